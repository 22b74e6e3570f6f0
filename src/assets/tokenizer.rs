//! Tokenizer support: building an HF `tokenizer.json` from a GGUF vocabulary, the special-token
//! settings of `tokenizer_config.json`, and streaming detokenization.
use crate::error::{Error, Result};
use serde_json::{json, Value};
use std::path::Path;
use tokenizers::Tokenizer;

/// The pre-tokenizer regexes llama.cpp names in `tokenizer.ggml.pre` (the same as HF's).
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn byte_level(use_regex: bool) -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

fn split(regex: &str) -> Value {
    json!({"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false})
}

/// Builds `tokenizer.json` for a byte-level BPE GGUF vocabulary (`tokenizer.ggml.model` "gpt2").
/// `types` are llama.cpp token types: 3 = control (special), 4 = user-defined (added, not special).
pub fn from_gguf_vocab(model: &str, pre: &str, tokens: &[String], types: &[i64], merges: &[String]) -> std::result::Result<Value, String> {
    if model != "gpt2" {
        return Err(format!(
            "tokenizer model {model:?} is not supported for conversion; supported: gpt2 (byte-level BPE)"
        ));
    }
    if merges.is_empty() {
        return Err("tokenizer.ggml.merges is missing or empty".into());
    }
    let pre_tokenizer = match pre {
        // SmolLM: digits split one by one, then GPT-2's byte-level split.
        "smollm" | "starcoder" | "refact" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        "llama-bpe" | "llama3" | "smaug-bpe" => json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_REGEX), byte_level(false)]}),
        "qwen2" => json!({"type": "Sequence", "pretokenizers": [split(QWEN2_REGEX), byte_level(false)]}),
        "default" | "gpt2" | "gpt-2" => byte_level(true),
        other => return Err(format!(
            "pre-tokenizer {other:?} is not supported; supported: smollm, starcoder, llama-bpe, qwen2, gpt2, default"
        )),
    };
    let vocab: serde_json::Map<String, Value> =
        tokens.iter().enumerate().map(|(i, t)| (t.clone(), json!(i))).collect();
    let added: Vec<Value> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| matches!(types.get(*i), Some(3) | Some(4)))
        .map(|(i, t)| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": types[i] == 3})
        })
        .collect();
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges,
        }
    }))
}

/// Parses a `tokenizer.json` value (as built above or read from disk).
pub fn from_value(v: &Value) -> Result<Tokenizer> {
    let s = serde_json::to_string(v).map_err(|e| Error::Tokenizer(e.to_string()))?;
    s.parse::<Tokenizer>().map_err(|e| Error::Tokenizer(e.to_string()))
}

pub fn from_file(path: &Path) -> Result<Tokenizer> {
    if !path.exists() {
        return Err(Error::Tokenizer(format!("{} is missing", path.display())));
    }
    from_bytes(&crate::error::read_file(path)?).map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))
}

/// Parses the bytes of a `tokenizer.json`. The tokenizers crate panics on some malformed files
/// (text that is not JSON inside a decoder, a bad precompiled normalizer; found by the
/// tokenizer fuzz target): the JSON is checked first, and a panic left becomes an error.
pub fn from_bytes(bytes: &[u8]) -> std::result::Result<Tokenizer, String> {
    serde_json::from_slice::<serde::de::IgnoredAny>(bytes).map_err(|e| format!("not valid JSON: {e}"))?;
    crate::error::catch_panic(|| Tokenizer::from_bytes(bytes))
        .map_err(|p| format!("not a tokenizer the tokenizers library can read (it failed with: {p})"))?
        .map_err(|e| e.to_string())
}

/// A token given as `"<s>"` or as `{"content": "<s>", ...}` in `tokenizer_config.json`.
pub fn token_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(str::to_string),
        _ => None,
    }
}

/// Decodes a token stream piece by piece, emitting text only once it is valid UTF-8 and stable
/// (byte-level BPE can split a character across tokens).
pub struct TokenStream {
    tokens: Vec<u32>,
    prev_index: usize,
    current_index: usize,
}

impl TokenStream {
    pub fn new() -> Self {
        Self { tokens: Vec::new(), prev_index: 0, current_index: 0 }
    }

    fn decode(tok: &Tokenizer, tokens: &[u32]) -> Result<String> {
        tok.decode(tokens, true).map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// Adds a token; returns newly completed text, if any.
    pub fn push(&mut self, tok: &Tokenizer, token: u32) -> Result<Option<String>> {
        let prev_text = Self::decode(tok, &self.tokens[self.prev_index..self.current_index])?;
        self.tokens.push(token);
        let text = Self::decode(tok, &self.tokens[self.prev_index..])?;
        if text.len() > prev_text.len() && !text.ends_with('\u{FFFD}') {
            let new = text.get(prev_text.len()..).unwrap_or("").to_string();
            self.prev_index = self.current_index;
            self.current_index = self.tokens.len();
            Ok(Some(new))
        } else {
            Ok(None)
        }
    }

    /// Whatever text is still held back at the end of generation.
    pub fn finish(&mut self, tok: &Tokenizer) -> Result<Option<String>> {
        let prev_text = Self::decode(tok, &self.tokens[self.prev_index..self.current_index])?;
        let text = Self::decode(tok, &self.tokens[self.prev_index..])?;
        Ok((text.len() > prev_text.len()).then(|| text.get(prev_text.len()..).unwrap_or("").to_string()))
    }
}

impl Default for TokenStream {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn malformed_tokenizer_json_is_an_error_not_a_panic() {
        // The tokenizers crate panics ("Helper") on a decoder that is not JSON.
        let e = super::from_bytes(br#"{"version": "1.0", "decoder": {"type": tru}, "model": {}}"#).unwrap_err();
        assert!(e.contains("not valid JSON"), "{e}");
        let e = super::from_bytes(br#"{"version": "1.0", "model": {"type": "BPE"}}"#).unwrap_err();
        assert!(!e.is_empty());
    }
}
