//! `awq-run chat`: an interactive, streaming, multi-turn chat in the terminal.
use super::common::{chat_template, Default4Bit, ModelArgs, SamplingArgs};
use anyhow::Result;
use awq_run::engine::chat_template::{ChatTemplate, Message};
use awq_run::engine::conversation::Conversation;
use awq_run::engine::generation::{GenerationStats, Generator, StopReason};
use awq_run::ModelAssets;
use rustyline::error::ReadlineError;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// System message at the start of the conversation.
    #[arg(long)]
    pub system: Option<String>,
    /// Print each rendered prompt to stderr (for debugging templates).
    #[arg(long)]
    pub show_prompt: bool,
    /// The KV cache's dtype: `auto` (f16 on the CPU, where activations are f32: half the memory
    /// a position takes and half the bytes each decode step reads, as llama.cpp's default
    /// cache; elsewhere the activation dtype), or on the CPU `f32` or `f16`.
    #[arg(long, default_value = "auto")]
    pub kv_cache_dtype: String,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

const HELP: &str = "commands: /help  /clear (forget the conversation)  /system [TEXT] (set or show the system message)\n\
                    /settings (show the sampling settings)  /set NAME VALUE (e.g. /set temperature 0.2; off turns top_p, top_k, min_p off)\n\
                    /save FILE, /load FILE (the conversation as JSON messages)  /stats (speed of the last reply, context used)  /exit\n\
                    Ctrl-C stops a reply, Ctrl-D exits.";

/// Renders and tokenizes the conversation; drops the oldest turns until the prompt and the reply
/// budget fit the context. Returns the tokens, the rendered text and how many turns were dropped.
fn fit_prompt(conv: &mut Conversation, tmpl: &ChatTemplate, assets: &ModelAssets, budget: usize) -> Result<(Vec<u32>, String, usize)> {
    let mut dropped = 0;
    loop {
        let text = tmpl.render(&conv.messages(), true)?;
        let tokens = assets.encode(&text, false)?;
        if tokens.len() <= budget {
            return Ok((tokens, text, dropped));
        }
        // Keep the newest user message; drop the oldest exchange (user + assistant) before it.
        if conv.turns.len() <= 1 {
            anyhow::bail!("the message alone has {} tokens, more than the {budget} that fit the context", tokens.len());
        }
        let n = if conv.turns.len() >= 3 && conv.turns[1].role == "assistant" { 2 } else { 1 };
        conv.turns.drain(0..n);
        dropped += n;
    }
}

pub fn run(a: Args) -> Result<()> {
    a.sampling.check()?;
    let (assets, model) = a.model.load_with(Default4Bit::Prefer)?;
    super::common::warm_up_cuda(&model)?;
    let mut params = a.sampling.params(&assets)?;
    eprintln!("sampling: {}", params.summary());
    let tmpl = chat_template(&assets)?;
    let kv_dtype = awq_run::engine::device::parse_kv_dtype(&a.kv_cache_dtype)?;
    let mut gen = Generator::with_kv_dtype(&model, &assets.tokenizer, assets.eos_ids.clone(), kv_dtype)?;

    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        // Ctrl-C while a reply streams stops it; at the prompt rustyline reports it itself.
        ctrlc::set_handler(move || stop.store(true, Ordering::SeqCst))?;
    }
    let mut history: Vec<String> = Vec::new();
    let mut conv = Conversation { system: a.system.clone(), turns: Vec::new() };
    // The last reply's statistics and the tokens its prompt and reply took, for /stats.
    let mut last: Option<(GenerationStats, usize)> = None;
    eprintln!("chatting with {} — /help for commands, Ctrl-D to exit", assets.name);
    loop {
        // An editor only for the prompt: rustyline takes SIGINT over while one exists, and the
        // Ctrl-C handler above must get it back while a reply streams. (Its signal-hook feature
        // would leave SIGINT alone but ignores typed-ahead input: a pasted line showed only its
        // first character until the next key press.)
        let mut rl = rustyline::DefaultEditor::new()?;
        for h in &history {
            let _ = rl.add_history_entry(h.as_str());
        }
        let read = rl.readline(">>> ");
        drop(rl);
        let line = match read {
            Ok(l) => l,
            Err(ReadlineError::Interrupted) => {
                eprintln!("(Ctrl-D or /exit to quit)");
                continue;
            }
            Err(ReadlineError::Eof) => break,
            Err(e) => return Err(e.into()),
        };
        let input = line.trim();
        if input.is_empty() {
            continue;
        }
        history.push(input.to_string());
        if let Some(cmd) = input.strip_prefix('/') {
            let (name, rest) = cmd.split_once(' ').map_or((cmd, ""), |(n, r)| (n, r.trim()));
            match name {
                "exit" | "quit" => break,
                "help" => eprintln!("{HELP}"),
                "clear" => {
                    conv.turns.clear();
                    gen.reset();
                    eprintln!("(conversation cleared)");
                }
                "system" if rest.is_empty() => {
                    eprintln!("system: {}", conv.system.as_deref().unwrap_or("(none)"));
                }
                "system" => {
                    conv.system = Some(rest.to_string());
                    eprintln!("(system message set)");
                }
                "settings" => eprintln!("{}", params.describe()),
                "save" | "load" if rest.is_empty() => eprintln!("usage: /{name} FILE"),
                "save" => match conv.save(std::path::Path::new(rest)) {
                    Ok(()) => eprintln!("(saved {} messages to {rest})", conv.messages().len()),
                    Err(e) => eprintln!("error: {e}"),
                },
                "load" => match Conversation::load(std::path::Path::new(rest)) {
                    Ok(c) => {
                        conv = c;
                        eprintln!("(loaded {} messages from {rest})", conv.messages().len());
                    }
                    Err(e) => eprintln!("error: {e}"),
                },
                "stats" => match &last {
                    Some((stats, used)) => eprintln!("last reply: {}\ncontext: {used} of {} tokens used", stats.summary(), gen.context_len()),
                    None => eprintln!("(no reply yet)"),
                },
                "set" => match rest.split_once(' ') {
                    Some((key, value)) => match params.set(key.trim(), value.trim()) {
                        Ok(()) => eprintln!("({} set)", key.trim()),
                        Err(e) => eprintln!("error: {e}"),
                    },
                    None => eprintln!("usage: /set NAME VALUE, NAME one of {}", awq_run::engine::sampling::SETTINGS.join(", ")),
                },
                _ => eprintln!("unknown command /{name}\n{HELP}"),
            }
            continue;
        }
        conv.turns.push(Message::new("user", input));
        // The reply may take max_tokens (at most half the context); the prompt gets the rest.
        let prompt_budget = gen.context_len() - params.max_tokens.min(gen.context_len() / 2);
        let (tokens, text, dropped) = match fit_prompt(&mut conv, &tmpl, &assets, prompt_budget) {
            Ok(x) => x,
            Err(e) => {
                eprintln!("error: {e:#}");
                conv.turns.pop();
                continue;
            }
        };
        if dropped > 0 {
            eprintln!("(dropped the {dropped} oldest messages to fit the context of {} tokens)", gen.context_len());
        }
        if a.show_prompt {
            eprintln!("--- prompt ---\n{text}\n--- end of prompt ---");
        }
        stop.store(false, Ordering::SeqCst);
        let mut reply = String::new();
        let mut stdout = std::io::stdout().lock();
        let result = gen.generate(&tokens, &params, Some(&stop), |t| {
            reply.push_str(t);
            stdout.write_all(t.as_bytes()).and_then(|_| stdout.flush()).map_err(|e| awq_run::Error::msg(e.to_string()))
        });
        writeln!(stdout)?;
        match result {
            Ok((_, stats)) => {
                match stats.stop {
                    StopReason::Interrupted => eprintln!("(stopped)"),
                    StopReason::MaxTokens => eprintln!("(cut at {} tokens: /set max_tokens N allows longer replies)", params.max_tokens),
                    StopReason::ContextFull => eprintln!("(cut: the context of {} tokens is full)", gen.context_len()),
                    StopReason::Eos => {}
                }
                eprintln!("[{}]", stats.summary());
                conv.turns.push(Message::new("assistant", reply.trim()));
                last = Some((stats.clone(), tokens.len() + stats.generated_tokens));
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                conv.turns.pop();
            }
        }
    }
    Ok(())
}
