//! The AWQ calibration pass (../shared/AWQ.md sections 2–5) and the RTN baseline.
//!
//! Blocks are processed one at a time: each is loaded from the (memory-mapped) checkpoint, run
//! in full precision over the calibration activations with every linear's input captured, its
//! four scale groups searched, the scales folded, the clipping searched, and its linears
//! quantized. The full-precision output feeds the next block, as the reference does.
pub mod calib;
pub mod clip;
pub mod scale;

use crate::error::{Error, Result};
use crate::model::layers::{causal_mask, Rope};
use crate::model::llama::{load_dense, Block, BlockContext, LinearInputs};
use crate::model::{Config, DenseLinear, Linear};
use crate::quant::{quantize_codes, QuantLinear, QuantParams};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::Serialize;
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    Awq,
    Rtn,
}

impl std::str::FromStr for Method {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "awq" => Ok(Method::Awq),
            "rtn" => Ok(Method::Rtn),
            _ => Err(Error::msg(format!("method {s:?}: expected awq or rtn"))),
        }
    }
}

#[derive(Debug, Clone)]
pub struct AwqOptions {
    pub method: Method,
    pub params: QuantParams,
    /// Search per-group clipping after scaling (AWQ only).
    pub clip: bool,
    /// AutoAWQ's duo scaling (x_mean and w_mean) instead of x_mean alone.
    pub duo_scaling: bool,
    /// Ratios tried: i / n_grid for i in 0..n_grid.
    pub n_grid: usize,
    /// Calibration blocks per forward chunk (bounds the attention's memory).
    pub batch: usize,
    /// Show a progress bar on stderr.
    pub progress: bool,
}

impl AwqOptions {
    pub fn new(method: Method, params: QuantParams) -> Self {
        Self { method, params, clip: true, duo_scaling: true, n_grid: 20, batch: 4, progress: false }
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
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub method: Method,
    pub bits: u32,
    pub group_size: usize,
    pub duo_scaling: bool,
    pub clip: bool,
    pub calibration_blocks: usize,
    pub seqlen: usize,
    pub groups: Vec<GroupReport>,
    pub block_secs: Vec<f64>,
    pub total_secs: f64,
}

/// Names and input sizes of one block's linears, to check the group size before any work.
pub fn check_group_size(cfg: &Config, p: QuantParams) -> Result<()> {
    let (h, i, qd) = (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads * cfg.head_dim());
    let layers = [
        ("self_attn.q_proj", h),
        ("self_attn.k_proj", h),
        ("self_attn.v_proj", h),
        ("self_attn.o_proj", qd),
        ("mlp.gate_proj", h),
        ("mlp.up_proj", h),
        ("mlp.down_proj", i),
    ];
    for (name, inp) in layers {
        p.check_layer(&format!("model.layers.0.{name}"), inp)?;
    }
    Ok(())
}

fn dense(w: Tensor, bias: Option<&Tensor>) -> Linear {
    DenseLinear::new(w, bias.cloned()).into_linear()
}

/// Quantizes `w` (`[out, in]`) to a [`QuantLinear`]. Scales and bias are rounded to f16 here,
/// as the checkpoint stores them, so the in-memory model is exactly the written one.
fn quantize_linear(w: &Tensor, bias: Option<&Tensor>, p: QuantParams, dtype: DType) -> Result<Linear> {
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
    let cat = |f: fn(&LinearInputs) -> &Option<Tensor>| -> Result<Option<Tensor>> {
        let parts: Vec<Tensor> = caps.iter().map(|c| f(c).clone().expect("captured")).collect();
        Ok(Some(Tensor::cat(&parts, 0)?))
    };
    let inputs = LinearInputs {
        qkv: cat(|c| &c.qkv)?,
        o_proj: cat(|c| &c.o_proj)?,
        gate_up: cat(|c| &c.gate_up)?,
        down_proj: cat(|c| &c.down_proj)?,
    };
    Ok((Tensor::cat(&outs, 0)?, inputs))
}

/// The mutable weights of one block during the search.
struct BlockWeights {
    ln1: Tensor,
    ln2: Tensor,
    w: [Tensor; 7],
    b: [Option<Tensor>; 7],
}

const Q: usize = 0;
const K: usize = 1;
const V: usize = 2;
const O: usize = 3;
const GATE: usize = 4;
const UP: usize = 5;
const DOWN: usize = 6;
const NAMES: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

impl BlockWeights {
    fn of(block: &Block) -> Result<Self> {
        let lin = block.linears();
        let w = lin.each_ref().map(|(_, l)| l.dense_weight().and_then(|w| w.to_dtype(DType::F32)));
        let b = lin.each_ref().map(|(_, l)| l.bias().cloned());
        let [w0, w1, w2, w3, w4, w5, w6] = w;
        Ok(Self {
            ln1: block.input_layernorm.weight.clone(),
            ln2: block.post_attention_layernorm.weight.clone(),
            w: [w0?, w1?, w2?, w3?, w4?, w5?, w6?],
            b,
        })
    }
}

/// AWQ for one block: scale search and folding, clip search, quantization.
fn awq_block(block: &Block, idx: usize, x: &Tensor, ctx: &BlockContext, dtype: DType, o: &AwqOptions, reports: &mut Vec<GroupReport>) -> Result<(Block, Tensor)> {
    let p = o.params;
    let (y, mut caps) = forward_capture(block, x, ctx, o.batch)?;
    check_finite(&y, &format!("block {idx} output"))?;
    let mut bw = BlockWeights::of(block)?;
    let attn = &block.self_attn;
    let mlp = &block.mlp;
    let take = |t: &Option<Tensor>| t.clone().expect("captured");
    let (x_qkv, x_o, x_gu, x_down) = (take(&caps.qkv), take(&caps.o_proj), take(&caps.gate_up), take(&caps.down_proj));
    let mut searched: Vec<(&'static str, Vec<usize>, Tensor)> = Vec::new();
    let mut report = |prev: &str, layers: &[usize], c: &scale::ScaleChoice| {
        reports.push(GroupReport {
            block: idx,
            prev_op: prev.to_string(),
            layers: layers.iter().map(|&l| NAMES[l].to_string()).collect(),
            ratio: c.ratio,
            loss_before: c.loss_rtn,
            loss_after: c.loss_best,
        });
    };

    // 1. q/k/v after input_layernorm, measured on the whole attention module.
    {
        let fp = chunked(&x_qkv, o.batch, |xc| attn.forward(xc, ctx))?;
        let run = |ws: &[Tensor]| {
            let mut a = attn.clone();
            a.q_proj = dense(ws[0].clone(), bw.b[Q].as_ref());
            a.k_proj = dense(ws[1].clone(), bw.b[K].as_ref());
            a.v_proj = dense(ws[2].clone(), bw.b[V].as_ref());
            chunked(&x_qkv, o.batch, |xc| a.forward(xc, ctx))
        };
        let what = format!("block {idx} q/k/v");
        let c = scale::search(&what, &scale::x_mean(&x_qkv)?, &[bw.w[Q].clone(), bw.w[K].clone(), bw.w[V].clone()], &fp, p, o.duo_scaling, o.n_grid, &run)?;
        report("input_layernorm", &[Q, K, V], &c);
        searched.push(("input_layernorm", vec![Q, K, V], c.scales));
    }
    // 2. o_proj after v_proj, only without GQA (same weight shapes).
    if bw.w[V].dims() == bw.w[O].dims() {
        let fp = attn.o_proj.forward(&x_o)?;
        let run = |ws: &[Tensor]| dense(ws[0].clone(), bw.b[O].as_ref()).forward(&x_o);
        let what = format!("block {idx} o_proj");
        let c = scale::search(&what, &scale::x_mean(&x_o)?, &[bw.w[O].clone()], &fp, p, o.duo_scaling, o.n_grid, &run)?;
        report("v_proj", &[O], &c);
        searched.push(("v_proj", vec![O], c.scales));
    }
    // 3. gate/up after post_attention_layernorm, measured on the whole MLP.
    {
        let fp = mlp.forward(&x_gu)?;
        let run = |ws: &[Tensor]| {
            let mut m = mlp.clone();
            m.gate_proj = dense(ws[0].clone(), bw.b[GATE].as_ref());
            m.up_proj = dense(ws[1].clone(), bw.b[UP].as_ref());
            m.forward(&x_gu)
        };
        let what = format!("block {idx} gate/up");
        let c = scale::search(&what, &scale::x_mean(&x_gu)?, &[bw.w[GATE].clone(), bw.w[UP].clone()], &fp, p, o.duo_scaling, o.n_grid, &run)?;
        report("post_attention_layernorm", &[GATE, UP], &c);
        searched.push(("post_attention_layernorm", vec![GATE, UP], c.scales));
    }
    // 4. down_proj after up_proj.
    {
        let fp = mlp.down_proj.forward(&x_down)?;
        let run = |ws: &[Tensor]| dense(ws[0].clone(), bw.b[DOWN].as_ref()).forward(&x_down);
        let what = format!("block {idx} down_proj");
        let c = scale::search(&what, &scale::x_mean(&x_down)?, &[bw.w[DOWN].clone()], &fp, p, o.duo_scaling, o.n_grid, &run)?;
        report("up_proj", &[DOWN], &c);
        searched.push(("up_proj", vec![DOWN], c.scales));
    }

    // Fold every group's scales (all were searched on the original weights, as AutoAWQ does).
    for (prev, layers, s) in &searched {
        match *prev {
            "input_layernorm" => bw.ln1 = bw.ln1.broadcast_div(&s.to_dtype(bw.ln1.dtype())?)?,
            "post_attention_layernorm" => bw.ln2 = bw.ln2.broadcast_div(&s.to_dtype(bw.ln2.dtype())?)?,
            "v_proj" | "up_proj" => {
                let pi = if *prev == "v_proj" { V } else { UP };
                bw.w[pi] = scale::unscale_rows(&bw.w[pi], s)?;
                if let Some(b) = &bw.b[pi] {
                    bw.b[pi] = Some(scale::unscale_rows(b, s)?);
                }
            }
            _ => unreachable!(),
        }
        for &l in layers {
            bw.w[l] = scale::scale_columns(&bw.w[l], s)?;
        }
        let input = match *prev {
            "input_layernorm" => &mut caps.qkv,
            "v_proj" => &mut caps.o_proj,
            "post_attention_layernorm" => &mut caps.gate_up,
            _ => &mut caps.down_proj,
        };
        *input = Some(take(input).broadcast_div(s)?);
    }

    // Clipping (q/k skipped: attention scores are too sensitive).
    if o.clip {
        let copts = clip::ClipOptions::default();
        for (l, x) in [(V, &caps.qkv), (O, &caps.o_proj), (GATE, &caps.gate_up), (UP, &caps.gate_up), (DOWN, &caps.down_proj)] {
            let mv = clip::search_clip(&bw.w[l], &take(x), p, &copts)?;
            bw.w[l] = clip::apply_clip(&bw.w[l], &mv)?;
        }
    }

    let mut out = block.clone();
    out.input_layernorm.weight = bw.ln1.to_dtype(dtype)?;
    out.post_attention_layernorm.weight = bw.ln2.to_dtype(dtype)?;
    let ql: Vec<Linear> = (0..7).map(|l| quantize_linear(&bw.w[l], bw.b[l].as_ref(), p, dtype)).collect::<Result<_>>()?;
    set_linears(&mut out, ql);
    Ok((out, y))
}

fn set_linears(b: &mut Block, mut l: Vec<Linear>) {
    let a = &mut b.self_attn;
    let m = &mut b.mlp;
    m.down_proj = l.pop().unwrap();
    m.up_proj = l.pop().unwrap();
    m.gate_proj = l.pop().unwrap();
    a.o_proj = l.pop().unwrap();
    a.v_proj = l.pop().unwrap();
    a.k_proj = l.pop().unwrap();
    a.q_proj = l.pop().unwrap();
}

/// RTN for one block: every linear quantized as it is.
fn rtn_block(block: &Block, p: QuantParams, dtype: DType) -> Result<Block> {
    let mut out = block.clone();
    let ql: Vec<Linear> = block
        .linears()
        .iter()
        .map(|(_, l)| quantize_linear(&l.dense_weight()?, l.bias(), p, dtype))
        .collect::<Result<_>>()?;
    set_linears(&mut out, ql);
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
        b.set_message(format!("{:?}", o.method).to_lowercase());
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut reports = Vec::new();
    let mut block_secs = Vec::new();
    let (n_calib, seqlen) = calib.map_or((0, 0), |c| (c.len(), c.first().map_or(0, Vec::len)));
    let mut state = match (o.method, calib) {
        (Method::Awq, Some(c)) if !c.is_empty() => {
            let flat: Vec<u32> = c.iter().flatten().copied().collect();
            let tokens = Tensor::from_vec(flat, (n_calib, seqlen), &device)?;
            let embed = vb.pp("model").get((cfg.vocab_size, cfg.hidden_size), "embed_tokens.weight")?;
            let x = embed.index_select(&tokens.flatten_all()?, 0)?.reshape((n_calib, seqlen, cfg.hidden_size))?;
            let rope = Rope::new(cfg, seqlen, DType::F32, &device)?;
            let mask = causal_mask(seqlen, 0, cfg.sliding_window, DType::F32, &device)?;
            Some((x, rope, mask))
        }
        (Method::Awq, _) => return Err(Error::msg("AWQ needs calibration data")),
        (Method::Rtn, _) => None,
    };
    for i in 0..n_layers {
        let tb = Instant::now();
        let block = Block::load(vb.pp(format!("model.layers.{i}")), cfg, &load_dense)
            .map_err(|e| Error::msg(format!("model.layers.{i}: {e}")))?;
        let q = match state.as_mut() {
            None => rtn_block(&block, o.params, vb.dtype())?,
            Some((x, rope, mask)) => {
                let ctx = BlockContext { rope, offset: 0, mask: mask.as_ref(), step: None };
                let (q, y) = awq_block(&block, i, x, &ctx, vb.dtype(), o, &mut reports)?;
                *x = y;
                q
            }
        };
        on_block(i, q)?;
        block_secs.push(tb.elapsed().as_secs_f64());
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(Report {
        method: o.method,
        bits: o.params.bits,
        group_size: o.params.group_size,
        duo_scaling: o.duo_scaling,
        clip: o.clip,
        calibration_blocks: n_calib,
        seqlen,
        groups: reports,
        block_secs,
        total_secs: t0.elapsed().as_secs_f64(),
    })
}

/// Quantizes a model in memory (fake quantization: the quantized linears multiply by their
/// dequantized weights), for evaluation without writing a checkpoint. Any bit width 2–8.
pub fn fake_quantized_model(assets: &crate::ModelAssets, device: &Device, calib: Option<&[Vec<u32>]>, o: &AwqOptions) -> Result<(crate::model::Model, Report)> {
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
    let c = scale::search("linear", &scale::x_mean(&x)?, std::slice::from_ref(&w), &fp, o.params, o.duo_scaling, o.n_grid, &run)?;
    let mut ws = scale::scale_columns(&w, &c.scales)?;
    if o.clip {
        let xs = x.broadcast_div(&c.scales)?;
        let mv = clip::search_clip(&ws, &xs, o.params, &clip::ClipOptions::default())?;
        ws = clip::apply_clip(&ws, &mv)?;
    }
    let eff = crate::quant::fake_quantize(&ws, o.params)?.broadcast_div(&c.scales)?;
    Ok((eff, c))
}
