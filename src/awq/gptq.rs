//! GPTQ for one linear layer (docs/GPTQ.md): columns quantized one at a time, each one's
//! rounding error spread over the columns not yet quantized through the inverse Hessian of the
//! layer's inputs, in blocks with a lazy update of the rest.
//!
//! The column loop runs on the host in f64 (its work is `out × in × block` multiply-adds per
//! layer, and the order of the updates is what GPTQ is); the lazy block updates, the bulk of
//! the work (`out × in² / 2`), are f64 matmuls on the pass's device; the Hessian is an f32
//! matmul there. The Cholesky factorization is on the host in f64 ([`super::cholesky`]).
use super::cholesky::inverse_upper_cholesky;
use crate::error::{Error, Result};
use crate::quant::{group_scale_zero, QuantScheme, QuantizedWeight, WeightShape};
use candle_core::{DType, Device, Tensor};
use serde::Serialize;

/// The settings of GPTQ.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct GptqOptions {
    /// Dampening: `damp × mean(diag H)` is added to the diagonal (raised ×10, twice, where the
    /// Cholesky factorization still fails).
    pub damp: f64,
    /// Quantize the columns in decreasing order of `diag H` (`desc_act`).
    pub act_order: bool,
    /// With `act_order`: each group's scale and zero from the unpermuted weight before the pass,
    /// so that groups stay contiguous (no input permutation at inference). Without it the
    /// groups follow the activation order and the checkpoint carries a `g_idx`.
    pub static_groups: bool,
    /// Quantize q/k/v, then o, then gate/up, then down, each on inputs through the layers
    /// already quantized.
    pub true_sequential: bool,
    /// Symmetric quantization: zero point fixed at `2^(bits-1)`, scale from max |w|.
    pub sym: bool,
    /// Error propagation (0 = off): before rounding, each weight moves this fraction of the way
    /// towards the weight that best maps the quantized stream's inputs to the full-precision
    /// outputs ([`propagation_target`]).
    pub propagate: f64,
    /// Error propagation into down_proj as well (QEP's reference leaves it out: its inputs are
    /// the widest and the most prone to being overfitted).
    pub propagate_down: bool,
}

impl Default for GptqOptions {
    fn default() -> Self {
        Self { damp: 0.01, act_order: false, static_groups: true, true_sequential: true, sym: false, propagate: 0.0, propagate_down: false }
    }
}

/// Columns per lazy-update block: 128, rounded up to whole groups so that a group never spans two
/// blocks (its scale is then found from fully updated weights).
pub fn block_columns(group: usize, inp: usize) -> usize {
    if group >= inp {
        128
    } else {
        group * 128usize.div_ceil(group)
    }
}

/// `H = (2/n) Σ xᵀx` over the `n` tokens of a layer's captured input `x` (`[..., in]`).
#[derive(Debug, Clone)]
pub struct Hessian {
    /// Row-major `in × in`.
    pub h: Vec<f64>,
    pub dim: usize,
    pub tokens: usize,
}

impl Hessian {
    pub fn of_inputs(x: &Tensor) -> Result<Self> {
        let dim = x.dim(candle_core::D::Minus1)?;
        let flat = x.to_dtype(DType::F32)?.reshape(((), dim))?;
        let tokens = flat.dim(0)?;
        if tokens == 0 {
            return Err(Error::msg("GPTQ: no calibration tokens"));
        }
        let xtx = flat.t()?.matmul(&flat)?;
        let scale = 2.0 / tokens as f64;
        let h = xtx.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?.into_iter().map(|v| v * scale).collect();
        Ok(Self { h, dim, tokens })
    }

    pub fn trace(&self) -> f64 {
        (0..self.dim).map(|i| self.h[i * self.dim + i]).sum()
    }
}

/// What GPTQ needs from a Hessian, prepared once for every layer that reads the same input.
#[derive(Debug, Clone)]
pub struct Prepared {
    dim: usize,
    /// Inputs that never fired (`diag H = 0`): their weights are zeroed.
    dead: Vec<bool>,
    /// With act-order: `perm[j]` is the column quantized `j`-th.
    perm: Option<Vec<usize>>,
    /// Upper Cholesky factor of the dampened, permuted `H⁻¹`.
    u: Vec<f64>,
    /// The dampening fraction the factorization succeeded with.
    pub damp: f64,
    /// `tr H` before dampening.
    pub trace: f64,
}

impl Prepared {
    /// `what` names the layer(s) in errors.
    pub fn new(h: &Hessian, o: &GptqOptions, what: &str) -> Result<Self> {
        let n = h.dim;
        if h.h.iter().any(|v| !v.is_finite()) {
            return Err(Error::msg(format!("{what}: the Hessian of the calibration inputs has NaN or inf entries")));
        }
        if !(o.damp > 0.0 && o.damp.is_finite()) {
            return Err(Error::msg(format!("--damp {}: must be a positive number", o.damp)));
        }
        let mut hm = h.h.clone();
        let dead: Vec<bool> = (0..n).map(|i| hm[i * n + i] == 0.0).collect();
        for (i, _) in dead.iter().enumerate().filter(|(_, d)| **d) {
            hm[i * n + i] = 1.0;
        }
        let perm = o.act_order.then(|| {
            let mut p: Vec<usize> = (0..n).collect();
            // Decreasing diag H; ties keep the natural order (a stable sort), so it is reproducible.
            p.sort_by(|&a, &b| hm[b * n + b].total_cmp(&hm[a * n + a]));
            p
        });
        if let Some(p) = &perm {
            hm = (0..n * n).map(|ij| hm[p[ij / n] * n + p[ij % n]]).collect();
        }
        let mean_diag = (0..n).map(|i| hm[i * n + i]).sum::<f64>() / n as f64;
        let mut damp = o.damp;
        let mut tries = 0;
        loop {
            let mut hd = hm.clone();
            for i in 0..n {
                hd[i * n + i] += damp * mean_diag;
            }
            match inverse_upper_cholesky(&hd, n) {
                Ok(u) => return Ok(Self { dim: n, dead, perm, u, damp, trace: h.trace() }),
                Err(col) if tries == 2 => {
                    let col = perm.as_ref().map_or(col, |p| p[col]);
                    return Err(Error::msg(format!(
                        "{what}: the Hessian of the calibration inputs is not positive definite even with dampening \
                         {damp} (input column {col}); the inputs may be degenerate: use more calibration data or a larger --damp"
                    )));
                }
                Err(_) => {
                    damp *= 10.0;
                    tries += 1;
                }
            }
        }
    }

    /// The activation order (`perm[j]` quantized `j`-th), if any.
    pub fn order(&self) -> Option<&[usize]> {
        self.perm.as_deref()
    }
}

/// `D = (2/n) (X_fp − X_q)ᵀ X_q` for one input (`[..., in]` each, the same tokens): how the
/// quantized stream's inputs `X_q` have drifted from the full-precision ones `X_fp`, in the
/// units of [`Hessian`].
pub fn input_drift(x_fp: &Tensor, x_q: &Tensor) -> Result<Tensor> {
    let dim = x_q.dim(candle_core::D::Minus1)?;
    let q = x_q.to_dtype(DType::F32)?.reshape(((), dim))?;
    let f = x_fp.to_dtype(DType::F32)?.reshape(((), dim))?;
    if f.dims() != q.dims() {
        return Err(Error::msg(format!("GPTQ: full-precision inputs {:?} against quantized-stream inputs {:?}", f.dims(), q.dims())));
    }
    let n = q.dim(0)?;
    Ok((f.sub(&q)?.t()?.matmul(&q)? * (2.0 / n as f64))?)
}

/// The weight GPTQ rounds under error propagation (docs/GPTQ.md, "Error propagation"):
/// `w + alpha · w · D · H⁻¹`, with `D` the [`input_drift`] and `H⁻¹` the dampened inverse that
/// `prep` factors. At `alpha = 1` it minimises `‖X_fp wᵀ − X_q w'ᵀ‖²` (plus the dampening), so
/// that the layer undoes the error the layers before it left in its inputs instead of
/// reproducing the full-precision weight on drifted inputs.
pub fn propagation_target(w: &Tensor, drift: &Tensor, prep: &Prepared, alpha: f64) -> Result<Tensor> {
    let (_, inp) = w.dims2()?;
    let n = prep.dim;
    if inp != n || drift.dims2()? != (n, n) {
        return Err(Error::msg(format!("GPTQ: a {inp}-input weight with a {n}x{n} Hessian and a {:?} drift", drift.dims())));
    }
    let device = w.device();
    let w = w.to_dtype(DType::F32)?;
    let r = w.matmul(&drift.to_dtype(DType::F32)?)?.to_dtype(DType::F64)?;
    // H⁻¹ = P Uᵀ U Pᵀ where `prep.u` is the upper factor of the inverse permuted by act-order.
    let columns = |idx: &[usize], t: &Tensor| -> Result<Tensor> {
        let idx: Vec<u32> = idx.iter().map(|&c| c as u32).collect();
        Ok(t.index_select(&Tensor::new(idx.as_slice(), device)?, 1)?)
    };
    let u = Tensor::from_vec(prep.u.clone(), (n, n), device)?;
    let r = match &prep.perm {
        Some(order) => columns(&inverse(order), &columns(order, &r)?.matmul(&u.t()?)?.matmul(&u)?)?,
        None => r.matmul(&u.t()?)?.matmul(&u)?,
    };
    Ok((w + (r * alpha)?.to_dtype(DType::F32)?)?)
}

/// A layer as GPTQ quantized it.
#[derive(Debug, Clone)]
pub struct GptqLayer {
    /// Codes, zeros and scales (scales already f16-exact). With dynamic act-order groups its
    /// columns are in `perm` order (groups contiguous there); otherwise in the layer's own order.
    pub weight: QuantizedWeight,
    /// Dynamic act-order groups: column `j` of `weight` is input `perm[j]` of the layer.
    pub perm: Option<Vec<u32>>,
    /// `Σ (w - q)² / (2 [H⁻¹]_jj²)`, the objective GPTQ reduces.
    pub loss: f64,
}

/// The quantizer GPTQ applies to one group of one row.
#[derive(Debug, Clone, Copy)]
struct Params {
    scale: f64,
    zero: f64,
}

/// How a group's scale and zero are found.
#[derive(Debug, Clone, Copy)]
pub struct Quantizer {
    pub scheme: QuantScheme,
    pub sym: bool,
    /// The smallest zero point allowed (1 where the checkpoint stores `zero - 1`, see
    /// docs/GPTQ.md, "Checkpoints").
    pub min_zero: f64,
}

impl Quantizer {
    fn params(&self, min: f64, max: f64) -> Params {
        let maxq = f64::from(self.scheme.max_code());
        let (scale, zero) = if self.sym {
            let amax = min.abs().max(max.abs());
            ((2.0 * amax).max(1e-5) / maxq, (maxq + 1.0) / 2.0)
        } else {
            let (s, z) = group_scale_zero(min as f32, max as f32, maxq as f32);
            (f64::from(s), f64::from(z).max(self.min_zero))
        };
        // The checkpoint stores f16 scales; the error feedback must see the stored value.
        Params { scale: half::f16::from_f64(scale).to_f64(), zero }
    }

    fn code(&self, w: f64, p: Params) -> f64 {
        ((w / p.scale).round() + p.zero).clamp(0.0, f64::from(self.scheme.max_code()))
    }
}

/// Per-row params of the group of columns `cols` of `wt` (`[in][out]`, column-major weights).
fn group_params(wt: &[f64], out: usize, cols: impl Iterator<Item = usize> + Clone, q: &Quantizer) -> Vec<Params> {
    (0..out)
        .map(|o| {
            let (mn, mx) = cols.clone().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), c| (a.min(wt[c * out + o]), b.max(wt[c * out + o])));
            q.params(mn, mx)
        })
        .collect()
}

/// GPTQ of `w` (`[out, in]`) with the prepared Hessian of its inputs; the lazy updates run on
/// `device`.
pub fn quantize_layer(w: &Tensor, prep: &Prepared, q: &Quantizer, o: &GptqOptions, device: &Device) -> Result<GptqLayer> {
    let (out, inp) = w.dims2()?;
    if inp != prep.dim {
        return Err(Error::msg(format!("GPTQ: a {out}x{inp} weight with a {0}x{0} Hessian", prep.dim)));
    }
    let g = q.scheme.group_for(inp);
    let groups = inp / g;
    let w = w.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
    let order: Vec<usize> = prep.perm.clone().unwrap_or_else(|| (0..inp).collect());
    // Column-major: column j (in quantization order) is contiguous, as the loop reads it.
    let mut wt = vec![0f64; inp * out];
    for (j, &c) in order.iter().enumerate() {
        if !prep.dead[c] {
            for r in 0..out {
                wt[j * out + r] = f64::from(w[r * inp + c]);
            }
        }
    }
    let static_groups = prep.perm.is_some() && o.static_groups;
    // Static groups: every group's params from the weight before any update, in natural order.
    let static_params: Vec<Vec<Params>> = if static_groups {
        let pos = inverse(&order);
        (0..groups).map(|gi| group_params(&wt, out, (gi * g..(gi + 1) * g).map(|c| pos[c]), q)).collect()
    } else {
        Vec::new()
    };
    let mut stored: Vec<Vec<Params>> = vec![Vec::new(); groups];
    let mut codes = vec![0u8; inp * out];
    let mut current: Vec<Params> = Vec::new();
    let mut loss = 0f64;
    let n = prep.dim;
    let u = &prep.u;
    let bs = block_columns(g, inp);
    let mut i1 = 0;
    while i1 < inp {
        let i2 = (i1 + bs).min(inp);
        let mut err = vec![0f64; (i2 - i1) * out];
        for i in i1..i2 {
            let params: &[Params] = if static_groups {
                &static_params[order[i] / g]
            } else {
                if i % g == 0 {
                    current = group_params(&wt, out, i..i + g, q);
                    stored[i / g] = current.clone();
                }
                &current
            };
            let d = u[i * n + i];
            let (col, later) = wt[i * out..i2 * out].split_at_mut(out);
            let e = &mut err[(i - i1) * out..(i - i1 + 1) * out];
            for r in 0..out {
                let code = q.code(col[r], params[r]);
                codes[i * out + r] = code as u8;
                let diff = col[r] - (code - params[r].zero) * params[r].scale;
                loss += diff * diff / (2.0 * d * d);
                e[r] = diff / d;
            }
            for (jj, lc) in later.chunks_exact_mut(out).enumerate() {
                let h = u[i * n + i + 1 + jj];
                for (x, &er) in lc.iter_mut().zip(e.iter()) {
                    *x -= h * er;
                }
            }
        }
        if i2 < inp {
            // W[:, i2:] -= Err · Hinv[i1:i2, i2:], here in column-major form.
            let rest = inp - i2;
            let b = i2 - i1;
            let a: Vec<f64> = (0..rest * b).map(|t| u[(i1 + t % b) * n + i2 + t / b]).collect();
            let a = Tensor::from_vec(a, (rest, b), device)?;
            let e = Tensor::from_vec(err, (b, out), device)?;
            let delta = a.matmul(&e)?.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f64>()?;
            for (x, d) in wt[i2 * out..].iter_mut().zip(&delta) {
                *x -= d;
            }
        }
        i1 = i2;
    }

    // Back to `[out, in]` rows of the layout the caller gets.
    let params_of = |gi: usize| if static_groups { &static_params[gi] } else { &stored[gi] };
    let dynamic = prep.perm.is_some() && !static_groups;
    let mut qw = QuantizedWeight {
        bits: q.scheme.bits,
        shape: WeightShape::new(out, inp, g),
        codes: vec![0; out * inp],
        zeros: vec![0; out * groups],
        scales: vec![0.0; out * groups],
    };
    for (j, &c) in order.iter().enumerate() {
        let col = if dynamic { j } else { c };
        for r in 0..out {
            qw.codes[r * inp + col] = codes[j * out + r];
        }
    }
    for gi in 0..groups {
        for (r, p) in params_of(gi).iter().enumerate() {
            qw.zeros[r * groups + gi] = p.zero as u8;
            qw.scales[r * groups + gi] = p.scale as f32;
        }
    }
    let perm = dynamic.then(|| order.iter().map(|&c| c as u32).collect());
    Ok(GptqLayer { weight: qw, perm, loss })
}

fn inverse(perm: &[usize]) -> Vec<usize> {
    let mut inv = vec![0; perm.len()];
    for (j, &c) in perm.iter().enumerate() {
        inv[c] = j;
    }
    inv
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_hold_whole_groups() {
        assert_eq!(block_columns(64, 576), 128);
        assert_eq!(block_columns(32, 576), 128);
        assert_eq!(block_columns(96, 576), 192);
        assert_eq!(block_columns(256, 1024), 256);
        assert_eq!(block_columns(576, 576), 128);
    }

    #[test]
    fn the_propagation_target_solves_the_dampened_least_squares() {
        // (w' − w) · H_d = alpha · w · D is the normal equation of
        // min ‖X_fp wᵀ − X_q w'ᵀ‖² + λ‖w' − w‖² (scaled by alpha), with H_d = H + λI.
        let dev = Device::Cpu;
        let (n, inp, out) = (300, 12, 5);
        let x_fp = Tensor::randn(0f32, 1.0, (n, inp), &dev).unwrap();
        let x_q = (&x_fp + Tensor::randn(0f32, 0.2, (n, inp), &dev).unwrap()).unwrap();
        let w = Tensor::randn(0f32, 1.0, (out, inp), &dev).unwrap();
        let h = Hessian::of_inputs(&x_q).unwrap();
        let d = input_drift(&x_fp, &x_q).unwrap();
        for act_order in [false, true] {
            let o = GptqOptions { act_order, ..GptqOptions::default() };
            let prep = Prepared::new(&h, &o, "t").unwrap();
            let alpha = 0.7;
            let t = propagation_target(&w, &d, &prep, alpha).unwrap();
            let mean_diag = (0..inp).map(|i| h.h[i * inp + i]).sum::<f64>() / inp as f64;
            let mut hd = h.h.clone();
            for i in 0..inp {
                hd[i * inp + i] += prep.damp * mean_diag;
            }
            let hd = Tensor::from_vec(hd, (inp, inp), &dev).unwrap();
            let w64 = w.to_dtype(DType::F64).unwrap();
            let lhs = (t.to_dtype(DType::F64).unwrap() - &w64).unwrap().matmul(&hd).unwrap();
            let rhs = (w64.matmul(&d.to_dtype(DType::F64).unwrap()).unwrap() * alpha).unwrap();
            let err = (lhs - &rhs).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
            let scale = rhs.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
            assert!(err <= 1e-4 * scale, "act_order {act_order}: residual {err} of {scale}");
        }
        // Inputs of different shapes, or a weight that does not match the Hessian, are refused.
        let e = input_drift(&x_fp.narrow(0, 0, 10).unwrap(), &x_q).unwrap_err().to_string();
        assert!(e.contains("full-precision inputs") && e.contains("[10, 12]") && e.contains("[300, 12]"), "{e}");
        let prep = Prepared::new(&h, &GptqOptions::default(), "t").unwrap();
        let e = propagation_target(&w.narrow(1, 0, 8).unwrap(), &d, &prep, 1.0).unwrap_err().to_string();
        assert!(e.contains("8-input weight") && e.contains("12x12 Hessian"), "{e}");
        // Without drift the target is the weight itself.
        let prep = Prepared::new(&h, &GptqOptions::default(), "t").unwrap();
        let t = propagation_target(&w, &input_drift(&x_q, &x_q).unwrap(), &prep, 1.0).unwrap();
        assert_eq!(t.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
    }

    #[test]
    fn dead_inputs_are_zeroed_and_the_hessian_still_factors() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (40, 8), &dev).unwrap();
        // Input 3 never fires.
        let mask = Tensor::from_vec((0..8).map(|i| if i == 3 { 0f32 } else { 1.0 }).collect(), 8, &dev).unwrap();
        let h = Hessian::of_inputs(&x.broadcast_mul(&mask).unwrap()).unwrap();
        let p = Prepared::new(&h, &GptqOptions::default(), "t").unwrap();
        assert!(p.dead[3] && p.dead.iter().filter(|d| **d).count() == 1);
        let w = Tensor::randn(0f32, 1.0, (8, 8), &dev).unwrap();
        let q = Quantizer { scheme: QuantScheme::new(4, 0).unwrap(), sym: false, min_zero: 0.0 };
        let l = quantize_layer(&w, &p, &q, &GptqOptions::default(), &dev).unwrap();
        let dq = l.weight.dequantize();
        for r in 0..8 {
            assert!(dq[r * 8 + 3].abs() <= l.weight.scales[r] * 0.5 + 1e-6, "dead column dequantizes near 0");
        }
    }

    #[test]
    fn a_singular_hessian_is_retried_with_more_dampening_and_a_nan_one_is_refused() {
        // Rank 1 inputs: H is singular but dampening makes it definite.
        let dev = Device::Cpu;
        let x = Tensor::ones((10, 6), DType::F32, &dev).unwrap();
        let h = Hessian::of_inputs(&x).unwrap();
        assert!(Prepared::new(&h, &GptqOptions::default(), "t").is_ok());
        let mut bad = h.clone();
        bad.h[0] = f64::NAN;
        let e = Prepared::new(&bad, &GptqOptions::default(), "model.layers.2.mlp.down_proj").unwrap_err().to_string();
        assert!(e.contains("model.layers.2.mlp.down_proj") && e.contains("NaN"), "{e}");
        // Negative definite: no dampening helps.
        let neg = Hessian { h: vec![-1.0, 0.0, 0.0, -1.0], dim: 2, tokens: 1 };
        let e = Prepared::new(&neg, &GptqOptions::default(), "model.layers.0.self_attn.q_proj").unwrap_err().to_string();
        assert!(e.contains("model.layers.0.self_attn.q_proj") && e.contains("not positive definite"), "{e}");
    }
}
