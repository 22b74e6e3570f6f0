//! Tool calls in free text (`tool_choice: "auto"` with `serve --tool-call-parser NAME`): the
//! model writes its calls in its own syntax among its text, and they are taken out of it. The
//! syntaxes are vLLM's parsers of the same names:
//! - `hermes` (Qwen 2.5 / 3, Hermes, SmolLM2): `<tool_call>{"name": ..., "arguments": {...}}
//!   </tool_call>`, one call per block, or (SmolLM2) a JSON list of calls in one block;
//! - `llama3_json` (Llama 3.1 / 3.2 / 3.3): a reply that is nothing but calls, `{"name": ...,
//!   "parameters": {...}}`, several joined by `;`, after `<|python_tag|>` or not;
//! - `mistral` (Mistral 7B v0.3, Nemo, Small): `[TOOL_CALLS]` and a JSON list of `{"name",
//!   "arguments"}` to the end of the reply.
//!
//! `<|python_tag|>` and `[TOOL_CALLS]` are special tokens in those models' tokenizers, and the
//! server's text leaves special tokens out, so a reply that *starts* with the calls' JSON (`{`
//! for llama3_json, `[` for mistral) is read as calls too, as vLLM's llama3_json parser does.
//!
//! Streamed text goes through [`Scanner`]: text outside the calls comes out at once, except a
//! tail that may be the start of a marker; a block comes out as its calls once it is closed (for
//! the syntaxes whose calls run to the end, once the reply ends). A block that holds no calls
//! comes out as the text it was.
use serde_json::Value;

/// Which syntax `--tool-call-parser` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolParser {
    Hermes,
    Llama3Json,
    Mistral,
}

/// The names `--tool-call-parser` takes, with the syntax each reads.
const OFFERED: &str = "hermes (<tool_call>{\"name\", \"arguments\"}</tool_call>), llama3_json ({\"name\", \"parameters\"}; ...) and mistral ([TOOL_CALLS][{\"name\", \"arguments\"}])";

impl std::str::FromStr for ToolParser {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "hermes" => Ok(ToolParser::Hermes),
            "llama3_json" => Ok(ToolParser::Llama3Json),
            "mistral" => Ok(ToolParser::Mistral),
            _ => Err(format!("unknown tool-call parser {s:?}; the parsers offered are {OFFERED}")),
        }
    }
}

impl ToolParser {
    /// The name `--tool-call-parser` takes.
    pub fn name(self) -> &'static str {
        match self {
            ToolParser::Hermes => "hermes",
            ToolParser::Llama3Json => "llama3_json",
            ToolParser::Mistral => "mistral",
        }
    }

    /// The syntax a chat template teaches its model, where it says (as llama-server reads a
    /// model's tool-call format off its template): Mistral's `[TOOL_CALLS]`, Hermes' (Qwen's)
    /// `<tool_call>`, or a Llama 3 template (its `<|start_header_id|>` headers) that reads
    /// `tools`. `None` for a template without tools, such as SmolLM2's or ChatML.
    pub fn from_template(template: &str) -> Option<Self> {
        if template.contains("[TOOL_CALLS]") {
            Some(ToolParser::Mistral)
        } else if template.contains("<tool_call>") {
            Some(ToolParser::Hermes)
        } else if template.contains("<|start_header_id|>") && template.contains("tools") {
            Some(ToolParser::Llama3Json)
        } else {
            None
        }
    }

    /// The text that opens a block of calls.
    fn open(self) -> &'static str {
        match self {
            ToolParser::Hermes => "<tool_call>",
            ToolParser::Llama3Json => "<|python_tag|>",
            ToolParser::Mistral => "[TOOL_CALLS]",
        }
    }

    /// The text that closes a block, or `None` where the calls run to the end of the reply.
    fn close(self) -> Option<&'static str> {
        match self {
            ToolParser::Hermes => Some("</tool_call>"),
            ToolParser::Llama3Json | ToolParser::Mistral => None,
        }
    }

    /// The character a reply that is nothing but calls starts with, where the opening marker
    /// is a special token the text leaves out.
    fn bare_start(self) -> Option<char> {
        match self {
            ToolParser::Hermes => None,
            ToolParser::Llama3Json => Some('{'),
            ToolParser::Mistral => Some('['),
        }
    }

    /// How a call is written, for the system message of a template that does not tell the
    /// model itself.
    pub fn how_to_call(self) -> &'static str {
        match self {
            ToolParser::Hermes => "To call a function, write <tool_call>{\"name\": <function name>, \"arguments\": <arguments as a JSON object>}</tool_call>.",
            ToolParser::Llama3Json => "To call a function, reply with only {\"name\": <function name>, \"parameters\": <arguments as a JSON object>}.",
            ToolParser::Mistral => "To call functions, reply with only [TOOL_CALLS][{\"name\": <function name>, \"arguments\": <arguments as a JSON object>}].",
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

/// The calls a block's body holds: JSON calls (`{"name", "arguments"|"parameters"}` objects or
/// lists of them) one after another, apart by whitespace or `;`; `None` when it holds anything
/// else or nothing (then the block stays text).
fn calls_in(body: &str) -> Option<Vec<Piece>> {
    let mut calls = Vec::new();
    let mut rest = body.trim_start_matches(|c: char| c.is_whitespace() || c == ';');
    while !rest.is_empty() {
        let mut values = serde_json::Deserializer::from_str(rest).into_iter::<Value>();
        let v = values.next()?.ok()?;
        rest = rest[values.byte_offset()..].trim_start_matches(|c: char| c.is_whitespace() || c == ';');
        match v {
            Value::Array(list) => calls.extend(list.iter().map(call_in).collect::<Option<Vec<_>>>()?),
            one => calls.push(call_in(&one)?),
        }
    }
    (!calls.is_empty()).then_some(calls)
}

/// One `{"name", "arguments"|"parameters"}` object as a call.
fn call_in(c: &Value) -> Option<Piece> {
    let name = c.get("name")?.as_str()?.to_string();
    let arguments = match c.get("arguments").or_else(|| c.get("parameters")) {
        None | Some(Value::Null) => "{}".to_string(),
        // Some models write the arguments as JSON text already.
        Some(Value::String(s)) => s.clone(),
        Some(a @ Value::Object(_)) => a.to_string(),
        Some(_) => return None,
    };
    Some(Piece::Call { name, arguments })
}

/// How much of the end of `s` may be the start of `pat` (so must wait for more text).
fn partial_suffix(s: &str, pat: &str) -> usize {
    (1..pat.len().min(s.len() + 1)).rev().find(|&n| s.is_char_boundary(s.len() - n) && pat.starts_with(&s[s.len() - n..])).unwrap_or(0)
}

/// Where a [`Scanner`] is in the reply.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
enum Place {
    /// Nothing but whitespace yet (the reply may be bare calls).
    #[default]
    Start,
    /// In text.
    Text,
    /// In a block, after its opening marker (or, bare, from the reply's start).
    Block { bare: bool },
}

/// Splits streamed text into [`Piece`]s as soon as each is certain.
#[derive(Debug)]
pub struct Scanner {
    parser: ToolParser,
    /// Text not yet given out: leading whitespace, a possible start of the opening marker, or
    /// an open block's body.
    held: String,
    place: Place,
}

impl Scanner {
    pub fn new(parser: ToolParser) -> Self {
        Scanner { parser, held: String::new(), place: Place::Start }
    }

    /// The pieces that `text`, after what came before, makes certain.
    pub fn push(&mut self, text: &str) -> Vec<Piece> {
        self.held += text;
        let (open, close) = (self.parser.open(), self.parser.close());
        let mut out = Vec::new();
        loop {
            match self.place {
                Place::Start => {
                    let Some(first) = self.held.trim_start().chars().next() else { break };
                    self.place = if Some(first) == self.parser.bare_start() { Place::Block { bare: true } } else { Place::Text };
                }
                Place::Block { bare } => {
                    let Some(close) = close else { break };
                    let Some(end) = self.held.find(close) else { break };
                    let body: String = self.held.drain(..end + close.len()).collect();
                    self.place = Place::Text;
                    out.extend(Self::block(&body[..end], || format!("{}{}", if bare { "" } else { open }, body)));
                }
                Place::Text => {
                    if let Some(start) = self.held.find(open) {
                        if start > 0 {
                            out.push(Piece::Text(self.held[..start].to_string()));
                        }
                        self.held.drain(..start + open.len());
                        self.place = Place::Block { bare: false };
                    } else {
                        let keep = partial_suffix(&self.held, open);
                        let give = self.held.len() - keep;
                        if give > 0 {
                            out.push(Piece::Text(self.held.drain(..give).collect()));
                        }
                        break;
                    }
                }
            }
        }
        out
    }

    /// A block's calls, or (none in it) its text as written.
    fn block(body: &str, written: impl FnOnce() -> String) -> Vec<Piece> {
        calls_in(body).unwrap_or_else(|| vec![Piece::Text(written())])
    }

    /// The end of the text: a block that runs to the end gives its calls; anything else held
    /// comes out as text (a block never closed stays text).
    pub fn finish(&mut self) -> Vec<Piece> {
        let rest = std::mem::take(&mut self.held);
        let open = self.parser.open();
        let out = match std::mem::take(&mut self.place) {
            Place::Block { bare: false } if self.parser.close().is_none() => Self::block(&rest, || format!("{open}{rest}")),
            // A bare reply may still begin with the marker, where the tokenizer has it as text.
            Place::Block { bare: true } => Self::block(rest.trim_start().strip_prefix(open).unwrap_or(&rest), || rest.clone()),
            Place::Block { bare: false } => vec![Piece::Text(format!("{open}{rest}"))],
            _ => vec![Piece::Text(rest)],
        };
        out.into_iter().filter(|p| *p != Piece::Text(String::new())).collect()
    }
}

/// A whole reply's text and calls: the text outside the calls (trimmed; `None` if nothing is
/// left) and the calls (name, arguments).
pub fn parse(parser: ToolParser, text: &str) -> (Option<String>, Vec<(String, String)>) {
    let mut s = Scanner::new(parser);
    let mut pieces = s.push(text);
    pieces.extend(s.finish());
    join(pieces)
}

/// A reply's pieces as [`parse`] gives them: the texts joined and trimmed (`None` if nothing
/// is left), the calls in order.
pub fn join(pieces: Vec<Piece>) -> (Option<String>, Vec<(String, String)>) {
    let mut content = String::new();
    let mut calls = Vec::new();
    for p in pieces {
        match p {
            Piece::Text(t) => content += &t,
            Piece::Call { name, arguments } => calls.push((name, arguments)),
        }
    }
    let content = content.trim();
    ((!content.is_empty()).then(|| content.to_string()), calls)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ToolParser::{Hermes, Llama3Json, Mistral};

    fn call(name: &str, arguments: &str) -> (String, String) {
        (name.into(), arguments.into())
    }

    #[test]
    fn hermes_replies() {
        let (text, calls) = parse(Hermes, "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>");
        assert_eq!(text.as_deref(), Some("Let me check."));
        assert_eq!(calls, vec![call("get_weather", r#"{"city":"Paris"}"#)]);
        let (text, calls) = parse(Hermes, r#"<tool_call>[{"name": "a", "arguments": {}}, {"name": "b", "parameters": {"x": 1}}]</tool_call>"#);
        assert_eq!((text, calls), (None, vec![call("a", "{}"), call("b", r#"{"x":1}"#)]), "SmolLM2's list");
        let (_, calls) = parse(Hermes, r#"<tool_call>{"name": "a", "arguments": "{\"k\": 2}"}</tool_call><tool_call>{"name": "c"}</tool_call>"#);
        assert_eq!(calls, vec![call("a", r#"{"k": 2}"#), call("c", "{}")]);
        // Not calls: the text stays as it was.
        for text in ["no calls here", "<tool_call>not json</tool_call>", "<tool_call>{\"name\": 3}</tool_call>", "<tool_call>{\"name\": \"a\"", "a < b <tool", "<tool_call>{\"name\": \"a\", \"arguments\": [1]}</tool_call>", "{\"name\": \"a\"}"] {
            assert_eq!(parse(Hermes, text), (Some(text.trim().to_string()), vec![]), "{text}");
        }
    }

    #[test]
    fn llama3_json_replies() {
        let (text, calls) = parse(Llama3Json, " {\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}");
        assert_eq!((text, calls), (None, vec![call("get_weather", r#"{"city":"Paris"}"#)]));
        let (text, calls) = parse(Llama3Json, r#"{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {}}"#);
        assert_eq!((text, calls), (None, vec![call("a", r#"{"x":1}"#), call("b", "{}")]), "several, joined by ;");
        let (text, calls) = parse(Llama3Json, r#"Checking.<|python_tag|>{"name": "a", "parameters": {}}"#);
        assert_eq!((text.as_deref(), calls), (Some("Checking."), vec![call("a", "{}")]), "after the tag, where it is text");
        for text in ["It is sunny.", "{not json}", r#"{"answer": 42}"#, r#"{"name": "a"} and more"#, "Use {\"name\": \"a\"} like this"] {
            assert_eq!(parse(Llama3Json, text), (Some(text.to_string()), vec![]), "{text}");
        }
    }

    #[test]
    fn mistral_replies() {
        let (text, calls) = parse(Mistral, r#"[TOOL_CALLS] [{"name": "a", "arguments": {"x": "y"}}, {"name": "b", "arguments": {}}]"#);
        assert_eq!((text, calls), (None, vec![call("a", r#"{"x":"y"}"#), call("b", "{}")]));
        let (text, calls) = parse(Mistral, r#"Let me see. [TOOL_CALLS][{"name": "a", "arguments": {}}]"#);
        assert_eq!((text.as_deref(), calls), (Some("Let me see."), vec![call("a", "{}")]));
        let (text, calls) = parse(Mistral, r#"[{"name": "a", "arguments": {}}]"#);
        assert_eq!((text, calls), (None, vec![call("a", "{}")]), "the marker left out as a special token");
        for text in ["[1] first, [2] second", "[TOOL_CALLS] none", "Plain."] {
            assert_eq!(parse(Mistral, text), (Some(text.to_string()), vec![]), "{text}");
        }
    }

    /// Streamed in every split of the same reply, the pieces come out the same (texts joined).
    #[test]
    fn any_split_gives_the_same_pieces() {
        let replies = [
            (Hermes, "Sure, <b>bold</b> <tool_call>{\"name\": \"f\", \"arguments\": {\"s\": \"é<\"}}</tool_call> done <tool"),
            (Llama3Json, "  {\"name\": \"f\", \"parameters\": {\"s\": \"é{\"}}; {\"name\": \"g\"}"),
            (Llama3Json, "Fine <|py> : <|python_tag|>{\"name\": \"f\", \"parameters\": {}}"),
            (Mistral, "Right [x]. [TOOL_CALLS][{\"name\": \"f\", \"arguments\": {\"s\": \"é[\"}}]"),
            (Mistral, "[{\"name\": \"f\", \"arguments\": {}}]"),
        ];
        for (parser, reply) in replies {
            let (whole_text, whole_calls) = parse(parser, reply);
            assert!(!whole_calls.is_empty(), "{reply}");
            let chars: Vec<char> = reply.chars().collect();
            for step in 1..=7 {
                let mut s = Scanner::new(parser);
                let mut pieces = Vec::new();
                for chunk in chars.chunks(step) {
                    pieces.extend(s.push(&chunk.iter().collect::<String>()));
                }
                pieces.extend(s.finish());
                assert_eq!(join(pieces), (whole_text.clone(), whole_calls.clone()), "{reply:?} in chunks of {step}");
            }
        }
        let (text, calls) = parse(Hermes, replies[0].1);
        assert_eq!(calls, vec![call("f", r#"{"s":"é<"}"#)]);
        assert_eq!(text.as_deref(), Some("Sure, <b>bold</b>  done <tool"));
    }

    #[test]
    fn text_that_may_open_a_block_waits() {
        let mut s = Scanner::new(Hermes);
        assert_eq!(s.push("Hello <to"), vec![Piece::Text("Hello ".into())]);
        assert_eq!(s.push("ol_c"), vec![]);
        assert_eq!(s.push("ar!"), vec![Piece::Text("<tool_car!".into())]);
        assert_eq!(s.finish(), vec![]);
        // A reply that may be bare calls waits for its first character, then for its end.
        let mut s = Scanner::new(Llama3Json);
        assert_eq!(s.push(" \n"), vec![]);
        assert_eq!(s.push("Hi"), vec![Piece::Text(" \nHi".into())]);
        let mut s = Scanner::new(Llama3Json);
        assert_eq!(s.push("{\"name\": \"f\"}"), vec![]);
        assert_eq!(s.finish(), vec![Piece::Call { name: "f".into(), arguments: "{}".into() }]);
        for (name, parser) in [("hermes", Hermes), ("llama3_json", Llama3Json), ("mistral", Mistral)] {
            assert_eq!(name.parse::<ToolParser>(), Ok(parser));
            assert_eq!(parser.name(), name);
        }
        let err = "pythonic".parse::<ToolParser>().unwrap_err();
        assert!(err.contains("hermes") && err.contains("llama3_json") && err.contains("mistral"), "{err}");
    }

    /// Templates name their syntax; templates without tools name none.
    #[test]
    fn the_syntax_is_read_off_the_template() {
        let qwen = "{%- if tools %}{{- '<|im_start|>system\\n' }}# Tools\n<tools>{% for tool in tools %}{{ tool | tojson }}{% endfor %}</tools>\nFor each function call, return a json object within <tool_call></tool_call> XML tags{% endif %}";
        let llama = "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}{%- if tools is not none %}{{- 'Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and its value}.' }}{%- endif %}";
        let mistral = "{%- if tools is not none and loop.last %}[AVAILABLE_TOOLS] {{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}{%- for tool_call in message.tool_calls %}[TOOL_CALLS] {{ tool_call | tojson }}{% endfor %}";
        assert_eq!(ToolParser::from_template(qwen), Some(Hermes));
        assert_eq!(ToolParser::from_template(llama), Some(Llama3Json));
        assert_eq!(ToolParser::from_template(mistral), Some(Mistral));
        assert_eq!(ToolParser::from_template(crate::engine::chat_template::CHATML), None);
        assert_eq!(ToolParser::from_template("{{ '<|start_header_id|>user<|end_header_id|>' + messages[0].content }}"), None, "Llama 3 without tools");
    }
}
