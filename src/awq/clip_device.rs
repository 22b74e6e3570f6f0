//! The clip search as tensor operations on the weight's device, for GPUs: the candidates, the
//! group quantizer and the Gram-matrix error of the host search in `clip.rs`, but each candidate
//! evaluated for every row and group of the layer at once, its error `dᵀ G d` as one batched
//! matmul over the groups. On Llama-2-7B the host loop spent about 2 · 10¹² multiply-adds a block
//! (100 candidates × `g` per weight), minutes of a calibration pass on the CPU and seconds on an
//! H100's f32 units.
//!
//! The arithmetic is the host loop's, operation for operation and in f32 (each step is its own
//! kernel, so nothing is contracted into a fused multiply-add); only the error's sums run in
//! another order, so the two searches agree except between candidates whose errors tie to f32
//! rounding (tested on the CPU). Keep TF32 off while this runs: the error differences that pick a
//! candidate are far below TF32's rounding.
use super::clip::{ClipBounds, ClipMode};
use crate::error::Result;
use candle_core::{DType, Tensor};

/// The grid of one layer's search.
pub(super) struct Grid {
    pub mode: ClipMode,
    /// Shrink steps per bound.
    pub steps: usize,
    pub n_grid: f32,
    /// The largest code (`2^bits − 1`).
    pub max_code: f32,
}

/// Best bounds per (row, group) of `w` (`[out, in]`, groups of `g`) with `gram` (`[groups, g, g]`,
/// f32, on `w`'s device) the groups' input Gram matrices divided by the token count.
pub(super) fn search_gram(w: &Tensor, gram: &Tensor, g: usize, grid: &Grid) -> Result<ClipBounds> {
    let (out, inp) = w.dims2()?;
    let groups = inp / g;
    let dev = w.device();
    // f32 scalars as one-element tensors: `broadcast_*` with them computes exactly what the host
    // loop's f32 literals do (a scalar argument would pass through f64).
    let scalar = |v: f32| Tensor::new(&[v], dev);
    let wg = w.to_dtype(DType::F32)?.reshape((out, groups, g))?;
    let mn = wg.min_keepdim(2)?;
    let mx = wg.max_keepdim(2)?;
    let amax = mn.abs()?.maximum(&mx.abs()?)?;
    let (zero_code, max_code, eps) = (scalar(0.0)?, scalar(grid.max_code)?, scalar(1e-5)?);
    let clamp_codes = |t: &Tensor| t.broadcast_maximum(&zero_code)?.broadcast_minimum(&max_code);
    let mut best_e = Tensor::full(f32::INFINITY, (out, groups, 1), dev)?;
    let (mut best_lo, mut best_hi) = (mn.clone(), mx.clone());
    let inner = if grid.mode == ClipMode::Asymmetric { grid.steps } else { 1 };
    for i in 0..grid.steps {
        let f_hi = 1.0 - i as f32 / grid.n_grid;
        for j in 0..inner {
            let (lo, hi) = match grid.mode {
                ClipMode::Symmetric => (amax.broadcast_mul(&scalar(-f_hi)?)?, amax.broadcast_mul(&scalar(f_hi)?)?),
                ClipMode::Asymmetric => (mn.broadcast_mul(&scalar(1.0 - j as f32 / grid.n_grid)?)?, mx.broadcast_mul(&scalar(f_hi)?)?),
            };
            // The clamped group's minimum and maximum are the clamped extremes.
            let cmn = mn.maximum(&lo)?.minimum(&hi)?;
            let cmx = mx.maximum(&lo)?.minimum(&hi)?;
            let c = wg.broadcast_maximum(&lo)?.broadcast_minimum(&hi)?;
            let scale = (cmx - &cmn)?.broadcast_maximum(&eps)?.broadcast_div(&max_code)?;
            let zero = clamp_codes(&cmn.div(&scale)?.round()?.neg()?)?;
            let q = clamp_codes(&c.broadcast_div(&scale)?.round()?.broadcast_add(&zero)?)?;
            let d = (q.broadcast_sub(&zero)?.broadcast_mul(&scale)? - &wg)?;
            // dᵀ G d per (row, group), the groups as the batch of one matmul.
            let dg = d.transpose(0, 1)?.contiguous()?;
            let e = (dg.matmul(gram)? * &dg)?.sum_keepdim(2)?.transpose(0, 1)?;
            // Strictly better only: on ties the earlier (less shrunk) candidate stays.
            let better = e.lt(&best_e)?;
            best_e = better.where_cond(&e, &best_e)?;
            best_lo = better.where_cond(&lo, &best_lo)?;
            best_hi = better.where_cond(&hi, &best_hi)?;
        }
    }
    Ok(ClipBounds { out, groups, lo: best_lo.flatten_all()?.to_vec1()?, hi: best_hi.flatten_all()?.to_vec1()? })
}
