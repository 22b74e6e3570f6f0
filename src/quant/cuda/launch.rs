//! Launch shapes of the GEMV kernels, as pure functions of the weight and the device's
//! residency, so they are unit-tested without a GPU.

/// Slices of k per GEMV launch: as many as fit the grid into one wave of resident blocks
/// (`resident` = SMs x blocks per SM), rounded down. A 4096-row layer has only 64 row ranges of
/// 64, a few SMs' worth, and an 11008-row one 172: 1.3 blocks per SM unsplit, leaving SMs idle for
/// a third of the launch (measured with Nsight Compute on an H100); three slices of 4-warp blocks,
/// four resident per SM, fill one wave. At most 8 slices; each slice keeps at least one k16 step
/// per warp.
pub fn gemv_splits(blocks: usize, ksteps: usize, resident: usize) -> usize {
    (resident / blocks.max(1)).clamp(1, (ksteps / 4).clamp(1, MAX_GEMV_SPLITS))
}

/// Launch shape of the batch-1 GEMV, `(warps per block, k slices)`, for `blocks` row ranges of
/// 64, `groups` quantization groups along k and `resident_warps` the GPU holds at once: 8-warp
/// blocks while they fit one wave, else 4; then as many k slices as keep one wave, at most 8 and
/// at most one per group of each warp. On an H100 (BENCHMARKS.md) this picks the best of the
/// split sweep at Llama-2-7B's shapes: one slice of 8-warp blocks at 11008 rows, four at 4096
/// rows (k 4096 or 11008), one slice of 4-warp blocks at 32000 rows. Each slice adds a fixed
/// cost (the partial sums' round trip), so slices only fill the GPU.
pub fn gemv1_launch(blocks: usize, groups: usize, resident_warps: usize) -> (usize, usize) {
    let warps = if blocks * 8 <= resident_warps { 8 } else { 4 };
    let splits = (resident_warps / (blocks * warps).max(1)).clamp(1, (groups / warps).clamp(1, MAX_GEMV_SPLITS));
    (warps, splits)
}

/// Most k slices of a GEMV launch (see [`gemv_splits`]).
pub const MAX_GEMV_SPLITS: usize = 8;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_fill_one_wave_on_an_h100() {
        // 132 SMs, four resident 4-warp blocks each.
        assert_eq!(gemv_splits(172, 256, 528), 3); // 11008 rows
        assert_eq!(gemv_splits(64, 256, 528), 8); // 4096 rows
        assert_eq!(gemv_splits(500, 256, 528), 1); // 32000 rows
        assert_eq!(gemv_splits(344, 256, 528), 1); // gate + up of 11008 each
        assert_eq!(gemv_splits(3, 4, 528), 1); // tiny k: one k16 step per warp at least
        assert_eq!(gemv_splits(8, 1024, 528), MAX_GEMV_SPLITS);
    }

    #[test]
    fn batch1_launch_fills_one_wave() {
        // An H100: 132 SMs x 16 warps. (row ranges, groups) of Llama-2-7B's GEMVs at g = 128.
        let h100 = 132 * 16;
        assert_eq!(gemv1_launch(172, 32, h100), (8, 1)); // gate or up
        assert_eq!(gemv1_launch(64, 32, h100), (8, 4)); // o
        assert_eq!(gemv1_launch(64, 86, h100), (8, 4)); // down (k = 11008)
        assert_eq!(gemv1_launch(500, 32, h100), (4, 1)); // lm_head
        assert_eq!(gemv1_launch(192, 32, h100), (8, 1)); // q, k, v in one launch
        assert_eq!(gemv1_launch(344, 32, h100), (4, 1)); // gate and up in one launch
        assert_eq!(gemv1_launch(9, 9, h100), (8, 1)); // SmolLM2 at g = 64: a slice needs a group per warp
        assert_eq!(gemv1_launch(3, 1, 16), (4, 1)); // a tiny GPU
    }
}
