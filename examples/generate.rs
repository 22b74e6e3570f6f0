//! Load a model with the library API and generate a reply.
//!
//!   cargo run --release --example generate -- [MODEL] [PROMPT]
//!
//! MODEL defaults to models/smollm2-135m-instruct (scripts/fetch-models.sh fetches it).
use awq_run::engine::chat_template::{ChatTemplate, Message};
use awq_run::engine::generation::{Generator, SamplingParams};
use awq_run::ModelAssets;
use candle_core::{DType, Device};
use std::io::Write;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let model = args.next().unwrap_or_else(|| "models/smollm2-135m-instruct".into());
    let prompt = args.next().unwrap_or_else(|| "Give me three facts about the Moon.".into());

    let assets = ModelAssets::load(&model)?;
    let model = assets.load_model(&Device::Cpu, DType::F32)?;
    let template = ChatTemplate::new(
        assets.chat_template.as_deref().unwrap_or(awq_run::engine::chat_template::CHATML),
        assets.bos_token.as_deref(),
        assets.eos_token.as_deref(),
    )?;
    let text = template.render(&[Message::new("user", &prompt)], true)?;
    let tokens = assets.encode(&text, false)?;

    let params = SamplingParams { temperature: 0.0, max_tokens: 100, ..Default::default() };
    let mut generator = Generator::new(&model, &assets.tokenizer, assets.eos_ids.clone());
    let (_, stats) = generator.generate(&tokens, &params, None, |piece| {
        print!("{piece}");
        std::io::stdout().flush().map_err(|e| awq_run::Error::msg(e.to_string()))
    })?;
    println!();
    eprintln!("{}", stats.summary());
    Ok(())
}
