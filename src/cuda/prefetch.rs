//! L2 prefetch hints for the decode step. At batch 1 a step alternates weight-streaming GEMVs with
//! small latency-bound kernels (norms, rope, attention, silu·mul) during which DRAM sits idle, and
//! every GEMV starts cold. Each kernel that precedes a GEMV therefore takes the device ranges of
//! that GEMV's weights and issues bulk L2 prefetches for them (fire and forget; `l2_prefetch` in
//! src/cuda/common.cuh), and each 4-bit GEMV, as its blocks finish, does the same for the next
//! GEMV's weights. A hint only moves reads earlier: results never depend on it.
use candle_core::Tensor;

/// Most ranges one hint carries (q/k/v codes and scales are six).
pub const MAX_RANGES: usize = 8;

/// Forward passes of at most this many tokens use hints (the GEMV's range; larger batches are
/// compute-bound GEMMs).
pub const HINT_MAX_TOKENS: usize = 8;

/// Device ranges to pull into L2; mirrors `L2Prefetch` in src/cuda/common.cuh (passed by value).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct L2Prefetch {
    ptr: [u64; MAX_RANGES],
    bytes: [u64; MAX_RANGES],
}

#[cfg(feature = "cuda")]
// SAFETY: plain old data with the C layout of the kernels' struct.
unsafe impl candle_core::cuda_backend::cudarc::driver::DeviceRepr for L2Prefetch {}

/// The default byte budget of one hint (see [`budget`]).
const DEFAULT_BUDGET_MB: usize = 8;

/// Bytes one hint may cover: `AWQ_RUN_L2_PREFETCH_MB` (0 turns hints off), else 8 MiB. On an
/// H100 (50 MB L2) 8 MiB beat 24 and 64 both for chained GEMVs and in decode: larger hints evict
/// weights the running GEMV has yet to read (BENCHMARKS.md).
pub fn budget() -> usize {
    use std::sync::OnceLock;
    static BUDGET: OnceLock<usize> = OnceLock::new();
    *BUDGET.get_or_init(|| {
        let mb = std::env::var("AWQ_RUN_L2_PREFETCH_MB").ok().and_then(|v| v.trim().parse::<usize>().ok());
        mb.unwrap_or(DEFAULT_BUDGET_MB) << 20
    })
}

impl L2Prefetch {
    /// No ranges: the kernels issue nothing.
    pub fn none() -> Self {
        Self::default()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.iter().all(|&b| b == 0)
    }

    /// Total bytes hinted.
    pub fn total_bytes(&self) -> u64 {
        self.bytes.iter().sum()
    }

    /// The leading parts of `ranges` (address, bytes), at most `budget` bytes in all, shared in
    /// proportion to the ranges' sizes (the GEMV reads all of its weights at once). Ranges beyond
    /// [`MAX_RANGES`], misaligned ones and empty ones are left out; sizes are cut to 16 bytes.
    pub fn from_ranges(ranges: &[(u64, u64)], budget: u64) -> Self {
        let mut out = Self::default();
        let usable: Vec<(u64, u64)> = ranges.iter().copied().filter(|&(p, b)| p % 16 == 0 && b >= 16).take(MAX_RANGES).collect();
        let total: u64 = usable.iter().map(|r| r.1).sum();
        if total == 0 || budget == 0 {
            return out;
        }
        for (i, &(p, b)) in usable.iter().enumerate() {
            let share = if total <= budget { b } else { (b as u128 * budget as u128 / total as u128) as u64 };
            out.ptr[i] = p;
            out.bytes[i] = share & !15;
        }
        out
    }

    /// The whole buffers of `tensors` (contiguous, on a CUDA device), within [`budget`] bytes.
    /// Anything else (CPU tensors, a build without CUDA) gives no hint.
    pub fn of(tensors: &[Tensor]) -> Self {
        Self::with_budget(tensors, budget() as u64)
    }

    /// As [`L2Prefetch::of`] within `budget` bytes (benchmarks compare sizes).
    pub fn with_budget(tensors: &[Tensor], budget: u64) -> Self {
        if budget == 0 || tensors.is_empty() {
            return Self::none();
        }
        #[cfg(feature = "cuda")]
        {
            let mut ranges = Vec::with_capacity(tensors.len());
            for t in tensors {
                let candle_core::Device::Cuda(dev) = t.device() else { return Self::none() };
                let Ok(p) = super::device_ptr(t, &dev.cuda_stream()) else { return Self::none() };
                ranges.push((p, (t.elem_count() * t.dtype().size_in_bytes()) as u64));
            }
            Self::from_ranges(&ranges, budget)
        }
        #[cfg(not(feature = "cuda"))]
        Self::none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_within_budget_are_whole() {
        let h = L2Prefetch::from_ranges(&[(256, 1000), (4096, 64)], 1 << 20);
        assert_eq!(h.ptr[..2], [256, 4096]);
        assert_eq!(h.bytes[..3], [992, 64, 0]);
    }

    #[test]
    fn budget_is_shared_in_proportion() {
        let h = L2Prefetch::from_ranges(&[(0, 3 << 20), (1 << 30, 1 << 20)], 1 << 20);
        assert_eq!(h.bytes[0], 3 << 18);
        assert_eq!(h.bytes[1], 1 << 18);
        assert!(h.total_bytes() <= 1 << 20);
    }

    #[test]
    fn misaligned_empty_and_surplus_ranges_are_dropped() {
        let mut ranges = vec![(8u64, 4096u64), (0, 0)];
        ranges.extend((0..10).map(|i| (i * 4096, 4096)));
        let h = L2Prefetch::from_ranges(&ranges, u64::MAX);
        assert_eq!(h.ptr[0], 0);
        assert_eq!(h.bytes.iter().filter(|&&b| b > 0).count(), MAX_RANGES);
        assert!(L2Prefetch::from_ranges(&ranges, 0).is_empty());
        assert!(L2Prefetch::none().is_empty());
    }
}
