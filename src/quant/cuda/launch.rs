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

/// Floats per token row of the GEMVs' cross-warp sums: 64 rows padded (GEMV_RED_STRIDE in
/// w4a16.cu).
pub const GEMV_RED_STRIDE: usize = 68;

/// Dynamic shared memory of a few-token GEMV block (w4_gemv1 in w4a16.cu): each of its `warps`
/// warps stages `m` tokens' activations of its share of the `k / g` groups, at most
/// ceil(groups / (splits x warps)), each token's row padded by 16 bytes (GEMV1_X_PAD); the
/// cross-warp sums reuse that memory at the end (`m` rows of GEMV_RED_STRIDE floats per warp).
pub fn gemv1_smem(k: usize, g: usize, m: usize, warps: usize, splits: usize) -> usize {
    let x = warps * m * ((k / g).div_ceil(warps * splits) * g * 2 + 16);
    x.max(warps * m * GEMV_RED_STRIDE * 4)
}

/// Launch shape of the few-token GEMV for `m` tokens, `(warps, k slices)`: [`gemv1_launch`]'s,
/// then more slices (each warp keeping a group at least), then 4-warp blocks, until the staged
/// activations fit `budget` bytes of shared memory; `None` where nothing fits (the ring kernel
/// runs instead).
pub fn gemv1_fit(k: usize, g: usize, m: usize, blocks: usize, resident_warps: usize, budget: usize) -> Option<(usize, usize)> {
    let groups = k / g;
    let (w, s) = gemv1_launch(blocks, groups, resident_warps);
    let more = |w: usize| (s..=(groups / w).max(s)).map(move |s| (w, s)).find(|&(w, s)| gemv1_smem(k, g, m, w, s) <= budget);
    more(w).or_else(|| more(4))
}

/// Most k slices of a GEMV launch (see [`gemv_splits`]).
pub const MAX_GEMV_SPLITS: usize = 8;

/// Most tokens the mma.sync skinny GEMM takes (w4a16_skinny.cu: 16, 32 or 64 token slots).
pub const SKINNY_MAX_TOKENS: usize = 64;
/// Most tokens the wgmma skinny GEMM takes (w4a16_skinny_sm90.cu: up to 128 token slots).
pub const SKINNY_WGMMA_MAX_TOKENS: usize = 128;
/// Rows per block of the skinny GEMM (SK_ROWS: 4 warps of 64).
pub const SKINNY_ROWS: usize = 256;

/// Whether the skinny GEMM takes weights of input width `k` and group size `g`: k in 64-wide
/// tiles, and one group per tile or two (g = 32).
pub fn skinny_shape_ok(k: usize, g: usize) -> bool {
    k > 0 && k.is_multiple_of(64) && (g == 32 || (g > 0 && g.is_multiple_of(64)))
}

/// The k-step groups (warps sharing 64 rows' k steps inside a block) the skinny GEMM is compiled
/// for at `mt` token slots (`SKINNY_ENTRY` in w4a16_skinny.cu: blocks of 128 · mt / 16 · kw
/// threads that fit the register file).
pub fn skinny_k_warps_built(mt: usize) -> &'static [usize] {
    match mt {
        16 => &[1, 2, 4],
        32 => &[1, 2],
        64 => &[1],
        _ => &[],
    }
}

/// Token slots of a skinny GEMM block for `m` tokens (128 from 65 on: the wgmma kernel's blocks,
/// in tiles beyond 128 tokens).
pub fn skinny_slots(m: usize) -> usize {
    match m {
        0..=16 => 16,
        17..=32 => 32,
        33..=64 => 64,
        _ => 128,
    }
}

/// Bytes of one skinny GEMM stage (`sk_stage_bytes` in w4_skinny.cuh): `mt` tokens' 64-wide x
/// tile, 16 weight units and two groups' (scale, zero) pairs of 256 rows.
pub fn skinny_stage_bytes(mt: usize) -> usize {
    mt * 128 + 16 * 512 + 2 * SKINNY_ROWS * 4
}

/// Bytes of a skinny GEMM block's sums at the end (`mt` rows of SK_RED_STRIDE = 260 floats),
/// which reuse the stages' shared memory.
fn skinny_sums_bytes(mt: usize) -> usize {
    mt * 260 * 4
}

/// Dynamic shared memory of an mma.sync skinny GEMM block (w4a16_skinny.cu: SK_STAGES = 4
/// stages, or the block's sums, whichever is more).
pub fn skinny_smem(mt: usize) -> usize {
    (4 * skinny_stage_bytes(mt)).max(skinny_sums_bytes(mt))
}

/// The (pipeline stages, overlap, blocks an SM) variants the wgmma skinny GEMM is built for at
/// `mt` token slots (`WGS_ENTRY` in w4a16_skinny_sm90.cu; overlap keeps a tile's wgmmas running
/// while the next is dequantized, where the MMAs are long enough to matter; two blocks an SM fit
/// 64 registers a thread only with the small accumulators of 16 and 32 slots).
pub fn skinny_wgmma_built(mt: usize) -> &'static [(usize, bool, usize)] {
    match mt {
        16 | 32 => &[(4, false, 1), (6, false, 1), (4, false, 2), (6, false, 2)],
        64 | 128 => &[(4, false, 1), (6, false, 1), (6, true, 1)],
        _ => &[],
    }
}
/// The wgmma skinny GEMM's default variant at `mt` token slots (H100, session 19): at 32 slots 6
/// stages and two blocks an SM (the batched step of 32 sequences 5.70 against 6.06 ms with one
/// block, though alone it wins only on 4096 × 11008: 21.1 against 21.9 µs at 32 tokens, and
/// loses on 11008 × 4096 and 4096²); at 128 slots 6 stages with overlap (4096 × 11008 at 96 /
/// 128 tokens 38.9 / 44.0 µs against 40.6 / 45.5, the step of 128 sequences 14.41 against 14.83
/// ms); at 16 slots the same as at 32 (session 27, see `skinny::skinny_wgmma_from`); else 4
/// stages, one block (at 64 slots the variants are within 2 %).
pub fn skinny_wgmma_default(mt: usize) -> (usize, bool, usize) {
    match mt {
        16 | 32 => (6, false, 2),
        128 => (6, true, 1),
        _ => (4, false, 1),
    }
}

/// A wgmma skinny GEMM variant as `AWQ_RUN_WGMMA_VARIANT` names it: the stages, then `o` for
/// overlap and `b` for two blocks an SM (`4`, `6o`, `4b`); None if it is not a number so followed.
pub fn parse_wgmma_variant(v: &str) -> Option<(usize, bool, usize)> {
    let digits = v.trim_end_matches(['o', 'b']);
    let flags = &v[digits.len()..];
    if flags.len() > 1 {
        return None;
    }
    Some((digits.parse().ok()?, flags == "o", if flags == "b" { 2 } else { 1 }))
}

/// Threads of a wgmma skinny GEMM block (WGS_THREADS: 4 warpgroups of 64 rows).
pub const SKINNY_WGMMA_THREADS: usize = 512;

/// Dynamic shared memory of a wgmma skinny GEMM block: `stages` of the mma.sync kernel's stages
/// (or the block's sums, whichever is more) and 1024 bytes to align them to the swizzle atoms.
pub fn skinny_wgmma_smem(mt: usize, stages: usize) -> usize {
    (stages * skinny_stage_bytes(mt)).max(skinny_sums_bytes(mt)) + 1024
}

/// k slices of a skinny GEMM launch: enough for two blocks per SM (`sms`), within one wave of
/// `resident` blocks, each slice at least 4 of the `ktiles` 64-wide tiles (the pipeline's
/// depth), at most [`SKINNY_MAX_SPLITS`]. Every slice adds its sums to the reduction that ends
/// the launch, so no more than needed to keep the weights streaming.
pub fn skinny_splits(blocks: usize, ktiles: usize, sms: usize, resident: usize) -> usize {
    let blocks = blocks.max(1);
    (2 * sms).div_ceil(blocks).min(resident / blocks).clamp(1, (ktiles / 4).clamp(1, SKINNY_MAX_SPLITS))
}

/// k slices of a wgmma skinny GEMM launch (512-thread blocks, `resident` of them at once): the
/// count whose blocks fill their waves best, less 0.03 a slice for the reduction each adds, each
/// slice at least 4 of the `ktiles` tiles, at most [`SKINNY_WGMMA_MAX_SPLITS`]. With one block
/// per SM the mma.sync rule (two blocks per SM within one wave) left 46 of 132 SMs idle on 22016
/// rows.
pub fn skinny_wgmma_splits(blocks: usize, ktiles: usize, resident: usize) -> usize {
    let (blocks, resident) = (blocks.max(1), resident.max(1));
    let most = (ktiles / 4).clamp(1, SKINNY_WGMMA_MAX_SPLITS);
    let score = |s: usize| {
        let waves = (blocks * s).div_ceil(resident);
        (blocks * s) as f64 / (waves * resident) as f64 - 0.03 * s as f64
    };
    (1..=most).fold(1, |best, s| if score(s) > score(best) + 1e-9 { s } else { best })
}

/// Most k slices of a skinny GEMM launch (SK_MAX_SPLITS in w4a16_skinny.cu).
pub const SKINNY_MAX_SPLITS: usize = 16;

/// Most k slices [`skinny_wgmma_splits`] plans. Up to session 26 it was 16, which two blocks an
/// SM (32 tokens) got for 16 row ranges; in session 27's sweep (H100, 16 to 128 tokens, the
/// GPU issue's shapes) 16 slices never beat 8, and at 32 tokens lost by 5 to 20 % (4096² 16.9
/// against 13.8 µs, 11008 × 4096 24.6 against 22.5).
pub const SKINNY_WGMMA_MAX_SPLITS: usize = 8;

/// Whether a skinny GEMM kernel with the cluster end runs `splits` k slices: one (no sums to
/// add) or a cluster size it is built for (`CLUSTER_SIZES` in w4a16_skinny_sm90.cu: 2, 4).
pub fn skinny_cluster_splits_ok(splits: usize) -> bool {
    matches!(splits, 1 | 2 | 4)
}

/// Most 64-wide k tiles a block of a cluster-end launch takes (see [`skinny_cluster_plan`]).
pub const SKINNY_CLUSTER_MAX_TILES: usize = 32;

/// The cluster size of a wgmma skinny launch whose global end would take `splits` slices of
/// `ktiles` k tiles, or None where the global end should run. A cluster adds its slices' sums in
/// shared memory, where the global end writes and reads 8 bytes an output and slice through L2
/// and the last block of each row range adds them alone; but clusters of 8 lost on an H100, so
/// a cluster takes 2 or 4 slices, fewer than the global end's, and its blocks take longer slices.
/// That pays where the sums' traffic is large beside the weights' (short k): measured on an H100
/// (BENCHMARKS.md, session 27) at 64 / 128 tokens, 4096² 16.8 / 22.7 µs against 20.8 / 34.1
/// (4 slices for 8), 4096 × 11008 27.4 / 37.1 against 28.9 / 44.4 (2 for 3), but 11008 × 4096
/// 35.9 / 49.9 against 30.7 / 48.7 (4 for 8: 43 tiles a block). So: the largest built size
/// up to `splits`, if its slices are at most [`SKINNY_CLUSTER_MAX_TILES`] tiles.
pub fn skinny_cluster_plan(splits: usize, ktiles: usize) -> Option<usize> {
    let size = match splits {
        0 | 1 => return None,
        2 | 3 => 2,
        _ => 4,
    };
    (ktiles.div_ceil(size) <= SKINNY_CLUSTER_MAX_TILES).then_some(size)
}

/// How the sm_90 GEMM (`w4a16_sm90.cu`) covers the output: `tokens` (256 or 128) a block, k cut
/// in `splits` (1 to [`SM90_MAX_SPLITS`]) whose sums the last block of each tile adds in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sm90Plan {
    pub tokens: usize,
    pub splits: usize,
}

impl std::fmt::Display for Sm90Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "t{}/s{}", self.tokens, self.splits)
    }
}

/// Most k splits of the sm_90 GEMM (SM90_MAX_SPLITS in w4a16_sm90.cu).
pub const SM90_MAX_SPLITS: usize = 4;

/// The sm_90 GEMM's plan for `m` tokens of a weight of `np` (padded) rows and `k` columns on a
/// device of `sms` SMs, splitting at most `max_split_tiles` tiles (the arrival counters): the one
/// a time model fitted to an H100 (BENCHMARKS.md, session 22) finds fastest. Time in units of one
/// 256-token block's k tile (about 0.84 µs): whole rounds of blocks over the SMs, each block its k
/// tiles plus 2 (its start and end); a 128-token block runs alone about 1.6 times slower per token
/// (two share an SM); the split sums cost their write and read, 8 bytes per output and split, at
/// about 3 TB/s. Splits only where the tiles are fewer than the SMs (measured: where they are
/// not, every split lost), so the 64 tiles of a 4096-row layer at 512 tokens split in two.
pub fn sm90_plan(m: usize, np: usize, k: usize, sms: usize, max_split_tiles: usize) -> Sm90Plan {
    const UNIT_US: f64 = 0.84;
    const BYTES_PER_US: f64 = 3e6;
    let ktiles = (k / 64).max(1);
    let mut best = (f64::INFINITY, Sm90Plan { tokens: 256, splits: 1 });
    for tokens in [256usize, 128] {
        let (scale, eff) = (tokens as f64 / 256.0, if tokens == 256 { 1.0 } else { 1.6 });
        let tiles = np.div_ceil(128) * m.div_ceil(tokens);
        let most = if tiles < sms && tiles <= max_split_tiles { SM90_MAX_SPLITS.min(ktiles) } else { 1 };
        for splits in 1..=most {
            let rounds = (tiles * splits).div_ceil(sms.max(1)) as f64;
            let traffic = if splits > 1 { (splits * tiles * tokens * 128 * 8) as f64 / (BYTES_PER_US * UNIT_US) } else { 0.0 };
            let time = rounds * scale * (ktiles.div_ceil(splits) as f64 * eff + 2.0) + traffic;
            if time < best.0 * 0.999 {
                best = (time, Sm90Plan { tokens, splits });
            }
        }
    }
    best.1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skinny_launches() {
        assert!(skinny_shape_ok(4096, 128) && skinny_shape_ok(576, 64) && skinny_shape_ok(11008, 32));
        assert!(!skinny_shape_ok(4096, 96) && !skinny_shape_ok(4000, 32) && !skinny_shape_ok(0, 64));
        assert_eq!((skinny_slots(9), skinny_slots(16), skinny_slots(17), skinny_slots(64), skinny_slots(65)), (16, 16, 32, 64, 128));
        assert!(skinny_k_warps_built(128).is_empty());
        // Every mma.sync slot count has the one-group kernel; no block passes 1024 threads.
        for mt in [16, 32, 64] {
            assert_eq!(skinny_k_warps_built(mt)[0], 1);
            assert!(skinny_k_warps_built(mt).iter().all(|kw| 128 * mt / 16 * kw <= 1024));
        }
        // Four stages of 64 tokens: 73.7 KB, three blocks per SM at most.
        assert_eq!(skinny_smem(64), 4 * (8192 + 8192 + 2048));
        // The shapes the plan was measured on (64-wide k tiles: 4096 is 64, 11008 is 172).
        assert_eq!((skinny_cluster_plan(8, 64), skinny_cluster_plan(3, 64), skinny_cluster_plan(8, 172)), (Some(4), Some(2), None));
        assert_eq!((skinny_cluster_plan(1, 64), skinny_cluster_plan(16, 128), skinny_cluster_plan(16, 129)), (None, Some(4), None));
        assert!([1, 2, 4].into_iter().all(skinny_cluster_splits_ok) && ![0, 3, 8].into_iter().any(skinny_cluster_splits_ok));
        assert!(skinny_smem(16) >= 16 * 260 * 4);
        // An H100 (132 SMs) holding two or four blocks per SM: 4096 rows (16 blocks) take 16
        // slices of k = 4096, 11008 rows (43 blocks) seven; a tiny k keeps one slice; a grid
        // already two blocks per SM keeps one.
        assert_eq!(skinny_splits(16, 64, 132, 264), 16);
        assert_eq!(skinny_splits(43, 64, 132, 528), 7);
        assert_eq!(skinny_splits(43, 64, 132, 264), 6);
        assert_eq!(skinny_splits(16, 172, 132, 528), 16);
        assert_eq!(skinny_splits(3, 9, 132, 264), 2);
        assert_eq!(skinny_splits(3, 2, 132, 264), 1);
        assert_eq!(skinny_splits(300, 64, 132, 264), 1);
        // The wgmma kernel's variants as AWQ_RUN_WGMMA_VARIANT names them.
        assert_eq!(parse_wgmma_variant("4"), Some((4, false, 1)));
        assert_eq!(parse_wgmma_variant("6o"), Some((6, true, 1)));
        assert_eq!(parse_wgmma_variant("4b"), Some((4, false, 2)));
        assert_eq!((parse_wgmma_variant("6ob"), parse_wgmma_variant("o"), parse_wgmma_variant("x4")), (None, None, None));
        // Every default variant is built.
        for mt in [16, 32, 64, 128] {
            assert!(skinny_wgmma_built(mt).contains(&skinny_wgmma_default(mt)));
        }
        // One block per SM of an H100: 11008, 4096, 12288 and 22016 rows.
        assert_eq!(skinny_wgmma_splits(43, 64, 132), 3);
        assert_eq!(skinny_wgmma_splits(16, 64, 132), 8);
        assert_eq!(skinny_wgmma_splits(16, 172, 132), 8);
        assert_eq!(skinny_wgmma_splits(48, 64, 132), 5);
        assert_eq!(skinny_wgmma_splits(86, 64, 132), 3);
        assert_eq!(skinny_wgmma_splits(3, 2, 132), 1);
        // Two blocks an SM (32 tokens): at most 8 slices.
        assert_eq!((skinny_wgmma_splits(16, 64, 264), skinny_wgmma_splits(43, 64, 264), skinny_wgmma_splits(48, 64, 264)), (8, 6, 5));
        // The wgmma kernel's stages stay 1024-aligned (its x tiles are 128-byte swizzle atoms).
        for mt in [16, 32, 64, 128] {
            assert_eq!(skinny_stage_bytes(mt) % 1024, 0);
            assert!(skinny_wgmma_smem(mt, 6) <= 227 * 1024);
        }
    }

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
    fn few_token_launches_fit_half_an_sm() {
        // An H100: 132 SMs x 16 warps, 227 KB of shared memory a block; two blocks per SM.
        let (h100, budget) = (132 * 16, 226 * 1024 / 2);
        // One token is staged whole: the batch-1 shapes of `batch1_launch_fills_one_wave`.
        assert_eq!(gemv1_fit(4096, 128, 1, 172, h100, budget), Some((8, 1)));
        assert_eq!(gemv1_smem(4096, 128, 1, 8, 1), 8 * (4 * 256 + 16));
        // 8 tokens of k = 11008: 11 groups a warp would take 181 KB, so two slices.
        assert_eq!(gemv1_fit(11008, 128, 8, 64, h100, budget).map(|(w, _)| w), Some(8));
        let (w, s) = gemv1_fit(11008, 128, 8, 172, h100, budget).unwrap();
        assert!(gemv1_smem(11008, 128, 8, w, s) <= budget && s >= 2, "{w} warps, {s} slices");
        // 16 tokens at 4096 x 11008 (the `_t16` kernel).
        let (w, s) = gemv1_fit(4096, 128, 16, 172, h100, budget).unwrap();
        assert!(gemv1_smem(4096, 128, 16, w, s) <= budget, "{w} warps, {s} slices");
        // The cross-warp sums need their room even when x is small.
        assert_eq!(gemv1_smem(64, 32, 16, 4, 1), 4 * 16 * 68 * 4);
        // Nothing fits a tiny budget: the ring kernel's turn.
        assert_eq!(gemv1_fit(4096, 128, 16, 172, h100, 1024), None);
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

    #[test]
    fn sm90_plans_fill_the_sms_and_stay_in_range() {
        // Prefill at 512 tokens on 132 SMs: a 4096-row layer (64 tiles of 256) is split in two,
        // as is the 11008-wide down projection's; an 11008-row one (172 tiles) is not split.
        assert_eq!(sm90_plan(512, 4096, 4096, 132, 1 << 16), Sm90Plan { tokens: 256, splits: 2 });
        assert_eq!(sm90_plan(512, 11008, 4096, 132, 1 << 16), Sm90Plan { tokens: 256, splits: 1 });
        assert_eq!(sm90_plan(512, 4096, 11008, 132, 1 << 16), Sm90Plan { tokens: 256, splits: 2 });
        assert_eq!(sm90_plan(1024, 4096, 4096, 132, 1 << 16), Sm90Plan { tokens: 256, splits: 1 });
        for m in [65usize, 129, 256, 512, 1000, 3584, 4096, 8192] {
            for (np, k) in [(4096usize, 4096usize), (11008, 4096), (4096, 11008), (192, 576), (128, 64)] {
                let p = sm90_plan(m, np, k, 132, 1 << 16);
                assert!(matches!(p.tokens, 128 | 256) && (1..=SM90_MAX_SPLITS.min(k / 64)).contains(&p.splits), "m={m} np={np} k={k}: {p}");
                // No split where the counters could not hold the tiles.
                assert_eq!(sm90_plan(m, np, k, 132, 1).splits, 1);
            }
        }
    }
}
