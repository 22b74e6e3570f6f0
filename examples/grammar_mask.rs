//! What structured output costs per token: the time to mask a row of logits to what a grammar
//! allows next (llguidance's mask, then the row edit) and to advance the grammar by the token,
//! fed the tokens of a valid reply one by one, on a model's real vocabulary. Prints the first
//! token's time (the lexer's states are built as they are first met), the median and the
//! maximum of the rest, and the trie's build time.
//!
//!   cargo run --release --example grammar_mask -- [MODEL_DIR]
use awq_run::assets::ModelAssets;
use awq_run::engine::constraint::{Compiler, Grammar};
use serde_json::json;
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let dir = std::env::args().nth(1).unwrap_or_else(|| "models/smollm2-135m-instruct-awq".into());
    let assets = ModelAssets::load(&dir)?;
    let vocab = assets.config.vocab_size;
    let compiler = Compiler::new(assets.tokenizer.clone(), vocab, &assets.eos_ids);
    let t = Instant::now();
    compiler.compile(&Grammar::Regex("a".into())).map_err(anyhow::Error::msg)?;
    println!("{dir}: {vocab} tokens; the trie and the grammar factory built in {:.0} ms", t.elapsed().as_secs_f64() * 1e3);
    let schema = json!({"type": "object", "properties": {
        "name": {"type": "string"}, "age": {"type": "integer"},
        "pets": {"type": "array", "items": {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]}, "name": {"type": "string"}}, "required": ["kind", "name"]}}},
        "required": ["name", "age", "pets"]});
    let cases = [
        ("JSON schema", Grammar::JsonSchema(schema), r#"{"name": "Ada Lovelace", "age": 36, "pets": [{"kind": "cat", "name": "Mr. Whiskers"}, {"kind": "dog", "name": "Rex"}]}"#),
        ("any JSON object", Grammar::JsonObject, r#"{"city": "Paris", "population": 2102650, "landmarks": ["Eiffel Tower", "Louvre"], "capital": true}"#),
        ("regex", Grammar::Regex("[A-Z][a-z]+( [a-z]+)*\\.".into()), "The quick brown fox jumps over the lazy dog and keeps running."),
        ("choice", Grammar::Choice(vec!["Paris".into(), "Lyon".into(), "Marseille".into()]), "Marseille"),
    ];
    for (name, g, text) in cases {
        let t = Instant::now();
        let mut c = compiler.compile(&g).map_err(anyhow::Error::msg)?;
        let compile_ms = t.elapsed().as_secs_f64() * 1e3;
        let ids = assets.tokenizer.encode(text, false).map_err(anyhow::Error::msg)?.get_ids().to_vec();
        let mut row = vec![0f32; vocab];
        let mut us = Vec::with_capacity(ids.len());
        for &id in &ids {
            row.fill(0.0);
            let t = Instant::now();
            c.mask(&mut row, &[]).map_err(anyhow::Error::msg)?;
            anyhow::ensure!(row[id as usize] == 0.0, "{name}: token {id} of the reply was masked");
            c.accept(id).map_err(anyhow::Error::msg)?;
            us.push(t.elapsed().as_secs_f64() * 1e6);
        }
        let first = us[0];
        let mut rest = us[1..].to_vec();
        rest.sort_by(f64::total_cmp);
        println!(
            "{name:>16}: compiled in {compile_ms:.1} ms; {} tokens: first {first:.0} µs, then median {:.0} µs, max {:.0} µs a token",
            ids.len(),
            rest.get(rest.len() / 2).copied().unwrap_or(0.0),
            rest.last().copied().unwrap_or(0.0)
        );
    }
    Ok(())
}
