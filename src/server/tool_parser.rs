//! Tool calls in free text (`tool_choice: "auto"` with `serve --tool-call-parser hermes`): the
//! model writes its calls in its own syntax among its text, and they are taken out of it. The
//! Hermes syntax, which Qwen 2.5 / 3, Hermes and SmolLM2's instruct models write (vLLM's
//! `hermes` parser reads the same): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`,
//! one call per block, or (SmolLM2) a JSON list of calls in one block.
//!
//! Streamed text goes through [`Scanner`]: text outside the blocks comes out at once, except a
//! tail that may be the start of `<tool_call>`; a block comes out as its calls once it is closed.
use serde_json::Value;

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

/// Which syntax `--tool-call-parser` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolParser {
    Hermes,
}

impl std::str::FromStr for ToolParser {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "hermes" => Ok(ToolParser::Hermes),
            _ => Err(format!("unknown tool-call parser {s:?}; the parser offered is hermes (<tool_call>{{\"name\", \"arguments\"}}</tool_call>)")),
        }
    }
}

/// A piece of a reply's text: text as it is, or a call taken out of it (`{"name", "arguments"}`
/// with the arguments as JSON text, as OpenAI's `function` object has them).
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    Text(String),
    Call { name: String, arguments: String },
}

/// The calls a block's body holds (one `{"name", "arguments"|"parameters"}` object or a list of
/// them), or `None` when it holds none (then the block stays text).
fn calls_in(body: &str) -> Option<Vec<Piece>> {
    let v: Value = serde_json::from_str(body.trim()).ok()?;
    let list = match v {
        Value::Array(a) => a,
        one @ Value::Object(_) => vec![one],
        _ => return None,
    };
    list.iter()
        .map(|c| {
            let name = c.get("name")?.as_str()?.to_string();
            let arguments = match c.get("arguments").or_else(|| c.get("parameters")) {
                None | Some(Value::Null) => "{}".to_string(),
                // Some models write the arguments as JSON text already.
                Some(Value::String(s)) => s.clone(),
                Some(a) => a.to_string(),
            };
            Some(Piece::Call { name, arguments })
        })
        .collect::<Option<Vec<_>>>()
        .filter(|c| !c.is_empty())
}

/// How much of the end of `s` may be the start of `pat` (so must wait for more text).
fn partial_suffix(s: &str, pat: &str) -> usize {
    (1..pat.len().min(s.len() + 1)).rev().find(|&n| s.is_char_boundary(s.len() - n) && pat.starts_with(&s[s.len() - n..])).unwrap_or(0)
}

/// Splits streamed text into [`Piece`]s as soon as each is certain.
#[derive(Debug, Default)]
pub struct Scanner {
    /// Text not yet given out: a possible start of `<tool_call>`, or an open block.
    held: String,
    in_block: bool,
}

impl Scanner {
    /// The pieces that `text`, after what came before, makes certain.
    pub fn push(&mut self, text: &str) -> Vec<Piece> {
        self.held += text;
        let mut out = Vec::new();
        loop {
            if self.in_block {
                let Some(end) = self.held.find(CLOSE) else { break };
                let body = self.held[..end].to_string();
                self.held.drain(..end + CLOSE.len());
                self.in_block = false;
                match calls_in(&body) {
                    Some(calls) => out.extend(calls),
                    None => out.push(Piece::Text(format!("{OPEN}{body}{CLOSE}"))),
                }
            } else if let Some(start) = self.held.find(OPEN) {
                if start > 0 {
                    out.push(Piece::Text(self.held[..start].to_string()));
                }
                self.held.drain(..start + OPEN.len());
                self.in_block = true;
            } else {
                let keep = partial_suffix(&self.held, OPEN);
                let give = self.held.len() - keep;
                if give > 0 {
                    out.push(Piece::Text(self.held[..give].to_string()));
                    self.held.drain(..give);
                }
                break;
            }
        }
        out
    }

    /// The end of the text: what is held comes out as text (a block never closed stays text).
    pub fn finish(&mut self) -> Vec<Piece> {
        let rest = std::mem::take(&mut self.held);
        let rest = if std::mem::take(&mut self.in_block) { format!("{OPEN}{rest}") } else { rest };
        if rest.is_empty() {
            Vec::new()
        } else {
            vec![Piece::Text(rest)]
        }
    }
}

/// A whole reply's text and calls: the text outside the blocks (trimmed; `None` if nothing is
/// left) and the calls.
pub fn parse(text: &str) -> (Option<String>, Vec<Piece>) {
    let mut s = Scanner::default();
    let mut pieces = s.push(text);
    pieces.extend(s.finish());
    let mut content = String::new();
    let mut calls = Vec::new();
    for p in pieces {
        match p {
            Piece::Text(t) => content += &t,
            call => calls.push(call),
        }
    }
    let content = content.trim();
    ((!content.is_empty()).then(|| content.to_string()), calls)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(name: &str, arguments: &str) -> Piece {
        Piece::Call { name: name.into(), arguments: arguments.into() }
    }

    #[test]
    fn whole_replies() {
        let (text, calls) = parse("Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>");
        assert_eq!(text.as_deref(), Some("Let me check."));
        assert_eq!(calls, vec![call("get_weather", r#"{"city":"Paris"}"#)]);
        let (text, calls) = parse(r#"<tool_call>[{"name": "a", "arguments": {}}, {"name": "b", "parameters": {"x": 1}}]</tool_call>"#);
        assert_eq!((text, calls), (None, vec![call("a", "{}"), call("b", r#"{"x":1}"#)]), "SmolLM2's list");
        let (_, calls) = parse(r#"<tool_call>{"name": "a", "arguments": "{\"k\": 2}"}</tool_call><tool_call>{"name": "c"}</tool_call>"#);
        assert_eq!(calls, vec![call("a", r#"{"k": 2}"#), call("c", "{}")]);
        // Not calls: the text stays as it was.
        for text in ["no calls here", "<tool_call>not json</tool_call>", "<tool_call>{\"name\": 3}</tool_call>", "<tool_call>{\"name\": \"a\"", "a < b <tool"] {
            assert_eq!(parse(text), (Some(text.trim().to_string()), vec![]), "{text}");
        }
    }

    /// Streamed in every split of the same reply, the pieces come out the same (texts joined).
    #[test]
    fn any_split_gives_the_same_pieces() {
        let reply = "Sure, <b>bold</b> <tool_call>{\"name\": \"f\", \"arguments\": {\"s\": \"é<\"}}</tool_call> done <tool";
        let (whole_text, whole_calls) = parse(reply);
        let chars: Vec<char> = reply.chars().collect();
        for step in 1..=7 {
            let mut s = Scanner::default();
            let mut pieces = Vec::new();
            for chunk in chars.chunks(step) {
                pieces.extend(s.push(&chunk.iter().collect::<String>()));
            }
            pieces.extend(s.finish());
            let text: String = pieces.iter().filter_map(|p| if let Piece::Text(t) = p { Some(t.as_str()) } else { None }).collect();
            let calls: Vec<Piece> = pieces.into_iter().filter(|p| matches!(p, Piece::Call { .. })).collect();
            assert_eq!((Some(text.trim().to_string()), &calls), (whole_text.clone(), &whole_calls), "chunks of {step}");
        }
        assert_eq!(whole_calls, vec![call("f", r#"{"s":"é<"}"#)]);
        assert_eq!(whole_text.as_deref(), Some("Sure, <b>bold</b>  done <tool"));
    }

    #[test]
    fn text_that_may_open_a_block_waits() {
        let mut s = Scanner::default();
        assert_eq!(s.push("Hello <to"), vec![Piece::Text("Hello ".into())]);
        assert_eq!(s.push("ol_c"), vec![]);
        assert_eq!(s.push("ar!"), vec![Piece::Text("<tool_car!".into())]);
        assert_eq!(s.finish(), vec![]);
        assert_eq!("hermes".parse::<ToolParser>(), Ok(ToolParser::Hermes));
        assert!("mistral".parse::<ToolParser>().unwrap_err().contains("hermes"));
    }
}
