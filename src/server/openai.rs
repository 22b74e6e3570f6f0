//! The OpenAI API's request fields and error objects. Requests are read from raw JSON by hand,
//! not through serde derive, so that every refusal names the field (`param`) and says what was
//! wrong with it, as OpenAI's own errors do.
use crate::engine::chat_template::Message;
use crate::engine::constraint::Grammar;
use crate::engine::logprobs::TOP_LOGPROBS_MAX;
use crate::engine::sampling::SamplingParams;
use super::tool_parser::ToolParser;
use axum::http::StatusCode;
use serde_json::{json, Map, Value};

/// An error answered in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Seconds for a `Retry-After` header (429 / 503).
    pub retry_after: Option<u32>,
}

impl ApiError {
    pub fn bad_request(param: &str, message: impl Into<String>) -> Self {
        Self { status: StatusCode::BAD_REQUEST, message: message.into(), kind: "invalid_request_error", param: Some(param.into()), code: None, retry_after: None }
    }
    pub fn new(status: StatusCode, kind: &'static str, code: Option<&'static str>, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), kind, param: None, code, retry_after: None }
    }
    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }
    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl axum::response::IntoResponse for ApiError {
    fn into_response(self) -> axum::response::Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut().insert(axum::http::header::RETRY_AFTER, s.into());
        }
        r
    }
}

pub type ApiResult<T> = std::result::Result<T, ApiError>;

/// What both completion endpoints take besides the prompt.
#[derive(Debug, Clone)]
pub struct Common {
    pub model: Option<String>,
    pub stream: bool,
    pub include_usage: bool,
    pub params: SamplingParams,
    /// `max_tokens` / `max_completion_tokens`, if given.
    pub max_tokens: Option<usize>,
    pub stop: Vec<String>,
    /// vLLM's extension: generate `max_tokens` whatever end-of-sequence tokens come.
    pub ignore_eos: bool,
    /// vLLM's extensions: tokens that end the reply as end-of-sequence does, and the tokens
    /// generated before either may come.
    pub stop_token_ids: Vec<u32>,
    pub min_tokens: usize,
    /// Choices per prompt (`n`).
    pub n: usize,
    /// A legacy completion's `echo`: the prompt leads the reply's text (and its tokens, scored,
    /// the reply's `logprobs`).
    pub echo: bool,
}

/// Most choices a request may ask for per prompt (`n`), and most prompts one legacy completion
/// may hold: each is a sequence of its own in the engine.
pub const MAX_CHOICES: usize = 64;

/// A parsed request body: an object, or a 400 naming what is wrong.
pub fn parse_body(bytes: &[u8]) -> ApiResult<Map<String, Value>> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| ApiError::bad_request("body", format!("the body is not valid JSON: {e}")))?;
    match v {
        Value::Object(o) => Ok(o),
        other => Err(ApiError::bad_request("body", format!("the body must be a JSON object, not {}", kind_of(&other)))),
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Typed access to the fields of a request object; `null` counts as absent, as in OpenAI's API.
pub struct Fields<'a>(pub &'a Map<String, Value>);

impl Fields<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }
    fn wrong(key: &str, want: &str, v: &Value) -> ApiError {
        ApiError::bad_request(key, format!("{key} must be {want}, not {}", kind_of(v)))
    }
    pub fn bool(&self, key: &str) -> ApiResult<Option<bool>> {
        self.get(key).map(|v| v.as_bool().ok_or_else(|| Self::wrong(key, "a boolean", v))).transpose()
    }
    pub fn string(&self, key: &str) -> ApiResult<Option<String>> {
        self.get(key).map(|v| v.as_str().map(str::to_string).ok_or_else(|| Self::wrong(key, "a string", v))).transpose()
    }
    /// A number in `[lo, hi]`.
    pub fn number(&self, key: &str, lo: f64, hi: f64) -> ApiResult<Option<f64>> {
        let Some(v) = self.get(key) else { return Ok(None) };
        let x = v.as_f64().ok_or_else(|| Self::wrong(key, "a number", v))?;
        if !(lo..=hi).contains(&x) {
            return Err(ApiError::bad_request(key, format!("{key} is {x}; it must be between {lo} and {hi}")));
        }
        Ok(Some(x))
    }
    /// A whole number of at least `lo`.
    pub fn int(&self, key: &str, lo: i64) -> ApiResult<Option<i64>> {
        let Some(v) = self.get(key) else { return Ok(None) };
        let x = v.as_i64().ok_or_else(|| Self::wrong(key, "an integer", v))?;
        if x < lo {
            return Err(ApiError::bad_request(key, format!("{key} is {x}; it must be at least {lo}")));
        }
        Ok(Some(x))
    }
}

/// The fields both endpoints share, over `defaults` (the model's own sampling settings); token
/// ids are checked against `vocab`.
pub fn common(o: &Map<String, Value>, defaults: &SamplingParams, vocab: usize) -> ApiResult<Common> {
    let f = Fields(o);
    let mut p = defaults.clone();
    if let Some(t) = f.number("temperature", 0.0, 2.0)? {
        p.temperature = t;
    }
    if let Some(t) = f.number("top_p", 0.0, 1.0)? {
        if t == 0.0 {
            return Err(ApiError::bad_request("top_p", "top_p must be greater than 0"));
        }
        p.top_p = (t < 1.0).then_some(t);
    }
    if let Some(k) = f.int("top_k", -1)? {
        p.top_k = (k > 0).then_some(k as usize);
    }
    if let Some(m) = f.number("min_p", 0.0, 1.0)? {
        p.min_p = (m > 0.0).then_some(m);
    }
    if let Some(x) = f.number("frequency_penalty", -2.0, 2.0)? {
        p.frequency_penalty = x as f32;
    }
    if let Some(x) = f.number("presence_penalty", -2.0, 2.0)? {
        p.presence_penalty = x as f32;
    }
    if let Some(x) = f.number("repetition_penalty", 0.01, 10.0)? {
        p.repeat_penalty = x as f32;
    }
    if let Some(s) = f.int("seed", i64::MIN)? {
        p.seed = s as u64;
    }
    let n = match f.int("n", 1)? {
        Some(n) if n > MAX_CHOICES as i64 => return Err(ApiError::bad_request("n", format!("n is {n}; at most {MAX_CHOICES} choices per prompt are given"))),
        Some(n) => n as usize,
        None => 1,
    };
    // 0 is taken here and refused later unless the request scores its prompt (`echo`).
    let max_tokens = match f.int("max_completion_tokens", 0)? {
        Some(n) => Some(n as usize),
        None => f.int("max_tokens", 0)?.map(|n| n as usize),
    };
    let stop = match f.get("stop") {
        None => vec![],
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|s| s.as_str().map(str::to_string).ok_or_else(|| ApiError::bad_request("stop", format!("stop must hold strings, not {}", kind_of(s)))))
            .collect::<ApiResult<_>>()?,
        Some(v) => return Err(Fields::wrong("stop", "a string or an array of strings", v)),
    };
    if stop.len() > 16 {
        return Err(ApiError::bad_request("stop", format!("stop has {} strings; at most 16 are allowed", stop.len())));
    }
    let stream = f.bool("stream")?.unwrap_or(false);
    let include_usage = match f.get("stream_options") {
        None => false,
        Some(Value::Object(so)) => Fields(so).bool("include_usage").map_err(|mut e| {
            e.param = Some("stream_options.include_usage".into());
            e
        })?.unwrap_or(false),
        Some(v) => return Err(Fields::wrong("stream_options", "an object", v)),
    };
    let ignore_eos = f.bool("ignore_eos")?.unwrap_or(false);
    let echo = f.bool("echo")?.unwrap_or(false);
    let stop_token_ids = match f.get("stop_token_ids") {
        None => Vec::new(),
        Some(Value::Array(a)) => token_ids(a, "stop_token_ids", vocab)?,
        Some(v) => return Err(Fields::wrong("stop_token_ids", "an array of token ids", v)),
    };
    let min_tokens = f.int("min_tokens", 0)?.map_or(0, |n| n as usize);
    if max_tokens.is_some_and(|m| min_tokens > m) {
        return Err(ApiError::bad_request("min_tokens", format!("min_tokens ({min_tokens}) is more than max_tokens ({})", max_tokens.unwrap_or(0))));
    }
    Ok(Common { model: f.string("model")?, stream, include_usage, params: p, max_tokens, stop, ignore_eos, stop_token_ids, min_tokens, n, echo })
}

/// The alternatives per token whose log-probabilities the reply carries, or `None` if it carries
/// none: a chat completion's `logprobs: true` with `top_logprobs` (0 to 20, 0 if absent), a
/// legacy completion's `logprobs: N` (0 to 20).
pub fn logprobs(o: &Map<String, Value>, chat: bool) -> ApiResult<Option<usize>> {
    let f = Fields(o);
    let max = TOP_LOGPROBS_MAX as i64;
    let most = |key: &str, n: i64| {
        if n > max {
            return Err(ApiError::bad_request(key, format!("{key} is {n}; at most {max} alternatives per token are given")));
        }
        Ok(n as usize)
    };
    if !chat {
        return f.int("logprobs", 0)?.map(|n| most("logprobs", n)).transpose();
    }
    let on = f.bool("logprobs")?.unwrap_or(false);
    match f.int("top_logprobs", 0)? {
        Some(_) if !on => Err(ApiError::bad_request("top_logprobs", "top_logprobs needs logprobs set to true")),
        Some(n) => most("top_logprobs", n).map(Some),
        None => Ok(on.then_some(0)),
    }
}

/// `logit_bias`: token ids (as strings, the keys) with a bias from −100 to 100 each.
pub fn logit_bias(o: &Map<String, Value>, vocab: usize) -> ApiResult<Vec<(u32, f32)>> {
    let f = Fields(o);
    let m = match f.get("logit_bias") {
        None => return Ok(Vec::new()),
        Some(Value::Object(m)) => m,
        Some(v) => return Err(Fields::wrong("logit_bias", "an object of token ids and biases", v)),
    };
    if m.len() > 300 {
        return Err(ApiError::bad_request("logit_bias", format!("logit_bias has {} tokens; at most 300 are allowed", m.len())));
    }
    m.iter()
        .map(|(k, v)| {
            let id = k.trim().parse::<u32>().ok().filter(|&t| (t as usize) < vocab);
            let id = id.ok_or_else(|| ApiError::bad_request("logit_bias", format!("logit_bias: {k:?} is not a token id below the vocabulary's size ({vocab})")))?;
            match v.as_f64() {
                Some(b) if (-100.0..=100.0).contains(&b) => Ok((id, b as f32)),
                _ => Err(ApiError::bad_request("logit_bias", format!("logit_bias: the bias of token {k} is {v}; it must be a number from -100 to 100"))),
            }
        })
        .collect()
}

/// The grammar a reply is held to, with the field that asked for it: OpenAI's `response_format`
/// (`json_object`, or `json_schema` with its `schema`), vLLM's `guided_json`, `guided_regex`,
/// `guided_choice` and `guided_grammar` (Lark) or their newer form `structured_outputs: {json,
/// regex, choice, grammar}`, llama-server's `json_schema`. At most one of them.
pub fn grammar(o: &Map<String, Value>) -> ApiResult<Option<(String, Grammar)>> {
    let f = Fields(o);
    let mut found: Option<(String, Grammar)> = None;
    let mut put = |param: &str, g: Grammar| -> ApiResult<()> {
        if let Some((first, _)) = &found {
            return Err(ApiError::bad_request(param, format!("{param} and {first} both ask for a reply's format; give one")));
        }
        found = Some((param.to_string(), g));
        Ok(())
    };
    match f.get("response_format") {
        None => {}
        Some(Value::Object(m)) => match m.get("type").and_then(Value::as_str) {
            Some("text") => {}
            // llama-server's json_object takes a `schema` too.
            Some("json_object") => put("response_format", m.get("schema").filter(|s| s.is_object()).cloned().map_or(Grammar::JsonObject, Grammar::JsonSchema))?,
            Some("json_schema") => {
                let js = match m.get("json_schema") {
                    Some(Value::Object(js)) => js,
                    Some(v) => return Err(Fields::wrong("response_format.json_schema", "an object", v)),
                    None => return Err(ApiError::bad_request("response_format.json_schema", "response_format.json_schema is required with the type json_schema")),
                };
                // No schema: any JSON value.
                let schema = match js.get("schema") {
                    None | Some(Value::Null) => json!({}),
                    Some(v @ Value::Object(_)) => v.clone(),
                    Some(v) => return Err(Fields::wrong("response_format.json_schema.schema", "an object", v)),
                };
                put("response_format", Grammar::JsonSchema(schema))?
            }
            Some(t) => return Err(ApiError::bad_request("response_format.type", format!("response_format.type is {t:?}; the types are text, json_object and json_schema"))),
            None => return Err(ApiError::bad_request("response_format.type", "response_format.type is required (text, json_object or json_schema)")),
        },
        Some(v) => return Err(Fields::wrong("response_format", "an object", v)),
    }
    let schema = |param: &str, v: &Value| match v {
        Value::Object(_) => Ok(Grammar::JsonSchema(v.clone())),
        Value::String(t) => serde_json::from_str::<Value>(t).ok().filter(Value::is_object).map(Grammar::JsonSchema).ok_or_else(|| ApiError::bad_request(param, format!("{param} is a string that is not a JSON schema object"))),
        v => Err(Fields::wrong(param, "a JSON schema (an object)", v)),
    };
    let text = |param: &str, v: &Value, make: fn(String) -> Grammar| match v {
        Value::String(t) => Ok(make(t.clone())),
        v => Err(Fields::wrong(param, "a string", v)),
    };
    let choice = |param: &str, v: &Value| match v {
        Value::Array(a) => a
            .iter()
            .map(|c| c.as_str().map(str::to_string).ok_or_else(|| ApiError::bad_request(param, format!("{param} must hold strings, not {}", kind_of(c)))))
            .collect::<ApiResult<Vec<_>>>()
            .map(Grammar::Choice),
        v => Err(Fields::wrong(param, "an array of strings", v)),
    };
    let so = match f.get("structured_outputs") {
        None => None,
        Some(Value::Object(m)) => Some(m),
        Some(v) => return Err(Fields::wrong("structured_outputs", "an object", v)),
    };
    let nested = |key: &str| so.and_then(|m| m.get(key)).filter(|v| !v.is_null());
    #[derive(Clone, Copy)]
    enum As {
        Schema,
        Regex,
        Choice,
        Lark,
    }
    let fields = [
        ("guided_json", f.get("guided_json"), As::Schema),
        ("guided_regex", f.get("guided_regex"), As::Regex),
        ("guided_choice", f.get("guided_choice"), As::Choice),
        ("guided_grammar", f.get("guided_grammar"), As::Lark),
        ("json_schema", f.get("json_schema"), As::Schema),
        ("structured_outputs.json", nested("json"), As::Schema),
        ("structured_outputs.regex", nested("regex"), As::Regex),
        ("structured_outputs.choice", nested("choice"), As::Choice),
        ("structured_outputs.grammar", nested("grammar"), As::Lark),
    ];
    for (param, v, kind) in fields {
        let Some(v) = v else { continue };
        let g = match kind {
            As::Schema => schema(param, v)?,
            As::Regex => text(param, v, Grammar::Regex)?,
            As::Choice => choice(param, v)?,
            As::Lark => text(param, v, Grammar::Lark)?,
        };
        put(param, g)?;
    }
    Ok(found)
}

/// One function a chat request offers the model (`tools[i].function`).
#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    pub name: String,
    /// Its arguments' JSON schema (`{"type": "object", "properties": {}}` if not given).
    pub parameters: Value,
}

/// How a reply calls the tools offered (`tool_choice`).
#[derive(Debug, Clone, PartialEq)]
pub enum ToolCalls {
    /// A named function (`{"type": "function", "function": {"name"}}`): the reply is one call
    /// of it, its text the call's arguments, held to the function's schema.
    Named(Tool),
    /// `"required"`: the reply is one or more calls of any of them, held to a JSON list of
    /// `{"name", "parameters"}` objects (vLLM's form), without whitespace; one call only with
    /// `parallel_tool_calls: false` (the flag).
    Required(Vec<Tool>, bool),
    /// `"auto"` (with `serve --tool-call-parser`): the model writes text, calls in its own
    /// syntax (the parser's) among it, or both; nothing holds it to a grammar.
    Auto(ToolParser),
}

impl ToolCalls {
    /// The grammar the reply is held to, if any.
    pub fn grammar(&self) -> Option<Grammar> {
        Some(match self {
            ToolCalls::Auto(_) => return None,
            ToolCalls::Named(t) => Grammar::JsonSchema(t.parameters.clone()),
            ToolCalls::Required(tools, parallel) => {
                let calls: Vec<Value> = tools
                    .iter()
                    .map(|t| json!({"type": "object", "properties": {"name": {"const": t.name}, "parameters": t.parameters}, "required": ["name", "parameters"], "additionalProperties": false}))
                    .collect();
                // Compact: the calls' arguments are written out again anyway, and whitespace
                // between a list's items is where small models loop.
                let mut list = json!({"type": "array", "minItems": 1, "items": {"anyOf": calls}, "x-guidance": {"whitespace_flexible": false}});
                if !parallel {
                    list["maxItems"] = json!(1);
                }
                Grammar::JsonSchema(list)
            }
        })
    }
}

/// A chat request's `tools` (the list as given, for the chat template; `None` if empty) and how
/// its reply calls them. `tool_choice` `"auto"`, the default where tools are given, needs a
/// parser of the model family's call syntax in free text (`serve --tool-call-parser`, as vLLM
/// asks for one): without it (`parser` `None`) it is refused, naming what is offered.
pub fn tools(o: &Map<String, Value>, parser: Option<ToolParser>) -> ApiResult<(Option<Value>, Option<ToolCalls>)> {
    let f = Fields(o);
    let list = match f.get("tools") {
        None => Vec::new(),
        Some(Value::Array(a)) => a.clone(),
        Some(v) => return Err(Fields::wrong("tools", "an array", v)),
    };
    let mut tools: Vec<Tool> = Vec::with_capacity(list.len());
    for (i, t) in list.iter().enumerate() {
        let at = |field: &str| format!("tools[{i}]{field}");
        if t.get("type").and_then(Value::as_str) != Some("function") {
            return Err(ApiError::bad_request(&at(".type"), format!("{}: only tools of type \"function\" are offered", at(".type"))));
        }
        let func = t.get("function").and_then(Value::as_object).ok_or_else(|| ApiError::bad_request(&at(".function"), format!("{} must be an object", at(".function"))))?;
        let name = func.get("name").and_then(Value::as_str).unwrap_or_default();
        if name.is_empty() || name.len() > 64 || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
            return Err(ApiError::bad_request(&at(".function.name"), format!("{} must be 1 to 64 letters, digits, _ or -", at(".function.name"))));
        }
        if tools.iter().any(|t| t.name == name) {
            return Err(ApiError::bad_request(&at(".function.name"), format!("{}: {name:?} is offered twice", at(".function.name"))));
        }
        let parameters = match func.get("parameters") {
            None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
            Some(p @ Value::Object(_)) => p.clone(),
            Some(v) => return Err(Fields::wrong(&at(".function.parameters"), "a JSON schema (an object)", v)),
        };
        tools.push(Tool { name: name.to_string(), parameters });
    }
    enum Choice<'a> {
        No,
        Auto,
        Required,
        Named(&'a str),
    }
    let choice = match f.get("tool_choice") {
        None if tools.is_empty() => Choice::No,
        None => Choice::Auto,
        Some(Value::String(c)) => match c.as_str() {
            "none" => Choice::No,
            "auto" => Choice::Auto,
            "required" => Choice::Required,
            _ => return Err(ApiError::bad_request("tool_choice", format!("tool_choice is {c:?}; it is \"none\", \"auto\", \"required\" or a named function"))),
        },
        Some(Value::Object(c)) => match c.get("function").and_then(|f| f.get("name")).and_then(Value::as_str) {
            Some(name) => Choice::Named(name),
            None => return Err(ApiError::bad_request("tool_choice.function.name", "tool_choice.function.name is required with a named function")),
        },
        Some(v) => return Err(Fields::wrong("tool_choice", "a string or an object", v)),
    };
    let need_tools = |what: &str| ApiError::bad_request("tool_choice", format!("tool_choice is {what}, but no tools are given"));
    let calls = match choice {
        Choice::No => None,
        Choice::Auto if tools.is_empty() => None,
        Choice::Auto => match parser {
            Some(p) => Some(ToolCalls::Auto(p)),
            None => {
                return Err(ApiError::bad_request(
                    "tool_choice",
                    "tool_choice \"auto\" (the default where tools are given) needs a parser of the model's own tool-call syntax, and this server has none: the model's chat template names no syntax, or --tool-call-parser none turned it off (serve --tool-call-parser hermes|llama3_json|mistral chooses one). Send \"required\", a named function ({\"type\": \"function\", \"function\": {\"name\": ...}}) or \"none\"",
                ))
            }
        },
        Choice::Required if tools.is_empty() => return Err(need_tools("\"required\"")),
        Choice::Required => Some(ToolCalls::Required(tools.clone(), f.bool("parallel_tool_calls")?.unwrap_or(true))),
        Choice::Named(name) if tools.is_empty() => return Err(need_tools(&format!("the function {name:?}"))),
        Choice::Named(name) => match tools.iter().find(|t| t.name == name) {
            Some(t) => Some(ToolCalls::Named(t.clone())),
            None => return Err(ApiError::bad_request("tool_choice.function.name", format!("tool_choice names {name:?}, which is not among the tools given"))),
        },
    };
    Ok(((!list.is_empty()).then(|| Value::Array(list)), calls))
}

/// Refuses, by name, the fields that ask for a reply this server does not give, instead of
/// quietly ignoring them: `echo` in a chat completion, `best_of` above 1, `suffix`, `tools` in
/// a legacy completion and the legacy `functions`. Their empty or default values pass (clients
/// send them without asking for anything).
pub fn refuse_unsupported(o: &Map<String, Value>, chat: bool) -> ApiResult<()> {
    let f = Fields(o);
    let refuse = |key: &str, what: &str| Err(ApiError::bad_request(key, format!("{key}: {what} is not supported by this server")));
    if chat && f.bool("echo")? == Some(true) {
        return refuse("echo", "the last message in a chat reply");
    }
    if f.int("best_of", 1)?.is_some_and(|n| n > 1) {
        return refuse("best_of", "choosing the best of several completions");
    }
    if f.string("suffix")?.is_some_and(|s| !s.is_empty()) {
        return refuse("suffix", "text after the completion");
    }
    for key in if chat { &["functions"][..] } else { &["tools", "functions"][..] } {
        match f.get(key) {
            Some(Value::Array(a)) if !a.is_empty() => return refuse(key, "calling tools"),
            Some(Value::Array(_)) | None => {}
            Some(v) => return Err(Fields::wrong(key, "an array", v)),
        }
    }
    Ok(())
}

/// `messages` of a chat completion: each `{"role", "content"}` with content a string or an
/// array of `{"type": "text", "text"}` parts.
pub fn messages(o: &Map<String, Value>) -> ApiResult<Vec<Message>> {
    let v = o.get("messages").ok_or_else(|| ApiError::bad_request("messages", "messages is required"))?;
    let list = v.as_array().ok_or_else(|| Fields::wrong("messages", "an array", v))?;
    if list.is_empty() {
        return Err(ApiError::bad_request("messages", "messages must hold at least one message"));
    }
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let at = |field: &str| format!("messages[{i}].{field}");
            let m = m.as_object().ok_or_else(|| Fields::wrong(&format!("messages[{i}]"), "an object", m))?;
            let role = match m.get("role") {
                Some(Value::String(r)) if matches!(r.as_str(), "system" | "developer" | "user" | "assistant" | "tool") => r.clone(),
                Some(Value::String(r)) => return Err(ApiError::bad_request(&at("role"), format!("{} is {r:?}; roles are system, developer, user, assistant, tool", at("role")))),
                Some(v) => return Err(Fields::wrong(&at("role"), "a string", v)),
                None => return Err(ApiError::bad_request(&at("role"), format!("{} is required", at("role")))),
            };
            let content = match m.get("content") {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => parts
                    .iter()
                    .map(|p| match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                        (Some("text"), Some(t)) => Ok(t.to_string()),
                        _ => Err(ApiError::bad_request(&at("content"), format!("{}: only text parts ({{\"type\": \"text\", \"text\": ...}}) are supported", at("content")))),
                    })
                    .collect::<ApiResult<Vec<_>>>()?
                    .join(""),
                Some(v) => return Err(Fields::wrong(&at("content"), "a string or an array of text parts", v)),
            };
            // Templates know system, user and assistant; developer is OpenAI's new name for system.
            let role = if role == "developer" { "system".to_string() } else { role };
            let tool_calls = match m.get("tool_calls") {
                None | Some(Value::Null) => None,
                // HF templates read each call's arguments as an object (`| tojson`); the API
                // sends them as JSON text (vLLM turns them into objects too).
                Some(Value::Array(calls)) => Some(Value::Array(
                    calls
                        .iter()
                        .map(|c| {
                            let mut c = c.clone();
                            if let Some(args) = c.pointer_mut("/function/arguments") {
                                if let Some(parsed) = args.as_str().and_then(|a| serde_json::from_str::<Value>(a).ok()) {
                                    *args = parsed;
                                }
                            }
                            c
                        })
                        .collect(),
                )),
                Some(v) => return Err(Fields::wrong(&at("tool_calls"), "an array", v)),
            };
            let tool_call_id = match m.get("tool_call_id") {
                None | Some(Value::Null) => None,
                Some(Value::String(id)) => Some(id.clone()),
                Some(v) => return Err(Fields::wrong(&at("tool_call_id"), "a string", v)),
            };
            Ok(Message { role, content, tool_calls, tool_call_id })
        })
        .collect()
}

/// The token ids of array `a` (the field `at`): whole numbers below `vocab`, or a 400 naming the
/// first that is not.
pub fn token_ids(a: &[Value], at: &str, vocab: usize) -> ApiResult<Vec<u32>> {
    a.iter()
        .enumerate()
        .map(|(j, v)| match v.as_u64() {
            Some(t) if (t as usize) < vocab => Ok(t as u32),
            _ => Err(ApiError::bad_request(at, format!("{at}[{j}] is {v}; token ids are whole numbers below the vocabulary's {vocab}"))),
        })
        .collect()
}

/// One prompt of a legacy completion: text, or token ids as they are.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
}

/// `prompt` of a (legacy) completion: a string, an array of token ids, or an array of several
/// (strings or arrays of token ids), one choice (or `n`) for each, in order. Token ids are
/// checked against `vocab`.
pub fn prompts(o: &Map<String, Value>, vocab: usize) -> ApiResult<Vec<Prompt>> {
    let tokens = |a: &[Value], at: &str| -> ApiResult<Prompt> {
        if a.is_empty() {
            return Err(ApiError::bad_request(at, format!("{at} holds no token ids")));
        }
        token_ids(a, at, vocab).map(Prompt::Tokens)
    };
    match o.get("prompt") {
        Some(Value::String(s)) => Ok(vec![Prompt::Text(s.clone())]),
        Some(Value::Array(a)) if a.is_empty() => Err(ApiError::bad_request("prompt", "prompt must hold at least one prompt")),
        Some(Value::Array(a)) if a[0].is_number() => Ok(vec![tokens(a, "prompt")?]),
        Some(Value::Array(a)) if a.len() > MAX_CHOICES => Err(ApiError::bad_request("prompt", format!("prompt holds {} prompts; at most {MAX_CHOICES} are taken at once", a.len()))),
        Some(Value::Array(a)) => a
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(Prompt::Text(s.clone())),
                Value::Array(ids) => tokens(ids, &format!("prompt[{i}]")),
                v => Err(Fields::wrong(&format!("prompt[{i}]"), "a string or an array of token ids", v)),
            })
            .collect(),
        Some(v) => Err(Fields::wrong("prompt", "a string, an array of token ids or an array of prompts", v)),
        None => Err(ApiError::bad_request("prompt", "prompt is required")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn fields_of_the_wrong_type_or_range_are_named() {
        let d = SamplingParams::default();
        let cases = [
            (json!({"temperature": "hot"}), "temperature"),
            (json!({"temperature": 3}), "temperature"),
            (json!({"top_p": 0}), "top_p"),
            (json!({"max_tokens": -1}), "max_tokens"),
            (json!({"max_completion_tokens": 1.5}), "max_completion_tokens"),
            (json!({"stop": [1]}), "stop"),
            (json!({"stream": "yes"}), "stream"),
            (json!({"stream_options": {"include_usage": 1}}), "stream_options.include_usage"),
            (json!({"n": 0}), "n"),
            (json!({"n": 65}), "n"),
            (json!({"presence_penalty": -3}), "presence_penalty"),
            (json!({"stop_token_ids": [1, "x"]}), "stop_token_ids"),
            (json!({"stop_token_ids": 5}), "stop_token_ids"),
            (json!({"stop_token_ids": [100]}), "stop_token_ids"),
            (json!({"min_tokens": -1}), "min_tokens"),
            (json!({"min_tokens": 5, "max_tokens": 4}), "min_tokens"),
        ];
        for (body, param) in cases {
            let e = common(&obj(body.clone()), &d, 100).unwrap_err();
            assert_eq!((e.status, e.param.as_deref()), (StatusCode::BAD_REQUEST, Some(param)), "{body}: {}", e.message);
        }
        let c = common(&obj(json!({"temperature": 0, "stop": "x", "max_tokens": 5, "top_k": -1, "seed": 7, "model": null})), &d, 100).unwrap();
        assert_eq!((c.params.temperature, c.stop, c.max_tokens, c.params.top_k, c.params.seed, c.model), (0.0, vec!["x".to_string()], Some(5), None, 7, None));
    }

    #[test]
    fn logprobs_are_asked_for_as_each_endpoint_spells_it() {
        let chat = |v: Value| logprobs(&obj(v), true);
        let legacy = |v: Value| logprobs(&obj(v), false);
        assert_eq!(chat(json!({})).unwrap(), None);
        assert_eq!(chat(json!({"logprobs": false})).unwrap(), None);
        assert_eq!(chat(json!({"logprobs": true})).unwrap(), Some(0));
        assert_eq!(chat(json!({"logprobs": true, "top_logprobs": 5})).unwrap(), Some(5));
        assert_eq!(legacy(json!({"logprobs": 3})).unwrap(), Some(3));
        assert_eq!(legacy(json!({"logprobs": null})).unwrap(), None);
        for (body, param, is_chat) in [
            (json!({"top_logprobs": 2}), "top_logprobs", true),
            (json!({"logprobs": false, "top_logprobs": 2}), "top_logprobs", true),
            (json!({"logprobs": true, "top_logprobs": 21}), "top_logprobs", true),
            (json!({"logprobs": true, "top_logprobs": -1}), "top_logprobs", true),
            (json!({"logprobs": 2}), "logprobs", true),
            (json!({"logprobs": true}), "logprobs", false),
            (json!({"logprobs": 21}), "logprobs", false),
        ] {
            let e = logprobs(&obj(body.clone()), is_chat).unwrap_err();
            assert_eq!((e.status, e.param.as_deref()), (StatusCode::BAD_REQUEST, Some(param)), "{body}: {}", e.message);
        }
    }

    #[test]
    fn fields_asking_for_what_is_not_offered_are_refused_by_name() {
        for (body, param) in [
            (json!({"echo": true}), "echo"),
            (json!({"best_of": 3}), "best_of"),
            (json!({"suffix": "end"}), "suffix"),
            (json!({"functions": [{"name": "f"}]}), "functions"),
        ] {
            let e = refuse_unsupported(&obj(body.clone()), true).unwrap_err();
            assert_eq!((e.status, e.param.as_deref()), (StatusCode::BAD_REQUEST, Some(param)), "{body}: {}", e.message);
        }
        // Tools are a chat completion's; a legacy completion refuses them.
        let tools = json!({"tools": [{"type": "function", "function": {"name": "f"}}]});
        assert_eq!(refuse_unsupported(&obj(tools.clone()), false).unwrap_err().param.as_deref(), Some("tools"));
        refuse_unsupported(&obj(tools), true).unwrap();
        let defaults = json!({"echo": false, "best_of": 1, "suffix": "", "logit_bias": {}, "response_format": {"type": "text"}, "tools": [], "functions": null, "user": "u"});
        refuse_unsupported(&obj(defaults.clone()), true).unwrap();
        refuse_unsupported(&obj(json!({"echo": true})), false).unwrap();
    }

    #[test]
    fn tools_and_tool_choice() {
        let weather = json!({"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}});
        let clock = json!({"type": "function", "function": {"name": "now"}});
        let t = |v: Value| tools(&obj(v), None);
        assert_eq!(t(json!({})).unwrap(), (None, None));
        assert_eq!(t(json!({"tools": [], "tool_choice": "auto"})).unwrap(), (None, None));
        let (list, calls) = t(json!({"tools": [weather, clock], "tool_choice": "none"})).unwrap();
        assert_eq!((list.unwrap().as_array().unwrap().len(), calls), (2, None));
        let (_, calls) = t(json!({"tools": [weather, clock], "tool_choice": {"type": "function", "function": {"name": "now"}}})).unwrap();
        assert_eq!(calls, Some(ToolCalls::Named(Tool { name: "now".into(), parameters: json!({"type": "object", "properties": {}}) })));
        let (_, calls) = t(json!({"tools": [weather, clock], "tool_choice": "required"})).unwrap();
        let Some(ToolCalls::Required(all, true)) = &calls else { panic!("{calls:?}") };
        assert_eq!(all.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(), ["get_weather", "now"]);
        let Some(Grammar::JsonSchema(g)) = calls.unwrap().grammar() else { panic!() };
        assert_eq!(g["items"]["anyOf"][0]["properties"]["name"]["const"], "get_weather");
        assert!(g.get("maxItems").is_none());
        let (_, calls) = t(json!({"tools": [weather], "tool_choice": "required", "parallel_tool_calls": false})).unwrap();
        let Some(Grammar::JsonSchema(g)) = calls.unwrap().grammar() else { panic!() };
        assert_eq!(g["maxItems"], 1, "one call without parallel calls");
        // auto: refused without a parser, free (no grammar) with one.
        let auto = json!({"tools": [weather], "tool_choice": "auto"});
        assert!(t(auto.clone()).unwrap_err().message.contains("--tool-call-parser"));
        let (_, calls) = tools(&obj(auto), Some(ToolParser::Mistral)).unwrap();
        assert_eq!(calls, Some(ToolCalls::Auto(ToolParser::Mistral)));
        assert_eq!(calls.unwrap().grammar(), None);
        for (body, param) in [
            (json!({"tools": [weather]}), "tool_choice"),
            (json!({"tools": [weather], "tool_choice": "auto"}), "tool_choice"),
            (json!({"tools": [weather], "tool_choice": "sometimes"}), "tool_choice"),
            (json!({"tools": [weather], "tool_choice": 1}), "tool_choice"),
            (json!({"tools": [weather], "tool_choice": {"type": "function"}}), "tool_choice.function.name"),
            (json!({"tools": [weather], "tool_choice": {"type": "function", "function": {"name": "other"}}}), "tool_choice.function.name"),
            (json!({"tool_choice": "required"}), "tool_choice"),
            (json!({"tools": {"a": 1}, "tool_choice": "none"}), "tools"),
            (json!({"tools": [{"type": "retrieval"}], "tool_choice": "none"}), "tools[0].type"),
            (json!({"tools": [{"type": "function"}], "tool_choice": "none"}), "tools[0].function"),
            (json!({"tools": [{"type": "function", "function": {"name": "a b"}}], "tool_choice": "none"}), "tools[0].function.name"),
            (json!({"tools": [clock, clock], "tool_choice": "none"}), "tools[1].function.name"),
            (json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}], "tool_choice": "none"}), "tools[0].function.parameters"),
            (json!({"tools": [weather], "tool_choice": "required", "parallel_tool_calls": "no"}), "parallel_tool_calls"),
        ] {
            let e = t(body.clone()).unwrap_err();
            assert_eq!((e.status, e.param.as_deref()), (StatusCode::BAD_REQUEST, Some(param)), "{body}: {}", e.message);
        }
    }

    #[test]
    fn logit_bias_maps_token_ids_to_biases() {
        let got = logit_bias(&obj(json!({"logit_bias": {"5": -100, " 7": 2.5}})), 10).unwrap();
        let mut got = got;
        got.sort_by_key(|p| p.0);
        assert_eq!(got, vec![(5, -100.0), (7, 2.5)]);
        assert!(logit_bias(&obj(json!({"logit_bias": {}})), 10).unwrap().is_empty());
        assert!(logit_bias(&obj(json!({"logit_bias": null})), 10).unwrap().is_empty());
        for (body, says) in [
            (json!({"logit_bias": [1]}), "must be an object"),
            (json!({"logit_bias": {"10": 1}}), "not a token id below"),
            (json!({"logit_bias": {"x": 1}}), "not a token id"),
            (json!({"logit_bias": {"1": 101}}), "from -100 to 100"),
            (json!({"logit_bias": {"1": "1"}}), "from -100 to 100"),
        ] {
            let e = logit_bias(&obj(body.clone()), 10).unwrap_err();
            assert_eq!(e.param.as_deref(), Some("logit_bias"));
            assert!(e.message.contains(says), "{body}: {}", e.message);
        }
    }

    #[test]
    fn grammars_come_from_each_api_s_field() {
        let g = |v: Value| grammar(&obj(v));
        let schema = json!({"type": "object", "properties": {"a": {"type": "string"}}});
        assert_eq!(g(json!({})).unwrap(), None);
        assert_eq!(g(json!({"response_format": {"type": "text"}})).unwrap(), None);
        assert_eq!(g(json!({"response_format": {"type": "json_object"}})).unwrap(), Some(("response_format".into(), Grammar::JsonObject)));
        assert_eq!(g(json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}})).unwrap(), Some(("response_format".into(), Grammar::JsonSchema(schema.clone()))));
        assert_eq!(g(json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}})).unwrap(), Some(("response_format".into(), Grammar::JsonSchema(json!({})))));
        assert_eq!(g(json!({"guided_json": schema.to_string()})).unwrap(), Some(("guided_json".into(), Grammar::JsonSchema(schema.clone()))));
        assert_eq!(g(json!({"guided_regex": "[a-z]+"})).unwrap(), Some(("guided_regex".into(), Grammar::Regex("[a-z]+".into()))));
        assert_eq!(g(json!({"guided_choice": ["a", "b"]})).unwrap(), Some(("guided_choice".into(), Grammar::Choice(vec!["a".into(), "b".into()]))));
        assert_eq!(g(json!({"guided_grammar": "start: \"a\""})).unwrap(), Some(("guided_grammar".into(), Grammar::Lark("start: \"a\"".into()))));
        assert_eq!(g(json!({"json_schema": schema})).unwrap(), Some(("json_schema".into(), Grammar::JsonSchema(schema.clone()))));
        assert_eq!(g(json!({"structured_outputs": {"choice": ["x"]}})).unwrap(), Some(("structured_outputs.choice".into(), Grammar::Choice(vec!["x".into()]))));
        for (body, param) in [
            (json!({"response_format": "json"}), "response_format"),
            (json!({"response_format": {"type": "xml"}}), "response_format.type"),
            (json!({"response_format": {}}), "response_format.type"),
            (json!({"response_format": {"type": "json_schema"}}), "response_format.json_schema"),
            (json!({"response_format": {"type": "json_schema", "json_schema": {"schema": [1]}}}), "response_format.json_schema.schema"),
            (json!({"guided_json": "not json"}), "guided_json"),
            (json!({"guided_json": 3}), "guided_json"),
            (json!({"guided_regex": ["a"]}), "guided_regex"),
            (json!({"guided_choice": "a"}), "guided_choice"),
            (json!({"guided_choice": ["a", 1]}), "guided_choice"),
            (json!({"structured_outputs": 1}), "structured_outputs"),
            (json!({"guided_regex": "a", "guided_choice": ["a"]}), "guided_choice"),
            (json!({"response_format": {"type": "json_object"}, "guided_regex": "a"}), "guided_regex"),
        ] {
            let e = g(body.clone()).unwrap_err();
            assert_eq!((e.status, e.param.as_deref()), (StatusCode::BAD_REQUEST, Some(param)), "{body}: {}", e.message);
        }
    }

    #[test]
    fn prompts_are_text_or_token_ids() {
        let text = |s: &str| Prompt::Text(s.into());
        assert_eq!(prompts(&obj(json!({"prompt": "a"})), 10).unwrap(), vec![text("a")]);
        assert_eq!(prompts(&obj(json!({"prompt": ["a", "b"]})), 10).unwrap(), vec![text("a"), text("b")]);
        assert_eq!(prompts(&obj(json!({"prompt": [3, 4]})), 10).unwrap(), vec![Prompt::Tokens(vec![3, 4])]);
        assert_eq!(prompts(&obj(json!({"prompt": [[3], "b"]})), 10).unwrap(), vec![Prompt::Tokens(vec![3]), text("b")]);
        for (body, param) in [
            (json!({}), "prompt"),
            (json!({"prompt": []}), "prompt"),
            (json!({"prompt": 3}), "prompt"),
            (json!({"prompt": [1, 10]}), "prompt"),
            (json!({"prompt": [1, -1]}), "prompt"),
            (json!({"prompt": [1, "a"]}), "prompt"),
            (json!({"prompt": ["a", [2, 11]]}), "prompt[1]"),
            (json!({"prompt": ["a", []]}), "prompt[1]"),
            (json!({"prompt": ["a", {}]}), "prompt[1]"),
            (json!({"prompt": vec!["a"; MAX_CHOICES + 1]}), "prompt"),
        ] {
            assert_eq!(prompts(&obj(body.clone()), 10).unwrap_err().param.as_deref(), Some(param), "{body}");
        }
    }

    #[test]
    fn messages_are_checked_one_by_one() {
        assert_eq!(messages(&obj(json!({"messages": []}))).unwrap_err().param.as_deref(), Some("messages"));
        assert_eq!(messages(&obj(json!({}))).unwrap_err().param.as_deref(), Some("messages"));
        let e = messages(&obj(json!({"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]}))).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[1].role"));
        let m = messages(&obj(json!({"messages": [{"role": "developer", "content": [{"type": "text", "text": "be "}, {"type": "text", "text": "brief"}]}]}))).unwrap();
        assert_eq!(m, vec![Message::new("system", "be brief")]);
        assert!(parse_body(b"{nope").unwrap_err().message.contains("not valid JSON"));
        assert!(parse_body(b"[1]").unwrap_err().message.contains("an array"));
    }
}
