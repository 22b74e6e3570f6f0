//! `awq-run generate`: one prompt, one streamed reply.
use super::common::{chat_template, Default4Bit, peak_rss_mib, rss_mib, ModelArgs, SamplingArgs};
use anyhow::{bail, Result};
use awq_run::engine::chat_template::Message;
use awq_run::engine::constraint::{Compiler, Grammar};
use awq_run::engine::generation::Generator;
use std::io::Write;
use std::path::PathBuf;

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
    /// Hold the reply to a JSON schema: a file, or the schema itself (text starting with `{`).
    #[arg(long, value_name = "FILE|JSON")]
    pub json_schema: Option<String>,
    /// Hold the reply to any JSON object.
    #[arg(long)]
    pub json: bool,
    /// Hold the reply to a regular expression (the whole reply matches it).
    #[arg(long)]
    pub regex: Option<String>,
    /// Hold the reply to one of these strings (repeat the flag for each).
    #[arg(long = "choice", value_name = "TEXT")]
    pub choices: Vec<String>,
    /// Hold the reply to the Lark grammar in FILE (llguidance's dialect: `start: ...`).
    #[arg(long, value_name = "FILE")]
    pub grammar: Option<PathBuf>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

impl Args {
    /// The grammar the flags ask for (at most one of them), with the flag's name.
    fn grammar(&self) -> Result<Option<(&'static str, Grammar)>> {
        let mut given: Vec<(&'static str, Grammar)> = Vec::new();
        if let Some(s) = &self.json_schema {
            let text = if s.trim_start().starts_with('{') { s.clone() } else { std::fs::read_to_string(s).map_err(|e| anyhow::anyhow!("--json-schema {s}: {e}"))? };
            let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("--json-schema {s}: not JSON: {e}"))?;
            if !v.is_object() {
                bail!("--json-schema {s}: a schema is a JSON object");
            }
            given.push(("--json-schema", Grammar::JsonSchema(v)));
        }
        if self.json {
            given.push(("--json", Grammar::JsonObject));
        }
        if let Some(r) = &self.regex {
            given.push(("--regex", Grammar::Regex(r.clone())));
        }
        if !self.choices.is_empty() {
            given.push(("--choice", Grammar::Choice(self.choices.clone())));
        }
        if let Some(p) = &self.grammar {
            let g = std::fs::read_to_string(p).map_err(|e| anyhow::anyhow!("--grammar {}: {e}", p.display()))?;
            given.push(("--grammar", Grammar::Lark(g)));
        }
        if given.len() > 1 {
            bail!("{} and {} both hold the reply to a grammar; give one", given[0].0, given[1].0);
        }
        Ok(given.pop())
    }
}

pub fn run(a: Args) -> Result<()> {
    if a.prompt.trim().is_empty() {
        bail!("--prompt is empty");
    }
    a.sampling.check()?;
    let grammar = a.grammar()?;
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
    if let Some((flag, g)) = grammar {
        let c = Compiler::new(assets.tokenizer.clone(), model.cfg.vocab_size, &assets.eos_ids).compile(&g).map_err(|e| anyhow::anyhow!("{flag}: {e}"))?;
        gen.set_constraint(Some(c));
    }
    let mut stdout = std::io::stdout().lock();
    let (_, stats) = gen.generate(&tokens, &params, None, |t| {
        stdout.write_all(t.as_bytes()).and_then(|_| stdout.flush()).map_err(|e| awq_run::Error::msg(e.to_string()))
    })?;
    writeln!(stdout)?;
    eprintln!("{}", stats.summary());
    eprintln!("memory: {:.0} MiB resident, {:.0} MiB peak (loading included)", rss_mib(), peak_rss_mib());
    Ok(())
}
