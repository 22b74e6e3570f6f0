//! `awq-run bench`: prefill and decode speed and peak memory, on a real or a dummy model.
use super::common::{peak_rss_mib, ModelArgs};
use anyhow::{bail, Result};
use awq_run::model::paged::KvPool;
use awq_run::model::Model;
use candle_core::{DType, Device, Tensor};
use serde::Serialize;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub dummy: super::common::DummyArgs,
    /// Re-quantize the decoder linears with candle's own format (q4_0, q4k) for comparison.
    #[arg(long)]
    pub requant: Option<String>,
    /// Prompt tokens for the prefill measurement.
    #[arg(long, default_value_t = 128)]
    pub prompt_len: usize,
    /// Tokens to decode.
    #[arg(long, default_value_t = 128)]
    pub gen: usize,
    /// Timed repetitions (the median is reported), after one warm-up.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Batch sizes (e.g. 1,16,64): measure the server's batched decode step instead, that many
    /// sequences of --prompt-len positions decoding --gen tokens together (aggregate tokens/s).
    #[arg(long, value_delimiter = ',')]
    pub batch: Vec<usize>,
    /// The KV cache's dtype (the paged one with --batch), as `serve --kv-cache-dtype` (auto:
    /// f16 on the CPU, the activation dtype elsewhere; f32 or f16 on the CPU).
    #[arg(long, default_value = "auto")]
    pub kv_cache_dtype: String,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// What was measured, and how: shared by the batch-1 and the batched report.
#[derive(Serialize)]
struct RunInfo {
    model: String,
    weights: String,
    device: String,
    dtype: String,
    prompt_len: usize,
    gen: usize,
    threads: usize,
    /// The CPU 4-bit arithmetic and lm_head format (`--cpu-kernel`, `--cpu-head`).
    cpu_kernel: String,
}

impl RunInfo {
    /// The head of the text report: `model [weights, kernel, N threads] on device (dtype)`.
    fn describe(&self) -> String {
        format!("{} [{}, {}, {} threads] on {} ({})", self.model, self.weights, self.cpu_kernel, self.threads, self.device, self.dtype)
    }
}

#[derive(Serialize)]
struct BenchResult {
    #[serde(flatten)]
    run: RunInfo,
    prefill_tok_s: f64,
    decode_tok_s: f64,
    decode_ms_per_token: f64,
    /// Host time to issue one decode step's work (the forward call, before reading the token):
    /// close to decode_ms_per_token when the host, not the device, sets the pace.
    decode_issue_ms_per_token: f64,
    peak_rss_mib: f64,
    kv_cache_dtype: String,
}

pub(super) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn sync(d: &Device) -> Result<()> {
    Ok(d.synchronize()?)
}

/// One prefill of `prompt` and `gen` greedy decode steps; returns (prefill s, decode s, decode s
/// spent issuing work).
fn run_once(model: &Model, kv_dtype: DType, prompt: &[u32], gen: usize) -> Result<(f64, f64, f64)> {
    let dev = &model.device;
    let mut cache = model.new_cache_with(prompt.len() + gen + 1, Some(kv_dtype))?;
    sync(dev)?;
    let t0 = Instant::now();
    let logits = model.forward(&Tensor::new(prompt, dev)?.unsqueeze(0)?, &mut cache)?;
    let mut next = logits.argmax(1)?.to_vec1::<u32>()?[0];
    let prefill = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let mut issue = 0.0;
    for _ in 0..gen {
        let ti = Instant::now();
        let logits = model.forward(&Tensor::new(&[next], dev)?.unsqueeze(0)?, &mut cache)?;
        let am = logits.argmax(1)?;
        issue += ti.elapsed().as_secs_f64();
        // Reading the token back is part of every real decode step.
        next = am.to_vec1::<u32>()?[0];
    }
    Ok((prefill, t1.elapsed().as_secs_f64(), issue))
}

pub fn run(a: Args) -> Result<()> {
    a.model.apply_cpu_options()?;
    let device = a.model.device()?;
    let dtype = awq_run::engine::device::parse_dtype(a.model.dtype.as_deref(), &device)?;
    let (mut model, name, weights) = if let Some(d) = a.dummy.build(dtype, &device)? {
        d
    } else {
        let (assets, m) = a.model.load()?;
        let quant = assets.quant_spec()?;
        let w = quant.map_or(format!("{dtype:?}").to_lowercase(), |q| format!("awq w{}g{}", q.scheme.bits, q.scheme.group.columns()));
        (m, assets.name.clone(), w)
    };
    let weights = match &a.requant {
        Some(r) => {
            use awq_run::linear::ggml::{parse_ggml_dtype, GgmlLinear};
            let dt = parse_ggml_dtype(r)?;
            model.map_linears(|l| GgmlLinear::requantize(l, dt).map(GgmlLinear::into_linear))?;
            format!("candle {r}")
        }
        None => weights,
    };
    if a.prompt_len == 0 || a.prompt_len + a.gen + 1 > model.context_len() {
        bail!("--prompt-len {} + --gen {} does not fit the context of {}", a.prompt_len, a.gen, model.context_len());
    }
    let vocab = model.vocab_size() as u32;
    let prompt: Vec<u32> = (0..a.prompt_len as u32).map(|i| (i * 7919 + 13) % vocab).collect();
    let run = RunInfo {
        model: name,
        weights,
        device: awq_run::engine::device::device_name(&device),
        dtype: format!("{dtype:?}").to_lowercase(),
        prompt_len: a.prompt_len,
        gen: a.gen,
        threads: rayon::current_num_threads(),
        cpu_kernel: a.model.cpu_kernel_name(),
    };
    let kv_dtype = KvPool::resolve_dtype(awq_run::engine::device::parse_kv_dtype(&a.kv_cache_dtype)?, model.dtype, &model.device)?;
    if !a.batch.is_empty() {
        return report_batched(&a, &model, run, kv_dtype, &prompt);
    }
    run_once(&model, kv_dtype, &prompt[..a.prompt_len.min(16)], 4)?; // warm-up
    let (mut pre, mut dec, mut issue) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..a.repeats.max(1) {
        let (p, d, i) = run_once(&model, kv_dtype, &prompt, a.gen)?;
        pre.push(a.prompt_len as f64 / p);
        dec.push(a.gen as f64 / d.max(1e-9));
        issue.push(1000.0 * i / a.gen.max(1) as f64);
    }
    let r = BenchResult {
        run,
        prefill_tok_s: median(pre),
        decode_tok_s: median(dec.clone()),
        decode_ms_per_token: 1000.0 / median(dec),
        decode_issue_ms_per_token: median(issue),
        peak_rss_mib: peak_rss_mib(),
        kv_cache_dtype: kv_dtype.as_str().to_string(),
    };
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "{}: prefill {:.1} tok/s ({} tokens), decode {:.1} tok/s ({:.2} ms/token, {:.2} ms of it issuing work, {} tokens), KV cache {}, peak RSS {:.0} MiB",
            r.run.describe(),
            r.prefill_tok_s,
            r.run.prompt_len,
            r.decode_tok_s,
            r.decode_ms_per_token,
            r.decode_issue_ms_per_token,
            r.run.gen,
            r.kv_cache_dtype,
            r.peak_rss_mib
        );
    }
    Ok(())
}

#[derive(Serialize)]
struct BatchedResult {
    #[serde(flatten)]
    run: RunInfo,
    kv_cache_dtype: String,
    batched: Vec<super::bench_batch::BatchRow>,
}

/// `--batch`: one row per batch size (see [`super::bench_batch`]).
fn report_batched(a: &Args, model: &Model, run: RunInfo, kv_dtype: DType, prompt: &[u32]) -> Result<()> {
    let rows = super::bench_batch::run(model, kv_dtype, prompt, a.gen, &a.batch, a.repeats)?;
    let r = BatchedResult { run, kv_cache_dtype: kv_dtype.as_str().to_string(), batched: rows };
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    println!("{}, batched decode of {} tokens after {}-token prompts, KV cache {}:", r.run.describe(), r.run.gen, r.run.prompt_len, r.kv_cache_dtype);
    println!("| batch | decode tok/s (all sequences) | ms per step | vs batch {} |", a.batch[0]);
    println!("|---|---|---|---|");
    for row in &r.batched {
        println!("| {} | {:.1} | {:.2} | {:.2}x |", row.batch, row.decode_tok_s, row.step_ms, row.vs_first);
    }
    Ok(())
}
