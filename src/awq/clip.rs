//! The clipping search (docs/AWQ.md, "The clip search"): per output row and input group, the
//! bounds of the weight range that minimize the error of the group's partial dot products.
//!
//! The error of a candidate `c` for a group with weights `w` and inputs `x_t` is
//! `mean_t (x_t · (Q(c) − w))²`. With `d = Q(c) − w` that is `dᵀ G d` for the group's Gram matrix
//! `G = Σ_t x_t x_tᵀ / T`, computed once per layer, so a candidate costs `g²` multiply-adds per
//! row whatever the token count. That makes it cheap to measure the error over **every**
//! calibration token, where AutoAWQ takes a stride subsample of 512 to 1023 tokens. The stride
//! decides how often each block's first token is kept — every one of them when it divides the
//! block length (32 blocks of 512: 32 times their share of the text), almost none when it does
//! not (34 blocks) — and in several layers that token (the attention sink) carries the largest
//! activations: in SmolLM2's down_proj inputs up to 640 times the median token's energy. Over all
//! tokens the objective no longer depends on that accident, and SmolLM2's 3-bit perplexity drops
//! by another 4 % (docs/AWQ.md). Groups wider than [`GRAM_MAX_GROUP`] (per-channel quantization)
//! use the subsample. On the CPU the candidates run row by row, rows in parallel over the kernel
//! threads; on a GPU as tensor operations over the whole layer (`clip_device.rs`).
//!
//! Two families of candidates (`--clip`):
//! * [`ClipMode::Symmetric`], AutoAWQ's: `[−m, m]` for `m = max|w| · (1 − i/20)`, `i < 10`.
//! * [`ClipMode::Asymmetric`] (the default): the group's maximum and minimum each shrunk toward zero
//!   on its own, `hi = max · (1 − i/20)`, `lo = min · (1 − j/20)`, `i, j < 10`. The quantizer has a
//!   zero point, so its range need not be centred on zero; the symmetric candidates that change
//!   anything are among these (a clamp at `m` below the larger end only). On SmolLM2 it lowers
//!   the 3-bit perplexity by about 5 % (docs/AWQ.md).
use crate::error::{Error, Result};
use crate::quant::cpu::pool::{self, SendPtr};
use crate::quant::QuantScheme;
use candle_core::{DType, Device, Tensor};

/// Which clipping bounds are searched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ClipMode {
    /// `[−m, m]`, one shrink of `max|w|` per group (AutoAWQ).
    #[serde(rename = "sym")]
    Symmetric,
    /// The maximum and the minimum shrunk separately.
    #[serde(rename = "asym")]
    Asymmetric,
}

impl std::str::FromStr for ClipMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "sym" => Ok(ClipMode::Symmetric),
            "asym" => Ok(ClipMode::Asymmetric),
            other => Err(Error::msg(format!("--clip {other}: expected asym or sym"))),
        }
    }
}

impl ClipMode {
    pub fn name(self) -> &'static str {
        match self {
            ClipMode::Symmetric => "sym",
            ClipMode::Asymmetric => "asym",
        }
    }
}

/// The widest group whose error is measured through its Gram matrix over every calibration
/// token; wider groups (per-channel quantization) use a token subsample directly, which is then
/// cheaper (`T · g` against `g²` per candidate and row).
pub const GRAM_MAX_GROUP: usize = 256;

pub struct ClipOptions {
    pub mode: ClipMode,
    pub n_grid: usize,
    pub max_shrink: f64,
    /// The tokens kept by the stride subsampling (512 to 1023 survive) where the error is not
    /// measured over all of them.
    pub n_tokens: usize,
    /// Measure the error over every token (groups up to [`GRAM_MAX_GROUP`]); false takes the
    /// stride subsample as AutoAWQ does.
    pub all_tokens: bool,
}

impl ClipOptions {
    pub fn new(mode: ClipMode) -> Self {
        Self { mode, n_grid: 20, max_shrink: 0.5, n_tokens: 512, all_tokens: true }
    }
    /// The options for `tokens`: `None` for every token, `Some(n)` for AutoAWQ's stride
    /// subsample of `n` to `2n − 1` tokens.
    pub fn with_tokens(mut self, tokens: Option<usize>) -> Self {
        self.all_tokens = tokens.is_none();
        if let Some(n) = tokens {
            self.n_tokens = n;
        }
        self
    }
    /// Shrink steps per bound (`i < steps`).
    fn steps(&self) -> usize {
        ((self.max_shrink * self.n_grid as f64) as usize).max(1)
    }
    /// The grid for the device search.
    pub fn grid(&self, p: QuantScheme) -> super::clip_device::Grid {
        super::clip_device::Grid { mode: self.mode, steps: self.steps(), n_grid: self.n_grid as f32, max_code: p.max_code() }
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

/// The chosen bounds: `lo[o * groups + g]`, `hi[...]` for row `o` and group `g`.
#[derive(Debug, Clone)]
pub struct ClipBounds {
    pub out: usize,
    pub groups: usize,
    pub lo: Vec<f32>,
    pub hi: Vec<f32>,
}

/// How a candidate's error is measured for one layer's groups.
enum Energy {
    /// Per group the `g × g` Gram matrix of its inputs over the tokens, divided by their count.
    Gram(Vec<f32>),
    /// The tokens themselves, `[t, in]` (groups wider than the token count).
    Tokens(Vec<f32>, usize),
}

/// `Σ a·b` with eight independent lanes (so it vectorizes).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] = x[l].mul_add(y[l], acc[l]);
        }
    }
    let mut s = 0f32;
    for (x, y) in ra.iter().zip(rb) {
        s = x.mul_add(*y, s);
    }
    acc.iter().sum::<f32>() + s
}

impl Energy {
    /// `mean_t (x_t · d)²` for group `gi` of width `g` of an `inp`-wide layer; `tmp` has `g`
    /// values of scratch space.
    #[inline(always)]
    fn of(&self, d: &[f32], gi: usize, g: usize, inp: usize, tmp: &mut [f32]) -> f32 {
        match self {
            Energy::Gram(gram) => {
                // G·d as a sum of G's rows (G is symmetric), then dᵀ(G·d).
                let m = &gram[gi * g * g..(gi + 1) * g * g];
                tmp.fill(0.0);
                for (row, &dj) in m.chunks_exact(g).zip(d) {
                    for (t, &v) in tmp.iter_mut().zip(row) {
                        *t = dj.mul_add(v, *t);
                    }
                }
                dot(d, tmp)
            }
            Energy::Tokens(x, t) => {
                let mut e = 0f32;
                for tok in x.chunks_exact(inp).take(*t) {
                    let y = dot(&tok[gi * g..(gi + 1) * g], d);
                    e += y * y;
                }
                e / *t as f32
            }
        }
    }
}

/// One layer's search: the weight `[out, in]` on the host, its energy and the grid.
struct Search<'a> {
    w: &'a [f32],
    inp: usize,
    g: usize,
    energy: Energy,
    mode: ClipMode,
    steps: usize,
    n_grid: f32,
    mc: f32,
}

impl Search<'_> {
    /// The best bounds of row `row`'s groups into `lo`, `hi` (one entry per group).
    #[inline(always)]
    fn row(&self, row: usize, lo: &mut [f32], hi: &mut [f32], scratch: &mut [f32]) {
        let g = self.g;
        let (cur, rest) = scratch.split_at_mut(g);
        let (d, tmp) = rest.split_at_mut(g);
        for gi in 0..self.inp / g {
            let wg = &self.w[row * self.inp + gi * g..row * self.inp + (gi + 1) * g];
            let (mut mn, mut mx) = (f32::INFINITY, f32::NEG_INFINITY);
            for &v in wg {
                mn = mn.min(v);
                mx = mx.max(v);
            }
            let amax = mn.abs().max(mx.abs());
            let mut best = (f32::INFINITY, mn, mx);
            let inner = if self.mode == ClipMode::Asymmetric { self.steps } else { 1 };
            for i in 0..self.steps {
                let f_hi = 1.0 - i as f32 / self.n_grid;
                for j in 0..inner {
                    let (l, h) = match self.mode {
                        ClipMode::Symmetric => (-amax * f_hi, amax * f_hi),
                        ClipMode::Asymmetric => (mn * (1.0 - j as f32 / self.n_grid), mx * f_hi),
                    };
                    // The group quantizer of `crate::quant::fake_quantize` on the clamped group;
                    // d = Q(clamp(w)) − w.
                    let (mut cmn, mut cmx) = (f32::INFINITY, f32::NEG_INFINITY);
                    for (c, &v) in cur.iter_mut().zip(wg) {
                        *c = v.max(l).min(h);
                        cmn = cmn.min(*c);
                        cmx = cmx.max(*c);
                    }
                    let scale = (cmx - cmn).max(1e-5) / self.mc;
                    let zero = (-(cmn / scale).round()).clamp(0.0, self.mc);
                    for ((dk, &c), &v) in d.iter_mut().zip(cur.iter()).zip(wg) {
                        *dk = (((c / scale).round() + zero).clamp(0.0, self.mc) - zero) * scale - v;
                    }
                    let e = self.energy.of(d, gi, g, self.inp, tmp);
                    // Strictly better only: on ties the earlier (less shrunk) candidate stays.
                    if e < best.0 {
                        best = (e, l, h);
                    }
                }
            }
            lo[gi] = best.1;
            hi[gi] = best.2;
        }
    }

    /// [`Search::row`] compiled for AVX2 and FMA (rounding and the dot products vectorize).
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn row_avx2(&self, row: usize, lo: &mut [f32], hi: &mut [f32], scratch: &mut [f32]) {
        self.row(row, lo, hi, scratch)
    }

    fn row_best(&self, row: usize, lo: &mut [f32], hi: &mut [f32], scratch: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: both features were just detected.
            return unsafe { self.row_avx2(row, lo, hi, scratch) };
        }
        self.row(row, lo, hi, scratch)
    }
}

/// Per group of `g` input channels the Gram matrix of the tokens `xs` (`[t, in]`, f32) divided by
/// their count: `[in / g, g, g]`.
pub(super) fn gram_matrices(xs: &Tensor, g: usize) -> Result<Tensor> {
    let (t, inp) = xs.dims2()?;
    // [t, in] -> [groups, t, g] -> [groups, g, g].
    let xg = xs.reshape((t, inp / g, g))?.transpose(0, 1)?.contiguous()?;
    Ok((xg.transpose(1, 2)?.contiguous()?.matmul(&xg)? / t as f64)?)
}

/// Best clipping bounds per (row, group) for weight `w` (`[out, in]`) with inputs `x`
/// (`[..., in]`). Math in f32 on the host.
pub fn search_clip(w: &Tensor, x: &Tensor, p: QuantScheme, o: &ClipOptions) -> Result<ClipBounds> {
    let (out, inp) = w.dims2()?;
    let g = p.group_for(inp);
    let groups = inp / g;
    let all = o.all_tokens && g <= GRAM_MAX_GROUP;
    let xs = if all { x.to_dtype(DType::F32)?.reshape(((), inp))? } else { subsample_tokens(x, o.n_tokens)? };
    let t = xs.dim(0)?;
    if t == 0 {
        return Err(Error::msg("clip search: no calibration tokens"));
    }
    let energy = if all || g <= t {
        let gram = gram_matrices(&xs, g)?;
        if !w.device().is_cpu() {
            return super::clip_device::search_gram(w, &gram, g, &o.grid(p));
        }
        Energy::Gram(gram.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?)
    } else {
        Energy::Tokens(xs.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?, t)
    };
    let wh = w.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
    let search = Search { w: &wh, inp, g, energy, mode: o.mode, steps: o.steps(), n_grid: o.n_grid as f32, mc: p.max_code() };
    let mut lo = vec![0f32; out * groups];
    let mut hi = vec![0f32; out * groups];
    let lo_ptr = SendPtr(lo.as_mut_ptr());
    let hi_ptr = SendPtr(hi.as_mut_ptr());
    pool::for_ranges(out, 1, |rows| {
        let mut scratch = vec![0f32; 3 * g];
        for row in rows {
            // SAFETY: each row's entries are written by the one task that owns the row.
            let (l, h) = unsafe { (lo_ptr.row(row, groups), hi_ptr.row(row, groups)) };
            search.row_best(row, l, h, &mut scratch);
        }
    });
    Ok(ClipBounds { out, groups, lo, hi })
}

impl ClipBounds {
    /// The mean over (row, group) of the clipped range's width over the group's own range
    /// (1 = unclipped; the search never shrinks a bound below half).
    pub fn mean_shrink(&self, w: &Tensor) -> Result<f64> {
        let wh = w.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
        let g = wh.len() / (self.out * self.groups);
        let mut total = 0f64;
        for (k, wg) in wh.chunks_exact(g).enumerate() {
            let (mn, mx) = wg.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
            let width = f64::from(mx - mn);
            let clipped = f64::from(mx.min(self.hi[k]) - mn.max(self.lo[k]));
            total += if width > 0.0 { clipped / width } else { 1.0 };
        }
        Ok(total / (self.out * self.groups) as f64)
    }

    /// `w` (`[out, in]`) clamped group-wise to the bounds, on `w`'s device and in its dtype.
    pub fn apply(&self, w: &Tensor) -> Result<Tensor> {
        let (out, inp) = w.dims2()?;
        let shape = (out, self.groups, 1);
        let lo = Tensor::from_slice(&self.lo, shape, w.device())?.to_dtype(w.dtype())?;
        let hi = Tensor::from_slice(&self.hi, shape, w.device())?.to_dtype(w.dtype())?;
        let wg = w.reshape((out, self.groups, inp / self.groups))?;
        Ok(wg.broadcast_maximum(&lo)?.broadcast_minimum(&hi)?.reshape((out, inp))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::fake_quantize;
    use crate::rng::Rng;

    fn tensor(r: &mut Rng, shape: (usize, usize), scale: f32) -> Tensor {
        let v: Vec<f32> = (0..shape.0 * shape.1).map(|_| r.normal() * scale).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// The layer's output error with `w2` quantized, against `w`.
    fn err(x: &Tensor, w: &Tensor, w2: &Tensor, p: QuantScheme) -> f32 {
        let q = fake_quantize(w2, p).unwrap();
        let d = (x.matmul(&q.t().unwrap()).unwrap() - x.matmul(&w.t().unwrap()).unwrap()).unwrap();
        d.sqr().unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn clipping_never_hurts_the_measured_error() {
        let mut r = Rng::new(4);
        // Skewed groups (a positive offset) and a heavy outlier make clipping worthwhile; a group
        // wider than GRAM_MAX_GROUP takes the other way of measuring the error.
        for (inp, g, tokens) in [(64, 32, 300), (64, 64, 40), (512, 512, 700)] {
            let w = (tensor(&mut r, (16, inp), 1.0) + 0.7).unwrap();
            let w = w.slice_assign(&[0..1, 0..1], &Tensor::new(&[[9.0f32]], &Device::Cpu).unwrap()).unwrap();
            let x = tensor(&mut r, (tokens, inp), 1.0);
            let p = QuantScheme::new(3, g).unwrap();
            for mode in [ClipMode::Symmetric, ClipMode::Asymmetric] {
                let b = search_clip(&w, &x, p, &ClipOptions::new(mode)).unwrap();
                assert_eq!((b.out, b.groups), (16, inp / g));
                let clipped = b.apply(&w).unwrap();
                let e = err(&x, &w, &clipped, p);
                assert!(e <= err(&x, &w, &w, p) * 1.0001, "{mode:?} g={g}: clipping raised the error");
                let s = b.mean_shrink(&w).unwrap();
                assert!((0.0..=1.0 + 1e-6).contains(&s), "{mode:?}: shrink {s}");
                // No bound beyond the group's own range or shrunk past half of it.
                let wh = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                for (k, wg) in wh.chunks_exact(g).enumerate() {
                    let (mn, mx) = wg.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
                    let amax = mn.abs().max(mx.abs());
                    assert!(b.hi[k] <= amax * 1.000001 && b.hi[k].abs() >= 0.55 * mx.abs() - 1e-6, "{mode:?} hi {} of [{mn}, {mx}]", b.hi[k]);
                    assert!(b.lo[k] >= -amax * 1.000001, "{mode:?} lo {} of [{mn}, {mx}]", b.lo[k]);
                }
            }
        }
    }

    /// The 3-bit search pinned to a straightforward one: every asymmetric candidate quantized by
    /// the crate's group quantizer and its error summed in f64 over every token, one token of
    /// each 100 carrying massive activations in a few channels (as attention sinks do; 1200 tokens, so
    /// AutoAWQ's stride-2 subsample would keep all of them and weigh them double). The chosen
    /// bounds must be the straightforward search's, up to candidates whose errors tie in f32.
    #[test]
    fn the_3_bit_search_matches_a_straightforward_one_over_every_token() {
        let mut r = Rng::new(21);
        let (out, inp, g, t) = (6, 128, 64, 1200);
        let w = tensor(&mut r, (out, inp), 0.05);
        let mut xv: Vec<f32> = (0..t * inp).map(|_| r.normal()).collect();
        for tok in (0..t).step_by(100) {
            // Massive activations in a few channels, as attention sinks carry them.
            for c in [3, 17, 70, 101] {
                xv[tok * inp + c] = 40.0;
            }
        }
        let x = Tensor::from_vec(xv.clone(), (t, inp), &Device::Cpu).unwrap();
        let p = QuantScheme::new(3, g).unwrap();
        let b = search_clip(&w, &x, p, &ClipOptions::new(ClipMode::Asymmetric)).unwrap();
        let wv = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let err = |row: usize, gi: usize, lo: f32, hi: f32| -> f64 {
            let wg = &wv[row * inp + gi * g..row * inp + (gi + 1) * g];
            let c: Vec<f32> = wg.iter().map(|v| v.max(lo).min(hi)).collect();
            let q = fake_quantize(&Tensor::from_vec(c, (1, g), &Device::Cpu).unwrap(), p.with_group(g)).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (0..t)
                .map(|tok| {
                    let xs = &xv[tok * inp + gi * g..tok * inp + (gi + 1) * g];
                    let y: f64 = xs.iter().zip(q.iter().zip(wg)).map(|(x, (q, w))| f64::from(*x) * (f64::from(*q) - f64::from(*w))).sum();
                    y * y
                })
                .sum::<f64>()
                / t as f64
        };
        for row in 0..out {
            for gi in 0..inp / g {
                let wg = &wv[row * inp + gi * g..row * inp + (gi + 1) * g];
                let (mn, mx) = wg.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
                let mut best = (f64::INFINITY, mn, mx);
                for i in 0..10 {
                    for j in 0..10 {
                        let (lo, hi) = (mn * (1.0 - j as f32 / 20.0), mx * (1.0 - i as f32 / 20.0));
                        let e = err(row, gi, lo, hi);
                        if e < best.0 {
                            best = (e, lo, hi);
                        }
                    }
                }
                let k = row * (inp / g) + gi;
                let got = err(row, gi, b.lo[k], b.hi[k]);
                assert!(
                    (b.lo[k], b.hi[k]) == (best.1, best.2) || got <= best.0 * (1.0 + 1e-5),
                    "row {row} group {gi}: chose [{}, {}] (error {got}), the straightforward search [{}, {}] ({})",
                    b.lo[k], b.hi[k], best.1, best.2, best.0
                );
            }
        }
    }

    #[test]
    fn the_gram_form_measures_what_the_tokens_measure() {
        let mut r = Rng::new(8);
        let x: Vec<f32> = (0..50 * 96).map(|_| r.normal()).collect();
        let d: Vec<f32> = (0..32).map(|_| r.normal() * 0.1).collect();
        let xt = Tensor::from_slice(&x, (50, 3, 32), &Device::Cpu).unwrap().transpose(0, 1).unwrap().contiguous().unwrap();
        let gram = (xt.transpose(1, 2).unwrap().contiguous().unwrap().matmul(&xt).unwrap() / 50.0).unwrap();
        let gram = Energy::Gram(gram.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        let tokens = Energy::Tokens(x, 50);
        let mut tmp = vec![0f32; 32];
        for gi in 0..3 {
            let (a, b) = (gram.of(&d, gi, 32, 96, &mut tmp), tokens.of(&d, gi, 32, 96, &mut tmp));
            assert!((a - b).abs() <= 1e-4 * b.abs(), "group {gi}: {a} vs {b}");
        }
    }
}
