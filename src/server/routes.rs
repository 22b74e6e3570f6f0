//! The endpoints: `/v1/chat/completions`, `/v1/completions`, `/v1/models`, `/health`,
//! `/metrics` and the chat page at `/`.
use super::logprobs::{self, TextOffsets};
use super::openai::{self, ApiError, ApiResult, Common};
use super::{AppState, CHAT_PAGE};
use crate::engine::logprobs::TokenLogprob;
use crate::engine::scheduler::{Event, EventSink, Finish, FinishReason, Request, SubmitError};
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::Arc;
use tokio::sync::mpsc;
use futures_util::StreamExt;

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

/// The two endpoints differ in how the prompt is made and how chunks look.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Completion,
}

async fn chat_completions(State(s): State<Arc<AppState>>, body: Bytes) -> Response {
    respond(s, body, Kind::Chat).await.unwrap_or_else(IntoResponse::into_response)
}

async fn completions(State(s): State<Arc<AppState>>, body: Bytes) -> Response {
    respond(s, body, Kind::Completion).await.unwrap_or_else(IntoResponse::into_response)
}

fn server_error(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", None, e.to_string())
}

async fn respond(s: Arc<AppState>, body: Bytes, kind: Kind) -> ApiResult<Response> {
    let o = openai::parse_body(&body)?;
    let mut c = openai::common(&o, &s.opts.defaults)?;
    let logprobs = openai::logprobs(&o, kind == Kind::Chat)?;
    openai::refuse_unsupported(&o)?;
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
    let prompt = tokio::task::spawn_blocking(move || -> ApiResult<Vec<u32>> {
        let (text, special) = match kind {
            Kind::Chat => {
                let msgs = openai::messages(&o2)?;
                let text = st.template.render(&msgs, true).map_err(|e| ApiError::bad_request("messages", e.to_string()))?;
                (text, false)
            }
            Kind::Completion => (openai::prompt(&o2)?, true),
        };
        let enc = st.tokenizer.encode(text, special).map_err(server_error)?;
        Ok(enc.get_ids().to_vec())
    })
    .await
    .map_err(server_error)??;
    let context = s.engine.context_len;
    let holder = if s.engine.context_by_cache { "the server's KV cache (--kv-cache-mb)" } else { "the model's context" };
    if prompt.len() >= context {
        let param = if kind == Kind::Chat { "messages" } else { "prompt" };
        return Err(ApiError::bad_request(param, format!("the prompt has {} tokens; {holder} holds {context}, and at least one token must be generated", prompt.len()))
            .with_code("context_length_exceeded"));
    }
    let room = context - prompt.len();
    c.params.max_tokens = match c.max_tokens {
        Some(n) if n > room => {
            return Err(ApiError::bad_request(
                if o.contains_key("max_completion_tokens") { "max_completion_tokens" } else { "max_tokens" },
                format!("the prompt has {} tokens and {n} more were asked for; {holder} holds {context}", prompt.len()),
            )
            .with_code("context_length_exceeded"))
        }
        Some(n) => n,
        None => room,
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let req = Request { prompt, params: c.params.clone(), stop: c.stop.clone(), ignore_eos: c.ignore_eos, logprobs, sink: Box::new(ChannelSink(tx)) };
    s.engine.submit(req).map_err(submit_error)?;
    let id = format!("{}-{}", if kind == Kind::Chat { "chatcmpl" } else { "cmpl" }, next_id());
    let asked = logprobs.is_some();
    if c.stream {
        Ok(stream(s, rx, id, kind, c, asked).into_response())
    } else {
        collect(s, rx, id, kind, asked).await.map(IntoResponse::into_response)
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

fn next_id() -> String {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros()).unwrap_or(0);
    format!("{t:x}{n:04x}")
}

fn reason(f: &Finish) -> &'static str {
    match f.reason {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

fn usage(f: &Finish) -> Value {
    json!({"prompt_tokens": f.prompt_tokens, "completion_tokens": f.completion_tokens, "total_tokens": f.prompt_tokens + f.completion_tokens})
}

/// A choice's `logprobs`: null unless the request asked for them (`asked`).
fn logprobs_value(s: &AppState, kind: Kind, asked: bool, tokens: &[TokenLogprob], offsets: &mut TextOffsets) -> Value {
    match (asked, kind) {
        (false, _) => Value::Null,
        (true, Kind::Chat) => logprobs::chat(&s.tokenizer, tokens),
        (true, Kind::Completion) => logprobs::completion(&s.tokenizer, tokens, offsets),
    }
}

/// The whole reply as one object.
async fn collect(s: Arc<AppState>, mut rx: mpsc::UnboundedReceiver<Event>, id: String, kind: Kind, asked: bool) -> ApiResult<Json<Value>> {
    let mut text = String::new();
    let mut tokens = Vec::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Text(t) => text += &t,
            Event::Logprobs(t) => tokens.push(t),
            Event::Failed(e) => return Err(server_error(e)),
            Event::Done(f) => {
                let lp = logprobs_value(&s, kind, asked, &tokens, &mut TextOffsets::default());
                let choice = match kind {
                    Kind::Chat => json!({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": lp, "finish_reason": reason(&f)}),
                    Kind::Completion => json!({"index": 0, "text": text, "logprobs": lp, "finish_reason": reason(&f)}),
                };
                let object = if kind == Kind::Chat { "chat.completion" } else { "text_completion" };
                return Ok(Json(json!({
                    "id": id, "object": object, "created": now(), "model": s.opts.model_name,
                    "choices": [choice], "usage": usage(&f), "system_fingerprint": null,
                })));
            }
        }
    }
    Err(server_error("the engine ended the request without an answer"))
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The reply as Server-Sent Events in OpenAI's chunk format, ending with `data: [DONE]`; with
/// log-probabilities (`asked`) each text chunk carries those of the tokens it completes, and
/// tokens whose text never came (a stop string cut it) a last chunk of no text before the end.
fn stream(s: Arc<AppState>, rx: mpsc::UnboundedReceiver<Event>, id: String, kind: Kind, c: Common, asked: bool) -> Sse<impl futures_util::Stream<Item = Result<SseEvent, Infallible>>> {
    let created = now();
    let model = s.opts.model_name.clone();
    let object = if kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" };
    let chunk = move |choice: Value, usage: Option<Value>| -> SseEvent {
        let mut v = json!({"id": id, "object": object, "created": created, "model": model, "system_fingerprint": null,
                           "choices": if choice.is_null() { json!([]) } else { json!([choice]) }});
        if let Some(u) = usage {
            v["usage"] = u;
        } else if c.include_usage {
            v["usage"] = Value::Null;
        }
        SseEvent::default().data(v.to_string())
    };
    let delta = move |text: Option<&str>, lp: Value, finish: Option<&str>| -> Value {
        match kind {
            Kind::Chat => {
                let d = match text {
                    Some(t) => json!({"content": t}),
                    None => json!({}),
                };
                json!({"index": 0, "delta": d, "logprobs": lp, "finish_reason": finish})
            }
            Kind::Completion => json!({"index": 0, "text": text.unwrap_or(""), "logprobs": lp, "finish_reason": finish}),
        }
    };
    let include_usage = c.include_usage;
    let first = (kind == Kind::Chat).then(|| chunk(json!({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}), None));
    // The tokens whose text has not come yet, and where the legacy API's offsets stand.
    let (mut pending, mut offsets) = (Vec::<TokenLogprob>::new(), TextOffsets::default());
    let events = tokio_stream::wrappers::UnboundedReceiverStream::new(rx).flat_map(move |ev| {
        let mut lp = |pending: &mut Vec<TokenLogprob>| logprobs_value(&s, kind, asked, &std::mem::take(pending), &mut offsets);
        let out: Vec<SseEvent> = match ev {
            Event::Logprobs(t) => {
                pending.push(t);
                vec![]
            }
            Event::Text(t) => vec![chunk(delta(Some(&t), lp(&mut pending), None), None)],
            Event::Done(f) => {
                let mut v = Vec::new();
                if !pending.is_empty() {
                    v.push(chunk(delta(Some(""), lp(&mut pending), None), None));
                }
                v.push(chunk(delta(None, Value::Null, Some(reason(&f))), None));
                if include_usage {
                    v.push(chunk(Value::Null, Some(usage(&f))));
                }
                v.push(SseEvent::default().data("[DONE]"));
                v
            }
            Event::Failed(e) => {
                let err = server_error(e).body();
                vec![SseEvent::default().data(err.to_string()), SseEvent::default().data("[DONE]")]
            }
        };
        futures_util::stream::iter(out.into_iter().map(Ok))
    });
    Sse::new(futures_util::stream::iter(first.into_iter().map(Ok)).chain(events)).keep_alive(axum::response::sse::KeepAlive::default())
}
