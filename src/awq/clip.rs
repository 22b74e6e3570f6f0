//! The clipping search (docs/AWQ.md, "The clip search"): per output row and input group, the shrink
//! of the weight range that minimizes the error of the group's partial dot products.
use crate::error::Result;
use crate::quant::{fake_quantize, QuantScheme};
use candle_core::{DType, Tensor};

pub struct ClipOptions {
    pub n_grid: usize,
    pub max_shrink: f64,
    /// Tokens kept by the stride subsampling (512 to 1023 survive).
    pub n_tokens: usize,
    /// Bound on the elements of one `[groups, tokens, rows]` product, to bound memory.
    pub max_elems: usize,
}

impl Default for ClipOptions {
    fn default() -> Self {
        Self { n_grid: 20, max_shrink: 0.5, n_tokens: 512, max_elems: 1 << 24 }
    }
}

/// Every `n / n_tokens`-th row of `x` (`[..., in]` flattened to `[tokens, in]`), in f32: the
/// reference's stride subsampling, so that between `n_tokens` and `2 n_tokens - 1` rows survive.
pub fn subsample_tokens(x: &Tensor, n_tokens: usize) -> Result<Tensor> {
    let inp = x.dim(candle_core::D::Minus1)?;
    let x = x.to_dtype(DType::F32)?.reshape(((), inp))?;
    let n = x.dim(0)?;
    let step = (n / n_tokens.max(1)).max(1);
    let idx: Vec<u32> = (0..n).step_by(step).map(|i| i as u32).collect();
    Ok(x.index_select(&Tensor::new(idx.as_slice(), x.device())?, 0)?)
}

/// Best clipping bound per `[out, groups]` for weight `w` (`[out, in]`) with inputs `x`
/// (`[tokens, in]`). Math in f32.
pub fn search_clip(w: &Tensor, x: &Tensor, p: QuantScheme, o: &ClipOptions) -> Result<Tensor> {
    let w = w.to_dtype(DType::F32)?;
    let (out, inp) = w.dims2()?;
    let g = p.group_for(inp);
    let groups = inp / g;
    let xs = subsample_tokens(x, o.n_tokens)?;
    let t = xs.dim(0)?;
    // [groups, tokens, g]
    let xg = xs.reshape((t, groups, g))?.transpose(0, 1)?.contiguous()?;
    let gp = p.with_group(g);
    let rows_per_chunk = (o.max_elems / (groups * t).max(1)).clamp(1, out);
    let mut best_all = Vec::new();
    let mut o0 = 0;
    while o0 < out {
        let oc = rows_per_chunk.min(out - o0);
        // [groups, oc, g]
        let wc = w.narrow(0, o0, oc)?.reshape((oc, groups, g))?.transpose(0, 1)?.contiguous()?;
        let org_max = wc.abs()?.max_keepdim(2)?; // [groups, oc, 1]
        let org_out = xg.matmul(&wc.transpose(1, 2)?)?; // [groups, t, oc]
        let mut best = org_max.squeeze(2)?;
        let mut min_err: Option<Tensor> = None;
        let steps = (o.max_shrink * o.n_grid as f64) as usize;
        for i in 0..steps {
            let mv = (&org_max * (1.0 - i as f64 / o.n_grid as f64))?;
            let cur = wc.broadcast_maximum(&mv.neg()?)?.broadcast_minimum(&mv)?;
            let q = fake_quantize(&cur.reshape((groups * oc, g))?, gp)?.reshape((groups, oc, g))?;
            let q_out = xg.matmul(&q.transpose(1, 2)?)?;
            let err = (q_out - &org_out)?.sqr()?.mean(1)?; // [groups, oc]
            let mv2 = mv.squeeze(2)?;
            match &min_err {
                None => {
                    best = mv2;
                    min_err = Some(err);
                }
                Some(me) => {
                    // Strictly better only: on ties the earlier (less shrunk) candidate stays.
                    let better = err.lt(me)?;
                    best = better.where_cond(&mv2, &best)?;
                    min_err = Some(better.where_cond(&err, me)?);
                }
            }
        }
        best_all.push(best);
        o0 += oc;
    }
    // [groups, out] -> [out, groups]
    Ok(Tensor::cat(&best_all, 1)?.t()?.contiguous()?)
}

/// The mean of the chosen bound over the group's own max |w| (1 = unclipped, 0.55 = the most shrunk).
pub fn mean_shrink(w: &Tensor, max_val: &Tensor) -> Result<f64> {
    let (out, inp) = w.dims2()?;
    let groups = max_val.dim(1)?;
    let amax = w.to_dtype(DType::F32)?.abs()?.reshape((out, groups, inp / groups))?.max(2)?;
    let r = (max_val.to_dtype(DType::F32)? / amax.clamp(1e-30, f64::INFINITY)?)?;
    Ok(f64::from(r.mean_all()?.to_scalar::<f32>()?))
}

/// Clamps `w` (`[out, in]`) group-wise to `[-max_val, max_val]` (`max_val` `[out, groups]`).
pub fn apply_clip(w: &Tensor, max_val: &Tensor) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let groups = max_val.dim(1)?;
    let mv = max_val.to_dtype(w.dtype())?.unsqueeze(2)?;
    let wg = w.reshape((out, groups, inp / groups))?;
    Ok(wg.broadcast_maximum(&mv.neg()?)?.broadcast_minimum(&mv)?.reshape((out, inp))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn clip_never_hurts_the_measured_error() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (16, 64), &dev).unwrap();
        // A heavy outlier makes clipping worthwhile.
        let w = w.slice_assign(&[0..1, 0..1], &Tensor::new(&[[9.0f32]], &dev).unwrap()).unwrap();
        let x = Tensor::randn(0f32, 1.0, (300, 64), &dev).unwrap();
        let p = QuantScheme::new(3, 32).unwrap();
        let mv = search_clip(&w, &x, p, &ClipOptions::default()).unwrap();
        assert_eq!(mv.dims(), &[16, 2]);
        let err = |w2: &Tensor| {
            let q = fake_quantize(w2, p).unwrap();
            let d = (x.matmul(&q.t().unwrap()).unwrap() - x.matmul(&w.t().unwrap()).unwrap()).unwrap();
            d.sqr().unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap()
        };
        let clipped = apply_clip(&w, &mv).unwrap();
        assert!(err(&clipped) <= err(&w) * 1.0001, "{} > {}", err(&clipped), err(&w));
        // The bound never exceeds the row's own max and never shrinks below half of it.
        let amax = w.abs().unwrap().reshape((16, 2, 32)).unwrap().max(2).unwrap();
        let ratio = (mv / amax).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(ratio.iter().all(|r| *r <= 1.0 + 1e-6 && *r >= 0.55 - 1e-6), "{ratio:?}");
    }
}
