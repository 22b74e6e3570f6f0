//! A full-precision linear layer; weight `[out, in]` in the activation dtype.
use super::{Capability, Linear, LinearLayer};
use candle_core::{Module, Result, Tensor};
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct DenseLinear {
    inner: candle_nn::Linear,
}

impl DenseLinear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { inner: candle_nn::Linear::new(weight, bias) }
    }

    /// The layer of checkpoint tensors `weight` `[out, in]` and optional `bias` under `vb`
    /// (e.g. `model.layers.0.self_attn.q_proj`).
    pub fn load(vb: candle_nn::VarBuilder, in_f: usize, out_f: usize, bias: bool) -> Result<Self> {
        let w = vb.get((out_f, in_f), "weight")?;
        let b = if bias { Some(vb.get(out_f, "bias")?) } else { None };
        Ok(Self::new(w, b))
    }

    pub fn weight(&self) -> &Tensor {
        self.inner.weight()
    }

    pub fn into_linear(self) -> Linear {
        Arc::new(self)
    }
}

impl LinearLayer for DenseLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.inner.forward(x)
    }
    fn in_features(&self) -> usize {
        self.inner.weight().dim(1).unwrap_or(0)
    }
    fn out_features(&self) -> usize {
        self.inner.weight().dim(0).unwrap_or(0)
    }
    fn dense_weight(&self) -> Result<Tensor> {
        Ok(self.inner.weight().clone())
    }
    fn bias(&self) -> Option<&Tensor> {
        self.inner.bias()
    }
    fn kind(&self) -> &'static str {
        "dense"
    }
    fn capability(&self) -> Capability<'_> {
        Capability::StreamedWeight(self.inner.weight())
    }
}
