//! `awq-run quantize`: AWQ, RTN, GPTQ or AWQ+GPTQ to a 4-bit checkpoint (AutoAWQ GEMM, or the
//! GPTQ layout for `--method gptq`).
use super::common::{peak_rss_mib, ModelArgs};
use anyhow::{Context, Result};
use awq_run::awq::gptq::GptqOptions;
use awq_run::awq::{calib, AwqOptions, Method};
use awq_run::quant::QuantScheme;
use awq_run::ModelAssets;
use std::path::PathBuf;

/// Calibration text used when --calib is not given (never the wiki text used for evaluation).
pub const DEFAULT_CALIB: &str = "models/data/c4.utf8";

#[derive(clap::Args, Debug, Clone)]
pub struct QuantArgs {
    /// awq (activation-aware scaling and clipping), rtn (round-to-nearest baseline), gptq
    /// (error-compensating rounding against the inputs' Hessian) or awq+gptq (AWQ's scales and
    /// clipping, then GPTQ's rounding).
    #[arg(long, default_value = "awq")]
    pub method: String,
    /// Bits per weight (2–8 for evaluation; checkpoints are 4-bit).
    #[arg(long, default_value_t = 4)]
    pub bits: u32,
    /// Input channels per quantization group; 0 for one group per output channel.
    #[arg(long, default_value_t = 128)]
    pub group_size: usize,
    /// Calibration text file (one record per line).
    #[arg(long)]
    pub calib: Option<PathBuf>,
    /// Number of calibration blocks.
    #[arg(long, default_value_t = 128)]
    pub n_samples: usize,
    /// Tokens per calibration block.
    #[arg(long, default_value_t = 512)]
    pub seqlen: usize,
    /// AWQ: score the ratio grid on this many of the calibration blocks (evenly spaced; 0 = all).
    /// The statistics and the clip search use every block. The grid is most of the pass's time:
    /// on 2 CPU cores SmolLM2's default pass (c4.utf8 holds 34 blocks of 512) takes 4.5 minutes
    /// with 8, and 32 blocks took 16 with all of them.
    #[arg(long, default_value_t = 8)]
    pub search_samples: usize,
    /// Skip the clipping search.
    #[arg(long)]
    pub no_clip: bool,
    /// The clipping bounds searched: asym (each group's maximum and minimum shrunk separately)
    /// or sym (AutoAWQ's [-m, m]).
    #[arg(long, default_value = "asym")]
    pub clip: String,
    /// The tokens the clip error is measured over: all, or N for AutoAWQ's stride subsample of
    /// N to 2N-1 tokens.
    #[arg(long, default_value = "all")]
    pub clip_tokens: String,
    /// AutoAWQ's duo scaling (activation and weight statistics); false uses activations alone.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub duo_scaling: bool,
    /// AWQ: search o_proj's scales under grouped-query attention too, one per v_proj channel
    /// shared by the query heads that read it; false (the default) skips o_proj there, as
    /// AutoAWQ does.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    pub gqa_o_proj: bool,
    /// Calibration blocks per forward chunk (memory vs. speed).
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// AWQ on CUDA: the ratio grid's forward passes multiply in TF32 (tensor cores; f32
    /// accumulation and f32 everywhere else); false: full f32. The rest of the pass is f32 either
    /// way. No effect on the CPU.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub search_tf32: bool,
    #[command(flatten)]
    pub gptq: GptqArgs,
}

/// GPTQ's settings (gptq and awq+gptq only; refused with other methods).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct GptqArgs {
    /// GPTQ: dampening added to the Hessian's diagonal, as a fraction of its mean [default: 0.01].
    #[arg(long)]
    pub damp: Option<f64>,
    /// GPTQ: quantize columns in decreasing order of activation energy (desc_act).
    #[arg(long)]
    pub act_order: bool,
    /// GPTQ with --act-order: fix each group's scale from the unpermuted weight, so groups stay
    /// contiguous (true); false lets groups follow the activation order (a g_idx checkpoint).
    #[arg(long, action = clap::ArgAction::Set)]
    pub static_groups: Option<bool>,
    /// GPTQ: quantize q/k/v, o, gate/up, down in turn, each on inputs through the layers already
    /// quantized [default: true].
    #[arg(long, action = clap::ArgAction::Set)]
    pub true_sequential: Option<bool>,
    /// GPTQ: symmetric quantization (zero point fixed at 2^(bits-1)).
    #[arg(long)]
    pub sym: bool,
    /// GPTQ: error propagation strength in [0, 1]; each layer is rounded towards the weight that
    /// maps its drifted (quantized-stream) inputs to the full-precision outputs [default: 0, off].
    #[arg(long, value_name = "ALPHA")]
    pub propagate: Option<f64>,
    /// GPTQ with --propagate: propagate into down_proj too [default: false, as QEP's reference].
    #[arg(long, value_name = "BOOL", action = clap::ArgAction::Set)]
    pub propagate_down_proj: Option<bool>,
}

impl GptqArgs {
    /// The GPTQ flags given on the command line.
    pub fn given(&self) -> Vec<&'static str> {
        [
            (self.damp.is_some(), "--damp"),
            (self.act_order, "--act-order"),
            (self.static_groups.is_some(), "--static-groups"),
            (self.true_sequential.is_some(), "--true-sequential"),
            (self.sym, "--sym"),
            (self.propagate.is_some(), "--propagate"),
            (self.propagate_down_proj.is_some(), "--propagate-down-proj"),
        ]
        .iter()
        .filter(|(g, _)| *g)
        .map(|(_, f)| *f)
        .collect()
    }

    /// GPTQ's options for `method`; flags given to a method that does not use them are refused.
    pub fn options(&self, method: Method) -> Result<GptqOptions> {
        let given = self.given();
        if !method.uses_gptq() && !given.is_empty() {
            anyhow::bail!("{}: only --method gptq and awq+gptq use it, not {}", given.join(", "), method.name());
        }
        if self.static_groups.is_some() && !self.act_order {
            anyhow::bail!("--static-groups: applies with --act-order only");
        }
        if method == Method::AwqGptq && self.sym {
            anyhow::bail!("--sym: awq+gptq writes the AWQ layout, which has zero points; use --method gptq --sym");
        }
        let mut o = GptqOptions::default();
        if let Some(d) = self.damp {
            if !(d > 0.0 && d.is_finite()) {
                anyhow::bail!("--damp {d}: must be a positive number");
            }
            o.damp = d;
        }
        o.act_order = self.act_order;
        o.static_groups = self.static_groups.unwrap_or(true);
        o.true_sequential = self.true_sequential.unwrap_or(true);
        o.sym = self.sym;
        if let Some(a) = self.propagate {
            if !(0.0..=1.0).contains(&a) {
                anyhow::bail!("--propagate {a}: expected a strength between 0 and 1");
            }
            o.propagate = a;
        }
        if self.propagate_down_proj.is_some() && o.propagate == 0.0 {
            anyhow::bail!("--propagate-down-proj: applies with --propagate only");
        }
        o.propagate_down = self.propagate_down_proj.unwrap_or(false);
        Ok(o)
    }
}

impl QuantArgs {
    pub fn options(&self) -> Result<AwqOptions> {
        let method: Method = self.method.parse()?;
        let mut o = AwqOptions::new(method, QuantScheme::new(self.bits, self.group_size)?);
        o.clip = !self.no_clip;
        o.clip_mode = self.clip.parse()?;
        o.clip_tokens = match self.clip_tokens.as_str() {
            "all" => None,
            n => Some(n.parse::<usize>().ok().filter(|&n| n > 0).with_context(|| format!("--clip-tokens {n}: expected all or a positive number"))?),
        };
        o.duo_scaling = self.duo_scaling;
        o.gqa_o_proj = self.gqa_o_proj;
        o.search_samples = self.search_samples;
        o.batch = self.batch.max(1);
        o.search_tf32 = self.search_tf32;
        o.progress = true;
        o.gptq = self.gptq.options(method)?;
        Ok(o)
    }

    /// The calibration blocks (None for RTN).
    pub fn calibration(&self, assets: &ModelAssets, o: &AwqOptions) -> Result<Option<Vec<Vec<u32>>>> {
        if o.method == Method::Rtn {
            return Ok(None);
        }
        let path = self.calib.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_CALIB));
        if self.calib.is_none() && !path.exists() {
            anyhow::bail!("the default calibration text {DEFAULT_CALIB} is missing: run scripts/fetch-models.sh or pass --calib FILE");
        }
        let blocks = calib::calibration_blocks(assets, &path, self.n_samples, self.seqlen)?;
        if blocks.len() < self.n_samples {
            eprintln!(
                "note: {} gives {} blocks of {} tokens (asked for {})",
                path.display(),
                blocks.len(),
                self.seqlen,
                self.n_samples
            );
        }
        Ok(Some(blocks))
    }
}

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Output directory for the checkpoint.
    #[arg(long, required_unless_present = "dummy_weights")]
    pub out: Option<PathBuf>,
    /// Time the AWQ pass on a random model of a known shape (--config) with random calibration
    /// tokens, for speed and memory work; writes nothing (random weights make no checkpoint).
    #[arg(long, conflicts_with_all = ["out", "model"])]
    pub dummy_weights: bool,
    /// The shape for --dummy-weights: llama-2-7b, llama-3-8b, qwen2.5-7b, smollm2-135m.
    #[arg(long, requires = "dummy_weights")]
    pub config: Option<String>,
    #[command(flatten)]
    pub quant: QuantArgs,
    /// Replace an existing output directory.
    #[arg(long)]
    pub force: bool,
}

pub fn run(a: Args) -> Result<()> {
    super::common::keep_freed_memory();
    if a.dummy_weights {
        return run_dummy(&a);
    }
    let Some(out) = a.out.as_ref() else { anyhow::bail!("--out DIR is required") };
    a.model.apply_cpu_options()?;
    let spec = a.model.model_spec()?;
    let device = a.model.device()?;
    let o = a.quant.options()?;
    let assets = ModelAssets::load(&spec).with_context(|| format!("loading {spec}"))?;
    awq_run::awq::check_group_size(&assets.config, o.params)?;
    awq_run::awq::export::check_writable(&o)?;
    let calib = a.quant.calibration(&assets, &o)?;
    eprintln!("quantizing {spec} with {}", describe(&o, calib.as_deref(), "", &device));
    let report = awq_run::awq::export::write_quantized(&assets, out, &o, calib.as_deref(), &device, a.force)?;
    eprintln!(
        "wrote {} in {:.1}s ({}; peak RSS {:.0} MiB)",
        out.display(),
        report.total_secs,
        report.phases_line(),
        peak_rss_mib()
    );
    Ok(())
}

/// `awq w4g64, 8 calibration blocks of 256 tokens on cpu` (`kind` qualifies the blocks).
fn describe(o: &AwqOptions, calib: Option<&[Vec<u32>]>, kind: &str, device: &candle_core::Device) -> String {
    let blocks = calib.map_or(String::new(), |c| format!(", {} {kind}calibration blocks of {} tokens", c.len(), c.first().map_or(0, Vec::len)));
    format!("{} {}{blocks} on {}", o.method.name(), o.params, awq_run::engine::device::device_name(device))
}

/// `--dummy-weights`: the AWQ pass over random weights of a preset shape, calibrated on random
/// token ids (the same amount of work as a real model: every block's forward passes, scale and
/// clip searches and quantization run; only the numbers are meaningless).
fn run_dummy(a: &Args) -> Result<()> {
    use awq_run::model::dummy;
    let Some(name) = a.config.as_deref() else { anyhow::bail!("--dummy-weights needs --config NAME") };
    let cfg = dummy::preset(name)?;
    let device = a.model.device()?;
    let o = a.quant.options()?;
    awq_run::awq::check_group_size(&cfg, o.params)?;
    let vb = dummy::dummy_var_builder(&cfg, candle_core::DType::F32, &device);
    let vocab = cfg.vocab_size as u64;
    let mut rng = awq_run::rng::Rng::new(0x5EED);
    let mut next = move || rng.below(vocab) as u32;
    let calib: Option<Vec<Vec<u32>>> = (o.method != Method::Rtn)
        .then(|| (0..a.quant.n_samples.max(1)).map(|_| (0..a.quant.seqlen.max(1)).map(|_| next()).collect()).collect());
    eprintln!("timing on a random {name}: {} (nothing is written)", describe(&o, calib.as_deref(), "random ", &device));
    let report = awq_run::awq::quantize_blocks(&vb, &cfg, calib.as_deref(), &o, |_, block| {
        // Like writing a checkpoint: the packed codes of every layer are produced, then dropped.
        for (_, l) in block.linears() {
            std::hint::black_box(awq_run::linear::quantized_weight(l)?);
        }
        Ok(())
    })?;
    println!(
        "{}",
        serde_json::json!({
            "config": name, "method": o.method.name(), "bits": o.params.bits,
            "group_size": o.params.group.columns(), "device": awq_run::engine::device::device_name(&device),
            "calib_blocks": calib.as_ref().map_or(0, |c| c.len()), "seqlen": a.quant.seqlen,
            "total_secs": report.total_secs, "phase_secs": report.phase_secs.iter().map(|(p, s)| (p.key(), *s)).collect::<std::collections::BTreeMap<_, _>>(),
            "search_tf32": o.search_tf32, "peak_rss_mib": peak_rss_mib(),
        })
    );
    Ok(())
}
