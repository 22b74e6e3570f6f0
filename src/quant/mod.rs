//! Quantization: the group quantizer, the AWQ GEMM packing and quantized linear layers.
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod ggml;
pub mod half;
pub mod linear;
pub mod pack;
pub mod prefetch;
pub mod quantizer;
pub mod tiled;

pub use half::HalfLinear;
pub use linear::QuantLinear;
pub use pack::QuantizedWeight;
pub use prefetch::L2Prefetch;
pub use quantizer::{fake_quantize, quantize_codes, QuantParams};
