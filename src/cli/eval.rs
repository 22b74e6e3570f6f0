//! `awq-run eval`: perplexity of a model (full precision, a checkpoint, or a quantization
//! evaluated on the fly with --fake-quant).
use super::common::ModelArgs;
use super::quantize::QuantArgs;
use anyhow::{bail, Context, Result};
use awq_run::ModelAssets;
use candle_core::DType;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The evaluation text (UTF-8), e.g. models/data/wiki.utf8.
    #[arg(long)]
    pub text: PathBuf,
    /// Tokens per window; several (comma-separated) score the same model at each length.
    #[arg(long, default_value = "2048", value_delimiter = ',')]
    pub seqlen: Vec<usize>,
    /// Score at most this many windows.
    #[arg(long)]
    pub max_windows: Option<usize>,
    /// Quantize in memory before scoring: METHOD:BITS:GROUP, e.g. awq:4:64, rtn:3:128,
    /// gptq:4:64 or awq+gptq:3:64.
    #[arg(long)]
    pub fake_quant: Option<String>,
    /// Calibration text for --fake-quant awq (default models/data/c4.utf8).
    #[arg(long)]
    pub calib: Option<PathBuf>,
    /// Calibration blocks for --fake-quant awq.
    #[arg(long, default_value_t = 128)]
    pub n_samples: usize,
    /// Blocks the AWQ ratio grid is scored on (0 = all), as for quantize.
    #[arg(long, default_value_t = 0)]
    pub search_samples: usize,
    /// AWQ on CUDA: the ratio grid's forward passes in TF32 (see `quantize --search-tf32`).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub search_tf32: bool,
    /// AWQ's clipping bounds for --fake-quant: asym or sym, as for quantize.
    #[arg(long, default_value = "asym")]
    pub clip: String,
    /// The tokens AWQ's clip error is measured over: all, or N (a stride subsample), as for
    /// quantize.
    #[arg(long, default_value = "all")]
    pub clip_tokens: String,
    /// Skip AWQ's clipping search.
    #[arg(long)]
    pub no_clip: bool,
    /// AWQ: search o_proj's scales under grouped-query attention too (shared by the query heads
    /// of a value head), as for quantize.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    pub gqa_o_proj: bool,
    /// Tokens per calibration block for --fake-quant awq.
    #[arg(long, default_value_t = 512)]
    pub calib_seqlen: usize,
    /// Write the --fake-quant pass's report (per-group ratios and losses, per-layer clipping and
    /// output errors; the layout of a checkpoint's awq_report.json) to this file.
    #[arg(long, requires = "fake_quant")]
    pub report: Option<PathBuf>,
    #[command(flatten)]
    pub gptq: super::quantize::GptqArgs,
    /// Windows per forward pass [default: 8 on a GPU, 1 on the CPU]. Each window is still its
    /// own sequence; the result is the same up to rounding.
    #[arg(long)]
    pub batch: Option<usize>,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

fn parse_fake_quant(s: &str) -> Result<(String, u32, usize)> {
    let parts: Vec<&str> = s.split(':').collect();
    let [m, b, g] = parts.as_slice() else {
        bail!("--fake-quant {s}: expected METHOD:BITS:GROUP, e.g. awq:4:64");
    };
    let bits = b.parse().with_context(|| format!("--fake-quant {s}: bad bits {b:?}"))?;
    let group = g.parse().with_context(|| format!("--fake-quant {s}: bad group size {g:?}"))?;
    Ok((m.to_string(), bits, group))
}

pub fn run(a: Args) -> Result<()> {
    if a.fake_quant.is_none() && !a.gptq.given().is_empty() {
        bail!("{}: GPTQ settings apply to --fake-quant gptq:… or awq+gptq:… only", a.gptq.given().join(", "));
    }
    if a.fake_quant.is_some() {
        super::common::keep_freed_memory();
    }
    a.model.apply_cpu_options()?;
    let spec = a.model.model_spec()?;
    let device = a.model.device()?;
    let dtype = awq_run::engine::device::parse_dtype(a.model.dtype.as_deref(), &device)?;
    let text = awq_run::awq::calib::read_text(&a.text)?;
    let assets = ModelAssets::load(&spec).with_context(|| format!("loading {spec}"))?;
    let tokens = assets.encode(&text, true)?;
    for &s in &a.seqlen {
        awq_run::engine::eval::check_windows(tokens.len(), s, assets.config.max_position_embeddings)?;
    }
    // A temporary file beside --report, made before the pass so that an unwritable location fails
    // before minutes of calibration, and renamed onto it only once the report is complete.
    let report_file = match &a.report {
        Some(p) => Some((p, awq_run::error::temp_beside(p).with_context(|| format!("--report {}: cannot create the file", p.display()))?)),
        None => None,
    };
    let model = match &a.fake_quant {
        None => assets.load_model(&device, dtype)?,
        Some(fq) => {
            let (method, bits, group_size) = parse_fake_quant(fq)?;
            let qa = QuantArgs {
                method,
                bits,
                group_size,
                calib: a.calib.clone(),
                n_samples: a.n_samples,
                seqlen: a.calib_seqlen,
                no_clip: a.no_clip,
                clip: a.clip.clone(),
                clip_tokens: a.clip_tokens.clone(),
                search_samples: a.search_samples,
                duo_scaling: true,
                gqa_o_proj: a.gqa_o_proj,
                batch: 4,
                search_tf32: a.search_tf32,
                gptq: a.gptq.clone(),
            };
            let o = qa.options()?;
            let calib = qa.calibration(&assets, &o)?;
            let (m, r) = awq_run::awq::fake_quantized_model(&assets, &device, calib.as_deref(), &o)?;
            eprintln!("fake-quantized with {fq} in {:.1}s ({})", r.total_secs, r.phases_line());
            if let Some((path, tmp)) = report_file {
                let json = serde_json::to_vec_pretty(&r)?;
                awq_run::error::persist_file(tmp, path, &json).with_context(|| format!("--report {}: cannot write", path.display()))?;
            }
            if dtype != DType::F32 {
                eprintln!("note: fake-quantized models are evaluated in f32");
            }
            m
        }
    };
    for &seqlen in &a.seqlen {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(indicatif::ProgressStyle::with_template("scoring [{bar:30}] window {pos}/{len} ETA {eta}").unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()));
        let batch = a.batch.unwrap_or(if device.is_cpu() { 1 } else { 8 });
        if batch == 0 {
            bail!("--batch must be positive");
        }
        let r = awq_run::engine::eval::perplexity(&model, &tokens, seqlen, a.max_windows, batch, |i, n| {
            bar.set_length(n as u64);
            bar.set_position(i as u64);
        })?;
        bar.finish_and_clear();
        if a.json {
            // One JSON object per line (per --seqlen).
            println!("{}", serde_json::to_string(&r)?);
        } else {
            println!("perplexity: {:.4}", r.perplexity);
            println!("windows: {} of {} tokens, {} tokens scored, {:.1}s", r.windows, r.seqlen, r.tokens_scored, r.seconds);
        }
    }
    Ok(())
}
