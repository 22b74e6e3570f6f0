//! Single-query attention on the CPU, fused: scores, softmax and the weighted sum of values in
//! one call per sequence (or per head), reading the KV cache in place. A decode step otherwise
//! spends as long in the generic path's small matmuls, softmax and reshapes as in the 4-bit
//! linears.
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// `q` `[b, heads, 1, d]` contiguous f32; `k`, `v` `[b, kv_heads, len, d]` f32 with unit stride on
/// `d` (views of the cache are fine). Returns `[b, heads, 1, d]`.
pub fn attend_one(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> Result<Tensor> {
    q.contiguous()?.apply_op3_no_bwd(k, v, &DecodeAttention { scale })
}

/// Whether [`attend_one`] applies: CPU, f32, one query, unit stride on the head dimension.
pub fn applies(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    let unit = |t: &Tensor| t.layout().stride().last() == Some(&1);
    q.device().is_cpu()
        && q.dtype() == candle_core::DType::F32
        && k.dtype() == candle_core::DType::F32
        && q.dim(2).ok() == Some(1)
        && unit(k)
        && unit(v)
}

struct DecodeAttention {
    scale: f32,
}

pub(super) fn f32_slice<'a>(s: &'a CpuStorage, what: &str) -> Result<&'a [f32]> {
    match s {
        CpuStorage::F32(v) => Ok(v),
        _ => candle_core::bail!("decode attention: {what} must be f32"),
    }
}

/// An element of a cached key or value row: f32, or f16 (the CPU's half-size paged cache,
/// `serve --kv-cache-dtype f16`). Attention reads each as f32; the arithmetic is the same.
pub trait KvElem: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    /// Eight values from `p` as f32 lanes.
    ///
    /// # Safety
    /// `p` points at eight readable values; the CPU has AVX2, FMA and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl KvElem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
}

impl KvElem for half::f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }
}

#[inline(always)]
fn dot<T: KvElem>(a: &[f32], b: &[T]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        for l in 0..8 {
            acc[l] += a[c * 8 + l] * b[c * 8 + l].to_f32();
        }
    }
    let mut s: f32 = acc.iter().sum();
    for i in chunks * 8..a.len() {
        s += a[i] * b[i].to_f32();
    }
    s
}

impl CustomOp3 for DecodeAttention {
    fn name(&self) -> &'static str {
        "awq-decode-attention"
    }

    fn cpu_fwd(&self, qs: &CpuStorage, ql: &Layout, ks: &CpuStorage, kl: &Layout, vs: &CpuStorage, vl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (q, k, v) = (f32_slice(qs, "q")?, f32_slice(ks, "k")?, f32_slice(vs, "v")?);
        let (b, h, one, d) = ql.shape().dims4()?;
        let (kb, kvh, len, kd) = kl.shape().dims4()?;
        if one != 1 || kb != b || kd != d || vl.shape() != kl.shape() || h % kvh != 0 {
            candle_core::bail!("decode attention: shapes q {:?} k {:?} v {:?}", ql.shape(), kl.shape(), vl.shape());
        }
        let Some((q0, _)) = ql.contiguous_offsets() else { candle_core::bail!("decode attention: q must be contiguous") };
        let (ks_, vs_) = (kl.stride(), vl.stride());
        let (ko, vo) = (kl.start_offset(), vl.start_offset());
        let n_rep = h / kvh;
        let mut out = vec![0f32; b * h * d];
        out.par_chunks_mut(d).enumerate().for_each(|(bh, o)| {
            let (bi, hi) = (bh / h, bh % h);
            let j = hi / n_rep;
            let qv = &q[q0 + bh * d..q0 + (bh + 1) * d];
            let kbase = ko + bi * ks_[0] + j * ks_[1];
            let vbase = vo + bi * vs_[0] + j * vs_[1];
            attend_head(qv, 0..len, |t| &k[kbase + t * ks_[2]..kbase + t * ks_[2] + d], |t| &v[vbase + t * vs_[2]..vbase + t * vs_[2] + d], self.scale, o);
        });
        Ok((CpuStorage::F32(out), Shape::from((b, h, 1, d))))
    }
}

/// One query head's attention over the positions `span` of its KV head: `out` (zeroed by the
/// caller) becomes `Σ_p softmax(q·k_p · scale)_p · v_p`, with `key(p)` and `value(p)` the cached
/// rows. [`attend_heads`] with one head; the custom op above uses it.
pub fn attend_head<'a, T: KvElem>(q: &[f32], span: std::ops::Range<usize>, key: impl Fn(usize) -> &'a [T], value: impl Fn(usize) -> &'a [T], scale: f32, out: &mut [f32]) {
    attend_heads(q, 0..1, 1, span, |_, p| key(p), |_, p| value(p), scale, out)
}

/// The attention of the query heads of KV heads `groups` (`n_rep` query heads each, `q` and
/// `out` `[groups.len() · n_rep][d]`, `out` zeroed by the caller) over positions `span`, with
/// `key(j, p)` and `value(j, p)` KV head `j`'s cached rows at position `p`.
///
/// Positions are taken in tiles, every KV head of the tile before the next tile: in the paged
/// cache a position's rows of all KV heads are adjacent, so a sequence's keys (then values) are
/// read front to back once, instead of one strided pass per KV head (a batched CPU step at
/// ~150 positions spent a third of its time here, reading at half the rate the 4-bit kernels
/// read weights). Each head's arithmetic does not depend on `groups` or `n_rep`: a head gives
/// the same bits whether it is attended alone or with others (batched decode relies on that).
#[allow(clippy::too_many_arguments)]
pub fn attend_heads<'a, T: KvElem>(q: &[f32], groups: std::ops::Range<usize>, n_rep: usize, span: std::ops::Range<usize>, key: impl Fn(usize, usize) -> &'a [T], value: impl Fn(usize, usize) -> &'a [T], scale: f32, out: &mut [f32]) {
    let heads = groups.len() * n_rep;
    assert!(heads > 0 && q.len().is_multiple_of(heads) && out.len() >= q.len(), "attention: {} query values for {heads} heads, {} outputs", q.len(), out.len());
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c") && (q.len() / heads).is_multiple_of(8) {
        // SAFETY: the three features were just detected.
        return unsafe { attend_heads_avx2(q, groups, n_rep, span, key, value, scale, out) };
    }
    attend_heads_any(q, groups, n_rep, span, key, value, scale, out)
}

/// Positions a tile of the weighted sum of values covers: its rows (all KV heads) stay in the
/// L1 cache while each query head adds its part.
const VALUE_TILE: usize = 32;

/// Positions ahead that the score loop prefetches keys.
const KEY_AHEAD: usize = 16;

/// Turns each head's row of raw scores into softmax weights, in place.
fn softmax_rows(scores: &mut [f32], len: usize) {
    scores.chunks_exact_mut(len).for_each(super::cpu_math::softmax);
}

/// [`attend_heads`] with AVX2 and FMA, head size a multiple of 8. Scores are taken 8 positions at
/// a time: 8 running sums of fused multiply-adds, reduced together into one vector of 8 scores
/// (one horizontal sum per position was most of the score loop's time at a head size of 64).
/// The weighted sum of values keeps up to 64 output elements in registers across a tile's
/// positions instead of loading and storing `out` for each.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; `q.len() / heads` is a multiple of 8.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn attend_heads_avx2<'a, T: KvElem>(q: &[f32], groups: std::ops::Range<usize>, n_rep: usize, span: std::ops::Range<usize>, key: impl Fn(usize, usize) -> &'a [T], value: impl Fn(usize, usize) -> &'a [T], scale: f32, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let heads = groups.len() * n_rep;
    let d = q.len() / heads;
    let (len, first) = (span.len(), span.start);
    if len == 0 {
        return;
    }
    let chunks = d / 8;
    let mut scores = vec![0f32; heads * len];
    let sp = scores.as_mut_ptr();
    let mut t = first;
    while t + 8 <= span.end {
        for (gi, j) in groups.clone().enumerate() {
            // Slicing checks each key's length once; the loads below stay inside these slices.
            let ks: [*const T; 8] = std::array::from_fn(|i| key(j, t + i)[..d].as_ptr());
            // Software prefetch: the paged cache is contiguous only within a block of 16
            // positions, too short a run for the hardware's prefetcher to get ahead (a batched
            // step's attention took 12-30 % longer without them). The keys `KEY_AHEAD` positions on,
            // into L1; these positions' values, read in the second pass, into L2.
            let row_bytes = d * std::mem::size_of::<T>();
            for i in 0..8 {
                let vp = value(j, t + i).as_ptr() as *const i8;
                for b in (0..row_bytes).step_by(64) {
                    _mm_prefetch::<_MM_HINT_T1>(vp.wrapping_add(b));
                }
                if t + i + KEY_AHEAD < span.end {
                    let kp = key(j, t + i + KEY_AHEAD).as_ptr() as *const i8;
                    for b in (0..row_bytes).step_by(64) {
                        _mm_prefetch::<_MM_HINT_T0>(kp.wrapping_add(b));
                    }
                }
            }
            for hh in gi * n_rep..(gi + 1) * n_rep {
                // In bounds: t + 8 ≤ span.end, so the 8 scores end inside the head's row.
                scores8(q.as_ptr().add(hh * d), &ks, chunks, scale, sp.add(hh * len + t - first));
            }
        }
        t += 8;
    }
    for p in t..span.end {
        for (gi, j) in groups.clone().enumerate() {
            let kp = key(j, p)[..d].as_ptr();
            for hh in gi * n_rep..(gi + 1) * n_rep {
                let qp = q.as_ptr().add(hh * d);
                let mut acc = _mm256_setzero_ps();
                for c in 0..chunks {
                    acc = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(c * 8)), T::load8(kp.add(c * 8)), acc);
                }
                let h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
                let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
                let h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
                scores[hh * len + p - first] = _mm_cvtss_f32(h) * scale;
            }
        }
    }
    softmax_rows(&mut scores, len);
    // The weighted sums, a tile of positions at a time: each head's output elements in groups
    // of up to 8 vectors, summed over the tile's positions in registers.
    let mut t0 = first;
    while t0 < span.end {
        let t1 = (t0 + VALUE_TILE).min(span.end);
        for (gi, j) in groups.clone().enumerate() {
            let value = |p: usize| value(j, p);
            for hh in gi * n_rep..(gi + 1) * n_rep {
                let w = &scores[hh * len + t0 - first..hh * len + t1 - first];
                let o = &mut out[hh * d..(hh + 1) * d];
                for c0 in (0..chunks).step_by(8) {
                    let tile = t0..t1;
                    match chunks - c0 {
                        1 => add_weighted_values::<T, 1>(tile, w, &value, c0, o),
                        2 => add_weighted_values::<T, 2>(tile, w, &value, c0, o),
                        3 => add_weighted_values::<T, 3>(tile, w, &value, c0, o),
                        4 => add_weighted_values::<T, 4>(tile, w, &value, c0, o),
                        5 => add_weighted_values::<T, 5>(tile, w, &value, c0, o),
                        6 => add_weighted_values::<T, 6>(tile, w, &value, c0, o),
                        7 => add_weighted_values::<T, 7>(tile, w, &value, c0, o),
                        _ => add_weighted_values::<T, 8>(tile, w, &value, c0, o),
                    }
                }
            }
        }
        t0 = t1;
    }
}

/// The scores of query `qp` against 8 key rows `ks` (`chunks` vectors each), times `scale`,
/// stored at `out[..8]`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn scores8<U: KvElem>(qp: *const f32, ks: &[*const U; 8], chunks: usize, scale: f32, out: *mut f32) {
    use std::arch::x86_64::*;
    let mut acc = [_mm256_setzero_ps(); 8];
    for c in 0..chunks {
        let qv = _mm256_loadu_ps(qp.add(c * 8));
        for (a, k) in acc.iter_mut().zip(ks) {
            *a = _mm256_fmadd_ps(qv, U::load8(k.add(c * 8)), *a);
        }
    }
    // [s0 … s7] from the 8 sums: pairwise horizontal adds, then the two 128-bit halves.
    let (t0, t1) = (_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
    let (t2, t3) = (_mm256_hadd_ps(acc[4], acc[5]), _mm256_hadd_ps(acc[6], acc[7]));
    let (u0, u1) = (_mm256_hadd_ps(t0, t1), _mm256_hadd_ps(t2, t3));
    let sums = _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
    _mm256_storeu_ps(out, _mm256_mul_ps(sums, _mm256_set1_ps(scale)));
}

/// `out[8·c0 ..][.. 8·NC] += Σ_p weights[p] · value(p)[8·c0 ..][.. 8·NC]`, the `NC` sums in
/// registers. `NC` is a constant so that they stay there: with a count known only at run time
/// the compiler kept them on the stack, and every position paid a load and a store per vector
/// (perf: 45 % of a batched CPU decode step's attention samples on that loop).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn add_weighted_values<'a, T: KvElem, const NC: usize>(span: std::ops::Range<usize>, weights: &[f32], value: &impl Fn(usize) -> &'a [T], c0: usize, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let mut acc = [_mm256_setzero_ps(); NC];
    for (p, &w) in span.zip(weights) {
        let w = _mm256_set1_ps(w);
        let vp = value(p)[c0 * 8..][..NC * 8].as_ptr();
        for (i, a) in acc.iter_mut().enumerate() {
            *a = _mm256_fmadd_ps(w, T::load8(vp.add(i * 8)), *a);
        }
    }
    let op = out[c0 * 8..][..NC * 8].as_mut_ptr();
    for (i, a) in acc.iter().enumerate() {
        _mm256_storeu_ps(op.add(i * 8), _mm256_add_ps(_mm256_loadu_ps(op.add(i * 8)), *a));
    }
}

/// [`attend_heads`] in portable code, one head after another.
#[allow(clippy::too_many_arguments)]
fn attend_heads_any<'a, T: KvElem>(q: &[f32], groups: std::ops::Range<usize>, n_rep: usize, span: std::ops::Range<usize>, key: impl Fn(usize, usize) -> &'a [T], value: impl Fn(usize, usize) -> &'a [T], scale: f32, out: &mut [f32]) {
    let heads = groups.len() * n_rep;
    let d = q.len() / heads;
    if span.is_empty() {
        return;
    }
    for (hh, (qh, oh)) in q.chunks_exact(d).zip(out.chunks_exact_mut(d)).enumerate() {
        let j = groups.start + hh / n_rep;
        let mut w: Vec<f32> = span.clone().map(|t| dot(qh, key(j, t)) * scale).collect();
        softmax_rows(&mut w, span.len());
        for (t, wt) in span.clone().zip(&w) {
            for (oe, ve) in oh.iter_mut().zip(value(j, t)) {
                *oe += wt * ve.to_f32();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both the portable loop and the dispatched one (AVX2 + FMA where the CPU has them) against
    /// an f64 softmax-attention on awkward lengths (around the 8-position blocks) and head sizes.
    #[test]
    fn attend_head_matches_an_f64_reference() {
        let mut r = crate::rng::Rng::new(7);
        for d in [8usize, 24, 64, 72, 128, 12] {
            for len in [1usize, 7, 8, 9, 17, 100, 257] {
                let q: Vec<f32> = (0..d).map(|_| r.unit()).collect();
                let k: Vec<f32> = (0..len * d).map(|_| r.unit() * 2.0).collect();
                let v: Vec<f32> = (0..len * d).map(|_| r.unit()).collect();
                let scale = 1.0 / (d as f32).sqrt();
                // Softmax attention over positions start..len in f64.
                let reference = |start: usize| -> Vec<f64> {
                    let s: Vec<f64> = (start..len).map(|p| (0..d).map(|i| q[i] as f64 * k[p * d + i] as f64).sum::<f64>() * scale as f64).collect();
                    let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = s.iter().map(|x| (x - mx).exp()).collect();
                    let z: f64 = e.iter().sum();
                    (0..d).map(|i| (start..len).map(|p| e[p - start] / z * v[p * d + i] as f64).sum()).collect()
                };
                // Spans from 0 and from past 0 (a sliding window).
                for start in [0usize, len / 3] {
                    let want = reference(start);
                    let key = |p: usize| &k[p * d..(p + 1) * d];
                    let value = |p: usize| &v[p * d..(p + 1) * d];
                    let mut fast = vec![0f32; d];
                    attend_head(&q, start..len, key, value, scale, &mut fast);
                    let mut portable = vec![0f32; d];
                    attend_heads_any(&q, 0..1, 1, start..len, |_, p| key(p), |_, p| value(p), scale, &mut portable);
                    for (name, got) in [("dispatched", &fast), ("portable", &portable)] {
                        let err = got.iter().zip(&want).map(|(g, w)| (*g as f64 - w).abs()).fold(0f64, f64::max);
                        assert!(err < 2e-6, "{name} d={d} len={len} start={start}: error {err}");
                    }
                }
            }
        }
    }

    /// The same kernels over f16 keys and values (the CPU's half-size paged cache): the
    /// reference takes the f16 values exactly, so only the f32 arithmetic's rounding is left.
    #[test]
    fn attend_head_over_f16_rows_matches_an_f64_reference() {
        use half::f16;
        let mut r = crate::rng::Rng::new(8);
        for d in [8usize, 64, 72, 128, 12] {
            for len in [1usize, 7, 9, 100, 257] {
                let q: Vec<f32> = (0..d).map(|_| r.unit()).collect();
                let k: Vec<f16> = (0..len * d).map(|_| f16::from_f32(r.unit() * 2.0)).collect();
                let v: Vec<f16> = (0..len * d).map(|_| f16::from_f32(r.unit())).collect();
                let scale = 1.0 / (d as f32).sqrt();
                let s: Vec<f64> = (0..len).map(|p| (0..d).map(|i| q[i] as f64 * k[p * d + i].to_f64()).sum::<f64>() * scale as f64).collect();
                let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - mx).exp()).collect();
                let z: f64 = e.iter().sum();
                let want: Vec<f64> = (0..d).map(|i| (0..len).map(|p| e[p] / z * v[p * d + i].to_f64()).sum()).collect();
                let key = |p: usize| &k[p * d..(p + 1) * d];
                let value = |p: usize| &v[p * d..(p + 1) * d];
                let mut fast = vec![0f32; d];
                attend_head(&q, 0..len, key, value, scale, &mut fast);
                let mut portable = vec![0f32; d];
                attend_heads_any(&q, 0..1, 1, 0..len, |_, p| key(p), |_, p| value(p), scale, &mut portable);
                for (name, got) in [("dispatched", &fast), ("portable", &portable)] {
                    let err = got.iter().zip(&want).map(|(g, w)| (*g as f64 - w).abs()).fold(0f64, f64::max);
                    assert!(err < 2e-6, "{name} d={d} len={len}: error {err}");
                }
            }
        }
    }

    /// Several KV heads of several query heads each, attended together, in f32 and f16 rows
    /// laid out as the paged cache lays them (a position's rows of every KV head side by side):
    /// every head's output has the same bits as that head attended alone, on lengths around
    /// the tiles (8 positions for scores, 32 for values) and spans that start past 0.
    #[test]
    fn heads_attended_together_equal_each_alone() {
        fn check<T: KvElem>(make: impl Fn(f32) -> T, seed: u64) {
            let mut r = crate::rng::Rng::new(seed);
            for (kvh, n_rep, d) in [(3usize, 3usize, 64usize), (2, 4, 16), (4, 1, 24), (2, 3, 12)] {
                for len in [1usize, 7, 8, 9, 31, 33, 100] {
                    let h = kvh * n_rep;
                    let q: Vec<f32> = (0..h * d).map(|_| r.unit()).collect();
                    let k: Vec<T> = (0..len * kvh * d).map(|_| make(r.unit() * 2.0)).collect();
                    let v: Vec<T> = (0..len * kvh * d).map(|_| make(r.unit())).collect();
                    let key = |j: usize, p: usize| &k[(p * kvh + j) * d..][..d];
                    let value = |j: usize, p: usize| &v[(p * kvh + j) * d..][..d];
                    for start in [0usize, len / 3] {
                        let mut together = vec![0f32; h * d];
                        attend_heads(&q, 0..kvh, n_rep, start..len, key, value, 0.3, &mut together);
                        for hh in 0..h {
                            let j = hh / n_rep;
                            let mut alone = vec![0f32; d];
                            attend_head(&q[hh * d..][..d], start..len, |p| key(j, p), |p| value(j, p), 0.3, &mut alone);
                            let same = alone.iter().zip(&together[hh * d..][..d]).all(|(a, b)| a.to_bits() == b.to_bits());
                            assert!(same, "kvh={kvh} n_rep={n_rep} d={d} len={len} start={start}: head {hh} differs");
                        }
                    }
                }
            }
        }
        check(|x| x, 9);
        check(half::f16::from_f32, 10);
    }
}
