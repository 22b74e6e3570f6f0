//! Activations quantized to int8 for the integer kernels (W4A8, and the 8-bit head): per token
//! and per block of 32, `d = max|x| / 127` and `q = round(x / d)`, so `x ≈ d · q` with an error
//! of at most `d / 2` per element.
//!
//! The int8 values are stored in the order the 4-bit kernels unpack weights: per pair of
//! 32-blocks (64 inputs `p·64 ..`), `[0..16, 32..48, 16..32, 48..64]`. One 32-byte load of the
//! packed codes of two chunks gives, after masking, the low nibbles of both chunks (weights
//! `0..16` and `32..48` of the pair) and, after a shift, the high nibbles (`16..32`, `48..64`);
//! the matching activations are then two plain 32-byte loads, and a 4-byte dot-product lane
//! always stays inside one 32-block. With `natural` order (the 8-bit head, whose codes are
//! plain bytes) no permutation is applied. A `k` that is not a multiple of 64 is padded with
//! zeros (scale 0) to the next pair.
#[derive(Debug, Clone)]
pub struct QuantizedActs {
    pub m: usize,
    pub k: usize,
    /// Pairs of 32-blocks per token (`ceil(k / 64)`).
    pub pairs: usize,
    /// `[m][pairs * 64]` int8, in kernel order.
    pub q: Vec<i8>,
    /// `[m][pairs][8]`: each pair's two block scales, each repeated four times (one per i32 lane
    /// of a 256-bit dot product: lanes 0–3 belong to the first block, 4–7 to the second).
    pub lane_scales: Vec<f32>,
    /// `[m][pairs * 2]`: per 32-block its scale `d`, side by side (for kernels that load the
    /// scales of several blocks as one vector).
    pub block_scales: Vec<f32>,
    /// `[m][pairs * 2]`: per 32-block `d · Σ q`, the block's quantized sum (for zero points).
    pub block_sums: Vec<f32>,
    /// `[m][pairs * 2]`: per 32-block `Σ q` as an integer (for the head's offset codes).
    pub block_qsums: Vec<i32>,
    /// `[m][pairs][8]` in kernel order only (empty in natural order): per i32 lane of a pair's
    /// two 256-bit dot products, `d · Σ q` over the eight values that lane multiplies, so a
    /// kernel subtracts the zero point's share per lane (`scale · zero · lane_sum`).
    pub lane_sums: Vec<f32>,
}

/// The fewest tokens one range of [`QuantizedActs::new`]'s work takes: calls with more are
/// spread over the pool.
const PARALLEL_TOKENS: usize = 32;

/// One token's share of a [`QuantizedActs`]' buffers.
struct TokenParts<'a> {
    q: &'a mut [i8],
    lane_scales: &'a mut [f32],
    block_scales: &'a mut [f32],
    block_sums: &'a mut [f32],
    block_qsums: &'a mut [i32],
    /// Empty in natural order.
    lane_sums: &'a mut [f32],
}

impl TokenParts<'_> {
    /// Quantizes one token's `xt` (`k` values) into its parts.
    fn quantize(self, xt: &[f32], natural: bool) {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: both features were just detected.
            return unsafe { self.quantize_avx2(xt, natural) };
        }
        self.quantize_any(xt, natural)
    }

    /// [`Self::quantize_any`] with each block of 32 rounded by AVX2 intrinsics (the compiler
    /// left the portable loop's max and saturating casts scalar: 7 % of a 512-token prefill); the
    /// same operations in the same order, so the same bytes.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn quantize_avx2(mut self, xt: &[f32], natural: bool) {
        let mut block = [0i8; 32];
        for (b, xb) in xt.chunks_exact(32).enumerate() {
            let (d, s) = x86::round_block(xb.try_into().expect("32 values"), &mut block);
            self.store_block(b, &block, d, s, natural);
        }
        self.finish(natural);
    }

    fn quantize_any(mut self, xt: &[f32], natural: bool) {
        let mut block = [0i8; 32];
        for (b, xb) in xt.chunks_exact(32).enumerate() {
            let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
            let d = amax / 127.0;
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            let mut s = 0i32;
            for (dst, v) in block.iter_mut().zip(xb) {
                // Round half away from zero (what `f32::round` does, which without SSE4.1 is a
                // libm call per value). |v · inv| ≤ 127 up to rounding; the clamp guards that.
                let y = (v * inv).clamp(-127.0, 127.0);
                let r = (y + 0.5f32.copysign(y)) as i8;
                *dst = r;
                s += i32::from(r);
            }
            self.store_block(b, &block, d, s, natural);
        }
        self.finish(natural);
    }

    /// Block `b`'s rounded values, scale `d` and integer sum `s` into their places.
    #[inline(always)]
    fn store_block(&mut self, b: usize, block: &[i8; 32], d: f32, s: i32, natural: bool) {
        let (p, half) = (b / 2, b % 2);
        let pair = &mut self.q[p * 64..][..64];
        if natural {
            pair[half * 32..][..32].copy_from_slice(block);
        } else {
            // `pair_slot` by halves of 16: the first block's 0..16 and 16..32 go to 0..16 and
            // 32..48, the second's to 16..32 and 48..64.
            pair[half * 16..][..16].copy_from_slice(&block[..16]);
            pair[32 + half * 16..][..16].copy_from_slice(&block[16..]);
        }
        self.lane_scales[p * 8 + half * 4..][..4].fill(d);
        self.block_scales[b] = d;
        self.block_sums[b] = d * s as f32;
        self.block_qsums[b] = s;
    }

    /// The lane sums of the kernel order, once every block is stored.
    #[inline(always)]
    fn finish(self, natural: bool) {
        if natural {
            return;
        }
        for (pair, (sums, scales)) in self.q.chunks_exact(64).zip(self.lane_sums.chunks_exact_mut(8).zip(self.lane_scales.chunks_exact(8))) {
            for (i, (sum, d)) in sums.iter_mut().zip(scales).enumerate() {
                let s: i32 = pair[4 * i..4 * i + 4].iter().chain(&pair[32 + 4 * i..32 + 4 * i + 4]).map(|&v| i32::from(v)).sum();
                *sum = d * s as f32;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// One block of 32 as [`super::TokenParts::quantize_any`] rounds it: `out` gets
    /// `round_half_away(clamp(x / d, ±127))` with `d = max|x| / 127`; returns `d` and the sum of
    /// `out`.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn round_block(x: &[f32; 32], out: &mut [i8; 32]) -> (f32, i32) {
        let sign = _mm256_set1_ps(-0.0);
        let v: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(x.as_ptr().add(i * 8)));
        let abs = |a: __m256| _mm256_andnot_ps(sign, a);
        let m = _mm256_max_ps(_mm256_max_ps(abs(v[0]), abs(v[1])), _mm256_max_ps(abs(v[2]), abs(v[3])));
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
        let d = amax / 127.0;
        let inv = _mm256_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
        let (lo, hi, half) = (_mm256_set1_ps(-127.0), _mm256_set1_ps(127.0), _mm256_set1_ps(0.5));
        let r: [__m256i; 4] = std::array::from_fn(|i| {
            let y = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(v[i], inv), lo), hi);
            // y + copysign(0.5, y), truncated toward zero: Rust's `as` after the same add.
            _mm256_cvttps_epi32(_mm256_add_ps(y, _mm256_or_ps(half, _mm256_and_ps(y, sign))))
        });
        let sum = _mm256_add_epi32(_mm256_add_epi32(r[0], r[1]), _mm256_add_epi32(r[2], r[3]));
        let sum = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
        let sum = _mm_add_epi32(sum, _mm_shuffle_epi32(sum, 0b01_00_11_10));
        let sum = _mm_add_epi32(sum, _mm_shuffle_epi32(sum, 0b10_11_00_01));
        // Packing works within 128-bit halves: the dword permutation puts the bytes back in order.
        let bytes = _mm256_packs_epi16(_mm256_packs_epi32(r[0], r[1]), _mm256_packs_epi32(r[2], r[3]));
        let bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(out.as_mut_ptr() as *mut __m256i, bytes);
        (d, _mm_cvtsi128_si32(sum))
    }
}

/// The buffers of a [`QuantizedActs`] as raw pointers, handed to the pool's tasks by copy.
#[derive(Clone, Copy)]
struct SendParts {
    q: *mut i8,
    lane_scales: *mut f32,
    block_scales: *mut f32,
    block_sums: *mut f32,
    block_qsums: *mut i32,
    lane_sums: *mut f32,
    pairs: usize,
    natural: bool,
}
// SAFETY: tasks write disjoint tokens' parts of buffers that outlive the pool call.
unsafe impl Send for SendParts {}
unsafe impl Sync for SendParts {}

impl SendParts {
    fn of(a: &mut QuantizedActs) -> Self {
        Self {
            q: a.q.as_mut_ptr(),
            lane_scales: a.lane_scales.as_mut_ptr(),
            block_scales: a.block_scales.as_mut_ptr(),
            block_sums: a.block_sums.as_mut_ptr(),
            block_qsums: a.block_qsums.as_mut_ptr(),
            lane_sums: a.lane_sums.as_mut_ptr(),
            pairs: a.pairs,
            natural: a.lane_sums.is_empty(),
        }
    }

    /// Token `t`'s parts.
    ///
    /// # Safety
    /// `t` is below the token count and no other live `TokenParts` is of token `t`.
    unsafe fn token<'a>(self, t: usize) -> TokenParts<'a> {
        use std::slice::from_raw_parts_mut as part;
        let p = self.pairs;
        TokenParts {
            q: part(self.q.add(t * p * 64), p * 64),
            lane_scales: part(self.lane_scales.add(t * p * 8), p * 8),
            block_scales: part(self.block_scales.add(t * p * 2), p * 2),
            block_sums: part(self.block_sums.add(t * p * 2), p * 2),
            block_qsums: part(self.block_qsums.add(t * p * 2), p * 2),
            lane_sums: if self.natural { &mut [] } else { part(self.lane_sums.add(t * p * 8), p * 8) },
        }
    }
}

/// Per token of a tile, [`QuantizedActs::tile_rows`].
pub struct TileRows<const T: usize> {
    pub q: [*const i8; T],
    pub scales: [*const f32; T],
    pub sums: [*const f32; T],
    pub qsums: [*const i32; T],
}

/// Where element `j` (0..64) of a pair is stored in the kernel order.
#[inline]
pub fn pair_slot(j: usize) -> usize {
    match j {
        0..=15 => j,
        16..=31 => j + 16,
        32..=47 => j - 16,
        _ => j,
    }
}

impl QuantizedActs {
    /// Quantizes `x` (`[m][k]`, `k` a multiple of 32), in the 4-bit kernels' order or in
    /// `natural` order.
    pub fn new(x: &[f32], m: usize, k: usize, natural: bool) -> Self {
        assert!(k.is_multiple_of(32) && x.len() == m * k, "activations: {} values for {m} × {k}", x.len());
        let pairs = k.div_ceil(64);
        let mut a = Self {
            m,
            k,
            pairs,
            q: vec![0i8; m * pairs * 64],
            lane_scales: vec![0f32; m * pairs * 8],
            block_scales: vec![0f32; m * pairs * 2],
            block_sums: vec![0f32; m * pairs * 2],
            block_qsums: vec![0i32; m * pairs * 2],
            lane_sums: if natural { Vec::new() } else { vec![0f32; m * pairs * 8] },
        };
        // A prompt's worth of tokens is quantized on the pool's threads, one range of tokens per
        // task (alone on the calling thread this was 5 % of a 512-token prefill, the other
        // threads idle); fewer than PARALLEL_TOKENS make one range, run on the calling thread.
        let parts = SendParts::of(&mut a);
        super::pool::for_ranges(m, PARALLEL_TOKENS, |ts| {
            for t in ts {
                // SAFETY: every task takes its own tokens' parts of the buffers, which outlive
                // the call.
                unsafe { parts.token(t) }.quantize(&x[t * k..(t + 1) * k], natural);
            }
        });
        a
    }

    /// Token `t`'s int8 values (`pairs * 64`).
    pub fn token(&self, t: usize) -> &[i8] {
        &self.q[t * self.pairs * 64..(t + 1) * self.pairs * 64]
    }
    pub fn token_lane_scales(&self, t: usize) -> &[f32] {
        &self.lane_scales[t * self.pairs * 8..(t + 1) * self.pairs * 8]
    }
    pub fn token_block_scales(&self, t: usize) -> &[f32] {
        &self.block_scales[t * self.pairs * 2..(t + 1) * self.pairs * 2]
    }
    pub fn token_block_sums(&self, t: usize) -> &[f32] {
        &self.block_sums[t * self.pairs * 2..(t + 1) * self.pairs * 2]
    }
    pub fn token_lane_sums(&self, t: usize) -> &[f32] {
        &self.lane_sums[t * self.pairs * 8..(t + 1) * self.pairs * 8]
    }
    pub fn token_block_qsums(&self, t: usize) -> &[i32] {
        &self.block_qsums[t * self.pairs * 2..(t + 1) * self.pairs * 2]
    }
    /// For tokens `t0 .. t0 + T`, where the panel kernels' inner loops read: each token's
    /// values and its first `blocks` 32-block scales, `d·Σq` and `Σq` (every slice checked once,
    /// here).
    pub fn tile_rows<const T: usize>(&self, t0: usize, blocks: usize) -> TileRows<T> {
        TileRows {
            q: std::array::from_fn(|t| self.token(t0 + t).as_ptr()),
            scales: std::array::from_fn(|t| self.token_block_scales(t0 + t)[..blocks].as_ptr()),
            sums: std::array::from_fn(|t| self.token_block_sums(t0 + t)[..blocks].as_ptr()),
            qsums: std::array::from_fn(|t| self.token_block_qsums(t0 + t)[..blocks].as_ptr()),
        }
    }
    /// The scale of 32-block `b` of token `t`.
    pub fn block_scale(&self, t: usize, b: usize) -> f32 {
        self.block_scales[t * self.pairs * 2 + b]
    }
    /// The dequantized value of element `i` of token `t` (for references and tests).
    pub fn value(&self, t: usize, i: usize, natural: bool) -> f32 {
        let (p, j) = (i / 64, i % 64);
        let slot = if natural { j } else { pair_slot(j) };
        self.block_scale(t, i / 32) * f32::from(self.q[t * self.pairs * 64 + p * 64 + slot])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn pair_slots_are_a_permutation() {
        let mut seen = [false; 64];
        for j in 0..64 {
            assert!(!std::mem::replace(&mut seen[pair_slot(j)], true));
        }
    }

    #[test]
    fn values_are_within_half_a_step_and_sums_match() {
        let mut rng = Rng::new(7);
        for &(m, k) in &[(1usize, 32usize), (3, 96), (2, 576), (37, 96), (40, 576)] {
            let mut x: Vec<f32> = (0..m * k).map(|_| rng.normal() * 3.0).collect();
            x[5] = 0.0;
            if k == 96 {
                x[32..64].fill(0.0); // an all-zero block: scale 0, values 0
            }
            for natural in [false, true] {
                let a = QuantizedActs::new(&x, m, k, natural);
                for t in 0..m {
                    for i in 0..k {
                        let d = a.block_scale(t, i / 32);
                        assert!((a.value(t, i, natural) - x[t * k + i]).abs() <= d * 0.5 + 1e-6, "t={t} i={i}");
                    }
                    for b in 0..k / 32 {
                        let s: f32 = (b * 32..(b + 1) * 32).map(|i| a.value(t, i, natural)).sum();
                        assert!((a.token_block_sums(t)[b] - s).abs() <= 1e-4 * (1.0 + s.abs()));
                    }
                }
            }
        }
    }

    /// Many tokens (spread over the pool) give exactly what each token gives alone.
    #[test]
    fn many_tokens_match_one_at_a_time() {
        let mut rng = Rng::new(9);
        for &(m, k) in &[(PARALLEL_TOKENS + 1, 96usize), (71, 576), (33, 32)] {
            let x: Vec<f32> = (0..m * k).map(|_| rng.normal()).collect();
            for natural in [false, true] {
                let all = QuantizedActs::new(&x, m, k, natural);
                for t in 0..m {
                    let one = QuantizedActs::new(&x[t * k..(t + 1) * k], 1, k, natural);
                    assert_eq!(all.token(t), one.token(0), "m={m} k={k} t={t}");
                    assert_eq!(all.token_lane_scales(t), one.token_lane_scales(0));
                    assert_eq!(all.token_block_sums(t), one.token_block_sums(0));
                    let p = all.pairs;
                    assert_eq!(all.block_qsums[t * p * 2..(t + 1) * p * 2], one.block_qsums[..]);
                    assert_eq!(all.lane_sums.get(t * p * 8..(t + 1) * p * 8).unwrap_or(&[]), &one.lane_sums[..]);
                }
            }
        }
    }

    /// The AVX2 rounding against the portable loop, byte for byte: random blocks, blocks of
    /// exact half steps (ties round away from zero), an all-zero block, and huge values.
    #[test]
    fn the_avx2_path_rounds_like_the_portable_loop() {
        if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
            eprintln!("skipped: this CPU has no AVX2/FMA");
            return;
        }
        let mut rng = Rng::new(3);
        let mut x: Vec<f32> = (0..32 * 40).map(|_| rng.normal() * 2.0).collect();
        for (i, v) in x[32..64].iter_mut().enumerate() {
            *v = (i as f32 - 16.0) * 0.5; // max 7.5: steps of 0.5 / (7.5 / 127), many ties
        }
        x[64..96].fill(0.0);
        x[96] = 3.0e38;
        x[97] = -3.0e38;
        for natural in [false, true] {
            let (m, k) = (5, 32 * 8);
            let mut a = QuantizedActs::new(&x, m, k, natural);
            let mut b = a.clone();
            let (pa, pb) = (SendParts::of(&mut a), SendParts::of(&mut b));
            for t in 0..m {
                // SAFETY: t < m, one token's parts at a time; AVX2 and FMA were detected above.
                unsafe {
                    pa.token(t).quantize_any(&x[t * k..(t + 1) * k], natural);
                    pb.token(t).quantize_avx2(&x[t * k..(t + 1) * k], natural);
                }
            }
            assert_eq!(a.q, b.q);
            assert_eq!(a.lane_scales, b.lane_scales);
            assert_eq!(a.block_qsums, b.block_qsums);
            assert_eq!(a.block_scales, b.block_scales);
            assert_eq!(a.block_sums, b.block_sums);
            assert_eq!(a.lane_sums, b.lane_sums);
        }
    }
}
