//! The quantized linear layer: group-quantized integer codes with scales and zero points.
//!
//! Its forward multiplies by the dequantized weight, kept in the activation dtype.
use super::pack::QuantizedWeight;
use crate::model::linear::{DenseLinear, Linear, LinearLayer};
use candle_core::{DType, Device, Result, Tensor};
use std::sync::Arc;

#[derive(Debug)]
pub struct QuantLinear {
    q: QuantizedWeight,
    dense: DenseLinear,
}

impl QuantLinear {
    pub fn new(q: QuantizedWeight, bias: Option<Tensor>, dtype: DType, device: &Device) -> Result<Self> {
        let w = Tensor::from_vec(q.dequantize(), (q.out_features, q.in_features), device)?.to_dtype(dtype)?;
        let bias = bias.map(|b| b.to_dtype(dtype)).transpose()?;
        Ok(Self { q, dense: DenseLinear::new(w, bias) })
    }
    pub fn into_linear(self) -> Linear {
        Arc::new(self)
    }
}

impl LinearLayer for QuantLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.dense.forward(x)
    }
    fn in_features(&self) -> usize {
        self.q.in_features
    }
    fn out_features(&self) -> usize {
        self.q.out_features
    }
    fn dense_weight(&self) -> Result<Tensor> {
        self.dense.dense_weight()
    }
    fn bias(&self) -> Option<&Tensor> {
        self.dense.bias()
    }
    fn kind(&self) -> &'static str {
        "w-int-dequant"
    }
    fn quantized(&self) -> Option<&QuantizedWeight> {
        Some(&self.q)
    }
}
