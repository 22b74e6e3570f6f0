//! CUDA plumbing shared by every kernel wrapper (the 4-bit GEMV/GEMMs in `quant::cuda`, the
//! fused decode kernels in `model::cuda`, the decode graph): raw device pointers, the device's
//! limits read once, occupancy, the dtype dispatch of a launch, L2 prefetch hints ([`prefetch`])
//! and the self-test's output poisoning. `common.cuh` beside this file is the device-side half.
//! Nothing here knows about layers or models.
pub mod prefetch;

pub use prefetch::L2Prefetch;

use candle_core::DType;

/// The name suffix of the crate's kernels instantiated for `dt` (f16, bf16, f32; none else).
pub fn kernel_suffix(dt: DType) -> Option<&'static str> {
    match dt {
        DType::F16 => Some("f16"),
        DType::BF16 => Some("bf16"),
        DType::F32 => Some("f32"),
        _ => None,
    }
}

/// [`kernel_suffix`], or an error naming `what` and the dtype.
pub fn suffix_for(what: &str, dt: DType) -> candle_core::Result<&'static str> {
    match kernel_suffix(dt) {
        Some(s) => Ok(s),
        None => candle_core::bail!("{what}: CUDA kernels take f16, bf16 or f32 data, not {dt:?}"),
    }
}

/// Runs `$body` with `$t` bound to the Rust element type of the float dtype `$dt` (f16, bf16 or
/// f32), the one dispatch every kernel launch over activations needs; other dtypes are an error.
#[macro_export]
macro_rules! with_float_type {
    ($dt:expr, $t:ident => $body:expr) => {
        match $dt {
            candle_core::DType::F16 => {
                type $t = half::f16;
                $body
            }
            candle_core::DType::BF16 => {
                type $t = half::bf16;
                $body
            }
            candle_core::DType::F32 => {
                type $t = f32;
                $body
            }
            dt => candle_core::bail!("CUDA kernels take f16, bf16 or f32 data, not {dt:?}"),
        }
    };
}

/// Poisoning of kernel outputs, a hook for the self-test: while it is on, the wrappers fill each
/// output buffer with NaN before their kernel runs, so an element a kernel fails to write shows
/// up as a mismatch instead of passing with stale memory. Off for inference.
pub mod poison {
    use std::sync::atomic::{AtomicBool, Ordering};

    static ON: AtomicBool = AtomicBool::new(false);

    /// Turns poisoning on until the guard is dropped.
    pub fn enable() -> Guard {
        ON.store(true, Ordering::SeqCst);
        Guard
    }

    pub fn enabled() -> bool {
        ON.load(Ordering::Relaxed)
    }

    pub struct Guard;

    impl Drop for Guard {
        fn drop(&mut self) {
            ON.store(false, Ordering::SeqCst);
        }
    }
}

#[cfg(feature = "cuda")]
mod device;
#[cfg(feature = "cuda")]
pub use device::*;
