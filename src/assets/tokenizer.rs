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
    byte_level_bpe(pre, tokens, types, merges)
}

/// The `tokenizer.json` of a byte-level BPE vocabulary (see [`from_gguf_vocab`]).
fn byte_level_bpe(pre: &str, tokens: &[String], types: &[i64], merges: &[String]) -> std::result::Result<Value, String> {
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

/// GPT-2's byte-to-character table: how byte-level BPE vocabularies spell each byte.
fn byte_chars() -> Vec<char> {
    let printable = |b: u32| (u32::from(b'!')..=u32::from(b'~')).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
    let mut next = 256;
    (0..256u32)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap_or('?')
            } else {
                next += 1;
                char::from_u32(next - 1).unwrap_or('?')
            }
        })
        .collect()
}

/// The specials of [`byte_level_tokenizer`], as ids 0, 1, 2.
pub const BYTE_LEVEL_SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// A tokenizer for models with random weights (`--dummy-weights`), which have no vocabulary of
/// their own: ChatML's three specials (ids 0 … 2), single bytes (ids 3 … 258) for encoding any
/// text, and up to `vocab` the words ` w259`, ` w260`, … so that whatever id a random model
/// samples decodes to visible text. No merges.
pub fn byte_level_tokenizer(vocab: usize) -> Result<Tokenizer> {
    let mut tokens: Vec<String> = BYTE_LEVEL_SPECIALS.iter().map(|s| s.to_string()).collect();
    let mut types = vec![3i64; tokens.len()];
    for c in byte_chars() {
        tokens.push(c.to_string());
        types.push(1);
    }
    // 'Ġ' is the byte table's space.
    for id in tokens.len()..vocab {
        tokens.push(format!("Ġw{id}"));
        types.push(1);
    }
    from_value(&byte_level_bpe("default", &tokens, &types, &[]).map_err(Error::Tokenizer)?)
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

/// The bytes token `id` stands for, as the API's log-probabilities report it (a token may be part
/// of a character: byte-level BPE splits them, SentencePiece's byte fallback too). Its text where
/// decoding it alone gives whole characters (a special token's own text included); otherwise
/// the byte of a byte-fallback token (`<0xE2>`), or the bytes behind a byte-level token's
/// characters; an id outside the vocabulary has none.
pub fn token_bytes(tok: &Tokenizer, id: u32) -> Vec<u8> {
    let text = tok.decode(&[id], false).unwrap_or_default();
    if !text.contains('\u{FFFD}') {
        return text.into_bytes();
    }
    surface_bytes(tok, id).unwrap_or_else(|| text.into_bytes())
}

/// The bytes behind a token that is part of a character, read from its surface form: a
/// byte-fallback token (`<0xE2>`), or a byte-level token's characters through GPT-2's table.
fn surface_bytes(tok: &Tokenizer, id: u32) -> Option<Vec<u8>> {
    let surface = tok.id_to_token(id)?;
    if let Some(b) = surface.strip_prefix("<0x").and_then(|h| h.strip_suffix('>')).and_then(|h| u8::from_str_radix(h, 16).ok()) {
        return Some(vec![b]);
    }
    static BYTES: std::sync::OnceLock<std::collections::HashMap<char, u8>> = std::sync::OnceLock::new();
    let table = BYTES.get_or_init(|| byte_chars().into_iter().enumerate().map(|(b, c)| (c, b as u8)).collect());
    surface.chars().map(|c| table.get(&c).copied()).collect()
}

/// What a token adds to text that is already under way ([`vocabulary_pieces`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Bytes(Vec<u8>),
    /// A special token (`<|im_end|>`): its text, which no text written by the model stands for.
    Special(String),
    /// An id the tokenizer has no token for (a model's vocabulary may be padded past it).
    Unknown,
}

/// What each id `0 .. vocab` adds to text already under way, as constrained decoding needs it
/// (which tokens can extend a partial JSON document). A token's text alone is not that:
/// SentencePiece decoders drop the space that leads a text, so `▁the` alone decodes to `the`.
/// Each token is decoded after an anchor token instead, and the anchor's text taken off, which
/// asks the tokenizer's own decoder, whatever its kind (byte-level, Metaspace, byte fallback);
/// a token that is part of a character has the bytes behind its surface form.
pub fn vocabulary_pieces(tok: &Tokenizer, vocab: usize) -> Vec<Piece> {
    let special: std::collections::HashSet<u32> = tok.get_added_tokens_decoder().iter().filter(|(_, t)| t.special).map(|(&id, _)| id).collect();
    let anchor = tok.token_to_id("a").or_else(|| tok.encode("a", false).ok().and_then(|e| e.get_ids().first().copied()));
    let anchor_text = anchor.and_then(|a| tok.decode(&[a], false).ok()).unwrap_or_default();
    (0..vocab as u32)
        .map(|id| {
            let Some(surface) = tok.id_to_token(id) else { return Piece::Unknown };
            if special.contains(&id) {
                return Piece::Special(tok.decode(&[id], false).unwrap_or(surface));
            }
            let after = anchor.and_then(|a| tok.decode(&[a, id], false).ok()).and_then(|t| t.strip_prefix(anchor_text.as_str()).map(str::to_string));
            match after.or_else(|| tok.decode(&[id], false).ok()) {
                Some(t) if !t.contains('\u{FFFD}') => Piece::Bytes(t.into_bytes()),
                t => Piece::Bytes(surface_bytes(tok, id).unwrap_or_else(|| t.unwrap_or_default().into_bytes())),
            }
        })
        .collect()
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
    fn token_bytes_are_whole_characters_or_the_bytes_behind_a_piece_of_one() {
        let t = super::byte_level_tokenizer(1000).unwrap();
        let ids = t.encode("a☃", false).unwrap().get_ids().to_vec();
        let bytes: Vec<Vec<u8>> = ids.iter().map(|&i| super::token_bytes(&t, i)).collect();
        assert_eq!(bytes, vec![b"a".to_vec(), vec![0xE2], vec![0x98], vec![0x83]]);
        assert_eq!(super::token_bytes(&t, 1), b"<|im_start|>".to_vec(), "a special token is its text");
        assert_eq!(super::token_bytes(&t, 500), b" w500".to_vec());
        assert!(super::token_bytes(&t, 5000).is_empty(), "outside the vocabulary");
    }

    #[test]
    fn vocabulary_pieces_are_what_a_token_adds_mid_text() {
        use super::Piece;
        let t = super::byte_level_tokenizer(600).unwrap();
        let p = super::vocabulary_pieces(&t, 602);
        assert_eq!(p.len(), 602);
        assert_eq!(p[2], Piece::Special("<|im_end|>".into()));
        let ids = t.encode("a ☃", false).unwrap().get_ids().to_vec();
        let bytes: Vec<u8> = ids.iter().flat_map(|&i| match &p[i as usize] {
            Piece::Bytes(b) => b.clone(),
            other => panic!("{other:?}"),
        }).collect();
        assert_eq!(bytes, "a ☃".as_bytes());
        assert_eq!(p[500], Piece::Bytes(b" w500".to_vec()));
        assert_eq!(p[601], Piece::Unknown, "past the tokenizer's vocabulary");
    }

    /// A SentencePiece-style vocabulary (Metaspace, byte fallback): `▁the` adds " the" mid-text,
    /// though it decodes to "the" alone.
    #[test]
    fn vocabulary_pieces_keep_the_space_of_a_metaspace_token() {
        use super::Piece;
        let json = serde_json::json!({
            "version": "1.0",
            "added_tokens": [{"id": 0, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
            "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": false},
            "decoder": {"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
            "model": {"type": "BPE", "vocab": {"<s>": 0, "<0xE2>": 1, "a": 2, "▁the": 3, "▁": 4, "t": 5, "h": 6, "e": 7}, "merges": [], "byte_fallback": true, "fuse_unk": true}
        });
        let t = super::from_value(&json).unwrap();
        assert_eq!(t.decode(&[3], false).unwrap(), "the");
        let p = super::vocabulary_pieces(&t, 8);
        assert_eq!(p[3], Piece::Bytes(b" the".to_vec()));
        assert_eq!(p[1], Piece::Bytes(vec![0xE2]));
        assert_eq!(p[0], Piece::Special("<s>".into()));
        assert_eq!(p[2], Piece::Bytes(b"a".to_vec()));
    }

    #[test]
    fn the_byte_level_tokenizer_round_trips_any_text() {
        let t = super::byte_level_tokenizer(1000).unwrap();
        let text = "Hello, wörld ☃\n<|im_start|>user";
        let ids = t.encode(text, false).unwrap().get_ids().to_vec();
        assert!(ids.iter().all(|&i| i < 259), "{ids:?}");
        assert_eq!(ids.iter().filter(|&&i| i == 1).count(), 1, "the special is one token");
        assert_eq!(t.decode(&ids, false).unwrap(), text);
        assert_eq!(t.get_vocab_size(true), 1000);
        assert_eq!(t.decode(&[259, 998], false).unwrap(), " w259 w998");
    }

    #[test]
    fn malformed_tokenizer_json_is_an_error_not_a_panic() {
        // The tokenizers crate panics ("Helper") on a decoder that is not JSON.
        let e = super::from_bytes(br#"{"version": "1.0", "decoder": {"type": tru}, "model": {}}"#).unwrap_err();
        assert!(e.contains("not valid JSON"), "{e}");
        let e = super::from_bytes(br#"{"version": "1.0", "model": {"type": "BPE"}}"#).unwrap_err();
        assert!(!e.is_empty());
    }
}
