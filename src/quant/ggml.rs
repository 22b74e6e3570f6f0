//! candle's own quantized matmul (llama.cpp's Q4_0 / Q4K formats) behind the linear-layer trait,
//! so `awq-run bench --requant` can compare our W4A16 op with it on the same model.
use crate::error::{Error, Result};
use crate::model::linear::{Linear, LinearLayer};
use crate::model::Model;
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Module, Tensor};
use std::sync::Arc;

#[derive(Debug)]
pub struct GgmlLinear {
    inner: QMatMul,
    bias: Option<Tensor>,
    n: usize,
    k: usize,
    weight: Tensor,
}

impl LinearLayer for GgmlLinear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = self.inner.forward(x)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
    fn in_features(&self) -> usize {
        self.k
    }
    fn out_features(&self) -> usize {
        self.n
    }
    fn dense_weight(&self) -> candle_core::Result<Tensor> {
        Ok(self.weight.clone())
    }
    fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
    fn kind(&self) -> &'static str {
        "ggml"
    }
}

pub fn parse_ggml_dtype(s: &str) -> Result<GgmlDType> {
    match s {
        "q4_0" => Ok(GgmlDType::Q4_0),
        "q4k" | "q4_k" => Ok(GgmlDType::Q4K),
        "q8_0" => Ok(GgmlDType::Q8_0),
        other => Err(Error::msg(format!("--requant {other}: expected q4_0, q4k or q8_0"))),
    }
}

fn requant(l: &Linear, dt: GgmlDType) -> Result<Linear> {
    let w = l.dense_weight()?;
    let q = QTensor::quantize(&w.to_dtype(candle_core::DType::F32)?, dt)?;
    // The dequantized copy is only kept for `dense_weight`; drop it to keep memory honest.
    let weight = Tensor::zeros((1, 1), candle_core::DType::F32, w.device())?;
    Ok(Arc::new(GgmlLinear { inner: QMatMul::from_qtensor(q)?, bias: l.bias().cloned(), n: l.out_features(), k: l.in_features(), weight }))
}

/// Replaces every decoder linear of `model` with candle's quantized matmul of type `dt`.
pub fn requantize_model(model: &mut Model, dt: GgmlDType) -> Result<()> {
    for b in model.layers.iter_mut() {
        let a = &mut b.self_attn;
        for l in [&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.o_proj] {
            *l = requant(l, dt)?;
        }
        let m = &mut b.mlp;
        for l in [&mut m.gate_proj, &mut m.up_proj, &mut m.down_proj] {
            *l = requant(l, dt)?;
        }
    }
    Ok(())
}
