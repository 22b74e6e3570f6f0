//! Arguments shared by several commands.
use anyhow::{bail, Context, Result};
use awq_run::engine::generation::SamplingParams;
use awq_run::ModelAssets;
use candle_core::{DType, Device};
use clap::Args;
use std::path::Path;

/// The model loaded when `--model` is not given (the f32 import of SmolLM2).
pub const DEFAULT_MODEL: &str = "models/smollm2-135m-instruct";
/// The 4-bit AWQ checkpoint of it that `scripts/fetch-models.sh` makes: `chat` and `generate`
/// prefer it when no `--model` is given.
pub const DEFAULT_QUANTIZED_MODEL: &str = "models/smollm2-135m-instruct-awq";

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Hub id (owner/name), local HF-layout directory, or .gguf file.
    #[arg(long, short)]
    pub model: Option<String>,
    /// cpu, cuda[:N] or metal[:N] (default: the best available).
    #[arg(long)]
    pub device: Option<String>,
    /// Activation dtype: f32, f16 or bf16 (default: f32 on CPU, f16 on GPUs).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Arithmetic of 4-bit layers on the CPU: `w4a8` (activations rounded to int8 per 32
    /// values, integer dot products; +0.14 % perplexity on SmolLM2) or `exact` (f32 activations
    /// times the dequantized weights).
    #[arg(long, value_enum, default_value_t = CpuKernelArg::W4a8)]
    pub cpu_kernel: CpuKernelArg,
    /// The lm_head of 4-bit models on the CPU: `int8` (8 bits per weight with a scale per 32:
    /// half the reads; +0.10 % perplexity on SmolLM2) or `f16` (as the checkpoint stores it).
    #[arg(long, value_enum, default_value_t = CpuHeadArg::Int8)]
    pub cpu_head: CpuHeadArg,
    /// CPU threads (default: the physical cores).
    #[arg(long)]
    pub threads: Option<usize>,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuKernelArg {
    Exact,
    W4a8,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuHeadArg {
    F16,
    Int8,
}

/// Which default model a command takes when `--model` is not given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Default4Bit {
    /// The 4-bit checkpoint where it exists (inference: chat, generate).
    Prefer,
    /// The full-precision model (quantize, eval, bench).
    No,
}

impl ModelArgs {
    pub fn model_spec(&self) -> Result<String> {
        self.model_spec_with(Default4Bit::No)
    }

    pub fn model_spec_with(&self, quantized: Default4Bit) -> Result<String> {
        if let Some(m) = &self.model {
            return Ok(m.clone());
        }
        let exists = |m: &str| Path::new(m).join("config.json").exists();
        if quantized == Default4Bit::Prefer && exists(DEFAULT_QUANTIZED_MODEL) {
            return Ok(DEFAULT_QUANTIZED_MODEL.to_string());
        }
        if !exists(DEFAULT_MODEL) {
            bail!(
                "no --model given and the default model {DEFAULT_MODEL} is missing; \
                 fetch it with: scripts/fetch-models.sh"
            );
        }
        Ok(DEFAULT_MODEL.to_string())
    }

    /// Applies `--cpu-kernel`, `--cpu-head` and `--threads` to the process; call it before the
    /// model is loaded and before any parallel work (the thread pool is built once).
    pub fn apply_cpu_options(&self) -> Result<()> {
        use awq_run::quant::cpu::{set_default_head, set_default_numerics, HeadFormat, Numerics};
        set_default_numerics(match self.cpu_kernel {
            CpuKernelArg::Exact => Numerics::Exact,
            CpuKernelArg::W4a8 => Numerics::W4A8,
        });
        set_default_head(match self.cpu_head {
            CpuHeadArg::F16 => HeadFormat::F16,
            CpuHeadArg::Int8 => HeadFormat::Int8,
        });
        let threads = match self.threads {
            Some(0) => bail!("--threads 0: give at least one thread"),
            Some(n) => n,
            None => candle_core::utils::get_num_threads(),
        };
        // candle's own matmuls read the variable; our kernels use rayon's global pool.
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
        if rayon::ThreadPoolBuilder::new().num_threads(threads).build_global().is_err() && rayon::current_num_threads() != threads {
            bail!("--threads {threads}: the thread pool was already started with {} threads", rayon::current_num_threads());
        }
        Ok(())
    }

    /// The CPU kernel settings in words, for logs and benchmark records.
    pub fn cpu_kernel_name(&self) -> String {
        let k = match self.cpu_kernel {
            CpuKernelArg::Exact => "exact".to_string(),
            CpuKernelArg::W4a8 => format!("w4a8 ({:?})", awq_run::quant::cpu::A8Path::detect()),
        };
        let h = match self.cpu_head {
            CpuHeadArg::F16 => "f16",
            CpuHeadArg::Int8 => "int8",
        };
        format!("{k}, head {h}")
    }

    pub fn device(&self) -> Result<Device> {
        Ok(awq_run::engine::device::parse_device(self.device.as_deref())?)
    }

    /// Loads assets and model (the full-precision default); prints what was loaded to stderr.
    pub fn load(&self) -> Result<(ModelAssets, awq_run::model::Model)> {
        self.load_with(Default4Bit::No)
    }

    /// As [`ModelArgs::load`], with the default model chosen by `quantized`.
    pub fn load_with(&self, quantized: Default4Bit) -> Result<(ModelAssets, awq_run::model::Model)> {
        let spec = self.model_spec_with(quantized)?;
        self.apply_cpu_options()?;
        let device = self.device()?;
        let dtype: DType = awq_run::engine::device::parse_dtype(self.dtype.as_deref(), &device)?;
        let t = std::time::Instant::now();
        let assets = ModelAssets::load(&spec).with_context(|| format!("loading {spec}"))?;
        let model = assets.load_model(&device, dtype)?;
        release_freed_memory();
        let weights = match assets.quant_spec()? {
            Some(q) => format!("AWQ {}", q.scheme),
            None => "full precision".to_string(),
        };
        eprintln!(
            "loaded {spec} ({:?}, {} layers, {weights}) on {} as {:?} in {:.2}s",
            assets.config.arch()?,
            assets.config.num_hidden_layers,
            awq_run::engine::device::device_name(&device),
            dtype,
            t.elapsed().as_secs_f64()
        );
        Ok((assets, model))
    }
}

/// Sampling flags. Each one left out takes the model's generation_config.json value, else
/// llama.cpp's default (see `awq_run::engine::sampling`).
#[derive(Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Most tokens to generate.
    #[arg(long, default_value_t = 512)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy [default: 0.8].
    #[arg(long)]
    pub temperature: Option<f64>,
    /// Nucleus sampling probability mass; 1 turns it off [default: 0.95].
    #[arg(long)]
    pub top_p: Option<f64>,
    /// Sample only among the k most likely tokens (a k of the vocabulary's size or more keeps
    /// them all) [default: 40].
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Drop tokens less likely than this fraction of the most likely one; 0 turns it off
    /// [default: 0.05].
    #[arg(long)]
    pub min_p: Option<f64>,
    /// Penalty for tokens among the last 64; 1.0 disables it [default: 1.0].
    #[arg(long)]
    pub repeat_penalty: Option<f32>,
    /// Random seed.
    #[arg(long, default_value_t = 299792458)]
    pub seed: u64,
}

impl SamplingArgs {
    /// The flags over `base`.
    fn over(&self, mut p: SamplingParams) -> Result<SamplingParams> {
        if let Some(t) = self.temperature {
            p.temperature = t;
        }
        if let Some(v) = self.top_p {
            p.top_p = (v != 1.0).then_some(v);
        }
        if let Some(k) = self.top_k {
            p.top_k = Some(k);
        }
        if let Some(v) = self.min_p {
            p.min_p = (v != 0.0).then_some(v);
        }
        if let Some(r) = self.repeat_penalty {
            p.repeat_penalty = r;
        }
        p.seed = self.seed;
        p.max_tokens = self.max_tokens;
        p.validate()?;
        Ok(p)
    }

    /// Checks the flags alone (before a model is loaded).
    pub fn check(&self) -> Result<()> {
        self.over(SamplingParams::default()).map(|_| ())
    }

    /// The effective settings for `assets`: llama.cpp's defaults, then the model's
    /// generation_config.json, then the flags.
    pub fn params(&self, assets: &ModelAssets) -> Result<SamplingParams> {
        self.over(model_sampling(assets)?)
    }
}

/// On CUDA, loads every kernel module and runs a short forward pass before the first prompt
/// ([`awq_run::model::Model::warm_up`]): on a driver that has not compiled our PTX before that
/// takes some 20 s, better spent at start-up than inside the first reply.
pub fn warm_up_cuda(model: &awq_run::model::Model) -> Result<()> {
    if model.device.is_cuda() {
        eprintln!("loading CUDA kernels...");
        let took = model.warm_up()?;
        eprintln!("CUDA kernels loaded and warmed up in {:.1} s", took.as_secs_f64());
    }
    Ok(())
}

/// llama.cpp's defaults with the model's generation_config.json applied (errors name the file).
pub fn model_sampling(assets: &ModelAssets) -> Result<SamplingParams> {
    let origin = match &assets.dir {
        Some(d) => d.join("generation_config.json").display().to_string(),
        None => format!("{}: generation settings", assets.name),
    };
    Ok(SamplingParams::default().with_generation_config(&assets.generation_config, &origin)?)
}

/// The chat template of a model, or ChatML (with a note) when it ships none.
pub fn chat_template(assets: &ModelAssets) -> Result<awq_run::engine::chat_template::ChatTemplate> {
    let tmpl = match &assets.chat_template {
        Some(t) => t.as_str(),
        None => {
            eprintln!("note: {} has no chat template; using ChatML", assets.name);
            awq_run::engine::chat_template::CHATML
        }
    };
    Ok(awq_run::engine::chat_template::ChatTemplate::new(tmpl, assets.bos_token.as_deref(), assets.eos_token.as_deref())?)
}

fn proc_status_mib(key: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Peak resident memory of this process in MiB (Linux; 0 elsewhere).
pub fn peak_rss_mib() -> f64 {
    proc_status_mib("VmHWM:")
}

/// Current resident memory of this process in MiB (Linux; 0 elsewhere).
pub fn rss_mib() -> f64 {
    proc_status_mib("VmRSS:")
}

/// Hands heap memory freed while loading (conversion buffers, per-layer temporaries) back to the
/// OS, so the resident size reflects the model as loaded rather than glibc's retained arenas.
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free heap pages; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// For the calibration passes (quantize, eval --fake-quant): keep freed heap memory for reuse
/// instead of giving it back to the OS. The passes allocate and free tensors of tens of MB
/// thousands of times; glibc serves those with fresh mmaps, and the kernel zeroes every page on
/// first touch — on the 2-core machine that was 9.5 of a 32-block AWQ pass's 42 CPU-minutes in
/// the kernel (page faults, page clearing). With mmap off and no trimming the pass reuses its
/// heap: 16 minutes instead of 22.5 wall-clock. The peak resident size is what the pass needs
/// at its largest either way.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes glibc's allocation policy for later calls.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// `--dummy-weights`: a model of random weights of a preset shape instead of a checkpoint
/// (bench, serve).
#[derive(clap::Args, Debug, Clone)]
pub struct DummyArgs {
    /// Build a random model of a known shape instead of loading one.
    #[arg(long)]
    pub dummy_weights: bool,
    /// The shape for --dummy-weights: llama-2-7b, llama-3-8b, qwen2.5-7b, smollm2-135m,
    /// tinyllama-1.1b.
    #[arg(long)]
    pub config: Option<String>,
    /// For --dummy-weights: fp (the activation dtype) or w4 (4-bit AWQ layers).
    #[arg(long, default_value = "fp")]
    pub weights: String,
    /// Group size of --weights w4.
    #[arg(long, default_value_t = 128)]
    pub group_size: usize,
}

impl DummyArgs {
    /// The random model, its name and a description of its weights; `None` without
    /// --dummy-weights.
    pub fn build(&self, dtype: DType, device: &candle_core::Device) -> Result<Option<(awq_run::model::Model, String, String)>> {
        if !self.dummy_weights {
            return Ok(None);
        }
        use awq_run::model::dummy;
        let Some(cfg_name) = self.config.as_deref() else { anyhow::bail!("--dummy-weights needs --config NAME") };
        let cfg = dummy::preset(cfg_name)?;
        let w4 = match self.weights.as_str() {
            "fp" => false,
            "w4" => true,
            other => anyhow::bail!("--weights {other}: expected fp or w4"),
        };
        let m = dummy::dummy_model(&cfg, w4, self.group_size, dtype, device)?;
        let weights = if w4 { format!("w4g{}", self.group_size) } else { format!("{dtype:?}").to_lowercase() };
        Ok(Some((m, format!("dummy-{cfg_name}"), weights)))
    }
}
