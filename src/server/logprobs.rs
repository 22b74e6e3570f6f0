//! The `logprobs` object of a choice, from the engine's per-token log-probabilities
//! ([`crate::engine::logprobs`]): the chat API's `{"content": [{token, logprob, bytes,
//! top_logprobs}], "refusal": null}`, or the legacy completion API's `{tokens, token_logprobs,
//! top_logprobs, text_offset}` (where each token's alternatives are a map from token text to
//! log-probability that also holds the generated token, as vLLM gives them). A streamed reply
//! carries in each chunk the tokens its text completes.
use crate::assets::tokenizer::token_bytes;
use crate::engine::logprobs::TokenLogprob;
use serde_json::{json, Map, Value};
use tokenizers::Tokenizer;

/// JSON has no infinities, and OpenAI reports the least likely tokens as -9999.
fn finite(lp: f32) -> f64 {
    if lp.is_nan() {
        -9999.0
    } else {
        f64::from(lp).clamp(-9999.0, 0.0)
    }
}

/// A token's text (lossy where it is part of a character) and bytes.
fn text_and_bytes(tok: &Tokenizer, id: u32) -> (String, Vec<u8>) {
    let b = token_bytes(tok, id);
    (String::from_utf8_lossy(&b).into_owned(), b)
}

/// The chat API's `logprobs` of `tokens`.
pub fn chat(tok: &Tokenizer, tokens: &[TokenLogprob]) -> Value {
    let entry = |id: u32, lp: f32| {
        let (text, bytes) = text_and_bytes(tok, id);
        json!({"token": text, "logprob": finite(lp), "bytes": bytes})
    };
    let content: Vec<Value> = tokens
        .iter()
        .map(|t| {
            let mut e = entry(t.token, t.logprob);
            e["top_logprobs"] = t.top.iter().map(|&(id, lp)| entry(id, lp)).collect();
            e
        })
        .collect();
    json!({"content": content, "refusal": null})
}

/// Where each token of a legacy completion starts in its text, in characters: a token that
/// completes a character another began starts where that character does.
#[derive(Debug, Default)]
pub struct TextOffsets {
    /// Bytes of a character not yet complete.
    pending: Vec<u8>,
    /// Characters before `pending`.
    chars: usize,
}

impl TextOffsets {
    /// The offset of a token of `bytes`, which then follow the text counted so far.
    fn next(&mut self, bytes: &[u8]) -> usize {
        // A token that does not go on with a character begun before it leaves that one broken:
        // a replacement character, as a lossy decoding shows it.
        let continues = bytes.first().is_some_and(|b| b & 0xC0 == 0x80);
        if !continues && !self.pending.is_empty() {
            self.chars += String::from_utf8_lossy(&self.pending).chars().count();
            self.pending.clear();
        }
        let at = self.chars;
        self.pending.extend_from_slice(bytes);
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    self.chars += s.chars().count();
                    self.pending.clear();
                    break;
                }
                Err(e) => {
                    let good = e.valid_up_to();
                    self.chars += std::str::from_utf8(&self.pending[..good]).map_or(0, |s| s.chars().count());
                    match e.error_len() {
                        // Bytes that no character can start with: one replacement character.
                        Some(n) => {
                            self.chars += 1;
                            self.pending.drain(..good + n);
                        }
                        None => {
                            self.pending.drain(..good);
                            break;
                        }
                    }
                }
            }
        }
        at
    }
}

/// The legacy completion API's `logprobs` of `tokens`, the next tokens of a reply whose earlier
/// ones `offsets` has counted.
pub fn completion(tok: &Tokenizer, tokens: &[TokenLogprob], offsets: &mut TextOffsets) -> Value {
    let (mut texts, mut lps, mut tops, mut at) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for t in tokens {
        let (text, bytes) = text_and_bytes(tok, t.token);
        at.push(offsets.next(&bytes));
        // Alternatives whose texts are the same (parts of characters, say) share one key; the
        // generated token's own value is the one kept under its text.
        let mut top = Map::new();
        for &(id, lp) in &t.top {
            top.insert(text_and_bytes(tok, id).0, json!(finite(lp)));
        }
        top.insert(text.clone(), json!(finite(t.logprob)));
        texts.push(text);
        lps.push(finite(t.logprob));
        tops.push(Value::Object(top));
    }
    json!({"tokens": texts, "token_logprobs": lps, "top_logprobs": tops, "text_offset": at})
}

/// The legacy completion API's `logprobs` of an echoed prompt, `prompt`'s tokens with the scores
/// of all but the first (`scored`, which has none: its log-probability and alternatives are
/// null), to be followed by those of the generated tokens ([`append`]).
pub fn echoed_prompt(tok: &Tokenizer, prompt: &[u32], scored: &[TokenLogprob], offsets: &mut TextOffsets) -> Value {
    let Some((&first, _)) = prompt.split_first() else { return completion(tok, &[], offsets) };
    let (text, bytes) = text_and_bytes(tok, first);
    let at = offsets.next(&bytes);
    let rest = completion(tok, scored, offsets);
    let lead = json!({"tokens": [text], "token_logprobs": [null], "top_logprobs": [null], "text_offset": [at]});
    append(lead, &rest)
}

/// `a` with the legacy `logprobs` lists of `b` appended to its own.
pub fn append(mut a: Value, b: &Value) -> Value {
    for key in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
        if let (Some(x), Some(y)) = (a[key].as_array_mut(), b[key].as_array()) {
            x.extend(y.iter().cloned());
        }
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_echoed_prompt_leads_with_a_null_then_the_scores() {
        let t = crate::assets::tokenizer::byte_level_tokenizer(1000).unwrap();
        let mut offsets = TextOffsets::default();
        let p = echoed_prompt(&t, &[500, 501], &[TokenLogprob { token: 501, logprob: -2.0, top: vec![(502, -1.0)] }], &mut offsets);
        let gen = completion(&t, &[TokenLogprob { token: 503, logprob: -0.5, top: vec![] }], &mut offsets);
        let all = append(p, &gen);
        assert_eq!(all["tokens"], json!([" w500", " w501", " w503"]));
        assert_eq!(all["token_logprobs"], json!([null, -2.0, -0.5]));
        assert_eq!(all["top_logprobs"], json!([null, {" w502": -1.0, " w501": -2.0}, {" w503": -0.5}]));
        assert_eq!(all["text_offset"], json!([0, 5, 10]));
    }

    #[test]
    fn text_offsets_count_characters_and_split_ones_start_where_they_begin() {
        let mut o = TextOffsets::default();
        let snow = "☃".as_bytes();
        let at: Vec<usize> = [b"ab".as_slice(), &snow[..1], &snow[1..], b"c", &[0xFF], b"d", &[0xC3], b"e", b"f"].iter().map(|b| o.next(b)).collect();
        assert_eq!(at, vec![0, 2, 2, 3, 4, 5, 6, 7, 8]);
    }

    #[test]
    fn both_shapes_hold_every_token_with_finite_numbers() {
        let t = crate::assets::tokenizer::byte_level_tokenizer(1000).unwrap();
        let toks = [TokenLogprob { token: 500, logprob: -0.5, top: vec![(501, -0.25), (500, -0.5)] }, TokenLogprob { token: 502, logprob: f32::NEG_INFINITY, top: vec![] }];
        let c = chat(&t, &toks);
        assert_eq!(c["content"][0]["token"], " w500");
        assert_eq!(c["content"][0]["bytes"], json!(b" w500".to_vec()));
        assert_eq!(c["content"][0]["top_logprobs"][0]["token"], " w501");
        assert_eq!(c["content"][1]["logprob"], -9999.0);
        assert_eq!(c["content"][1]["top_logprobs"], json!([]));
        let l = completion(&t, &toks, &mut TextOffsets::default());
        assert_eq!(l["tokens"], json!([" w500", " w502"]));
        assert_eq!(l["token_logprobs"], json!([-0.5, -9999.0]));
        assert_eq!(l["top_logprobs"][0], json!({" w501": -0.25, " w500": -0.5}));
        assert_eq!(l["top_logprobs"][1], json!({" w502": -9999.0}), "the generated token is always among them");
        assert_eq!(l["text_offset"], json!([0, 5]));
    }
}
