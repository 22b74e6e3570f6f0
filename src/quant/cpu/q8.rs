//! An 8-bit weight for the CPU (the lm_head of 4-bit models, which is otherwise their largest
//! read per token): per row and 32-block a symmetric f32 scale, `w = s · c` with
//! `c = round(w / s)` in −127..127, `s = max|w| / 127`. Multiplied as W8A8: activations quantized
//! per 32-block as for the 4-bit kernel (in natural order), integer dot products per block.
//!
//! **Layout: panels of eight rows.** For each panel and 32-block the codes are stored as eight
//! 32-byte words, word `j` holding bytes `4j .. 4j+4` of the block of each of the eight rows
//! (row `r` at bytes `4r ..`). One 4-byte piece of a token's activations, broadcast to the eight
//! lanes, meets word `j` in one `vpdpbusd` (`sdot` on NEON): lane `r` collects row `r`'s products,
//! and after the eight words lane `r` holds the block's exact dot product of row `r`. So a block
//! needs no horizontal reduction: with a row-major layout each row's eight lanes had to be summed
//! per block (by `hadd` chains), which held the head at eight tokens to about a third of the
//! integer units' rate; the block scales of a panel are eight consecutive floats, one vector.
//!
//! The codes are kept as `c + 128` (unsigned, the first operand of `vpdpbusd`); the sum of a
//! block then carries `128 · Σ q` of the token's block, which is subtracted once per block and
//! token (`QuantizedActs::token_block_qsums`). AVX2 (`vpmaddubsw` saturates i16 at u8 × i8) and
//! NEON (`sdot` is signed × signed) flip the codes back to `c` and use the sign trick
//! (`|c| · sign(q, c)`: two products of at most 127·127 fit i16) and `sdot` as they are.
use super::acts::QuantizedActs;
use super::w4a8::A8Path;
use rayon::prelude::*;

/// Rows of a panel.
pub const PANEL: usize = 8;

/// Tokens that share one pass over a panel's codes.
const TOKENS: usize = 8;

/// Tokens from which AVX512-VNNI CPUs multiply two panels at a time, in 512-bit vectors (as the
/// 4-bit decode kernel does, `w4_panel.rs`): half the instructions where the call is bound by
/// them; one token waits on memory and keeps one panel (one stream of codes) at a time.
const PAIR_MIN_TOKENS: usize = 6;

#[derive(Debug, Clone)]
pub struct Q8Weight {
    pub n: usize,
    pub k: usize,
    /// `[n/8 rounded up][k/32][8 words][8 rows][4]`, each code as `c + 128` (rows past `n` zero).
    codes: Vec<u8>,
    /// `[n/8 rounded up][k/32][8 rows]`.
    scales: Vec<f32>,
}

impl Q8Weight {
    /// Quantizes a row-major `[n][k]` weight given row by row by `row(o, buf)`; `k` must be a
    /// multiple of 32.
    pub fn quantize(n: usize, k: usize, row: impl Fn(usize, &mut [f32]) + Sync) -> Self {
        assert!(k.is_multiple_of(32), "8-bit weight: {k} columns, not a multiple of 32");
        let (panels, nb) = (n.div_ceil(PANEL), k / 32);
        // A padding row's codes are those of c = 0 and its scales 0.
        let mut codes = vec![128u8; panels * nb * 32 * PANEL];
        let mut scales = vec![0f32; panels * nb * PANEL];
        codes.par_chunks_mut(nb * 32 * PANEL).zip(scales.par_chunks_mut(nb * PANEL)).enumerate().for_each_init(
            || vec![0f32; k],
            |buf, (p, (c, s))| {
                for r in 0..PANEL.min(n - p * PANEL) {
                    row(p * PANEL + r, buf);
                    for (b, wb) in buf.chunks_exact(32).enumerate() {
                        let amax = wb.iter().fold(0f32, |a, v| a.max(v.abs()));
                        s[b * PANEL + r] = amax / 127.0;
                        let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
                        for (i, v) in wb.iter().enumerate() {
                            let q = (v * inv).round().clamp(-127.0, 127.0) as i8;
                            c[code_offset(b, r, i)] = (q as u8) ^ 0x80;
                        }
                    }
                }
            },
        );
        Self { n, k, codes, scales }
    }

    /// The code of row `o`, column `i`.
    pub fn code(&self, o: usize, i: usize) -> i8 {
        let panel = &self.codes[(o / PANEL) * (self.k / 32) * 32 * PANEL..];
        (panel[code_offset(i / 32, o % PANEL, i % 32)] ^ 0x80) as i8
    }

    /// The scale of row `o`, 32-block `b`.
    pub fn scale(&self, o: usize, b: usize) -> f32 {
        self.scales[((o / PANEL) * (self.k / 32) + b) * PANEL + o % PANEL]
    }

    pub fn dequantize_row(&self, o: usize, out: &mut [f32]) {
        for (i, v) in out.iter_mut().enumerate().take(self.k) {
            *v = self.scale(o, i / 32) * f32::from(self.code(o, i));
        }
    }

    /// `y[t][o]` for `m` tokens; `x` is `[m][k]`, `y` `[m][n]`.
    pub fn matmul(&self, x: &[f32], m: usize, path: A8Path) -> Vec<f32> {
        let (n, nb) = (self.n, self.k / 32);
        let acts = QuantizedActs::new(x, m, self.k, true);
        let path = path.or_scalar();
        let pairs = path == A8Path::Avx512Vnni && m >= PAIR_MIN_TOKENS;
        let panel = |p: usize| Panel { codes: &self.codes[p * nb * 32 * PANEL..][..nb * 32 * PANEL], scales: &self.scales[p * nb * PANEL..][..nb * PANEL] };
        super::par_output_blocks(
            m,
            n,
            if pairs { 2 * PANEL } else { PANEL },
            // The tile's outputs, once per task (zeroing them per block cost 5 % at one token).
            || [[0f32; 2 * PANEL]; TOKENS],
            |out, rows, dst| {
                let p = rows.start / PANEL;
                // A block of more than 8 rows reaches into the next panel (the last panel is
                // padded with zero rows).
                let (a, b) = (panel(p), (rows.len() > PANEL).then(|| panel(p + 1)));
                let mut t0 = 0;
                while t0 < m {
                    let tile = TOKENS.min(m - t0);
                    match &b {
                        Some(b) => pair_tile(&a, b, &acts, t0, tile, out),
                        None => panel_tile(path, &a, &acts, t0, tile, out),
                    }
                    for (t, o) in out[..tile].iter().enumerate() {
                        dst.put_run(t0 + t, rows.start, &o[..rows.len()]);
                    }
                    t0 += tile;
                }
            },
        )
    }
}

/// Where code `i` (0..32) of row `r` of 32-block `b` sits in a panel's codes.
#[inline]
fn code_offset(b: usize, r: usize, i: usize) -> usize {
    ((b * 8 + i / 4) * PANEL + r) * 4 + i % 4
}

/// One panel's codes and scales.
struct Panel<'a> {
    codes: &'a [u8],
    scales: &'a [f32],
}

/// Two panels on the AVX512-VNNI path: `out[t][r]` from `a` for `r < 8`, from `b` above.
fn pair_tile(a: &Panel, b: &Panel, acts: &QuantizedActs, t0: usize, tile: usize, out: &mut [[f32; 2 * PANEL]; TOKENS]) {
    assert_eq!(a.codes.len(), b.codes.len(), "paired panels of different widths");
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: pairs are formed only on the AVX512-VNNI path, chosen only where
        // `A8Path::available` lists it.
        const_tokens!(tile, T => unsafe { x86::pair_avx512vnni::<T>(a, b, acts, t0, out) })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (a, b, acts, t0, tile, out);
        unreachable!("panel pairs run only on x86");
    }
}

/// `out[t][r]` = row `r`'s output for token `t0 + t`, `t < tile` (≤ [`TOKENS`]), `r < 8`.
fn panel_tile(path: A8Path, panel: &Panel, acts: &QuantizedActs, t0: usize, tile: usize, out: &mut [[f32; 2 * PANEL]; TOKENS]) {
    macro_rules! dispatch {
        ($($f:ident)::+) => {
            const_tokens!(tile, T => $($f)::+::<T>(panel, acts, t0, out))
        };
    }
    match path {
        // SAFETY (all): the path is only chosen when `A8Path::available` lists it.
        #[cfg(target_arch = "x86_64")]
        A8Path::Avx512Vnni => unsafe { dispatch!(x86::panel_avx512vnni) },
        #[cfg(target_arch = "x86_64")]
        A8Path::AvxVnni => unsafe { dispatch!(x86::panel_avxvnni) },
        #[cfg(target_arch = "x86_64")]
        A8Path::Avx2 => unsafe { dispatch!(x86::panel_avx2) },
        #[cfg(target_arch = "aarch64")]
        A8Path::NeonDot => unsafe { dispatch!(arm::panel_neon_dot) },
        _ => dispatch!(panel_scalar),
    }
}

/// The reference: exact integer dot products per row and block (the codes read in memory
/// order).
fn panel_scalar<const T: usize>(panel: &Panel, acts: &QuantizedActs, t0: usize, out: &mut [[f32; 2 * PANEL]; TOKENS]) {
    for (t, o) in out[..T].iter_mut().enumerate() {
        let q = acts.token(t0 + t);
        let mut acc = [0f32; PANEL];
        for (b, (s, words)) in panel.scales.chunks_exact(PANEL).zip(panel.codes.chunks_exact(32 * PANEL)).enumerate() {
            let mut dot = [0i32; PANEL];
            for (j, word) in words.chunks_exact(4 * PANEL).enumerate() {
                let x = &q[b * 32 + 4 * j..][..4];
                for (d, c) in dot.iter_mut().zip(word.chunks_exact(4)) {
                    *d += c.iter().zip(x).map(|(c, x)| i32::from((c ^ 0x80) as i8) * i32::from(*x)).sum::<i32>();
                }
            }
            let db = acts.block_scale(t0 + t, b);
            for ((a, d), s) in acc.iter_mut().zip(dot).zip(s) {
                *a += s * db * d as f32;
            }
        }
        o[..PANEL].copy_from_slice(&acc);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Panel, QuantizedActs, PANEL, TOKENS};
    use std::arch::x86_64::*;

    macro_rules! panel_fn {
        ($name:ident, $features:literal, $block:ident) => {
            /// Per block: the panel's eight code words loaded once for all `T` tokens, each
            /// token's eight broadcast pieces against them, the block's integer sums (one lane
            /// per row) converted once and scaled by the rows' scales times the token's.
            ///
            /// # Safety
            /// The CPU must have the features named; arguments as in `panel_scalar`.
            #[target_feature(enable = $features)]
            pub unsafe fn $name<const T: usize>(panel: &Panel, acts: &QuantizedActs, t0: usize, out: &mut [[f32; 2 * PANEL]; TOKENS]) {
                let mut acc = [_mm256_setzero_ps(); T];
                let nb = panel.scales.len() / PANEL;
                let cp = panel.codes.as_ptr();
                let rows = acts.tile_rows::<T>(t0, nb);
                let (xp, dp, qs) = (rows.q, rows.scales, rows.qsums);
                // The next panel is fetched while this one is multiplied (the hardware
                // prefetcher stops at page boundaries; see the W4A8 kernel).
                let ahead = cp.add(panel.codes.len());
                for b in 0..nb {
                    for l in 0..4 {
                        _mm_prefetch::<_MM_HINT_T0>(ahead.add(b * 256 + 64 * l) as *const i8);
                    }
                    let words: [__m256i; 8] = std::array::from_fn(|j| _mm256_loadu_si256(cp.add(b * 256 + 32 * j) as *const __m256i));
                    let sv = _mm256_loadu_ps(panel.scales.as_ptr().add(b * PANEL));
                    for t in 0..T {
                        let x = xp[t].add(b * 32) as *const i32;
                        let sums = $block(&words, x, *qs[t].add(b));
                        let w = _mm256_mul_ps(sv, _mm256_set1_ps(*dp[t].add(b)));
                        acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), w, acc[t]);
                    }
                }
                for t in 0..T {
                    _mm256_storeu_ps(out[t].as_mut_ptr(), acc[t]);
                }
            }
        };
    }

    /// Two panels side by side in 512-bit vectors (lanes 0–7 the rows of `a`, 8–15 those of
    /// `b`), otherwise `panel_avx512vnni` lane for lane.
    ///
    /// # Safety
    /// The CPU must have AVX512F and AVX512-VNNI; `a` and `b` of the same width, arguments
    /// otherwise as in `panel_scalar`.
    #[target_feature(enable = "avx2,fma,avx512f,avx512vl,avx512vnni")]
    pub unsafe fn pair_avx512vnni<const T: usize>(a: &Panel, b: &Panel, acts: &QuantizedActs, t0: usize, out: &mut [[f32; 2 * PANEL]; TOKENS]) {
        let mut acc = [_mm512_setzero_ps(); T];
        let nb = a.scales.len() / PANEL;
        let (pa, pb) = (a.codes.as_ptr(), b.codes.as_ptr());
        let rows = acts.tile_rows::<T>(t0, nb);
        let (xp, dp, qs) = (rows.q, rows.scales, rows.qsums);
        // The two panels after `b` (the next block's), fetched while these are multiplied;
        // prefetches past the last panel never fault.
        let ahead = pb.wrapping_add(b.codes.len());
        for blk in 0..nb {
            for l in 0..8 {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(if l < 4 { blk * 256 + 64 * l } else { b.codes.len() + blk * 256 + 64 * (l - 4) }) as *const i8);
            }
            let mut words = [_mm512_setzero_si512(); 8];
            for (j, w) in words.iter_mut().enumerate() {
                let lo = _mm256_loadu_si256(pa.add(blk * 256 + 32 * j) as *const __m256i);
                let hi = _mm256_loadu_si256(pb.add(blk * 256 + 32 * j) as *const __m256i);
                *w = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi);
            }
            let (sa, sb) = (_mm256_loadu_ps(a.scales.as_ptr().add(blk * PANEL)), _mm256_loadu_ps(b.scales.as_ptr().add(blk * PANEL)));
            let sv = _mm512_castpd_ps(_mm512_insertf64x4::<1>(_mm512_castps_pd(_mm512_castps256_ps512(sa)), _mm256_castps_pd(sb)));
            for t in 0..T {
                let x = xp[t].add(blk * 32) as *const i32;
                let mut s = _mm512_setzero_si512();
                for (j, w) in words.iter().enumerate() {
                    s = _mm512_dpbusd_epi32(s, *w, _mm512_set1_epi32(x.add(j).read_unaligned()));
                }
                let sums = _mm512_sub_epi32(s, _mm512_set1_epi32(*qs[t].add(blk) << 7));
                let w = _mm512_mul_ps(sv, _mm512_set1_ps(*dp[t].add(blk)));
                acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), w, acc[t]);
            }
        }
        for t in 0..T {
            _mm512_storeu_ps(out[t].as_mut_ptr(), acc[t]);
        }
    }

    /// One block's eight row sums: `vpdpbusd` of the codes (`c + 128`) with each broadcast
    /// 4-byte piece of the activations, less `128 · Σ q`.
    #[inline(always)]
    unsafe fn block_vnni512(words: &[__m256i; 8], x: *const i32, qsum: i32) -> __m256i {
        let mut s = _mm256_setzero_si256();
        for (j, w) in words.iter().enumerate() {
            s = _mm256_dpbusd_epi32(s, *w, _mm256_set1_epi32(x.add(j).read_unaligned()));
        }
        _mm256_sub_epi32(s, _mm256_set1_epi32(qsum << 7))
    }
    #[inline(always)]
    unsafe fn block_avxvnni(words: &[__m256i; 8], x: *const i32, qsum: i32) -> __m256i {
        let mut s = _mm256_setzero_si256();
        for (j, w) in words.iter().enumerate() {
            s = _mm256_dpbusd_avx_epi32(s, *w, _mm256_set1_epi32(x.add(j).read_unaligned()));
        }
        _mm256_sub_epi32(s, _mm256_set1_epi32(qsum << 7))
    }
    /// AVX2: the codes flipped back to `c`, then `|c| · sign(q, c)` pairs in i16 (at most
    /// 2 · 127 · 127, no saturation), summed to i32 per lane.
    #[inline(always)]
    unsafe fn block_avx2(words: &[__m256i; 8], x: *const i32, _qsum: i32) -> __m256i {
        let flip = _mm256_set1_epi8(-128);
        let ones = _mm256_set1_epi16(1);
        let mut s = _mm256_setzero_si256();
        for (j, w) in words.iter().enumerate() {
            let c = _mm256_xor_si256(*w, flip);
            let xb = _mm256_set1_epi32(x.add(j).read_unaligned());
            let p = _mm256_maddubs_epi16(_mm256_sign_epi8(c, c), _mm256_sign_epi8(xb, c));
            s = _mm256_add_epi32(s, _mm256_madd_epi16(p, ones));
        }
        s
    }

    panel_fn!(panel_avx512vnni, "avx2,fma,avx512f,avx512vl,avx512vnni", block_vnni512);
    panel_fn!(panel_avxvnni, "avx2,fma,avxvnni", block_avxvnni);
    panel_fn!(panel_avx2, "avx2,fma", block_avx2);
}

#[cfg(target_arch = "aarch64")]
mod arm {
    use super::super::w4a8::arm::sdot;
    use super::{Panel, QuantizedActs, PANEL, TOKENS};
    use std::arch::aarch64::*;

    /// Rows 0–3 and 4–7 of each code word in two registers, flipped back to `c`; `sdot` with the
    /// broadcast 4-byte piece of the activations gives each row's block sum in its lane.
    ///
    /// # Safety
    /// The CPU must have NEON and the dot-product extension; arguments as in `panel_scalar`.
    #[target_feature(enable = "neon,dotprod")]
    pub unsafe fn panel_neon_dot<const T: usize>(panel: &Panel, acts: &QuantizedActs, t0: usize, out: &mut [[f32; 2 * PANEL]; TOKENS]) {
        let mut acc = [[vdupq_n_f32(0.0); 2]; T];
        let cp = panel.codes.as_ptr();
        let flip = vdupq_n_u8(0x80);
        for (b, s) in panel.scales.chunks_exact(PANEL).enumerate() {
            let words: [[int8x16_t; 2]; 8] = std::array::from_fn(|j| std::array::from_fn(|h| vreinterpretq_s8_u8(veorq_u8(vld1q_u8(cp.add(b * 256 + 32 * j + 16 * h)), flip))));
            let sv = [vld1q_f32(s.as_ptr()), vld1q_f32(s.as_ptr().add(4))];
            for t in 0..T {
                let x = acts.token(t0 + t).as_ptr().add(b * 32) as *const i32;
                let mut sums = [vdupq_n_s32(0); 2];
                for (j, w) in words.iter().enumerate() {
                    let xb = vreinterpretq_s8_s32(vdupq_n_s32(x.add(j).read_unaligned()));
                    for h in 0..2 {
                        sums[h] = sdot(sums[h], w[h], xb);
                    }
                }
                let d = acts.block_scale(t0 + t, b);
                for h in 0..2 {
                    acc[t][h] = vfmaq_f32(acc[t][h], vcvtq_f32_s32(sums[h]), vmulq_n_f32(sv[h], d));
                }
            }
        }
        for t in 0..T {
            vst1q_f32(out[t].as_mut_ptr(), acc[t][0]);
            vst1q_f32(out[t].as_mut_ptr().add(4), acc[t][1]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// Every path against the exact integer reference on awkward shapes (rows that leave a
    /// panel part empty, one block, long rows) and token counts (below, at and past a tile; from
    /// `PAIR_MIN_TOKENS` on AVX512-VNNI two panels at a time, the second one part empty for
    /// n = 28, a last panel alone for 40 and 129).
    #[test]
    fn every_path_matches_the_quantized_reference() {
        let mut rng = Rng::new(5);
        for &(n, k) in &[(7usize, 32usize), (40, 96), (129, 576), (16, 2048), (28, 64)] {
            let w: Vec<f32> = (0..n * k).map(|_| rng.normal() * 0.05).collect();
            let q = Q8Weight::quantize(n, k, |o, buf| buf.copy_from_slice(&w[o * k..(o + 1) * k]));
            let mut row = vec![0f32; k];
            for o in 0..n {
                q.dequantize_row(o, &mut row);
                for i in 0..k {
                    let s = q.scale(o, i / 32);
                    assert!((row[i] - w[o * k + i]).abs() <= s * 0.5 + 1e-7);
                }
            }
            for m in [1, 3, 4, 6, 8, 11] {
                let x: Vec<f32> = (0..m * k).map(|_| rng.normal()).collect();
                let acts = QuantizedActs::new(&x, m, k, true);
                for path in A8Path::available() {
                    let y = q.matmul(&x, m, path);
                    for t in 0..m {
                        for o in 0..n {
                            q.dequantize_row(o, &mut row);
                            let terms: Vec<f64> = (0..k).map(|i| f64::from(row[i]) * f64::from(acts.value(t, i, true))).collect();
                            let want: f64 = terms.iter().sum();
                            let mag: f64 = terms.iter().map(|v| v.abs()).sum();
                            let got = f64::from(y[t * n + o]);
                            assert!((got - want).abs() <= 1e-5 * mag + 1e-6, "{path:?} n={n} k={k} m={m}: {got} vs {want}");
                        }
                    }
                }
            }
        }
    }
}
