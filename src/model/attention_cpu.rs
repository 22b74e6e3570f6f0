//! Single-query attention on the CPU, fused: scores, softmax and the weighted sum of values in
//! one pass per head, reading the KV cache in place. A decode step otherwise spends as long in
//! the generic path's small matmuls, softmax and reshapes as in the 4-bit linears.
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

fn f32_slice<'a>(s: &'a CpuStorage, what: &str) -> Result<&'a [f32]> {
    match s {
        CpuStorage::F32(v) => Ok(v),
        _ => candle_core::bail!("decode attention: {what} must be f32"),
    }
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        for l in 0..8 {
            acc[l] += a[c * 8 + l] * b[c * 8 + l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for i in chunks * 8..a.len() {
        s += a[i] * b[i];
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
/// rows. Shared by the custom op above and the host decode step, so both compute alike.
pub fn attend_head<'a>(q: &[f32], span: std::ops::Range<usize>, key: impl Fn(usize) -> &'a [f32], value: impl Fn(usize) -> &'a [f32], scale: f32, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: both features were just detected.
        return unsafe { attend_head_avx2(q, span, key, value, scale, out) };
    }
    attend_head_any(q, span, key, value, scale, out)
}

/// [`attend_head`] compiled for AVX2 (the dot products and the weighted sum vectorize 8 wide
/// instead of SSE2's 4; the same operations in the same order).
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_head_avx2<'a>(q: &[f32], span: std::ops::Range<usize>, key: impl Fn(usize) -> &'a [f32], value: impl Fn(usize) -> &'a [f32], scale: f32, out: &mut [f32]) {
    attend_head_any(q, span, key, value, scale, out)
}

#[inline(always)]
fn attend_head_any<'a>(q: &[f32], span: std::ops::Range<usize>, key: impl Fn(usize) -> &'a [f32], value: impl Fn(usize) -> &'a [f32], scale: f32, out: &mut [f32]) {
    let mut scores: Vec<f32> = span.clone().map(|t| dot(q, key(t)) * scale).collect();
    let max = scores.iter().fold(f32::NEG_INFINITY, |a, &s| a.max(s));
    let mut sum = 0f32;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    let inv = 1.0 / sum;
    for (t, p) in span.zip(&scores) {
        let w = p * inv;
        for (oe, ve) in out.iter_mut().zip(value(t)) {
            *oe += w * ve;
        }
    }
}
