//! `awq-run quantize`: AWQ (or RTN) to an AutoAWQ GEMM 4-bit checkpoint.
use super::common::{peak_rss_mib, ModelArgs};
use anyhow::{Context, Result};
use awq_run::awq::{calib, AwqOptions, Method};
use awq_run::quant::QuantScheme;
use awq_run::ModelAssets;
use std::path::PathBuf;

/// Calibration text used when --calib is not given (never the wiki text used for evaluation).
pub const DEFAULT_CALIB: &str = "models/data/c4.utf8";

#[derive(clap::Args, Debug, Clone)]
pub struct QuantArgs {
    /// awq (activation-aware scaling and clipping) or rtn (round-to-nearest baseline).
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
    /// Skip the clipping search.
    #[arg(long)]
    pub no_clip: bool,
    /// AutoAWQ's duo scaling (activation and weight statistics); false uses activations alone.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub duo_scaling: bool,
    /// Calibration blocks per forward chunk (memory vs. speed).
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
}

impl QuantArgs {
    pub fn options(&self) -> Result<AwqOptions> {
        let method: Method = self.method.parse()?;
        let mut o = AwqOptions::new(method, QuantScheme::new(self.bits, self.group_size)?);
        o.clip = !self.no_clip;
        o.duo_scaling = self.duo_scaling;
        o.batch = self.batch.max(1);
        o.progress = true;
        Ok(o)
    }

    /// The calibration blocks for AWQ (None for RTN).
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
    let calib = a.quant.calibration(&assets, &o)?;
    eprintln!("quantizing {spec} with {}", describe(&o, calib.as_deref(), "", &device));
    let report = awq_run::awq::export::write_quantized(&assets, out, &o, calib.as_deref(), &device, a.force)?;
    eprintln!(
        "wrote {} in {:.1}s (peak RSS {:.0} MiB)",
        out.display(),
        report.total_secs,
        peak_rss_mib()
    );
    Ok(())
}

/// `awq w4g64, 8 calibration blocks of 256 tokens on cpu` (`kind` qualifies the blocks).
fn describe(o: &AwqOptions, calib: Option<&[Vec<u32>]>, kind: &str, device: &candle_core::Device) -> String {
    let blocks = calib.map_or(String::new(), |c| format!(", {} {kind}calibration blocks of {} tokens", c.len(), c.first().map_or(0, Vec::len)));
    format!("{:?} {}{blocks} on {}", o.method, o.params, awq_run::engine::device::device_name(device))
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
            "config": name, "method": format!("{:?}", o.method).to_lowercase(), "bits": o.params.bits,
            "group_size": o.params.group.columns(), "device": awq_run::engine::device::device_name(&device),
            "calib_blocks": calib.as_ref().map_or(0, |c| c.len()), "seqlen": a.quant.seqlen,
            "total_secs": report.total_secs, "peak_rss_mib": peak_rss_mib(),
        })
    );
    Ok(())
}
