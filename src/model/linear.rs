//! One trait for every linear layer, so a dense layer and a 4-bit layer are interchangeable in the
//! model (the AWQ pass swaps them, checkpoints decide which one is loaded).
use crate::quant::L2Prefetch;
use candle_core::{DType, Module, Result, Tensor};
use std::sync::Arc;

pub trait LinearLayer: std::fmt::Debug + Send + Sync {
    /// `x` is `[..., in_features]`; the result is `[..., out_features]` in `x`'s dtype.
    fn forward(&self, x: &Tensor) -> Result<Tensor>;
    fn in_features(&self) -> usize;
    fn out_features(&self) -> usize;
    /// The effective weight as a dense `[out, in]` tensor (dequantized for quantized layers).
    fn dense_weight(&self) -> Result<Tensor>;
    fn bias(&self) -> Option<&Tensor>;
    /// A short name of the implementation, for logs and reports.
    fn kind(&self) -> &'static str;
    /// The integer codes, zeros and scales of a quantized layer (`None` for other layers; an
    /// error where they cannot be read back, e.g. from a failing device).
    fn quantized(&self) -> Result<Option<crate::quant::QuantizedWeight>> {
        Ok(None)
    }
    /// The layer as a 4-bit [`crate::quant::QuantLinear`], for kernels that take several at once.
    fn as_quant(&self) -> Option<&crate::quant::QuantLinear> {
        None
    }
    /// The device buffers a forward pass streams (the weights), for L2 prefetch hints; empty
    /// where hints do not apply.
    fn device_buffers(&self) -> Vec<Tensor> {
        Vec::new()
    }
    /// [`LinearLayer::forward`], and where the kernel can (the 4-bit GEMV on CUDA), pulling the
    /// ranges of `next` (the next layer's weights) into L2 as it finishes.
    fn forward_prefetch(&self, x: &Tensor, next: &L2Prefetch) -> Result<Tensor> {
        let _ = next;
        self.forward(x)
    }
}

/// The L2 prefetch hint for the weights of `layers` (see [`crate::quant::prefetch`]).
pub fn prefetch_hint(layers: &[&Linear]) -> L2Prefetch {
    let buffers: Vec<Tensor> = layers.iter().flat_map(|l| l.device_buffers()).collect();
    L2Prefetch::of(&buffers)
}

/// `x` through several layers that share it (q/k/v, gate/up): one fused launch where the layers'
/// kernels allow it (4-bit weights on CUDA, few tokens), else one forward per layer.
pub fn forward_shared(layers: &[&Linear], x: &Tensor) -> Result<Vec<Tensor>> {
    forward_shared_prefetch(layers, x, &L2Prefetch::none())
}

/// [`forward_shared`], with `next` pulled into L2 by the fused kernel as it finishes.
pub fn forward_shared_prefetch(layers: &[&Linear], x: &Tensor, next: &L2Prefetch) -> Result<Vec<Tensor>> {
    if let Some(out) = crate::quant::linear::forward_fused(layers, x, next)? {
        return Ok(out);
    }
    layers.iter().map(|l| l.forward_prefetch(x, next)).collect()
}

pub type Linear = Arc<dyn LinearLayer>;

/// A full-precision linear layer; weight `[out, in]` in the activation dtype.
#[derive(Debug, Clone)]
pub struct DenseLinear {
    inner: candle_nn::Linear,
}

impl DenseLinear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { inner: candle_nn::Linear::new(weight, bias) }
    }
    pub fn weight(&self) -> &Tensor {
        self.inner.weight()
    }
    pub fn into_linear(self) -> Linear {
        Arc::new(self)
    }
    /// A copy with weight and bias converted to `dtype`.
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        let b = match self.inner.bias() {
            Some(b) => Some(b.to_dtype(dtype)?),
            None => None,
        };
        Ok(Self::new(self.inner.weight().to_dtype(dtype)?, b))
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
    fn device_buffers(&self) -> Vec<Tensor> {
        if self.inner.weight().device().is_cuda() {
            vec![self.inner.weight().clone()]
        } else {
            Vec::new()
        }
    }
}
