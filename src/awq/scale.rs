//! The activation-aware scale search for one group of linear layers sharing an input
//! (docs/AWQ.md, "The scale search"), and folding the chosen scales into the model.
use crate::error::{Error, Result};
use crate::quant::{fake_quantize, QuantScheme};
use candle_core::{DType, Tensor, D};

/// Mean |x| per input channel over all tokens; `x` is `[..., in]`, the result `[in]` in f32.
pub fn x_mean(x: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let flat = x.to_dtype(DType::F32)?.reshape(((), d))?;
    Ok(flat.abs()?.mean(0)?)
}

/// The weight side of duo scaling: |W| over its group's max (+1e-6), averaged over the output
/// rows of all the group's layers; `[in]`.
pub fn w_mean(weights: &[Tensor], group_size: usize) -> Result<Tensor> {
    let w = Tensor::cat(weights, 0)?.to_dtype(DType::F32)?;
    let (rows, inp) = w.dims2()?;
    let g = if group_size == 0 { inp } else { group_size };
    let grouped = w.abs()?.reshape((rows * inp / g, g))?;
    let scaled = grouped.broadcast_div(&(grouped.max_keepdim(1)? + 1e-6)?)?;
    Ok(scaled.reshape((rows, inp))?.mean(0)?)
}

/// Scales for ratio `alpha`: plain `x_mean^a` or duo `x_mean^a / (w_mean^(1-a) + 1e-4)`, clamped
/// at 1e-4, normalized by `sqrt(max * min)`, non-finite values replaced by 1.
pub fn scales_for(x_mean: &Tensor, w_mean: Option<&Tensor>, alpha: f64) -> Result<Tensor> {
    let s = x_mean.powf(alpha)?;
    let s = match w_mean {
        Some(wm) => (s / (wm.powf(1.0 - alpha)? + 1e-4)?)?,
        None => s,
    };
    let s = s.clamp(1e-4, f64::INFINITY)?;
    let max = s.max(0)?.to_scalar::<f32>()?;
    let min = s.min(0)?.to_scalar::<f32>()?;
    let s = (s / f64::from(max * min).sqrt())?;
    // inf / NaN -> 1 (as the reference does).
    let finite = s.abs()?.lt(f64::from(f32::MAX))?; // false for inf and NaN
    Ok(finite.where_cond(&s, &s.ones_like()?)?)
}

/// `Q(W · diag(s)) · diag(1/s)`: the weight the quantized, scaled layer effectively applies.
pub fn scaled_fake_quant(w: &Tensor, s: &Tensor, p: QuantScheme) -> Result<Tensor> {
    let w = w.to_dtype(DType::F32)?;
    let q = fake_quantize(&w.broadcast_mul(s)?, p)?;
    Ok(q.broadcast_div(s)?)
}

/// Mean squared difference in f32.
pub fn mse(a: &Tensor, b: &Tensor) -> Result<f64> {
    let d = (a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?;
    Ok(f64::from(d.sqr()?.mean_all()?.to_scalar::<f32>()?))
}

/// How one scale is shared by several input channels of a layer: under grouped-query attention
/// every value head is read by `rep` query heads, so o_proj's input channel `h·hd + d` carries v
/// channel `(h / rep)·hd + d`. A scale folded out of v_proj's output rows must then be the same
/// on all `rep` o_proj columns that carry that channel: one scale per v channel, `kv · hd` of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedHeads {
    pub kv_heads: usize,
    pub rep: usize,
    pub head_dim: usize,
}

impl SharedHeads {
    /// The per-channel statistic `t` (`[kv · rep · hd]`, o_proj's inputs) averaged over the
    /// `rep` channels that share a scale: `[kv · hd]`.
    pub fn reduce(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.reshape((self.kv_heads, self.rep, self.head_dim))?.mean(1)?.flatten_all()?)
    }

    /// One scale per v channel (`[kv · hd]`) repeated onto o_proj's input channels.
    pub fn expand(&self, s: &Tensor) -> Result<Tensor> {
        let (kv, rep, hd) = (self.kv_heads, self.rep, self.head_dim);
        Ok(s.reshape((kv, 1, hd))?.broadcast_as((kv, rep, hd))?.contiguous()?.flatten_all()?)
    }
}

/// Result of one group's search.
#[derive(Debug, Clone)]
pub struct ScaleChoice {
    /// One per input channel of the group's layers, or with [`SharedHeads`] one per shared
    /// channel (expand them for the layers' columns).
    pub scales: Tensor,
    pub ratio: f64,
    /// Loss of plain round-to-nearest (no scaling).
    pub loss_rtn: f64,
    pub loss_best: f64,
    /// The loss of every ratio tried, in grid order (reports: where the optimum is and how flat).
    pub losses: Vec<f64>,
}

/// Grid-searches the ratio for a group. `run(ws)` evaluates the measured module with the group's
/// weights replaced by `ws` (in the order of `weights`); its output is compared with `fp_out`.
/// `x_mean` is per input channel of the weights, also with `shared` (it is reduced here).
#[allow(clippy::too_many_arguments)]
pub fn search(
    what: &str,
    x_mean: &Tensor,
    weights: &[Tensor],
    fp_out: &Tensor,
    p: QuantScheme,
    duo: bool,
    n_grid: usize,
    shared: Option<SharedHeads>,
    run: &dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>,
) -> Result<ScaleChoice> {
    let reduce = |t: Tensor| match shared {
        Some(sh) => sh.reduce(&t),
        None => Ok(t),
    };
    let wm = if duo { Some(reduce(w_mean(weights, p.group.columns())?)?) } else { None };
    let x_mean = &reduce(x_mean.clone())?;
    let loss_of = |s: Option<&Tensor>| -> Result<f64> {
        let s = s.map(|s| shared.map_or_else(|| Ok(s.clone()), |sh| sh.expand(s))).transpose()?;
        let ws: Vec<Tensor> = weights
            .iter()
            .map(|w| match &s {
                Some(s) => scaled_fake_quant(w, s, p),
                None => fake_quantize(w, p),
            })
            .collect::<Result<_>>()?;
        let out = run(&ws)?;
        let l = mse(&out, fp_out)?;
        if !l.is_finite() {
            return Err(Error::msg(format!("{what}: the loss is {l} (NaN or inf in the activations or weights)")));
        }
        Ok(l)
    };
    let loss_rtn = loss_of(None)?;
    let mut best: Option<(f64, f64, Tensor)> = None;
    let mut losses = Vec::with_capacity(n_grid);
    for i in 0..n_grid {
        let alpha = i as f64 / n_grid as f64;
        let s = scales_for(x_mean, wm.as_ref(), alpha)?;
        let l = loss_of(Some(&s))?;
        losses.push(l);
        if best.as_ref().is_none_or(|(bl, _, _)| l < *bl) {
            best = Some((l, alpha, s));
        }
    }
    let (loss_best, ratio, scales) = best.ok_or_else(|| Error::msg("empty ratio grid"))?;
    Ok(ScaleChoice { scales, ratio, loss_rtn, loss_best, losses })
}

/// Multiplies the input columns of `w` (`[out, in]`) by `s`.
pub fn scale_columns(w: &Tensor, s: &Tensor) -> Result<Tensor> {
    Ok(w.broadcast_mul(&s.to_dtype(w.dtype())?)?)
}

/// Divides the last `len(s)` rows of `w` (`[out, in]` or a bias `[out]`) by `s`.
pub fn unscale_rows(w: &Tensor, s: &Tensor) -> Result<Tensor> {
    let n = s.dim(0)?;
    let out = w.dim(0)?;
    let s = s.to_dtype(w.dtype())?;
    let s = if w.rank() == 2 { s.unsqueeze(1)? } else { s };
    if out == n {
        return Ok(w.broadcast_div(&s)?);
    }
    let head = w.narrow(0, 0, out - n)?;
    let tail = w.narrow(0, out - n, n)?.broadcast_div(&s)?;
    Ok(Tensor::cat(&[head, tail], 0)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn plain_alpha_zero_is_rtn() {
        let dev = Device::Cpu;
        let xm = Tensor::rand(0.1f32, 3.0, 64, &dev).unwrap();
        let s = scales_for(&xm, None, 0.0).unwrap();
        assert_eq!(s.to_vec1::<f32>().unwrap(), vec![1.0; 64]);
        let w = Tensor::randn(0f32, 1.0, (8, 64), &dev).unwrap();
        let p = QuantScheme::new(4, 32).unwrap();
        let a = scaled_fake_quant(&w, &s, p).unwrap();
        let b = fake_quantize(&w, p).unwrap();
        assert_eq!(mse(&a, &b).unwrap(), 0.0);
    }

    #[test]
    fn scales_are_normalized_and_finite() {
        let dev = Device::Cpu;
        let xm = Tensor::new(&[0.0f32, 1e-8, 1.0, 50.0], &dev).unwrap();
        let wm = Tensor::new(&[0.5f32, 0.2, 0.9, 0.1], &dev).unwrap();
        for alpha in [0.0, 0.5, 0.95] {
            let s = scales_for(&xm, Some(&wm), alpha).unwrap().to_vec1::<f32>().unwrap();
            let (mx, mn) = s.iter().fold((f32::MIN, f32::MAX), |(a, b), &x| (a.max(x), b.min(x)));
            assert!(s.iter().all(|x| x.is_finite() && *x > 0.0));
            assert!(((mx * mn).sqrt() - 1.0).abs() < 1e-4, "{s:?}");
        }
    }

    #[test]
    fn shared_heads_reduce_and_expand_follow_the_query_heads() {
        let dev = Device::Cpu;
        // 2 kv heads of 3 channels, each read by 2 query heads: o_proj has 12 input channels.
        let sh = SharedHeads { kv_heads: 2, rep: 2, head_dim: 3 };
        let o = Tensor::new(&[1f32, 2., 3., 3., 4., 5., 10., 20., 30., 30., 40., 50.], &dev).unwrap();
        assert_eq!(sh.reduce(&o).unwrap().to_vec1::<f32>().unwrap(), vec![2., 3., 4., 20., 30., 40.]);
        let s = Tensor::new(&[1f32, 2., 3., 4., 5., 6.], &dev).unwrap();
        assert_eq!(sh.expand(&s).unwrap().to_vec1::<f32>().unwrap(), vec![1., 2., 3., 1., 2., 3., 4., 5., 6., 4., 5., 6.]);
    }

    #[test]
    fn folding_preserves_the_function() {
        let dev = Device::Cpu;
        let prev = Tensor::randn(0f32, 1.0, (6, 5), &dev).unwrap();
        let next = Tensor::randn(0f32, 1.0, (3, 4), &dev).unwrap();
        let s = Tensor::new(&[0.5f32, 2.0, 3.0, 0.25], &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 5), &dev).unwrap();
        let y = x.matmul(&prev.t().unwrap()).unwrap().narrow(1, 2, 4).unwrap().matmul(&next.t().unwrap()).unwrap();
        let p2 = unscale_rows(&prev, &s).unwrap();
        let n2 = scale_columns(&next, &s).unwrap();
        let y2 = x.matmul(&p2.t().unwrap()).unwrap().narrow(1, 2, 4).unwrap().matmul(&n2.t().unwrap()).unwrap();
        assert!(mse(&y, &y2).unwrap() < 1e-10);
    }
}
