//! The endpoints: `/v1/chat/completions`, `/v1/completions`, `/v1/models`, `/health`,
//! `/metrics`, vLLM's `/tokenize` and `/detokenize`, and the chat page at `/`.
use super::openai::{self, ApiError, ApiResult, Common, Prompt};
use super::reply::{collect, server_error, stream, Echo, Kind, Reply};
use super::tool_parser::ToolParser;
use crate::engine::chat_template::Message;
use super::{AppState, CHAT_PAGE};
use crate::engine::scheduler::{Event, EventSink, Request, SubmitError};
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use std::sync::Arc;
use tokio::sync::mpsc;

/// Request bodies above this are refused (a 128k-token prompt is well under it).
const MAX_BODY: usize = 16 << 20;

pub fn router(state: Arc<AppState>) -> Router {
    let v1 = Router::new()
        .route("/chat/completions", post(chat_completions))
        .route("/completions", post(completions))
        .route("/models", get(models))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), require_key));
    Router::new()
        .route("/", get(|| async { Html(CHAT_PAGE) }))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/metrics", get(metrics))
        .nest("/v1", v1)
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", Some("not_found"), "no such endpoint") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "invalid_request_error", Some("method_not_allowed"), "this endpoint does not take that method")
        })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

/// With `--api-key`, `/v1/` answers 401 unless the request carries `Authorization: Bearer KEY`.
async fn require_key(State(s): State<Arc<AppState>>, req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    if let Some(key) = &s.opts.api_key {
        let given = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(key.as_str()) {
            let what = if given.is_none() { "no API key was given (Authorization: Bearer KEY)" } else { "the API key is wrong" };
            return ApiError::new(StatusCode::UNAUTHORIZED, "authentication_error", Some("invalid_api_key"), what).into_response();
        }
    }
    next.run(req).await
}

async fn metrics(State(s): State<Arc<AppState>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], s.engine.metrics.render(&s.opts.model_name))
}

async fn models(State(s): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({"object": "list", "data": [{
        "id": s.opts.model_name, "object": "model", "created": s.created, "owned_by": "awq-run",
        "max_model_len": s.engine.context_len,
    }]}))
}

/// vLLM's `/tokenize`: the tokens of `prompt` (with the tokenizer's special tokens unless
/// `add_special_tokens` is false), or of `messages` through the chat template (with the
/// assistant's opening unless `add_generation_prompt` is false), as a completion or chat request
/// would see them.
async fn tokenize(State(s): State<Arc<AppState>>, body: Bytes) -> ApiResult<Json<Value>> {
    let o = openai::parse_body(&body)?;
    let st = s.clone();
    let tokens = tokio::task::spawn_blocking(move || -> ApiResult<Vec<u32>> {
        let f = openai::Fields(&o);
        let (text, special) = if o.contains_key("messages") {
            let msgs = openai::messages(&o)?;
            let text = st.template.render(&msgs, f.bool("add_generation_prompt")?.unwrap_or(true)).map_err(|e| ApiError::bad_request("messages", e.to_string()))?;
            (text, f.bool("add_special_tokens")?.unwrap_or(false))
        } else {
            let text = f.string("prompt")?.ok_or_else(|| ApiError::bad_request("prompt", "prompt (a string) or messages is required"))?;
            (text, f.bool("add_special_tokens")?.unwrap_or(true))
        };
        Ok(st.tokenizer.encode(text, special).map_err(server_error)?.get_ids().to_vec())
    })
    .await
    .map_err(server_error)??;
    Ok(Json(json!({"tokens": tokens, "count": tokens.len(), "max_model_len": s.engine.context_len})))
}

/// vLLM's `/detokenize`: the text of `tokens` (ids below the vocabulary's size).
async fn detokenize(State(s): State<Arc<AppState>>, body: Bytes) -> ApiResult<Json<Value>> {
    let o = openai::parse_body(&body)?;
    let ids = match o.get("tokens") {
        Some(Value::Array(a)) => openai::token_ids(a, "tokens", s.engine.vocab_size)?,
        _ => return Err(ApiError::bad_request("tokens", "tokens (an array of token ids) is required")),
    };
    let text = s.tokenizer.decode(&ids, false).map_err(server_error)?;
    Ok(Json(json!({"prompt": text})))
}

/// Events of one request, from the engine thread to its handler.
struct ChannelSink(mpsc::UnboundedSender<Event>);

impl EventSink for ChannelSink {
    fn send(&mut self, event: Event) -> bool {
        self.0.send(event).is_ok()
    }
    fn is_closed(&self) -> bool {
        self.0.is_closed()
    }
}

async fn chat_completions(State(s): State<Arc<AppState>>, body: Bytes) -> Response {
    respond(s, body, Kind::Chat).await.unwrap_or_else(IntoResponse::into_response)
}

async fn completions(State(s): State<Arc<AppState>>, body: Bytes) -> Response {
    respond(s, body, Kind::Completion).await.unwrap_or_else(IntoResponse::into_response)
}

async fn respond(s: Arc<AppState>, body: Bytes, kind: Kind) -> ApiResult<Response> {
    let o = openai::parse_body(&body)?;
    let c = openai::common(&o, &s.opts.defaults, s.engine.vocab_size)?;
    let logprobs = openai::logprobs(&o, kind == Kind::Chat)?;
    openai::refuse_unsupported(&o, kind == Kind::Chat)?;
    let logit_bias = openai::logit_bias(&o, s.engine.vocab_size)?;
    let mut grammar = openai::grammar(&o)?;
    let (tools, tool_calls) = if kind == Kind::Chat { openai::tools(&o, s.opts.tool_parser)? } else { (None, None) };
    if let Some(g) = tool_calls.as_ref().and_then(openai::ToolCalls::grammar) {
        if let Some((param, _)) = &grammar {
            return Err(ApiError::bad_request(param, format!("{param} and tool_choice both ask for a reply's format; give one")));
        }
        grammar = Some(("tools".into(), g));
    }
    // A legacy completion's echo (chat refuses it above): the prompt leads each choice's text.
    let echo_on = kind == Kind::Completion && c.echo;
    if c.max_tokens == Some(0) && !echo_on {
        let param = if o.contains_key("max_completion_tokens") { "max_completion_tokens" } else { "max_tokens" };
        return Err(ApiError::bad_request(param, format!("{param} is 0; at least one token must be generated (0 is taken with echo, to score the prompt alone)")));
    }
    if let Some(m) = &c.model {
        if *m != s.opts.model_name {
            let mut e = ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", Some("model_not_found"), format!("model {m:?} is not served here; this server serves {:?}", s.opts.model_name));
            e.param = Some("model".into());
            return Err(e);
        }
    }
    // Templates and tokenizers are CPU work: off the async threads.
    let st = s.clone();
    let o2 = o.clone();
    // Each prompt's tokens, and its text (what `echo` puts first); the grammar's first state.
    let (prompts, constraint) = tokio::task::spawn_blocking(move || -> ApiResult<_> {
        let constraint = match grammar {
            Some((param, g)) => Some(st.engine.compile(&g).map_err(|e| ApiError::bad_request(&param, format!("{param}: {e}")))?),
            None => None,
        };
        let (inputs, special) = match kind {
            Kind::Chat => {
                let mut msgs = openai::messages(&o2)?;
                if let Some(t) = tools.as_ref().filter(|_| !st.template.knows_tools()) {
                    msgs = with_tools_described(msgs, t, st.opts.tool_parser);
                }
                let text = st.template.render_with_tools(&msgs, true, tools.as_ref()).map_err(|e| ApiError::bad_request("messages", e.to_string()))?;
                (vec![Prompt::Text(text)], false)
            }
            Kind::Completion => (openai::prompts(&o2, st.engine.vocab_size)?, true),
        };
        let prompts = inputs
            .into_iter()
            .map(|p| match p {
                Prompt::Text(t) => Ok((st.tokenizer.encode(t.as_str(), special).map_err(server_error)?.get_ids().to_vec(), t)),
                Prompt::Tokens(ids) => {
                    let text = st.tokenizer.decode(&ids, false).map_err(server_error)?;
                    Ok((ids, text))
                }
            })
            .collect::<ApiResult<Vec<(Vec<u32>, String)>>>()?;
        Ok((prompts, constraint))
    })
    .await
    .map_err(server_error)??;
    let choices = prompts.len() * c.n;
    if choices > s.engine.max_queue() {
        let param = if c.n > 1 { "n" } else { "prompt" };
        return Err(ApiError::bad_request(param, format!("{choices} choices were asked for; the server queues at most {} requests (--max-queue)", s.engine.max_queue())));
    }
    let mut requests = Vec::with_capacity(choices);
    let mut echo = Vec::with_capacity(choices);
    for (i, (prompt, text)) in prompts.iter().enumerate() {
        let max_tokens = room_for(&s, kind, &o, &c, prompt.len(), (prompts.len() > 1).then_some(i))?;
        if c.min_tokens > max_tokens {
            return Err(ApiError::bad_request("min_tokens", format!("min_tokens is {}, more than the {max_tokens} tokens the context leaves after the prompt", c.min_tokens)));
        }
        for j in 0..c.n {
            let mut params = c.params.clone();
            params.max_tokens = max_tokens;
            // Each choice of a prompt draws with its own seed (choice 0 with the one given).
            params.seed = params.seed.wrapping_add(j as u64);
            requests.push((prompt.clone(), params));
            echo.push(echo_on.then(|| Echo { text: text.clone(), tokens: prompt.clone() }));
        }
    }
    // Every choice is a request of its own in the engine; if one cannot be queued, the receivers
    // of those that were are dropped here, and the engine cancels them.
    let prompt_logprobs = logprobs.filter(|_| echo_on);
    let mut receivers = Vec::with_capacity(choices);
    for (prompt, params) in requests {
        let (tx, rx) = mpsc::unbounded_channel();
        let req = Request {
            prompt,
            params,
            stop: c.stop.clone(),
            ignore_eos: c.ignore_eos,
            stop_token_ids: c.stop_token_ids.clone(),
            min_tokens: c.min_tokens,
            logprobs,
            prompt_logprobs,
            logit_bias: logit_bias.clone(),
            // Each choice from the grammar's start.
            constraint: constraint.clone(),
            sink: Box::new(ChannelSink(tx)),
        };
        s.engine.submit(req).map_err(submit_error)?;
        receivers.push(rx);
    }
    let id = format!("{}-{}", if kind == Kind::Chat { "chatcmpl" } else { "cmpl" }, next_id());
    let reply = Reply { id, kind, asked: logprobs.is_some(), prompt_tokens: prompts.iter().map(|p| p.0.len()).sum(), echo, tools: tool_calls };
    if c.stream {
        Ok(stream(s, receivers, reply, c.include_usage).into_response())
    } else {
        collect(s, receivers, reply).await.map(IntoResponse::into_response)
    }
}

/// `msgs` with the tools offered described in the system message (the first, made if there is
/// none), for chat templates that do not show the model their `tools`: the model then knows
/// what the functions are for and what their arguments mean, which the grammar alone does not
/// tell it; with a tool-call parser, also how to write a call (as Hermes-style templates say).
fn with_tools_described(mut msgs: Vec<Message>, tools: &Value, parser: Option<ToolParser>) -> Vec<Message> {
    let mut note = format!("You can call these functions (their parameters as JSON schemas):\n{tools}");
    if let Some(p) = parser {
        note = format!("{note}\n\n{}", p.how_to_call());
    }
    match msgs.first_mut().filter(|m| m.role == "system") {
        Some(m) => m.content = format!("{}\n\n{note}", m.content),
        None => msgs.insert(0, Message::new("system", &note)),
    }
    msgs
}

/// The tokens a prompt of `len` may be followed by: `max_tokens` if it fits the context, else a
/// 400 naming both lengths (and the prompt, `index`, of several).
fn room_for(s: &AppState, kind: Kind, o: &serde_json::Map<String, Value>, c: &Common, len: usize, index: Option<usize>) -> ApiResult<usize> {
    let context = s.engine.context_len;
    let holder = if s.engine.context_by_cache { "the server's KV cache (--kv-cache-mb)" } else { "the model's context" };
    let what = index.map_or("the prompt".to_string(), |i| format!("prompt[{i}]"));
    if len >= context {
        let param = if kind == Kind::Chat { "messages" } else { "prompt" };
        return Err(ApiError::bad_request(param, format!("{what} has {len} tokens; {holder} holds {context}, and at least one token must be generated")).with_code("context_length_exceeded"));
    }
    let room = context - len;
    match c.max_tokens {
        Some(n) if n > room => Err(ApiError::bad_request(
            if o.contains_key("max_completion_tokens") { "max_completion_tokens" } else { "max_tokens" },
            format!("{what} has {len} tokens and {n} more were asked for; {holder} holds {context}"),
        )
        .with_code("context_length_exceeded")),
        Some(n) => Ok(n),
        None => Ok(room),
    }
}

fn submit_error(e: SubmitError) -> ApiError {
    let mut err = match &e {
        SubmitError::QueueFull(_) => ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", Some("queue_full"), e.to_string()),
        SubmitError::Stopped => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", Some("engine_stopped"), e.to_string()),
        SubmitError::PromptTooLong { .. } => ApiError::bad_request("messages", e.to_string()).with_code("context_length_exceeded"),
        SubmitError::EmptyPrompt => ApiError::bad_request("prompt", e.to_string()),
        SubmitError::BadParams(m) => ApiError::bad_request("body", m.clone()),
    };
    if err.status == StatusCode::TOO_MANY_REQUESTS || err.status == StatusCode::SERVICE_UNAVAILABLE {
        err.retry_after = Some(1);
    }
    err
}

pub(super) fn next_id() -> String {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros()).unwrap_or(0);
    format!("{t:x}{n:04x}")
}

