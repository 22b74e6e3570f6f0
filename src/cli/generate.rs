//! `awq-run generate`: one prompt, one streamed reply.
use super::common::{chat_template, Default4Bit, peak_rss_mib, rss_mib, ModelArgs, SamplingArgs};
use anyhow::{bail, Result};
use awq_run::engine::chat_template::Message;
use awq_run::engine::generation::Generator;
use std::io::Write;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt (the user's message, unless --raw).
    #[arg(long, short)]
    pub prompt: String,
    /// A system message for the chat template.
    #[arg(long)]
    pub system: Option<String>,
    /// Feed the prompt as it is, without the chat template.
    #[arg(long)]
    pub raw: bool,
    /// The KV cache's dtype: `auto` (f16 on the CPU, where activations are f32: half the memory
    /// a position takes and half the bytes each decode step reads, as llama.cpp's default
    /// cache; elsewhere the activation dtype), or on the CPU `f32` or `f16`.
    #[arg(long, default_value = "auto")]
    pub kv_cache_dtype: String,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

pub fn run(a: Args) -> Result<()> {
    if a.prompt.trim().is_empty() {
        bail!("--prompt is empty");
    }
    a.sampling.check()?;
    let (assets, model) = a.model.load_with(Default4Bit::Prefer)?;
    let params = a.sampling.params(&assets)?;
    eprintln!("sampling: {}", params.summary());
    let tokens = if a.raw {
        assets.encode(&a.prompt, true)?
    } else {
        let mut msgs = Vec::new();
        if let Some(s) = &a.system {
            msgs.push(Message::new("system", s));
        }
        msgs.push(Message::new("user", &a.prompt));
        let text = chat_template(&assets)?.render(&msgs, true)?;
        assets.encode(&text, false)?
    };
    let kv_dtype = awq_run::engine::device::parse_kv_dtype(&a.kv_cache_dtype)?;
    let mut gen = Generator::with_kv_dtype(&model, &assets.tokenizer, assets.eos_ids.clone(), kv_dtype)?;
    let mut stdout = std::io::stdout().lock();
    let (_, stats) = gen.generate(&tokens, &params, None, |t| {
        stdout.write_all(t.as_bytes()).and_then(|_| stdout.flush()).map_err(|e| awq_run::Error::msg(e.to_string()))
    })?;
    writeln!(stdout)?;
    eprintln!("{}", stats.summary());
    eprintln!("memory: {:.0} MiB resident, {:.0} MiB peak (loading included)", rss_mib(), peak_rss_mib());
    Ok(())
}
