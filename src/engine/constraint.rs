//! Structured output: a reply held to a JSON schema, a regular expression, a list of choices or
//! a Lark grammar. At every step the grammar's matcher says which tokens may come next, the
//! others' logits become −∞ before the draw, and the drawn token advances the matcher; once the
//! grammar is complete only the end of the sequence may come, and the reply ends there.
//!
//! The masks come from llguidance (the library behind structured output in llama.cpp, vLLM,
//! SGLang and mistral.rs): an Earley parser over a lazily built lexer, walking a trie of the
//! vocabulary's byte strings. The trie is built here from [`vocabulary_pieces`], once per
//! engine, the first time a request asks for a grammar (SmolLM2's 49,152 tokens: a fraction of
//! a second).
use crate::assets::tokenizer::{vocabulary_pieces, Piece};
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{self, TokEnv, TokRxInfo, TokTrie, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;
use std::sync::{Arc, OnceLock};
use tokenizers::Tokenizer;

/// What a reply must match.
#[derive(Debug, Clone, PartialEq)]
pub enum Grammar {
    /// A JSON Schema. An object schema that does not say whether properties it does not name may
    /// come allows none, as llama.cpp's grammars and vLLM's default backend (xgrammar's strict
    /// mode) read schemas: a small model otherwise adds invented keys without end.
    /// llguidance's `x-guidance` key in the schema sets its options, e.g.
    /// `{"whitespace_flexible": false}` for compact JSON.
    JsonSchema(Value),
    /// Any JSON object (OpenAI's `json_object`).
    JsonObject,
    /// A regular expression the whole reply matches.
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// A grammar in llguidance's Lark syntax (`start: ...`).
    Lark(String),
}

impl Grammar {
    fn top_level(&self) -> TopLevelGrammar {
        match self {
            Grammar::JsonSchema(s) => {
                let mut s = s.clone();
                close_objects(&mut s);
                TopLevelGrammar::from_json_schema(s)
            }
            Grammar::JsonObject => TopLevelGrammar::from_json_schema(serde_json::json!({"type": "object"})),
            Grammar::Regex(r) => TopLevelGrammar::from_regex(r),
            Grammar::Choice(c) => TopLevelGrammar::from_regex(&c.iter().map(|s| regex_syntax::escape(s)).collect::<Vec<_>>().join("|")),
            Grammar::Lark(g) => TopLevelGrammar::from_lark(g.clone()),
        }
    }
}

/// Sets `additionalProperties: false` in every object schema of `schema` that has neither it
/// nor `patternProperties` (see [`Grammar::JsonSchema`]), walking only the keywords that hold
/// schemas (never a property named like a keyword, nor `const` or `enum` values).
fn close_objects(schema: &mut Value) {
    let Value::Object(m) = schema else { return };
    let says_object = match m.get("type") {
        Some(Value::String(t)) => t == "object",
        Some(Value::Array(ts)) => ts.iter().any(|t| t == "object"),
        _ => m.contains_key("properties"),
    };
    if says_object && !m.contains_key("additionalProperties") && !m.contains_key("patternProperties") && !m.contains_key("unevaluatedProperties") {
        m.insert("additionalProperties".into(), Value::Bool(false));
    }
    for (key, child) in m.iter_mut() {
        match key.as_str() {
            // Maps of names to schemas.
            "properties" | "patternProperties" | "$defs" | "definitions" | "dependentSchemas" => {
                if let Value::Object(named) = child {
                    named.values_mut().for_each(close_objects);
                }
            }
            // Lists of schemas.
            "anyOf" | "allOf" | "oneOf" | "prefixItems" => {
                if let Value::Array(list) = child {
                    list.iter_mut().for_each(close_objects);
                }
            }
            // One schema.
            "items" | "additionalProperties" | "not" | "if" | "then" | "else" | "contains" | "propertyNames" | "additionalItems" => close_objects(child),
            _ => {}
        }
    }
}

/// Compiles grammars against one model's vocabulary; the vocabulary's trie is built on first use.
pub struct Compiler {
    tokenizer: Tokenizer,
    vocab: usize,
    ends: Vec<u32>,
    factory: OnceLock<Result<ParserFactory, String>>,
}

impl Compiler {
    /// For a model of `vocab` logits whose replies end at `eos` (its end-of-sequence tokens).
    pub fn new(tokenizer: Tokenizer, vocab: usize, eos: &[u32]) -> Self {
        let ends = eos.iter().copied().filter(|&t| (t as usize) < vocab).collect();
        Self { tokenizer, vocab, ends, factory: OnceLock::new() }
    }

    fn factory(&self) -> Result<&ParserFactory, String> {
        self.factory
            .get_or_init(|| {
                if self.ends.is_empty() {
                    return Err("the model names no end-of-sequence token, which a grammar's end needs".into());
                }
                let words: Vec<Vec<u8>> = vocabulary_pieces(&self.tokenizer, self.vocab)
                    .into_iter()
                    .map(|p| match p {
                        Piece::Bytes(b) => b,
                        // The trie's mark for a special token: no text matches it.
                        Piece::Special(s) => [&[TokTrie::SPECIAL_TOKEN_MARKER][..], s.as_bytes()].concat(),
                        Piece::Unknown => Vec::new(),
                    })
                    .collect();
                let trie = TokTrie::from(&TokRxInfo::new(self.vocab as u32, self.ends[0]), &words).with_eos_tokens(&self.ends);
                let env: TokEnv = Arc::new(Env { trie, tokenizer: self.tokenizer.clone() });
                let mut f = ParserFactory::new_simple(&env).map_err(|e| format!("cannot set up grammars for this vocabulary: {e}"))?;
                // Grammar errors go to the client, not to the server's stderr.
                f.quiet();
                Ok(f)
            })
            .as_ref()
            .map_err(Clone::clone)
    }

    /// A matcher for `g`, or why `g` is not a grammar (a schema llguidance does not support, a
    /// regex that does not parse, an empty choice list).
    pub fn compile(&self, g: &Grammar) -> Result<Constraint, String> {
        if let Grammar::Choice(c) = g {
            if c.is_empty() {
                return Err("the list of choices is empty".into());
            }
        }
        let factory = self.factory()?;
        // A user's schema or grammar is hostile input: a panic deep in the compiler is its error.
        let top = g.top_level();
        let parser = crate::error::catch_panic(std::panic::AssertUnwindSafe(|| factory.create_parser(top))).map_err(|p| format!("the grammar compiler failed: {p}"))?;
        let matcher = Matcher::new(parser);
        if let Some(e) = matcher.get_error() {
            return Err(e);
        }
        Ok(Constraint { matcher, ends: self.ends.clone() })
    }
}

/// The tokenizer behind the trie: llguidance tokenizes a grammar's literal special tokens
/// with it (text through the tokenizer itself, not greedily over the trie).
struct Env {
    trie: TokTrie,
    tokenizer: Tokenizer,
}

impl TokenizerEnv for Env {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }
    fn tokenize_bytes(&self, s: &[u8]) -> Vec<toktrie::TokenId> {
        self.tokenizer.encode(String::from_utf8_lossy(s).as_ref(), false).map(|e| e.get_ids().to_vec()).unwrap_or_else(|_| self.trie.greedy_tokenize(s))
    }
    fn tokenize_is_canonical(&self) -> bool {
        false
    }
}

/// One reply's grammar state.
#[derive(Clone)]
pub struct Constraint {
    matcher: Matcher,
    /// The model's end-of-sequence tokens; never empty ([`Compiler::compile`] refuses a model
    /// without one).
    ends: Vec<u32>,
}

/// What the grammar allows next ([`Constraint::mask`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Tokens other than the end of the sequence (the row is masked to them, and to the end
    /// where the grammar may stop here).
    Tokens,
    /// Only the end of the sequence, this token (the model's first end-of-sequence token): the
    /// grammar is complete.
    End(u32),
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint").field("stopped", &self.matcher.is_stopped()).finish()
    }
}

impl Constraint {
    /// Sets to −∞ the logit of every token the grammar does not allow next; `also_ends` (stop
    /// token ids) count as ends of the sequence.
    pub fn mask(&mut self, row: &mut [f32], also_ends: &[u32]) -> Result<Next, String> {
        if self.matcher.is_stopped() {
            return self.stopped_error().map(|_| Next::End(self.ends[0]));
        }
        let allowed = self.matcher.compute_mask().map_err(|e| format!("the grammar failed: {e}"))?;
        let may_end = self.ends.iter().any(|&t| allowed.is_allowed(t));
        let mut ends: Vec<(usize, f32)> = self.ends.iter().chain(also_ends).map(|&t| t as usize).filter(|&t| t < row.len()).map(|t| (t, row[t])).collect();
        ends.sort_by_key(|e| e.0);
        ends.dedup_by_key(|e| e.0);
        // A word of the mask at a time (a grammar allows a few tokens or nearly all of them: the
        // words are mostly all clear or all set), past the mask's end nothing.
        let words = allowed.as_slice();
        let mut chunks = row.chunks_mut(32);
        for (&w, chunk) in words.iter().zip(&mut chunks) {
            match w {
                u32::MAX => {}
                0 => chunk.fill(f32::NEG_INFINITY),
                w => chunk.iter_mut().enumerate().filter(|(b, _)| w & (1 << b) == 0).for_each(|(_, l)| *l = f32::NEG_INFINITY),
            }
        }
        chunks.for_each(|c| c.fill(f32::NEG_INFINITY));
        // Every end of the sequence counts as one: allowed where the grammar may end here.
        let mut ends_allowed = 0;
        for &(t, l) in &ends {
            ends_allowed += usize::from(t < allowed.len() && allowed.is_allowed(t as u32));
            row[t] = if may_end { l } else { f32::NEG_INFINITY };
        }
        let other = allowed.num_set() > ends_allowed;
        match (other, may_end) {
            (true, _) => Ok(Next::Tokens),
            (false, true) => Ok(Next::End(self.ends[0])),
            // Nothing can follow and the grammar is not complete: no token of this vocabulary
            // continues it.
            (false, false) => Err("no token of the vocabulary can continue the grammar here".into()),
        }
    }

    /// Takes a drawn token (not an end of the sequence); whether the grammar is then complete
    /// and allows nothing more.
    pub fn accept(&mut self, token: u32) -> Result<bool, String> {
        self.matcher.consume_token(token).map_err(|e| format!("the grammar refused token {token}: {e}"))?;
        if self.matcher.is_stopped() {
            self.stopped_error()?;
            return Ok(true);
        }
        Ok(false)
    }

    fn stopped_error(&self) -> Result<(), String> {
        match self.matcher.get_error() {
            Some(e) => Err(format!("the grammar failed: {e}")),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::assets::tokenizer::byte_level_tokenizer;

    fn compiler() -> (Compiler, Tokenizer) {
        let t = byte_level_tokenizer(300).unwrap();
        (Compiler::new(t.clone(), 320, &[2]), t)
    }

    /// Feeds the tokens of `text` one by one, checking each was allowed; then whether the end may come.
    fn run(c: &mut Constraint, t: &Tokenizer, text: &str) -> Result<Next, String> {
        for id in t.encode(text, false).unwrap().get_ids() {
            let mut row = vec![0f32; 320];
            c.mask(&mut row, &[])?;
            if row[*id as usize] == f32::NEG_INFINITY {
                return Err(format!("token {id} refused"));
            }
            if c.accept(*id)? {
                return Ok(Next::End(2));
            }
        }
        let mut row = vec![0f32; 320];
        let next = c.mask(&mut row, &[0])?;
        assert_eq!(row[2] == 0.0, row[0] == 0.0, "a stop id ends as the end-of-sequence token does");
        Ok(if row[2] == 0.0 && next == Next::Tokens { Next::Tokens } else { next })
    }

    #[test]
    fn a_regex_allows_its_language_and_ends_where_it_is_complete() {
        let (c, t) = compiler();
        let g = c.compile(&Grammar::Regex("[0-9]{2,3}".into())).unwrap();
        assert_eq!(run(&mut g.clone(), &t, "12").unwrap(), Next::Tokens, "a third digit may come");
        assert_eq!(run(&mut g.clone(), &t, "123").unwrap(), Next::End(2));
        assert!(run(&mut g.clone(), &t, "1a").is_err());
        let mut row = vec![0f32; 320];
        assert_eq!(g.clone().mask(&mut row, &[]).unwrap(), Next::Tokens);
        assert_eq!(row[2], f32::NEG_INFINITY, "no end before two digits");
        assert_eq!(row[1], f32::NEG_INFINITY, "special tokens are never text");
        assert_eq!(row[310], f32::NEG_INFINITY, "ids past the tokenizer's vocabulary never come");
        let allowed: Vec<usize> = row.iter().enumerate().filter(|(_, l)| **l == 0.0).map(|(i, _)| i).collect();
        assert_eq!(allowed.len(), 10, "the ten digits: {allowed:?}");
    }

    #[test]
    fn choices_json_schemas_and_lark_grammars() {
        let (c, t) = compiler();
        let g = c.compile(&Grammar::Choice(vec!["yes".into(), "no".into(), "a|b".into()])).unwrap();
        assert_eq!(run(&mut g.clone(), &t, "yes").unwrap(), Next::End(2));
        assert_eq!(run(&mut g.clone(), &t, "a|b").unwrap(), Next::End(2), "choices are literal text");
        assert!(run(&mut g.clone(), &t, "a").is_ok_and(|n| n == Next::Tokens));
        assert!(run(&mut g.clone(), &t, "yep").is_err());
        let schema = serde_json::json!({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"], "additionalProperties": false, "x-guidance": {"whitespace_flexible": false}});
        let g = c.compile(&Grammar::JsonSchema(schema)).unwrap();
        assert_eq!(run(&mut g.clone(), &t, r#"{"n":42}"#).unwrap(), Next::End(2));
        assert!(run(&mut g.clone(), &t, r#"{"m":1}"#).is_err());
        let g = c.compile(&Grammar::Lark("start: \"x\" \"y\"+".into())).unwrap();
        assert_eq!(run(&mut g.clone(), &t, "xyy").unwrap(), Next::Tokens);
    }

    #[test]
    fn object_schemas_allow_no_unnamed_properties_unless_they_say_so() {
        let mut s = serde_json::json!({"type": "object", "properties": {
            "properties": {"type": "object", "properties": {"a": {"type": "integer"}}},
            "open": {"type": "object", "additionalProperties": true},
            "list": {"type": "array", "items": {"properties": {"x": {"const": {"type": "object"}}}}},
            "either": {"anyOf": [{"type": "object"}, {"type": "string"}]}},
            "$defs": {"d": {"type": ["object", "null"]}}});
        close_objects(&mut s);
        assert_eq!(s["additionalProperties"], false);
        assert_eq!(s["properties"]["properties"]["additionalProperties"], false, "a property named properties is a schema");
        assert!(s["properties"].get("additionalProperties").is_none(), "the map of properties is no schema");
        assert_eq!(s["properties"]["open"]["additionalProperties"], true);
        assert_eq!(s["properties"]["list"]["items"]["additionalProperties"], false);
        assert_eq!(s["properties"]["list"]["items"]["properties"]["x"]["const"], serde_json::json!({"type": "object"}), "values are not schemas");
        assert_eq!(s["properties"]["either"]["anyOf"][0]["additionalProperties"], false);
        assert!(s["properties"]["either"]["anyOf"][1].get("additionalProperties").is_none());
        assert_eq!(s["$defs"]["d"]["additionalProperties"], false);
        // Through a grammar: an unnamed key is refused; with json_object any object is taken.
        let (c, t) = compiler();
        let g = c.compile(&Grammar::JsonSchema(serde_json::json!({"type": "object", "properties": {"a": {"type": "integer"}}, "x-guidance": {"whitespace_flexible": false}}))).unwrap();
        assert_eq!(run(&mut g.clone(), &t, r#"{"a":1}"#).unwrap(), Next::End(2));
        assert!(run(&mut g.clone(), &t, r#"{"b":1}"#).is_err());
        let g = c.compile(&Grammar::JsonObject).unwrap();
        assert!(run(&mut g.clone(), &t, r#"{"b": [1, {"c": null}]}"#).is_ok());
    }

    #[test]
    fn bad_grammars_are_errors() {
        let (c, _) = compiler();
        assert!(c.compile(&Grammar::Regex("(".into())).is_err());
        assert!(c.compile(&Grammar::Choice(vec![])).is_err());
        assert!(c.compile(&Grammar::Lark("start: undefined_rule".into())).is_err());
        assert!(c.compile(&Grammar::JsonSchema(serde_json::json!({"type": "no such type"}))).is_err());
        let none = Compiler::new(byte_level_tokenizer(300).unwrap(), 300, &[]);
        assert!(none.compile(&Grammar::Regex("a".into())).unwrap_err().contains("end-of-sequence"));
    }
}
