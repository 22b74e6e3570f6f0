//! Quantization formats and kernels, below any notion of a layer or a model: what a
//! quantization is ([`scheme`]), the group quantizer ([`quantizer`]), weight layouts
//! ([`format`]: plain codes, the AutoAWQ GEMM packing, the CPU and CUDA kernels' layouts) and the
//! kernels that read them ([`cpu`], [`cuda`]).
pub mod cpu;
pub mod cuda;
pub mod format;
pub mod quantizer;
pub mod scheme;

pub use format::{QuantizedWeight, WeightShape};
pub use quantizer::{fake_quantize, group_scale_zero, quantize_codes};
pub use scheme::{GroupSize, QuantScheme};
