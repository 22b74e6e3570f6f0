//! Linear layers behind one trait, so a dense layer, an f16-weight layer, a 4-bit layer and
//! candle's GGML formats are interchangeable in the model (the AWQ pass swaps them, checkpoints
//! decide which one is loaded). The trait is narrow; what only some layers can do (hand their
//! codes to a checkpoint writer, join a fused multi-weight GEMV, name their device buffers for
//! L2 prefetch hints) is a [`Capability`] the caller asks for.
pub mod dense;
pub mod ggml;
pub mod half;
pub mod int8;
pub mod quant;

pub use dense::DenseLinear;
pub use half::HalfLinear;
pub use int8::Int8Linear;
pub use quant::QuantLinear;

use crate::cuda::L2Prefetch;
use crate::quant::QuantizedWeight;
use candle_core::{Result, Tensor};
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
    /// What the layer offers beyond [`LinearLayer::forward`].
    fn capability(&self) -> Capability<'_> {
        Capability::Plain
    }
}

/// The optional capabilities of a linear layer.
#[derive(Debug, Clone, Copy)]
pub enum Capability<'a> {
    /// Nothing beyond `forward`.
    Plain,
    /// A full-precision weight that `forward` reads whole: on a GPU, L2 prefetch hints can
    /// name it.
    StreamedWeight(&'a Tensor),
    /// A group-quantized layer: its integer codes for checkpoints, and on CUDA the fused
    /// multi-weight GEMV and a GEMV that prefetches the next layer's weights.
    Quantized(&'a QuantLinear),
}

pub type Linear = Arc<dyn LinearLayer>;

/// The integer codes, zeros and scales of a quantized layer (`None` for other layers; an error
/// where they cannot be read back, e.g. from a failing device).
pub fn quantized_weight(layer: &Linear) -> Result<Option<QuantizedWeight>> {
    match layer.capability() {
        Capability::Quantized(q) => q.quantized().map(Some),
        _ => Ok(None),
    }
}

/// The L2 prefetch hint for the weights of `layers` (see [`crate::cuda::prefetch`]): empty
/// unless they live on a CUDA device.
pub fn prefetch_hint(layers: &[&Linear]) -> L2Prefetch {
    let mut buffers: Vec<Tensor> = Vec::new();
    for l in layers {
        match l.capability() {
            Capability::StreamedWeight(w) if w.device().is_cuda() => buffers.push(w.clone()),
            Capability::Quantized(q) => buffers.extend(q.device_buffers()),
            _ => {}
        }
    }
    L2Prefetch::of(&buffers)
}

/// `layer.forward(x)`, pulling `next` (the next layer's weights) into L2 as the kernel finishes
/// where it can (the 4-bit GEMV on CUDA).
pub fn forward_hinted(layer: &Linear, x: &Tensor, next: &L2Prefetch) -> Result<Tensor> {
    match layer.capability() {
        Capability::Quantized(q) => q.forward_prefetch(x, next),
        _ => layer.forward(x),
    }
}

/// `x` through several layers that share it (q/k/v, gate/up): one fused launch where the layers'
/// kernels allow it (4-bit weights on CUDA, few tokens), else one forward per layer; `next` as
/// in [`forward_hinted`].
pub fn forward_shared(layers: &[&Linear], x: &Tensor, next: &L2Prefetch) -> Result<Vec<Tensor>> {
    let quant: Option<Vec<&QuantLinear>> = layers
        .iter()
        .map(|l| match l.capability() {
            Capability::Quantized(q) => Some(q),
            _ => None,
        })
        .collect();
    if let Some(out) = quant.map(|q| QuantLinear::forward_fused(&q, x, next)).transpose()?.flatten() {
        return Ok(out);
    }
    layers.iter().map(|l| forward_hinted(l, x, next)).collect()
}
