//! Causal attention of many queries on the CPU (prefill, chunked prefill, calibration), fused
//! per tile of queries: scores of the tile against the keys it may see, the softmax with a
//! vectorized exponential, and the weighted sum of values, all in one task.
//!
//! The generic path (matmul, additive mask, softmax, matmul) spent more of a 512-token prefill
//! than the 4-bit linears' own tiles: it scores every query against every key, also the half
//! the mask then throws away, materializes the mask-added scores twice, and takes glibc's
//! scalar `expf` per score. Here a tile of [`TILE`] queries of one head is scored against the
//! keys up to its last query only (the triangle's wasted half shrinks to within a tile), with
//! the `gemm` crate's microkernels for both products (they take the paged cache's strided keys
//! and values in place).
use super::attention_cpu::f32_slice;
use super::cpu_math::softmax;
use crate::quant::cpu::{gemm_f32, pool};
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

/// Queries per task: the wasted scores per query are under half a tile, and a tile's scores
/// (`TILE` × the keys) stay in L2 between the two products up to long contexts.
const TILE: usize = 32;

/// `q` `[b, heads, seq, d]` f32; `k`, `v` `[b, kv_heads, len, d]` f32 with unit stride on `d`
/// (views of the cache are fine), `len ≥ seq`: the queries are the last `seq` positions. Query
/// `i` at position `p = len - seq + i` sees keys `0..=p`, or `p - w ..= p` with a sliding window
/// `w` (the additive mask of `causal_mask`). Returns `[b, seq, heads * d]`.
pub fn attend_causal(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32, window: Option<usize>) -> Result<Tensor> {
    q.contiguous()?.apply_op3_no_bwd(k, v, &CausalAttention { scale, window })
}

/// Whether [`attend_causal`] applies: CPU, f32, unit stride on the head dimension, at least as
/// many keys as queries.
pub fn causal_applies(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    let unit = |t: &Tensor| t.layout().stride().last() == Some(&1);
    let f32 = |t: &Tensor| t.dtype() == candle_core::DType::F32;
    q.device().is_cpu() && f32(q) && f32(k) && f32(v) && unit(k) && unit(v) && matches!((q.dim(2), k.dim(2)), (Ok(s), Ok(l)) if s <= l)
}

struct CausalAttention {
    scale: f32,
    window: Option<usize>,
}

/// The last element a `[b, heads, len, d]` view with these strides reaches, plus one.
fn view_end(l: &Layout) -> Result<usize> {
    let dims = l.shape().dims4()?;
    let s = l.stride();
    Ok(l.start_offset() + (dims.0 - 1) * s[0] + (dims.1 - 1) * s[1] + (dims.2 - 1) * s[2] + dims.3)
}

impl CustomOp3 for CausalAttention {
    fn name(&self) -> &'static str {
        "awq-causal-attention"
    }

    fn cpu_fwd(&self, qs: &CpuStorage, ql: &Layout, ks: &CpuStorage, kl: &Layout, vs: &CpuStorage, vl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (q, k, v) = (f32_slice(qs, "q")?, f32_slice(ks, "k")?, f32_slice(vs, "v")?);
        let (b, h, seq, d) = ql.shape().dims4()?;
        let (kb, kvh, len, kd) = kl.shape().dims4()?;
        if kb != b || kd != d || vl.shape() != kl.shape() || kvh == 0 || h % kvh != 0 || seq > len || seq == 0 || d == 0 {
            candle_core::bail!("causal attention: shapes q {:?} k {:?} v {:?}", ql.shape(), kl.shape(), vl.shape());
        }
        let Some((q0, _)) = ql.contiguous_offsets() else { candle_core::bail!("causal attention: q must be contiguous") };
        if kl.stride()[3] != 1 || vl.stride()[3] != 1 || view_end(kl)? > k.len() || view_end(vl)? > v.len() {
            candle_core::bail!("causal attention: k/v views do not fit their storage with unit stride on the head dimension");
        }
        let (ks_, vs_) = (kl.stride(), vl.stride());
        let (n_rep, offset, tiles) = (h / kvh, len - seq, seq.div_ceil(TILE));
        let mut out = vec![0f32; b * seq * h * d];
        let out_ptr = pool::SendPtr(out.as_mut_ptr());
        let (scale, window) = (self.scale, self.window);
        // Tasks by (tile, batch, head), the last tiles (the most keys) first, so that the pool's
        // threads, taking tasks in turn, end together.
        pool::run(tiles * b * h, &|t| {
            let dst = out_ptr; // the whole SendPtr: a closure would capture only its raw field
            let tile = tiles - 1 - t / (b * h);
            let (bi, hi) = ((t % (b * h)) / h, t % h);
            let j = hi / n_rep;
            let (r0, r1) = (tile * TILE, ((tile + 1) * TILE).min(seq));
            let rows = r1 - r0;
            // Keys lo..=last: from what the tile's first query sees to its last query's own.
            let lo = window.map_or(0, |w| (offset + r0).saturating_sub(w));
            let cols = offset + r1 - lo;
            let mut p = vec![0f32; rows * cols];
            // SAFETY (both products): every matrix lies inside its buffer: q's rows r0..r1 of head
            // (bi, hi) in the contiguous q; keys and values lo..lo+cols ≤ len of KV head (bi, j),
            // checked against the storage above (`view_end`); the scores are `p`, rows × cols; the
            // output rows (bi, r0..r1, hi) are written by this task alone.
            unsafe {
                // Scores: scale · Q Kᵀ, the keys' rows read as columns.
                let kp = k.as_ptr().add(kl.start_offset() + bi * ks_[0] + j * ks_[1] + lo * ks_[2]);
                gemm_f32(rows, cols, d, p.as_mut_ptr(), cols, q.as_ptr().add(q0 + ((bi * h + hi) * seq + r0) * d), d, kp, 1, ks_[2], scale);
            }
            for (r, row) in p.chunks_mut(cols).enumerate() {
                let pos = offset + r0 + r;
                let first = window.map_or(0, |w| pos.saturating_sub(w)) - lo;
                softmax_in_span(row, first..pos + 1 - lo);
            }
            unsafe {
                // Output rows (bi, r0.., hi): P V.
                let vp = v.as_ptr().add(vl.start_offset() + bi * vs_[0] + j * vs_[1] + lo * vs_[2]);
                gemm_f32(rows, d, cols, dst.0.add(((bi * seq + r0) * h + hi) * d), h * d, p.as_ptr(), cols, vp, vs_[2], 1, 1.0);
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((b, seq, h * d))))
    }
}

/// `row[span]` becomes its softmax, the rest of `row` zeros (masked keys weigh nothing).
fn softmax_in_span(row: &mut [f32], span: std::ops::Range<usize>) {
    let (head, rest) = row.split_at_mut(span.start);
    let (live, tail) = rest.split_at_mut(span.len());
    head.fill(0.0);
    tail.fill(0.0);
    softmax(live)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Masked softmax attention in f64, straight from the definition.
    #[allow(clippy::too_many_arguments)]
    fn reference(q: &[f32], k: &[f32], v: &[f32], (b, h, seq, d): (usize, usize, usize, usize), (kvh, len): (usize, usize), window: Option<usize>, key_at: impl Fn(usize, usize, usize) -> usize) -> Vec<f64> {
        let scale = 1.0 / (d as f64).sqrt();
        let mut out = vec![0f64; b * seq * h * d];
        for bi in 0..b {
            for hi in 0..h {
                let j = hi / (h / kvh);
                for i in 0..seq {
                    let pos = len - seq + i;
                    let first = window.map_or(0, |w| pos.saturating_sub(w));
                    let qv = &q[((bi * h + hi) * seq + i) * d..][..d];
                    let s: Vec<f64> = (first..=pos).map(|p| (0..d).map(|e| qv[e] as f64 * k[key_at(bi, j, p) + e] as f64).sum::<f64>() * scale).collect();
                    let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = s.iter().map(|x| (x - mx).exp()).sum();
                    for e in 0..d {
                        out[((bi * seq + i) * h + hi) * d + e] = (first..=pos).zip(&s).map(|(p, x)| (x - mx).exp() / z * v[key_at(bi, j, p) + e] as f64).sum();
                    }
                }
            }
        }
        out
    }

    /// Awkward query counts (around the tile), offsets (chunked prefill), grouped heads, head
    /// sizes, sliding windows, and keys/values as strided views of a `[b, len, kv_heads, d]`
    /// cache, against the f64 definition.
    #[test]
    fn attend_causal_matches_an_f64_reference() -> Result<()> {
        let mut r = crate::rng::Rng::new(11);
        for (b, h, kvh, d) in [(1usize, 3usize, 1usize, 64usize), (2, 4, 2, 24), (1, 2, 2, 8)] {
            for (seq, offset) in [(1usize, 0usize), (1, 9), (5, 0), (31, 2), (33, 0), (70, 40), (97, 0)] {
                for window in [None, Some(7), Some(40)] {
                    let len = offset + seq;
                    let qv: Vec<f32> = (0..b * h * seq * d).map(|_| r.unit() * 2.0).collect();
                    let kv: Vec<f32> = (0..b * len * kvh * d).map(|_| r.unit() * 2.0).collect();
                    let vv: Vec<f32> = (0..b * len * kvh * d).map(|_| r.unit()).collect();
                    let dev = Device::Cpu;
                    let q = Tensor::from_slice(&qv, (b, h, seq, d), &dev)?;
                    let k = Tensor::from_slice(&kv, (b, len, kvh, d), &dev)?.transpose(1, 2)?;
                    let v = Tensor::from_slice(&vv, (b, len, kvh, d), &dev)?.transpose(1, 2)?;
                    assert!(causal_applies(&q, &k, &v));
                    let got = attend_causal(&q, &k, &v, 1.0 / (d as f32).sqrt(), window)?;
                    assert_eq!(got.dims(), &[b, seq, h * d]);
                    let got = got.flatten_all()?.to_vec1::<f32>()?;
                    let want = reference(&qv, &kv, &vv, (b, h, seq, d), (kvh, len), window, |bi, j, p| ((bi * len + p) * kvh + j) * d);
                    let err = got.iter().zip(&want).map(|(g, w)| (*g as f64 - w).abs()).fold(0f64, f64::max);
                    assert!(err < 2e-6, "b={b} h={h} kvh={kvh} d={d} seq={seq} offset={offset} window={window:?}: error {err}");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn more_queries_than_keys_are_refused() -> Result<()> {
        let q = Tensor::zeros((1, 2, 4, 8), candle_core::DType::F32, &Device::Cpu)?;
        let k = Tensor::zeros((1, 1, 3, 8), candle_core::DType::F32, &Device::Cpu)?;
        assert!(!causal_applies(&q, &k, &k));
        let err = attend_causal(&q, &k, &k, 1.0, None).unwrap_err().to_string();
        assert!(err.contains("causal attention: shapes"), "{err}");
        Ok(())
    }
}
