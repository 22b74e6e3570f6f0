//! `awq-run serve`: the OpenAI-compatible server with continuous batching and a chat page.
use super::common::{model_sampling, Default4Bit, ModelArgs};
use anyhow::{bail, Context, Result};
use awq_run::engine::scheduler::SchedulerConfig;
use awq_run::model::paged::{KvPool, BLOCK_TOKENS};
use awq_run::server::{AppState, Server, ServerOptions};
use awq_run::server::tool_parser::ToolParser;
use awq_run::ModelAssets;
use std::net::{IpAddr, SocketAddr};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Serve a model of random weights (throughput measurements): its tokenizer takes one token
    /// per byte, its replies are noise.
    #[command(flatten)]
    pub dummy: super::common::DummyArgs,
    /// Address to listen on (0.0.0.0 for every interface).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// Port to listen on (0: any free port, printed at start).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Sequences decoded together in one step at most.
    #[arg(long, default_value_t = 16)]
    pub max_batch: usize,
    /// Requests waiting for a place in the batch at most; more are answered 429.
    #[arg(long, default_value_t = 256)]
    pub max_queue: usize,
    /// Memory of the paged KV cache, in MiB [default: what --max-batch full contexts take, at
    /// most 2048].
    #[arg(long, conflicts_with = "kv_blocks")]
    pub kv_cache_mb: Option<usize>,
    /// Size of the paged KV cache in blocks of 16 tokens (instead of --kv-cache-mb).
    #[arg(long)]
    pub kv_blocks: Option<usize>,
    /// The KV cache's dtype: `auto` (f16 on the CPU, where activations are f32: half the
    /// memory per token and half the bytes a decode step's attention reads, keys and values
    /// rounded to f16 as in llama.cpp's default cache; elsewhere the activation dtype), or on
    /// the CPU `f32` or `f16`.
    #[arg(long, default_value = "auto")]
    pub kv_cache_dtype: String,
    /// Prompt tokens prefilled per step at most, over all prefilling sequences (long prompts go
    /// in chunks, so running streams keep their pace) [default: 512 on the CPU; on CUDA 8192 with 70
    /// GiB of GPU memory or more, else 4096].
    #[arg(long)]
    pub prefill_chunk: Option<usize>,
    /// Compute every prompt in full: no reuse of the KV blocks of an earlier prompt that
    /// started with the same tokens (the prefix cache, on by default, as in vLLM and
    /// llama-server: a conversation's next turn or a shared system prompt is not computed again).
    #[arg(long)]
    pub no_prefix_cache: bool,
    /// Require `Authorization: Bearer KEY` on every /v1/ request.
    #[arg(long)]
    pub api_key: Option<String>,
    /// The model name the API reports and accepts (default: the model's directory or file name).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Read tool calls out of replies in this syntax, for `tool_choice: "auto"`: `hermes`
    /// (`<tool_call>{"name", "arguments"}</tool_call>`: Qwen 2.5 / 3, Hermes, SmolLM2),
    /// `llama3_json` (a reply of `{"name", "parameters"}` calls joined by `;`: Llama 3.1-3.3),
    /// `mistral` (`[TOOL_CALLS][{"name", "arguments"}, ...]`), or `none` (`auto` refused).
    /// Default: the syntax the model's chat template teaches, where it names one; else none.
    #[arg(long, value_name = "NAME")]
    pub tool_call_parser: Option<ParserFlag>,
}

/// `--tool-call-parser`: a syntax, or `none`.
#[derive(Debug, Clone, Copy)]
pub enum ParserFlag {
    Off,
    On(ToolParser),
}

impl std::str::FromStr for ParserFlag {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "none" => Ok(ParserFlag::Off),
            _ => s.parse().map(ParserFlag::On).map_err(|e| format!("{e}, or none")),
        }
    }
}

pub fn run(a: Args) -> Result<()> {
    if a.max_batch == 0 {
        bail!("--max-batch must be positive");
    }
    if a.prefill_chunk == Some(0) {
        bail!("--prefill-chunk must be positive");
    }
    if a.kv_cache_mb == Some(0) || a.kv_blocks == Some(0) {
        bail!("the KV cache needs at least one block: --kv-cache-mb / --kv-blocks must be positive");
    }
    a.model.apply_cpu_options()?;
    let device = a.model.device()?;
    let dtype = awq_run::engine::device::parse_dtype(a.model.dtype.as_deref(), &device)?;
    let (assets, model, dummy_name) = match a.dummy.build(dtype, &device)? {
        Some((model, name, weights)) => {
            eprintln!("serving random weights: {name} ({weights}); the tokenizer takes one token per byte");
            (ModelAssets::for_dummy(&name, model.cfg.clone())?, model, Some(name))
        }
        None => {
            let (assets, model) = a.model.load_with(Default4Bit::Prefer)?;
            (assets, model, None)
        }
    };
    let kv_dtype = KvPool::resolve_dtype(awq_run::engine::device::parse_kv_dtype(&a.kv_cache_dtype)?, model.dtype, &model.device)?;
    let block_bytes = KvPool::block_bytes(&model.cfg, kv_dtype);
    let kv_blocks = match (a.kv_blocks, a.kv_cache_mb) {
        (Some(b), _) => b,
        (None, Some(mb)) => (mb << 20) / block_bytes,
        // Never more than every sequence of a full batch at full context could use.
        (None, None) => ((2048 << 20) / block_bytes).min(a.max_batch * KvPool::blocks_for(model.context_len())),
    }
    .max(1);
    let defaults = model_sampling(&assets)?;
    let name = a.served_model_name.clone().or(dummy_name).unwrap_or_else(|| {
        let spec = a.model.model_spec_with(Default4Bit::Prefer).unwrap_or_default();
        std::path::Path::new(spec.trim_end_matches('/')).file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or(spec)
    });
    let prefill_chunk = a.prefill_chunk.unwrap_or_else(|| awq_run::engine::device::default_prefill_chunk(&device));
    let sched = SchedulerConfig { max_batch: a.max_batch, max_queue: a.max_queue, kv_blocks, prefill_chunk, kv_dtype: Some(kv_dtype), prefix_cache: !a.no_prefix_cache };
    let tool_parser = match a.tool_call_parser {
        Some(ParserFlag::Off) => None,
        Some(ParserFlag::On(p)) => Some(p),
        None => {
            let found = assets.chat_template.as_deref().and_then(ToolParser::from_template);
            if let Some(p) = found {
                eprintln!("tool calls in tool_choice \"auto\": the {} syntax, which the chat template teaches (--tool-call-parser to choose another, or none)", p.name());
            }
            found
        }
    };
    let opts = ServerOptions { model_name: name.clone(), api_key: a.api_key.clone(), defaults, tool_parser };
    super::common::warm_up_cuda(&model)?;
    let state = AppState::new(model, &assets, sched, opts)?;
    if state.engine.context_by_cache {
        eprintln!("note: the KV cache holds fewer tokens than the model's context; requests are limited to {} tokens", state.engine.context_len);
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().context("starting the async runtime")?;
    let server = Server::bind(&rt, SocketAddr::new(a.host, a.port), state)?;
    let addr = server.local_addr()?;
    eprintln!(
        "KV cache: {kv_blocks} blocks of {BLOCK_TOKENS} tokens ({} tokens, {:.0} MiB, {}, prefix cache {}); batch up to {} sequences",
        kv_blocks * BLOCK_TOKENS,
        (kv_blocks * block_bytes) as f64 / (1 << 20) as f64,
        kv_dtype.as_str(),
        if a.no_prefix_cache { "off" } else { "on" },
        a.max_batch
    );
    if a.api_key.is_some() {
        eprintln!("API key required on /v1/ (Authorization: Bearer ...)");
    }
    // The tests and scripts read this line for the port.
    println!("serving {name} on http://{addr} (chat page at /, OpenAI API at /v1)");
    use std::io::Write;
    std::io::stdout().flush()?;
    server.run(&rt)?;
    eprintln!("server stopped");
    Ok(())
}
