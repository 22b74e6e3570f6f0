//! An 8-bit weight for the CPU (the lm_head of 4-bit models, which is otherwise their largest
//! read per token): per row and 32-block a symmetric f32 scale, `w = s · c` with
//! `c = round(w / s)` in −127..127, `s = max|w| / 127`. Multiplied as W8A8: activations quantized
//! per 32-block as for the 4-bit kernel (in natural order), integer dot products per block.
//!
//! The signed × signed products use the sign trick on x86 (`|c| · sign(q, c)` as u8 × i8, for
//! `vpdpbusd` or `vpmaddubsw`: two products of at most 127·127 fit i16), `sdot` on NEON.
use super::acts::QuantizedActs;
use super::w4a8::{A8Path, TILE};
use rayon::prelude::*;

#[derive(Debug, Clone)]
pub struct Q8Weight {
    pub n: usize,
    pub k: usize,
    /// `[n][k]`
    pub codes: Vec<i8>,
    /// `[n][k / 32]`
    pub scales: Vec<f32>,
}

impl Q8Weight {
    /// Quantizes a row-major `[n][k]` weight given row by row by `row(o, buf)`; `k` must be a
    /// multiple of 32.
    pub fn quantize(n: usize, k: usize, row: impl Fn(usize, &mut [f32]) + Sync) -> Self {
        assert!(k.is_multiple_of(32), "8-bit weight: {k} columns, not a multiple of 32");
        let mut codes = vec![0i8; n * k];
        let mut scales = vec![0f32; n * k / 32];
        codes.par_chunks_mut(k).zip(scales.par_chunks_mut(k / 32)).enumerate().for_each_init(
            || vec![0f32; k],
            |buf, (o, (c, s))| {
                row(o, buf);
                for ((cb, sb), wb) in c.chunks_exact_mut(32).zip(s.iter_mut()).zip(buf.chunks_exact(32)) {
                    let amax = wb.iter().fold(0f32, |a, v| a.max(v.abs()));
                    *sb = amax / 127.0;
                    let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
                    for (d, v) in cb.iter_mut().zip(wb) {
                        *d = (v * inv).round().clamp(-127.0, 127.0) as i8;
                    }
                }
            },
        );
        Self { n, k, codes, scales }
    }

    pub fn dequantize_row(&self, o: usize, out: &mut [f32]) {
        let k = self.k;
        for (i, v) in out.iter_mut().enumerate().take(k) {
            *v = self.scales[o * k / 32 + i / 32] * f32::from(self.codes[o * k + i]);
        }
    }

    /// `y[t][o]` for `m` tokens; `x` is `[m][k]`, `y` `[m][n]`.
    pub fn matmul(&self, x: &[f32], m: usize, path: A8Path) -> Vec<f32> {
        let (n, k) = (self.n, self.k);
        let acts = QuantizedActs::new(x, m, k, true);
        let path = path.or_scalar();
        super::par_output_rows(
            m,
            n,
            || (),
            |_, o, dst| {
                let codes = &self.codes[o * k..(o + 1) * k];
                let scales = &self.scales[o * k / 32..(o + 1) * k / 32];
                let mut out = [0f32; TILE];
                let mut t0 = 0;
                while t0 < m {
                    let tile = TILE.min(m - t0);
                    row_tile(path, codes, scales, &acts, t0, tile, &mut out);
                    for (i, v) in out[..tile].iter().enumerate() {
                        dst.put(t0 + i, *v);
                    }
                    t0 += tile;
                }
            },
        )
    }
}

fn row_tile(path: A8Path, codes: &[i8], scales: &[f32], acts: &QuantizedActs, t0: usize, tile: usize, out: &mut [f32; TILE]) {
    macro_rules! dispatch {
        ($($f:ident)::+) => {
            match tile {
                1 => $($f)::+::<1>(codes, scales, acts, t0, out),
                2 => $($f)::+::<2>(codes, scales, acts, t0, out),
                3 => $($f)::+::<3>(codes, scales, acts, t0, out),
                _ => $($f)::+::<4>(codes, scales, acts, t0, out),
            }
        };
    }
    match path {
        // SAFETY (all): the path is only chosen when `A8Path::available` lists it.
        #[cfg(target_arch = "x86_64")]
        A8Path::Avx512Vnni => unsafe { dispatch!(x86::tile_avx512vnni) },
        #[cfg(target_arch = "x86_64")]
        A8Path::AvxVnni => unsafe { dispatch!(x86::tile_avxvnni) },
        #[cfg(target_arch = "x86_64")]
        A8Path::Avx2 => unsafe { dispatch!(x86::tile_avx2) },
        #[cfg(target_arch = "aarch64")]
        A8Path::NeonDot => unsafe { dispatch!(arm::tile_neon_dot) },
        _ => dispatch!(tile_scalar),
    }
}

fn tile_scalar<const T: usize>(codes: &[i8], scales: &[f32], acts: &QuantizedActs, t0: usize, out: &mut [f32; TILE]) {
    for (t, o) in out[..T].iter_mut().enumerate() {
        let q = acts.token(t0 + t);
        let mut acc = 0f32;
        for (b, (cb, s)) in codes.chunks_exact(32).zip(scales).enumerate() {
            let dot: i32 = cb.iter().zip(&q[b * 32..b * 32 + 32]).map(|(c, x)| i32::from(*c) * i32::from(*x)).sum();
            acc += s * acts.block_scale(t0 + t, b) * dot as f32;
        }
        *o = acc;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::super::w4a8::x86::hsum;
    use super::{QuantizedActs, TILE};
    use std::arch::x86_64::*;

    /// The eight lanes of each of `v[0..8]` summed: lane `i` of the result is `Σ v[i]`.
    #[inline(always)]
    unsafe fn lane_sums8(v: &[__m256i; 8]) -> __m256i {
        let (a, b) = (_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
        let (c, d) = (_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
        // Per 128-bit half: the quarter sums of v0..v3 (ab) and v4..v7 (cd).
        let (ab, cd) = (_mm256_hadd_epi32(a, b), _mm256_hadd_epi32(c, d));
        _mm256_add_epi32(_mm256_permute2x128_si256(ab, cd, 0x20), _mm256_permute2x128_si256(ab, cd, 0x31))
    }

    macro_rules! tile_fn {
        ($name:ident, $features:literal, $dot:ident) => {
            /// Eight blocks at a time: their exact integer dot products reduced into one vector
            /// (lane `i` = block `i`), converted once and scaled by the blocks' weight and
            /// activation scales as vectors. Scaling each block's eight lanes by a broadcast
            /// product (a scalar multiply, a broadcast, a conversion and a multiply-add per block
            /// and token) was a third of the head's time at eight tokens.
            ///
            /// # Safety
            /// The CPU must have the features named; arguments as in `tile_scalar`.
            #[target_feature(enable = $features)]
            pub unsafe fn $name<const T: usize>(codes: &[i8], scales: &[f32], acts: &QuantizedActs, t0: usize, out: &mut [f32; TILE]) {
                let mut acc = [_mm256_setzero_ps(); T];
                let cp = codes.as_ptr();
                let nb = scales.len();
                let mut xp = [std::ptr::null::<i8>(); T];
                let mut dp = [std::ptr::null::<f32>(); T];
                for t in 0..T {
                    xp[t] = acts.token(t0 + t).as_ptr();
                    dp[t] = acts.token_block_scales(t0 + t)[..nb].as_ptr();
                }
                // The rows after this one are fetched while it is multiplied (see the W4A8
                // kernel: the hardware prefetcher stops at page boundaries).
                let ahead = cp.add(2 * codes.len());
                let full = nb / 8 * 8;
                for b in (0..full).step_by(8) {
                    for l in 0..4 {
                        _mm_prefetch::<_MM_HINT_T0>(ahead.add(b * 32 + 64 * l));
                    }
                    let sv = _mm256_loadu_ps(scales.as_ptr().add(b));
                    for t in 0..T {
                        let v: [__m256i; 8] = std::array::from_fn(|i| {
                            let c = _mm256_loadu_si256(cp.add((b + i) * 32) as *const __m256i);
                            let x = _mm256_loadu_si256(xp[t].add((b + i) * 32) as *const __m256i);
                            $dot(_mm256_sign_epi8(c, c), _mm256_sign_epi8(x, c))
                        });
                        let w = _mm256_mul_ps(sv, _mm256_loadu_ps(dp[t].add(b)));
                        acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lane_sums8(&v)), w, acc[t]);
                    }
                }
                for b in full..nb {
                    _mm_prefetch::<_MM_HINT_T0>(ahead.add(b * 32));
                    let c = _mm256_loadu_si256(cp.add(b * 32) as *const __m256i);
                    let ac = _mm256_sign_epi8(c, c);
                    for t in 0..T {
                        let x = _mm256_loadu_si256(xp[t].add(b * 32) as *const __m256i);
                        let d = _mm256_cvtepi32_ps($dot(ac, _mm256_sign_epi8(x, c)));
                        acc[t] = _mm256_fmadd_ps(d, _mm256_set1_ps(scales[b] * *dp[t].add(b)), acc[t]);
                    }
                }
                for t in 0..T {
                    out[t] = hsum(acc[t]);
                }
            }
        };
    }

    #[inline(always)]
    unsafe fn dot_vnni512(a: __m256i, b: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), a, b)
    }
    #[inline(always)]
    unsafe fn dot_avxvnni(a: __m256i, b: __m256i) -> __m256i {
        _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), a, b)
    }
    #[inline(always)]
    unsafe fn dot_avx2(a: __m256i, b: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1))
    }

    tile_fn!(tile_avx512vnni, "avx2,fma,avx512f,avx512vl,avx512vnni", dot_vnni512);
    tile_fn!(tile_avxvnni, "avx2,fma,avxvnni", dot_avxvnni);
    tile_fn!(tile_avx2, "avx2,fma", dot_avx2);
}

#[cfg(target_arch = "aarch64")]
mod arm {
    use super::super::w4a8::arm::sdot;
    use super::{QuantizedActs, TILE};
    use std::arch::aarch64::*;

    /// # Safety
    /// The CPU must have NEON and the dot-product extension; arguments as in `tile_scalar`.
    #[target_feature(enable = "neon,dotprod")]
    pub unsafe fn tile_neon_dot<const T: usize>(codes: &[i8], scales: &[f32], acts: &QuantizedActs, t0: usize, out: &mut [f32; TILE]) {
        let mut acc = [vdupq_n_f32(0.0); T];
        let cp = codes.as_ptr();
        for (b, s) in scales.iter().enumerate() {
            let c0 = vld1q_s8(cp.add(b * 32));
            let c1 = vld1q_s8(cp.add(b * 32 + 16));
            for t in 0..T {
                let x = acts.token(t0 + t).as_ptr().add(b * 32);
                let d = sdot(sdot(vdupq_n_s32(0), c0, vld1q_s8(x)), c1, vld1q_s8(x.add(16)));
                acc[t] = vfmaq_n_f32(acc[t], vcvtq_f32_s32(d), s * acts.block_scale(t0 + t, b));
            }
        }
        for t in 0..T {
            out[t] = vaddvq_f32(acc[t]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn every_path_matches_the_quantized_reference() {
        let mut rng = Rng::new(5);
        for &(n, k) in &[(7usize, 32usize), (40, 96), (129, 576), (16, 2048)] {
            let w: Vec<f32> = (0..n * k).map(|_| rng.normal() * 0.05).collect();
            let q = Q8Weight::quantize(n, k, |o, buf| buf.copy_from_slice(&w[o * k..(o + 1) * k]));
            let mut row = vec![0f32; k];
            for o in 0..n {
                q.dequantize_row(o, &mut row);
                for i in 0..k {
                    let s = q.scales[o * k / 32 + i / 32];
                    assert!((row[i] - w[o * k + i]).abs() <= s * 0.5 + 1e-7);
                }
            }
            for m in [1, 3, 4, 6] {
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
