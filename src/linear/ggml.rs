//! candle's own quantized matmul (llama.cpp's Q4_0 / Q4K / Q8_0 formats) behind the linear-layer
//! trait, so `awq-run bench --requant` can compare our W4A16 op with it on the same model.
use super::{Linear, LinearLayer};
use crate::error::{Error, Result};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use std::sync::Arc;

#[derive(Debug)]
pub struct GgmlLinear {
    /// The quantized weight `[out, in]`; `matmul` runs it.
    weight: Arc<QTensor>,
    matmul: QMatMul,
    bias: Option<Tensor>,
    device: Device,
}

impl GgmlLinear {
    /// `layer`'s effective weight re-quantized to `dt` (its bias kept as it is).
    pub fn requantize(layer: &Linear, dt: GgmlDType) -> Result<Self> {
        let w = layer.dense_weight()?;
        let device = w.device().clone();
        let weight = Arc::new(QTensor::quantize(&w.to_dtype(candle_core::DType::F32)?, dt)?);
        Ok(Self { matmul: QMatMul::from_arc(weight.clone())?, weight, bias: layer.bias().cloned(), device })
    }

    pub fn into_linear(self) -> Linear {
        Arc::new(self)
    }
}

impl LinearLayer for GgmlLinear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = self.matmul.forward(x)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
    fn in_features(&self) -> usize {
        self.weight.shape().dims().get(1).copied().unwrap_or(0)
    }
    fn out_features(&self) -> usize {
        self.weight.shape().dims().first().copied().unwrap_or(0)
    }
    /// Dequantized on demand: the layer keeps only the quantized blocks.
    fn dense_weight(&self) -> candle_core::Result<Tensor> {
        self.weight.dequantize(&self.device)
    }
    fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
    fn kind(&self) -> &'static str {
        "ggml"
    }
}

/// `--requant NAME`: the GGML block format it names.
pub fn parse_ggml_dtype(s: &str) -> Result<GgmlDType> {
    match s {
        "q4_0" => Ok(GgmlDType::Q4_0),
        "q4k" | "q4_k" => Ok(GgmlDType::Q4K),
        "q8_0" => Ok(GgmlDType::Q8_0),
        other => Err(Error::msg(format!("--requant {other}: expected q4_0, q4k or q8_0"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linear::DenseLinear;

    #[test]
    fn requantized_layer_keeps_its_shape_and_weight() {
        let mut rng = crate::rng::Rng::new(3);
        let w: Vec<f32> = (0..64 * 256).map(|_| rng.normal()).collect();
        let w = Tensor::from_vec(w, (64, 256), &Device::Cpu).unwrap();
        let dense = DenseLinear::new(w.clone(), None).into_linear();
        let q = GgmlLinear::requantize(&dense, GgmlDType::Q8_0).unwrap();
        assert_eq!((q.in_features(), q.out_features()), (256, 64));
        let back = q.dense_weight().unwrap();
        assert_eq!(back.dims(), &[64, 256]);
        let err = (back - &w).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(err < 0.05, "Q8_0 dequantized weight off by {err}");
    }
}
