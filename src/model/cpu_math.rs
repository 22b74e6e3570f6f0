//! Vectorized elementwise math for the CPU paths: the exponential and the softmax that attention
//! takes (prompt and decode), and silu(gate) · up as one op. candle's own ops call glibc's
//! scalar `expf` per value and allocate a tensor per step (silu, then the product): on a
//! 512-token prefill of SmolLM2 that is 24 million exponentials.
use crate::quant::cpu::pool;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

const EXP_MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23
const LN2_HI: f32 = 0.693_359_4; // 355/512
const LN2_LO: f32 = -2.121_944_4e-4; // ln 2 − LN2_HI
const INV_FACT: [f32; 8] = [1.0, 1.0, 0.5, 1.0 / 6.0, 1.0 / 24.0, 1.0 / 120.0, 1.0 / 720.0, 1.0 / 5040.0];

/// `e^x` for `x ≤ 0` to within 3e-7 relative, in plain arithmetic: `x = n·ln 2 + r` with
/// `n = round(x·log2 e)` (rounded with the 1.5·2²³ trick, which leaves `n` in the low bits) and
/// `|r| ≤ ½ ln 2`, reduced in two steps (Cody and Waite: the high part of ln 2 has 9 significant
/// bits, so `n·LN2_HI` is exact); then `2ⁿ` from the exponent bits times `e^r` by its Taylor
/// polynomial of degree 7 (the first dropped term is under 6e-9). Below −87 the result flushes to
/// 0 (e^−87 ≈ 1.6e-38, at the end of the normal floats). [`x86::exp_nonpositive_avx2`] takes the
/// same steps 8 lanes at a time.
#[inline(always)]
pub fn exp_nonpositive(x: f32) -> f32 {
    let xc = x.max(-87.0);
    let shifted = xc * std::f32::consts::LOG2_E + EXP_MAGIC;
    let n = shifted.to_bits().wrapping_sub(EXP_MAGIC.to_bits()) as i32;
    let nf = shifted - EXP_MAGIC;
    let r = (xc - nf * LN2_HI) - nf * LN2_LO;
    let c = &INV_FACT;
    let poly = c[0] + r * (c[1] + r * (c[2] + r * (c[3] + r * (c[4] + r * (c[5] + r * (c[6] + r * c[7]))))));
    let pow2n = f32::from_bits(((n + 127).max(0) as u32) << 23);
    if x < -87.0 {
        0.0
    } else {
        poly * pow2n
    }
}

/// `live` becomes its softmax: `e^(x − max) / Σ e^(x − max)` with [`exp_nonpositive`], 8
/// lanes at a time with AVX2 where the CPU has it (glibc's scalar `expf` per score was 30 % of
/// a decode step's attention). The prompt and the decode attention both take it.
pub fn softmax(live: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: both features were just detected.
        return unsafe { x86::softmax_avx2(live) };
    }
    softmax_any(live)
}

fn softmax_any(live: &mut [f32]) {
    let max = live.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let mut sum = 0f32;
    for x in live.iter_mut() {
        *x = exp_nonpositive(*x - max);
        sum += *x;
    }
    let inv = 1.0 / sum;
    live.iter_mut().for_each(|x| *x *= inv);
}

/// `g · sigmoid(g)`, from `e = e^(−|g|)` (never overflows): `sigmoid(g)` is `1 / (1 + e)` for
/// `g ≥ 0` and `e / (1 + e)` below.
#[inline(always)]
fn silu(g: f32) -> f32 {
    let e = exp_nonpositive(-g.abs());
    let sig = if g >= 0.0 { 1.0 } else { e } / (1.0 + e);
    g * sig
}

#[cfg(target_arch = "x86_64")]
pub mod x86 {
    use super::{EXP_MAGIC, INV_FACT, LN2_HI, LN2_LO};
    use std::arch::x86_64::*;

    /// [`super::exp_nonpositive`] on 8 lanes (with fused multiply-adds, so the last bit may
    /// differ from the scalar steps).
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_nonpositive_avx2(x: __m256) -> __m256 {
        let (magic, floor) = (_mm256_set1_ps(EXP_MAGIC), _mm256_set1_ps(-87.0));
        let xc = _mm256_max_ps(x, floor);
        let shifted = _mm256_fmadd_ps(xc, _mm256_set1_ps(std::f32::consts::LOG2_E), magic);
        let nf = _mm256_sub_ps(shifted, magic);
        let r = _mm256_fnmadd_ps(nf, _mm256_set1_ps(LN2_HI), xc);
        let r = _mm256_fnmadd_ps(nf, _mm256_set1_ps(LN2_LO), r);
        let mut poly = _mm256_set1_ps(INV_FACT[7]);
        for c in INV_FACT[..7].iter().rev() {
            poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(*c));
        }
        // 2^n: n sits in the low bits of `shifted`; (n + 127) << 23 is its exponent field.
        let n = _mm256_sub_epi32(_mm256_castps_si256(shifted), _mm256_castps_si256(magic));
        let pow2n = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n, _mm256_set1_epi32(127)), 23));
        let below = _mm256_cmp_ps(x, floor, _CMP_LT_OQ);
        _mm256_andnot_ps(below, _mm256_mul_ps(poly, pow2n))
    }

    /// [`super::softmax_any`] 8 lanes at a time with AVX2 intrinsics (the compiler left the
    /// portable loop scalar); the tail of fewer than 8 takes the portable steps.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn softmax_avx2(live: &mut [f32]) {
        use std::arch::x86_64::*;
        let n8 = live.len() / 8 * 8;
        let p = live.as_mut_ptr();
        let mut mx = _mm256_set1_ps(f32::NEG_INFINITY);
        for i in (0..n8).step_by(8) {
            mx = _mm256_max_ps(mx, _mm256_loadu_ps(p.add(i)));
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), mx);
        let max = live[n8..].iter().chain(&lanes).fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let vmax = _mm256_set1_ps(max);
        let mut acc = _mm256_setzero_ps();
        for i in (0..n8).step_by(8) {
            let e = exp_nonpositive_avx2(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), vmax));
            _mm256_storeu_ps(p.add(i), e);
            acc = _mm256_add_ps(acc, e);
        }
        _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
        let mut sum: f32 = lanes.iter().sum();
        for x in live[n8..].iter_mut() {
            *x = super::exp_nonpositive(*x - max);
            sum += *x;
        }
        let inv = _mm256_set1_ps(1.0 / sum);
        for i in (0..n8).step_by(8) {
            _mm256_storeu_ps(p.add(i), _mm256_mul_ps(_mm256_loadu_ps(p.add(i)), inv));
        }
        for x in live[n8..].iter_mut() {
            *x *= 1.0 / sum;
        }
    }

    /// `out[i] = silu(g[i]) · u[i]` 8 lanes at a time; the tail takes the portable steps.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn silu_mul(g: &[f32], u: &[f32], out: &mut [f32]) {
        let n8 = out.len() / 8 * 8;
        let (sign, one) = (_mm256_set1_ps(-0.0), _mm256_set1_ps(1.0));
        for i in (0..n8).step_by(8) {
            let gv = _mm256_loadu_ps(g.as_ptr().add(i));
            let e = exp_nonpositive_avx2(_mm256_or_ps(gv, sign)); // e^(−|g|)
            let negative = _mm256_cmp_ps(gv, _mm256_setzero_ps(), _CMP_LT_OQ);
            let sig = _mm256_div_ps(_mm256_blendv_ps(one, e, negative), _mm256_add_ps(one, e));
            let y = _mm256_mul_ps(_mm256_mul_ps(gv, sig), _mm256_loadu_ps(u.as_ptr().add(i)));
            _mm256_storeu_ps(out.as_mut_ptr().add(i), y);
        }
        for i in n8..out.len() {
            out[i] = super::silu(g[i]) * u[i];
        }
    }
}

/// `out[i] = silu(g[i]) · u[i]`, AVX2 where the CPU has it.
fn silu_mul_slices(g: &[f32], u: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: both features were just detected.
        return unsafe { x86::silu_mul(g, u, out) };
    }
    for ((o, g), u) in out.iter_mut().zip(g).zip(u) {
        *o = silu(*g) * u;
    }
}

/// silu(gate) · up on the CPU for f32 tensors of one shape, in one pass over the pool's threads.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.contiguous()?.apply_op2_no_bwd(&up.contiguous()?, &SiluMul)
}

/// Whether [`silu_mul`] applies: CPU, f32, the same shape.
pub fn silu_mul_applies(gate: &Tensor, up: &Tensor) -> bool {
    let f32 = |t: &Tensor| t.dtype() == candle_core::DType::F32;
    gate.device().is_cpu() && f32(gate) && f32(up) && gate.shape() == up.shape()
}

struct SiluMul;

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "awq-silu-mul"
    }

    fn cpu_fwd(&self, gs: &CpuStorage, gl: &Layout, us: &CpuStorage, ul: &Layout) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(g), CpuStorage::F32(u)) = (gs, us) else { candle_core::bail!("silu·mul: gate and up must be f32") };
        let (Some((g0, g1)), Some((u0, u1))) = (gl.contiguous_offsets(), ul.contiguous_offsets()) else {
            candle_core::bail!("silu·mul: gate and up must be contiguous")
        };
        if gl.shape() != ul.shape() {
            candle_core::bail!("silu·mul: gate {:?} and up {:?} differ", gl.shape(), ul.shape());
        }
        Ok((CpuStorage::F32(silu_mul_host(&g[g0..g1], &u[u0..u1])), gl.shape().clone()))
    }
}

/// `silu(gate) · up` of each row of `gu` (`[m][2 · n]`, a row's gate then its up values, as one
/// call of the fused gate/up projection leaves them): `[m][n]`, rows split over the kernel
/// threads (a decode step's few rows stay on the calling thread).
pub fn silu_mul_rows_host(gu: &[f32], n: usize) -> Vec<f32> {
    let m = gu.len() / (2 * n);
    let mut out = vec![0f32; m * n];
    let dst = pool::SendPtr(out.as_mut_ptr());
    pool::for_ranges(m, 4096usize.div_ceil(n).max(1), |rows| {
        for r in rows {
            let row = &gu[r * 2 * n..(r + 1) * 2 * n];
            // SAFETY: tasks take disjoint rows of `out`, which outlives the call.
            silu_mul_slices(&row[..n], &row[n..], unsafe { dst.row(r, n) });
        }
    });
    out
}

/// `silu(g) · u` elementwise over the pool's threads (AVX2 where the CPU has it).
pub fn silu_mul_host(g: &[f32], u: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; g.len()];
    // Chunks of 4096 values (16 KiB) per task: a decode step's single row stays on one thread.
    const CHUNK: usize = 4096;
    let dst = pool::SendPtr(out.as_mut_ptr());
    pool::for_ranges(g.len().div_ceil(CHUNK), 1, |chunks| {
        let (a, b) = (chunks.start * CHUNK, (chunks.end * CHUNK).min(g.len()));
        // SAFETY: tasks take disjoint ranges of `out`, which outlives the call.
        let o = unsafe { dst.range(a..b) };
        silu_mul_slices(&g[a..b], &u[a..b], o);
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn exp_nonpositive_is_within_3e_7_of_exp() {
        let mut x = 0f32;
        while x > -87.0 {
            let (got, want) = (exp_nonpositive(x) as f64, (x as f64).exp());
            assert!(((got - want) / want).abs() < 3e-7, "exp({x}) = {got}, want {want}");
            x -= 0.001_37;
        }
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_nonpositive(-100.0), 0.0);
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
    }

    /// The dispatched softmax (AVX2 here) and the portable one against f64, on lengths around
    /// the 8 lanes, with scores spread wide enough that some flush to zero.
    #[test]
    fn softmax_matches_an_f64_reference() {
        let mut r = crate::rng::Rng::new(5);
        for len in [1usize, 7, 8, 9, 16, 23, 100] {
            for spread in [1f32, 60.0] {
                let x: Vec<f32> = (0..len + 5).map(|_| r.unit() * spread).collect();
                let span = 2..2 + len;
                let mx = x[span.clone()].iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
                let z: f64 = x[span.clone()].iter().map(|&v| (v as f64 - mx).exp()).sum();
                let mut fast = x.clone();
                softmax(&mut fast[span.clone()]);
                let mut portable = x.clone();
                softmax_any(&mut portable[span.clone()]);
                for i in span.clone() {
                    let (f, p) = (fast[i], portable[i]);
                    let want = (x[i] as f64 - mx).exp() / z;
                    // x − max is rounded to f32 first: half an ulp of it moves e^(x − max) by
                    // |x − max|·2⁻²⁴ relative, on top of the exponential's own 3e-7.
                    let tol = want * (1e-6 + (x[i] as f64 - mx).abs() * 6e-8) + 1e-30;
                    assert!((f as f64 - want).abs() <= tol, "dispatched len={len} i={i}: {f} vs {want}");
                    assert!((p as f64 - want).abs() <= tol, "portable len={len} i={i}: {p} vs {want}");
                }
            }
        }
    }

    /// The op (AVX2 lanes and the scalar tail here) and the portable steps against f64, over
    /// awkward lengths and values from −100 to 100 (where e^(−g) would overflow f32).
    #[test]
    fn silu_mul_matches_an_f64_reference() -> Result<()> {
        let mut r = crate::rng::Rng::new(17);
        for n in [1usize, 7, 8, 9, 100, 4096 * 2 + 13] {
            let g: Vec<f32> = (0..n).map(|i| if i % 7 == 3 { r.unit() * 100.0 } else { r.unit() * 8.0 }).collect();
            let u: Vec<f32> = (0..n).map(|_| r.unit() * 3.0).collect();
            let want: Vec<f64> = g.iter().zip(&u).map(|(&g, &u)| g as f64 / (1.0 + (-(g as f64)).exp()) * u as f64).collect();
            let gt = Tensor::from_slice(&g, (1, n), &Device::Cpu)?;
            let ut = Tensor::from_slice(&u, (1, n), &Device::Cpu)?;
            assert!(silu_mul_applies(&gt, &ut));
            let got = silu_mul(&gt, &ut)?.flatten_all()?.to_vec1::<f32>()?;
            let portable: Vec<f32> = g.iter().zip(&u).map(|(g, u)| silu(*g) * u).collect();
            for (i, w) in want.iter().enumerate() {
                let tol = 1e-6 * w.abs() + 1e-30;
                assert!((got[i] as f64 - w).abs() <= tol, "op n={n} g={}: {} vs {w}", g[i], got[i]);
                assert!((portable[i] as f64 - w).abs() <= tol, "portable n={n} g={}: {} vs {w}", g[i], portable[i]);
            }
        }
        Ok(())
    }
}
