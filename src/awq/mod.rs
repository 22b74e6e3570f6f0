//! The AWQ calibration pass (docs/AWQ.md) and the RTN baseline.
//!
//! Blocks are processed one at a time: each is loaded from the (memory-mapped) checkpoint, run
//! in full precision over the calibration activations with every linear's input captured, its
//! scale groups ([`groups::SCALE_GROUPS`]) searched, the scales folded, the clipping searched,
//! and its linears quantized. The full-precision output feeds the next block, as the reference
//! does. [`export`] writes the result as a checkpoint.
pub mod calib;
pub mod cholesky;
pub mod clip;
pub mod clip_device;
pub mod export;
pub mod gptq;
mod gptq_pass;
pub mod groups;
pub mod scale;

use crate::error::{Error, Result};
use crate::linear::{DenseLinear, Linear, QuantLinear};
use crate::model::layers::{causal_mask, Rope};
use crate::model::llama::load_dense;
use crate::model::{Block, BlockContext, Config, LinearInputs, Proj};
use crate::quant::{quantize_codes, QuantScheme};
use groups::{Fold, Measured, ScaleGroup, SCALE_GROUPS};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::Serialize;
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Method {
    #[serde(rename = "awq")]
    Awq,
    #[serde(rename = "rtn")]
    Rtn,
    #[serde(rename = "gptq")]
    Gptq,
    /// AWQ's scales (and clipping) folded first, then GPTQ's rounding of the scaled weights.
    #[serde(rename = "awq+gptq")]
    AwqGptq,
}

impl Method {
    /// The name flags and reports use.
    pub fn name(self) -> &'static str {
        match self {
            Method::Awq => "awq",
            Method::Rtn => "rtn",
            Method::Gptq => "gptq",
            Method::AwqGptq => "awq+gptq",
        }
    }

    /// Whether the method rounds with GPTQ (and so reads `AwqOptions::gptq`).
    pub fn uses_gptq(self) -> bool {
        matches!(self, Method::Gptq | Method::AwqGptq)
    }

    /// Whether the method needs calibration data.
    pub fn calibrated(self) -> bool {
        self != Method::Rtn
    }
}

impl std::str::FromStr for Method {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "awq" => Ok(Method::Awq),
            "rtn" => Ok(Method::Rtn),
            "gptq" => Ok(Method::Gptq),
            "awq+gptq" => Ok(Method::AwqGptq),
            _ => Err(Error::msg(format!("method {s:?}: expected awq, rtn, gptq or awq+gptq"))),
        }
    }
}

#[derive(Debug, Clone)]
pub struct AwqOptions {
    pub method: Method,
    pub params: QuantScheme,
    /// Search per-group clipping after scaling (AWQ only).
    pub clip: bool,
    /// Which clipping bounds the search tries (see [`clip::ClipMode`]).
    pub clip_mode: clip::ClipMode,
    /// The tokens the clip error is measured over: every one (`None`), or AutoAWQ's stride
    /// subsample of this many (see [`clip::ClipOptions::with_tokens`]).
    pub clip_tokens: Option<usize>,
    /// AutoAWQ's duo scaling (x_mean and w_mean) instead of x_mean alone.
    pub duo_scaling: bool,
    /// Search o_proj's scales under grouped-query attention too, one per v channel shared by the
    /// query heads that read it; off by default (AutoAWQ's behaviour: no measured gain on
    /// SmolLM2, docs/AWQ.md); see [`groups::Condition`].
    pub gqa_o_proj: bool,
    /// Ratios tried: i / n_grid for i in 0..n_grid.
    pub n_grid: usize,
    /// Calibration blocks the ratio grid is scored on (evenly spaced over all of them; 0 = all).
    /// The grid's 20 forward passes are most of the pass's time; the activation statistics
    /// (`x_mean`) and the clip search still see every block.
    pub search_samples: usize,
    /// Calibration blocks per forward chunk (bounds the attention's memory).
    pub batch: usize,
    /// On CUDA, the ratio grid's forward passes multiply in TF32 (tensor cores, f32 accumulation
    /// and f32 everywhere else); false keeps them in full f32. The block outputs that feed the
    /// next block, the statistics and the clip search stay in f32 either way.
    pub search_tf32: bool,
    /// Show a progress bar on stderr.
    pub progress: bool,
    /// GPTQ's settings (gptq and awq+gptq).
    pub gptq: gptq::GptqOptions,
}

impl AwqOptions {
    pub fn new(method: Method, params: QuantScheme) -> Self {
        Self { method, params, clip: true, clip_mode: clip::ClipMode::Asymmetric, clip_tokens: None, duo_scaling: true, gqa_o_proj: false, n_grid: 20, search_samples: 0, batch: 4, search_tf32: true, progress: false, gptq: gptq::GptqOptions::default() }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct GroupReport {
    pub block: usize,
    pub prev_op: String,
    pub layers: Vec<String>,
    pub ratio: f64,
    /// Output MSE of the measured module with plain round-to-nearest.
    pub loss_before: f64,
    /// Output MSE with the chosen scales.
    pub loss_after: f64,
    /// Output MSE of every ratio tried (`i / n_grid`, in order).
    pub losses: Vec<f64>,
}

/// What happened to one linear layer of a block.
#[derive(Debug, Clone, Serialize)]
pub struct LayerReport {
    pub block: usize,
    pub layer: String,
    /// Mean over (row, group) of the chosen clip bound over the group's max |w|; absent where
    /// the clipping is not searched (q/k) or is off.
    pub clip_shrink: Option<f64>,
    /// Mean squared error of the layer's output on (subsampled) calibration inputs: round-to-
    /// nearest of the original weight, and the weight as AWQ quantized it (scaled, clipped).
    pub output_mse_rtn: f64,
    pub output_mse: f64,
    /// GPTQ only: `tr H` of the layer's inputs (how much signal it sees), and GPTQ's objective
    /// `Σ (w - q)² / (2 [H⁻¹]_jj²)` after rounding.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hessian_trace: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gptq_loss: Option<f64>,
    /// GPTQ only: the dampening fraction the Cholesky factorization succeeded with (above
    /// `--damp` where it had to be raised).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub damp: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub method: Method,
    pub bits: u32,
    pub group_size: usize,
    pub duo_scaling: bool,
    /// o_proj's scales searched under grouped-query attention (shared over query heads).
    pub gqa_o_proj: bool,
    pub clip: bool,
    /// The clipping bounds searched (with `clip`).
    pub clip_mode: clip::ClipMode,
    /// The tokens the clip error was measured over (absent: every one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clip_tokens: Option<usize>,
    /// GPTQ's settings, for gptq and awq+gptq.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gptq: Option<gptq::GptqOptions>,
    pub calibration_blocks: usize,
    /// Blocks the ratio grid was scored on (0: all).
    pub search_samples: usize,
    pub seqlen: usize,
    pub groups: Vec<GroupReport>,
    pub layers: Vec<LayerReport>,
    pub block_secs: Vec<f64>,
    /// Seconds per phase of the pass, summed over the blocks, in the order the phases first ran
    /// (see [`Phase`]); a JSON object keyed by [`Phase::key`].
    #[serde(serialize_with = "phases_as_map")]
    pub phase_secs: Vec<(Phase, f64)>,
    pub total_secs: f64,
}

/// The parts of the pass timed for the report: loading a block's weights (`load`), its
/// full-precision forward with the inputs captured and the per-layer RTN errors (`capture`),
/// AWQ's ratio grid (`scale_search`), the clip search (`clip`), GPTQ's rounding (`gptq`), and
/// rounding and packing the weights with the per-layer reports (`round`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Load,
    Capture,
    ScaleSearch,
    Clip,
    Gptq,
    Round,
}

fn phases_as_map<S: serde::Serializer>(phases: &[(Phase, f64)], s: S) -> std::result::Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut m = s.serialize_map(Some(phases.len()))?;
    for (p, secs) in phases {
        m.serialize_entry(p.key(), secs)?;
    }
    m.end()
}

impl Phase {
    /// The JSON key: `load`, `capture`, `scale_search`, `clip`, `gptq`, `round`.
    pub fn key(self) -> &'static str {
        match self {
            Phase::ScaleSearch => "scale_search",
            p => p.name(),
        }
    }
    /// The name on stderr.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Load => "load",
            Phase::Capture => "capture",
            Phase::ScaleSearch => "scale search",
            Phase::Clip => "clip",
            Phase::Gptq => "gptq",
            Phase::Round => "round",
        }
    }
}

impl Report {
    /// `load 1.2 s, capture 3.4 s, ...` for the phases that ran.
    pub fn phases_line(&self) -> String {
        self.phase_secs.iter().map(|(p, s)| format!("{} {s:.1} s", p.name())).collect::<Vec<_>>().join(", ")
    }
}

/// While alive, f32 matmuls on CUDA may run in TF32 (candle's process-wide switch, which
/// cuBLAS reads per call); the previous setting is restored on drop. No effect on other devices.
struct Tf32Scope(bool);

impl Tf32Scope {
    fn new(on: bool) -> Self {
        let previous = candle_core::cuda::gemm_reduced_precision_f32();
        candle_core::cuda::set_gemm_reduced_precision_f32(on);
        Self(previous)
    }
}

impl Drop for Tf32Scope {
    fn drop(&mut self) {
        candle_core::cuda::set_gemm_reduced_precision_f32(self.0);
    }
}

/// Checks the group size against the input width of every linear of a block, before any work.
pub fn check_group_size(cfg: &Config, p: QuantScheme) -> Result<()> {
    for proj in Proj::ALL {
        p.check_layer(&format!("model.layers.0.{}", proj.hf_name()), proj.features(cfg).0)?;
    }
    Ok(())
}

fn dense(w: Tensor, bias: Option<&Tensor>) -> Linear {
    DenseLinear::new(w, bias.cloned()).into_linear()
}

/// Quantizes `w` (`[out, in]`) to a [`QuantLinear`]. Scales and bias are rounded to f16 here,
/// as the checkpoint stores them, so the in-memory model is exactly the written one.
fn quantize_linear(w: &Tensor, bias: Option<&Tensor>, p: QuantScheme, dtype: DType) -> Result<Linear> {
    let (out, inp) = w.dims2()?;
    let data = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let mut q = quantize_codes(&data, out, inp, p);
    for s in q.scales.iter_mut() {
        *s = half::f16::from_f32(*s).to_f32();
    }
    let bias = bias.map(|b| b.to_dtype(DType::F16)?.to_dtype(DType::F32)).transpose()?;
    Ok(QuantLinear::new(q, bias, dtype, w.device())?.into_linear())
}

fn check_finite(t: &Tensor, what: &str) -> Result<()> {
    let m = t.abs()?.max_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()?;
    if !m.is_finite() {
        return Err(Error::msg(format!("{what}: NaN or inf in the activations")));
    }
    Ok(())
}

/// Runs `f` over `x` (`[n, seq, d]`) in chunks of `batch` samples and concatenates the results.
fn chunked(x: &Tensor, batch: usize, f: impl Fn(&Tensor) -> candle_core::Result<Tensor>) -> candle_core::Result<Tensor> {
    let n = x.dim(0)?;
    let mut outs = Vec::new();
    let mut i = 0;
    while i < n {
        let b = batch.min(n - i);
        outs.push(f(&x.narrow(0, i, b)?)?);
        i += b;
    }
    Tensor::cat(&outs, 0)
}

/// The block's full-precision output and the inputs of its linears, over all samples.
fn forward_capture(block: &Block, x: &Tensor, ctx: &BlockContext, batch: usize) -> Result<(Tensor, LinearInputs)> {
    let n = x.dim(0)?;
    let mut outs = Vec::new();
    let mut caps: Vec<LinearInputs> = Vec::new();
    let mut i = 0;
    while i < n {
        let b = batch.min(n - i);
        let mut c = LinearInputs::default();
        outs.push(block.forward(&x.narrow(0, i, b)?, ctx, None, Some(&mut c))?);
        caps.push(c);
        i += b;
    }
    let mut inputs = LinearInputs::default();
    for p in LinearInputs::FIRST_READERS {
        let parts: Vec<Tensor> = caps.iter().map(|c| c.of(p).cloned()).collect::<Option<_>>().ok_or_else(|| Error::msg(format!("{}: input not captured", p.hf_name())))?;
        *inputs.of_mut(p) = Some(Tensor::cat(&parts, 0)?);
    }
    Ok((Tensor::cat(&outs, 0)?, inputs))
}

/// The captured input of `p` (an error naming the layer where the capture lacks it).
fn input_of(inputs: &LinearInputs, p: Proj) -> Result<Tensor> {
    inputs.of(p).cloned().ok_or_else(|| Error::msg(format!("{}: input not captured", p.hf_name())))
}

/// The mutable weights of one block during the search, f32, indexed by [`Proj::index`].
struct BlockWeights {
    ln1: Tensor,
    ln2: Tensor,
    w: Vec<Tensor>,
    b: Vec<Option<Tensor>>,
}

impl BlockWeights {
    fn of(block: &Block) -> Result<Self> {
        let w = Proj::ALL.iter().map(|&p| block.linear(p).dense_weight().and_then(|w| w.to_dtype(DType::F32))).collect::<candle_core::Result<_>>()?;
        let b = Proj::ALL.iter().map(|&p| block.linear(p).bias().cloned()).collect();
        Ok(Self { ln1: block.input_layernorm.weight.clone(), ln2: block.post_attention_layernorm.weight.clone(), w, b })
    }
    fn w(&self, p: Proj) -> &Tensor {
        &self.w[p.index()]
    }
    fn bias(&self, p: Proj) -> Option<&Tensor> {
        self.b[p.index()].as_ref()
    }
}

/// The output of `group`'s measured module on `x`, with the group's layers replaced by dense
/// layers of `ws` (in the order of `group.layers`), or as the block has them (`None`).
fn measure(block: &Block, group: &ScaleGroup, bw: &BlockWeights, ws: Option<&[Tensor]>, x: &Tensor, ctx: &BlockContext, batch: usize) -> candle_core::Result<Tensor> {
    let mut b = block.clone();
    if let Some(ws) = ws {
        for (&p, w) in group.layers.iter().zip(ws) {
            *b.linear_mut(p) = dense(w.clone(), bw.bias(p));
        }
    }
    match group.measured {
        Measured::Attention => chunked(x, batch, |xc| b.self_attn.forward(xc, ctx)),
        Measured::Mlp => b.mlp.forward(x),
        Measured::Layer => b.linear(group.layers[0]).forward(x),
    }
}

/// Output MSE of `x · Wqᵀ` against `x · w0ᵀ` (`x`: the original input, subsampled), where `Wq` is
/// `w` quantized and brought back to the original units: its columns divided by the scales
/// folded into them, its rows multiplied by the scales folded out of them.
fn layer_output_mse(x: &Tensor, w0: &Tensor, w: &Tensor, cols: Option<&Tensor>, rows: Option<&Tensor>, p: QuantScheme) -> Result<f64> {
    let mut q = crate::quant::fake_quantize(w, p)?;
    if let Some(c) = cols {
        q = q.broadcast_div(c)?;
    }
    if let Some(r) = rows {
        // The fold divided the last rows by `r`: dividing by `1/r` undoes it.
        q = scale::unscale_rows(&q, &r.recip()?)?;
    }
    scale::mse(&x.matmul(&q.t()?)?, &x.matmul(&w0.t()?)?)
}

/// `k` of the calibration blocks of `x` (`[n, seq, d]`), evenly spaced (all where `k` is 0 or ≥ n):
/// whole blocks, because the attention needs each token's context.
fn search_subset(x: &Tensor, k: usize) -> Result<Tensor> {
    let n = x.dim(0)?;
    if k == 0 || k >= n {
        return Ok(x.clone());
    }
    let idx: Vec<u32> = (0..k).map(|i| (i * n / k) as u32).collect();
    Ok(x.index_select(&Tensor::new(idx.as_slice(), x.device())?, 0)?)
}

/// Tokens of the captured inputs that the per-layer errors are measured on.
const REPORT_TOKENS: usize = 512;

/// What the pass records while it runs, block by block.
struct Records {
    groups: Vec<GroupReport>,
    layers: Vec<LayerReport>,
    phases: Vec<(Phase, f64)>,
    /// For [`Records::lap`]: the device to wait for and the end of the last lap.
    device: Device,
    last: Instant,
}

impl Records {
    fn new(device: &Device) -> Self {
        Self { groups: Vec::new(), layers: Vec::new(), phases: Vec::new(), device: device.clone(), last: Instant::now() }
    }

    /// Charges the time since the last lap to `phase`, after waiting for the device (a GPU runs
    /// kernels asynchronously: without the wait, their time would land in a later phase).
    fn lap(&mut self, phase: Phase) -> Result<()> {
        self.device.synchronize()?;
        let now = Instant::now();
        let secs = (now - self.last).as_secs_f64();
        self.last = now;
        match self.phases.iter_mut().find(|(p, _)| *p == phase) {
            Some((_, total)) => *total += secs,
            None => self.phases.push((phase, secs)),
        }
        Ok(())
    }
}

/// A block's weights as AWQ's search leaves them before rounding: scales folded, clipped; with
/// what the per-layer report compares them against.
struct Folded {
    bw: BlockWeights,
    /// The block's full-precision output.
    y: Tensor,
    /// Per layer: the original weight, a subsample of its original input, the output error of
    /// plain round-to-nearest on them, the scales folded into its columns and out of its rows,
    /// the mean clip shrink.
    w0: Vec<Tensor>,
    x0: Vec<Tensor>,
    rtn_mse: Vec<f64>,
    col_scale: Vec<Option<Tensor>>,
    row_scale: Vec<Option<Tensor>>,
    shrink: Vec<Option<f64>>,
}

/// AWQ's scale search and folding, then its clip search, for one block.
fn awq_fold(block: &Block, idx: usize, x: &Tensor, ctx: &BlockContext, o: &AwqOptions, rec: &mut Records) -> Result<Folded> {
    let p = o.params;
    let (y, mut caps) = forward_capture(block, x, ctx, o.batch)?;
    check_finite(&y, &format!("block {idx} output"))?;
    let mut bw = BlockWeights::of(block)?;
    // Per-layer errors of round-to-nearest, on the original inputs and weights.
    let w0 = bw.w.clone();
    let mut x0 = Vec::new();
    let mut rtn_mse = Vec::new();
    for l in Proj::ALL {
        let xs = clip::subsample_tokens(&input_of(&caps, l)?, REPORT_TOKENS)?;
        rtn_mse.push(layer_output_mse(&xs, bw.w(l), bw.w(l), None, None, p)?);
        x0.push(xs);
    }
    rec.lap(Phase::Capture)?;
    // The scales folded into each layer's columns and out of its rows.
    let mut col_scale: Vec<Option<Tensor>> = vec![None; Proj::ALL.len()];
    let mut row_scale: Vec<Option<Tensor>> = vec![None; Proj::ALL.len()];

    // Every group is searched on the original weights and inputs (as AutoAWQ does), then folded.
    let att = &block.self_attn;
    let heads = scale::SharedHeads { kv_heads: att.n_kv_heads, rep: att.n_heads / att.n_kv_heads.max(1), head_dim: att.head_dim };
    let mut searched: Vec<(&ScaleGroup, Tensor)> = Vec::new();
    let tf32 = Tf32Scope::new(o.search_tf32);
    for group in SCALE_GROUPS.iter().filter(|g| g.applies(heads, o.gqa_o_proj)) {
        let xg = input_of(&caps, group.layers[0])?;
        let xs = search_subset(&xg, o.search_samples)?;
        let fp = measure(block, group, &bw, None, &xs, ctx, o.batch)?;
        let run = |ws: &[Tensor]| measure(block, group, &bw, Some(ws), &xs, ctx, o.batch);
        let weights: Vec<Tensor> = group.layers.iter().map(|&l| bw.w(l).clone()).collect();
        let what = format!("block {idx} {}", group.label());
        let c = scale::search(&what, &scale::x_mean(&xg)?, &weights, &fp, p, o.duo_scaling, o.n_grid, group.sharing(heads), &run)?;
        rec.groups.push(GroupReport {
            block: idx,
            prev_op: group.fold.name().to_string(),
            layers: group.layers.iter().map(|l| l.name().to_string()).collect(),
            ratio: c.ratio,
            loss_before: c.loss_rtn,
            loss_after: c.loss_best,
            losses: c.losses,
        });
        searched.push((group, c.scales));
    }
    drop(tf32);
    rec.lap(Phase::ScaleSearch)?;

    for (group, s_fold) in &searched {
        // The scales of the group's input channels (repeated over query heads for o_proj under
        // GQA); `s_fold` is what the producing op's rows are divided by.
        let s = &match group.sharing(heads) {
            Some(sh) => sh.expand(s_fold)?,
            None => s_fold.clone(),
        };
        match group.fold {
            Fold::InputNorm => bw.ln1 = bw.ln1.broadcast_div(&s.to_dtype(bw.ln1.dtype())?)?,
            Fold::PostAttentionNorm => bw.ln2 = bw.ln2.broadcast_div(&s.to_dtype(bw.ln2.dtype())?)?,
            Fold::Rows(prev) => {
                let i = prev.index();
                row_scale[i] = Some(s_fold.clone());
                bw.w[i] = scale::unscale_rows(&bw.w[i], s_fold)?;
                if let Some(b) = &bw.b[i] {
                    bw.b[i] = Some(scale::unscale_rows(b, s_fold)?);
                }
            }
        }
        for &l in group.layers {
            bw.w[l.index()] = scale::scale_columns(&bw.w[l.index()], s)?;
            col_scale[l.index()] = Some(s.clone());
        }
        let input = caps.of_mut(group.layers[0]);
        *input = input.as_ref().map(|t| t.broadcast_div(s)).transpose()?;
    }

    let mut shrink = vec![None; Proj::ALL.len()];
    // Clipping (q/k skipped: attention scores are too sensitive).
    if o.clip {
        let copts = clip::ClipOptions::new(o.clip_mode).with_tokens(o.clip_tokens);
        for l in groups::CLIPPED {
            let bounds = clip::search_clip(bw.w(l), &input_of(&caps, l)?, p, &copts)?;
            shrink[l.index()] = Some(bounds.mean_shrink(bw.w(l))?);
            bw.w[l.index()] = bounds.apply(bw.w(l))?;
        }
    }
    rec.lap(Phase::Clip)?;
    Ok(Folded { bw, y, w0, x0, rtn_mse, col_scale, row_scale, shrink })
}

impl Folded {
    /// `block` with the folded norms and the folded, clipped weights as dense layers.
    fn dense_block(&self, block: &Block, dtype: DType) -> Result<Block> {
        let mut out = block.clone();
        out.input_layernorm.weight = self.bw.ln1.to_dtype(dtype)?;
        out.post_attention_layernorm.weight = self.bw.ln2.to_dtype(dtype)?;
        for l in Proj::ALL {
            *out.linear_mut(l) = dense(self.bw.w(l).clone(), self.bw.bias(l));
        }
        Ok(out)
    }
}

/// AWQ for one block: scale search and folding, clip search, quantization.
fn awq_block(block: &Block, idx: usize, x: &Tensor, ctx: &BlockContext, dtype: DType, o: &AwqOptions, rec: &mut Records) -> Result<(Block, Tensor)> {
    let f = awq_fold(block, idx, x, ctx, o, rec)?;
    for l in Proj::ALL {
        let i = l.index();
        rec.layers.push(LayerReport {
            block: idx,
            layer: l.name().to_string(),
            clip_shrink: f.shrink[i],
            output_mse_rtn: f.rtn_mse[i],
            output_mse: layer_output_mse(&f.x0[i], &f.w0[i], f.bw.w(l), f.col_scale[i].as_ref(), f.row_scale[i].as_ref(), o.params)?,
            hessian_trace: None,
            gptq_loss: None,
            damp: None,
        });
    }
    let mut out = block.clone();
    out.input_layernorm.weight = f.bw.ln1.to_dtype(dtype)?;
    out.post_attention_layernorm.weight = f.bw.ln2.to_dtype(dtype)?;
    for l in Proj::ALL {
        *out.linear_mut(l) = quantize_linear(f.bw.w(l), f.bw.bias(l), o.params, dtype)?;
    }
    Ok((out, f.y))
}

/// RTN for one block: every linear quantized as it is.
fn rtn_block(block: &Block, p: QuantScheme, dtype: DType) -> Result<Block> {
    let mut out = block.clone();
    for l in Proj::ALL {
        let lin = block.linear(l);
        *out.linear_mut(l) = quantize_linear(&lin.dense_weight()?, lin.bias(), p, dtype)?;
    }
    Ok(out)
}

/// Runs the pass over every block of the model in `vb`, handing each quantized block to
/// `on_block` as soon as it is done (so only one block need be in memory). `calib` holds the
/// calibration token blocks (AWQ only). Math is f32 on `device`.
pub fn quantize_blocks(vb: &VarBuilder, cfg: &Config, calib: Option<&[Vec<u32>]>, o: &AwqOptions, mut on_block: impl FnMut(usize, Block) -> Result<()>) -> Result<Report> {
    check_group_size(cfg, o.params)?;
    let t0 = Instant::now();
    let device: Device = vb.device().clone();
    let n_layers = cfg.num_hidden_layers;
    let bar = if o.progress {
        let b = indicatif::ProgressBar::new(n_layers as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template("{msg:>12} [{bar:30}] block {pos}/{len} {elapsed_precise} ETA {eta_precise}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        b.set_message(o.method.name());
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut rec = Records::new(&device);
    let mut block_secs = Vec::new();
    let (n_calib, seqlen) = calib.map_or((0, 0), |c| (c.len(), c.first().map_or(0, Vec::len)));
    let mut state = match (o.method, calib) {
        (m, Some(c)) if m.calibrated() && !c.is_empty() => {
            let flat: Vec<u32> = c.iter().flatten().copied().collect();
            let tokens = Tensor::from_vec(flat, (n_calib, seqlen), &device)?;
            let embed = vb.pp("model").get((cfg.vocab_size, cfg.hidden_size), "embed_tokens.weight")?;
            let x = embed.index_select(&tokens.flatten_all()?, 0)?.reshape((n_calib, seqlen, cfg.hidden_size))?;
            let rope = Rope::new(cfg, seqlen, DType::F32, &device)?;
            let mask = causal_mask(seqlen, 0, cfg.sliding_window, DType::F32, &device)?;
            // Error propagation runs the full-precision model beside the quantized one.
            let x_fp = (m.uses_gptq() && o.gptq.propagate > 0.0).then(|| x.clone());
            Some((x, x_fp, rope, mask))
        }
        (Method::Rtn, _) => None,
        (m, _) => return Err(Error::msg(format!("{} needs calibration data", m.name()))),
    };
    for i in 0..n_layers {
        let tb = Instant::now();
        let block = Block::load(vb.pp(format!("model.layers.{i}")), cfg, &load_dense)
            .map_err(|e| Error::msg(format!("model.layers.{i}: {e}")))?;
        rec.lap(Phase::Load)?;
        let q = match state.as_mut() {
            None => rtn_block(&block, o.params, vb.dtype())?,
            Some((x, x_fp, rope, mask)) => {
                let ctx = BlockContext::new(rope, 0, mask.as_ref(), None);
                let (q, y, y_fp) = match o.method {
                    Method::Awq => {
                        let (q, y) = awq_block(&block, i, x, &ctx, vb.dtype(), o, &mut rec)?;
                        (q, y, None)
                    }
                    _ => {
                        let r = gptq_pass::gptq_block(&block, i, x, x_fp.as_ref(), &ctx, vb.dtype(), o, &mut rec)?;
                        rec.lap(Phase::Gptq)?;
                        r
                    }
                };
                *x = y;
                *x_fp = y_fp;
                q
            }
        };
        on_block(i, q)?;
        rec.lap(Phase::Round)?;
        block_secs.push(tb.elapsed().as_secs_f64());
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(Report {
        method: o.method,
        bits: o.params.bits,
        group_size: o.params.group.columns(),
        duo_scaling: o.duo_scaling,
        gqa_o_proj: o.gqa_o_proj,
        clip: o.clip,
        clip_mode: o.clip_mode,
        clip_tokens: o.clip_tokens,
        gptq: o.method.uses_gptq().then_some(o.gptq),
        calibration_blocks: n_calib,
        search_samples: o.search_samples,
        seqlen,
        groups: rec.groups,
        layers: rec.layers,
        block_secs,
        phase_secs: rec.phases,
        total_secs: t0.elapsed().as_secs_f64(),
    })
}

/// Quantizes a model in memory (fake quantization: the quantized linears multiply by their
/// dequantized weights), for evaluation without writing a checkpoint. Any bit width 2–8.
pub fn fake_quantized_model(assets: &crate::assets::ModelAssets, device: &Device, calib: Option<&[Vec<u32>]>, o: &AwqOptions) -> Result<(crate::model::Model, Report)> {
    let vb = assets.var_builder(DType::F32, device)?;
    let mut layers = Vec::new();
    let report = quantize_blocks(&vb, &assets.config, calib, o, |_, b| {
        layers.push(b);
        Ok(())
    })?;
    let model = crate::model::Model::from_layers(vb, &assets.config, layers, false)?;
    Ok((model, report))
}

/// AWQ for one linear layer given its inputs `x` (`[tokens, in]`): the scale searched on the
/// layer's own output, then clipping, as for the down_proj group. Returns the weight the
/// quantized layer effectively applies (`Q(clip(W·s)) / s`, the 1/s folded back) and the choice.
pub fn awq_linear(w: &Tensor, x: &Tensor, o: &AwqOptions) -> Result<(Tensor, scale::ScaleChoice)> {
    let w = w.to_dtype(DType::F32)?;
    let x = x.to_dtype(DType::F32)?;
    let fp = x.matmul(&w.t()?)?;
    let run = |ws: &[Tensor]| x.matmul(&ws[0].t()?);
    let c = scale::search("linear", &scale::x_mean(&x)?, std::slice::from_ref(&w), &fp, o.params, o.duo_scaling, o.n_grid, None, &run)?;
    let mut ws = scale::scale_columns(&w, &c.scales)?;
    if o.clip {
        let xs = x.broadcast_div(&c.scales)?;
        ws = clip::search_clip(&ws, &xs, o.params, &clip::ClipOptions::new(o.clip_mode).with_tokens(o.clip_tokens))?.apply(&ws)?;
    }
    let eff = crate::quant::fake_quantize(&ws, o.params)?.broadcast_div(&c.scales)?;
    Ok((eff, c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_search_subset_takes_evenly_spaced_whole_blocks() {
        let x = Tensor::arange(0f32, 10.0, &Device::Cpu).unwrap().reshape((10, 1, 1)).unwrap();
        let pick = |k| search_subset(&x, k).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(pick(4), vec![0.0, 2.0, 5.0, 7.0]);
        assert_eq!(pick(0).len(), 10);
        assert_eq!(pick(12).len(), 10);
    }
}
