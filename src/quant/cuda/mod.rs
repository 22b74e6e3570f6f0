//! The CUDA kernels of the 4-bit linear (`w4a16.cu`, `w4a16_sm90.cu`, `w4a16_skinny.cu`,
//! `w4a16_skinny_sm90.cu`) and
//! their thin wrappers ([`kernels`], `skinny`, built with the `cuda` feature), and their launch shapes ([`launch`], always
//! built so that they are unit-tested on any machine).
pub mod launch;

#[cfg(feature = "cuda")]
mod kernels;
#[cfg(feature = "cuda")]
pub use kernels::*;
#[cfg(feature = "cuda")]
mod skinny;
#[cfg(feature = "cuda")]
pub use skinny::{skinny_capable, skinny_default_kernel, skinny_kernels_built, skinny_many, skinny_many_with, skinny_max_tokens, skinny_supported, skinny_wgmma_available, skinny_wgmma_variant, SkinnyKernel};
