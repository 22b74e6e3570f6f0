//! The endpoints: `/v1/chat/completions`, `/v1/completions`, `/v1/models`, `/health`,
//! `/metrics`, vLLM's `/tokenize` and `/detokenize`, and the chat page at `/`.
use super::logprobs::{self, TextOffsets};
use super::openai::{self, ApiError, ApiResult, Common, Prompt};
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
        Some(Value::Array(a)) => a
            .iter()
            .enumerate()
            .map(|(i, v)| match v.as_u64() {
                Some(t) if (t as usize) < s.engine.vocab_size => Ok(t as u32),
                _ => Err(ApiError::bad_request("tokens", format!("tokens[{i}] is {v}; token ids are whole numbers below the vocabulary's {}", s.engine.vocab_size))),
            })
            .collect::<ApiResult<Vec<u32>>>()?,
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
    let c = openai::common(&o, &s.opts.defaults)?;
    let logprobs = openai::logprobs(&o, kind == Kind::Chat)?;
    openai::refuse_unsupported(&o, kind == Kind::Chat)?;
    if c.max_tokens == Some(0) && !(kind == Kind::Completion && c.echo) {
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
    // Each prompt's tokens, and its text (what `echo` puts first).
    let prompts = tokio::task::spawn_blocking(move || -> ApiResult<Vec<(Vec<u32>, String)>> {
        let (inputs, special) = match kind {
            Kind::Chat => {
                let msgs = openai::messages(&o2)?;
                (vec![Prompt::Text(st.template.render(&msgs, true).map_err(|e| ApiError::bad_request("messages", e.to_string()))?)], false)
            }
            Kind::Completion => (openai::prompts(&o2, st.engine.vocab_size)?, true),
        };
        inputs
            .into_iter()
            .map(|p| match p {
                Prompt::Text(t) => Ok((st.tokenizer.encode(t.as_str(), special).map_err(server_error)?.get_ids().to_vec(), t)),
                Prompt::Tokens(ids) => {
                    let text = st.tokenizer.decode(&ids, false).map_err(server_error)?;
                    Ok((ids, text))
                }
            })
            .collect()
    })
    .await
    .map_err(server_error)??;
    if let Some(t) = c.stop_token_ids.iter().find(|&&t| t as usize >= s.engine.vocab_size) {
        return Err(ApiError::bad_request("stop_token_ids", format!("stop_token_ids holds {t}; token ids are below the vocabulary's {}", s.engine.vocab_size)));
    }
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
            echo.push((kind == Kind::Completion && c.echo).then(|| Echo { text: text.clone(), tokens: prompt.clone() }));
        }
    }
    // Every choice is a request of its own in the engine; if one cannot be queued, the receivers
    // of those that were are dropped here, and the engine cancels them.
    let mut receivers = Vec::with_capacity(choices);
    for (prompt, params) in requests {
        let (tx, rx) = mpsc::unbounded_channel();
        let prompt_logprobs = logprobs.filter(|_| kind == Kind::Completion && c.echo);
        let req = Request {
            prompt,
            params,
            stop: c.stop.clone(),
            ignore_eos: c.ignore_eos,
            stop_token_ids: c.stop_token_ids.clone(),
            min_tokens: c.min_tokens,
            logprobs,
            prompt_logprobs,
            sink: Box::new(ChannelSink(tx)),
        };
        s.engine.submit(req).map_err(submit_error)?;
        receivers.push(rx);
    }
    let id = format!("{}-{}", if kind == Kind::Chat { "chatcmpl" } else { "cmpl" }, next_id());
    let reply = Reply { id, kind, asked: logprobs.is_some(), prompt_tokens: prompts.iter().map(|p| p.0.len()).sum(), echo };
    if c.stream {
        Ok(stream(s, receivers, reply, c.include_usage).into_response())
    } else {
        collect(s, receivers, reply).await.map(IntoResponse::into_response)
    }
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

/// What every choice of one reply shares.
struct Reply {
    id: String,
    kind: Kind,
    /// Whether the request asked for log-probabilities.
    asked: bool,
    /// The prompts' tokens, each prompt counted once whatever `n` (as OpenAI and vLLM count them).
    prompt_tokens: usize,
    /// Per choice, the prompt that leads its text (`echo`).
    echo: Vec<Option<Echo>>,
}

/// A prompt echoed at the start of a legacy completion's text.
struct Echo {
    text: String,
    tokens: Vec<u32>,
}

/// The text and `logprobs` (null unless asked for) that an echoed prompt leads a choice with;
/// `scored`: the engine's scores of its tokens after the first.
fn echoed(s: &AppState, e: &Echo, asked: bool, scored: &[TokenLogprob], offsets: &mut TextOffsets) -> (String, Value) {
    let lp = if asked { logprobs::echoed_prompt(&s.tokenizer, &e.tokens, scored, offsets) } else { Value::Null };
    (e.text.clone(), lp)
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

fn usage(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens})
}

/// A choice's `logprobs`: null unless the request asked for them (`asked`).
fn logprobs_value(s: &AppState, kind: Kind, asked: bool, tokens: &[TokenLogprob], offsets: &mut TextOffsets) -> Value {
    match (asked, kind) {
        (false, _) => Value::Null,
        (true, Kind::Chat) => logprobs::chat(&s.tokenizer, tokens),
        (true, Kind::Completion) => logprobs::completion(&s.tokenizer, tokens, offsets),
    }
}

/// The whole reply as one object, its choices in order.
async fn collect(s: Arc<AppState>, receivers: Vec<mpsc::UnboundedReceiver<Event>>, r: Reply) -> ApiResult<Json<Value>> {
    let mut choices = Vec::with_capacity(receivers.len());
    let mut completion_tokens = 0;
    for (index, mut rx) in receivers.into_iter().enumerate() {
        let mut text = String::new();
        let mut tokens = Vec::new();
        let mut scored = Vec::new();
        let done = loop {
            match rx.recv().await {
                Some(Event::Text(t)) => text += &t,
                Some(Event::Logprobs(t)) => tokens.push(t),
                Some(Event::PromptLogprobs(p)) => scored = p,
                Some(Event::Failed(e)) => return Err(server_error(e)),
                Some(Event::Done(f)) => break f,
                None => return Err(server_error("the engine ended the request without an answer")),
            }
        };
        completion_tokens += done.completion_tokens;
        let mut offsets = TextOffsets::default();
        let lead = r.echo[index].as_ref().map(|e| echoed(&s, e, r.asked, &scored, &mut offsets));
        let mut lp = logprobs_value(&s, r.kind, r.asked, &tokens, &mut offsets);
        if let Some((echo_text, echo_lp)) = lead {
            text = echo_text + &text;
            lp = if r.asked { logprobs::append(echo_lp, &lp) } else { Value::Null };
        }
        choices.push(match r.kind {
            Kind::Chat => json!({"index": index, "message": {"role": "assistant", "content": text}, "logprobs": lp, "finish_reason": reason(&done)}),
            Kind::Completion => json!({"index": index, "text": text, "logprobs": lp, "finish_reason": reason(&done)}),
        });
    }
    let object = if r.kind == Kind::Chat { "chat.completion" } else { "text_completion" };
    Ok(Json(json!({
        "id": r.id, "object": object, "created": now(), "model": s.opts.model_name,
        "choices": choices, "usage": usage(r.prompt_tokens, completion_tokens), "system_fingerprint": null,
    })))
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The reply as Server-Sent Events in OpenAI's chunk format, ending with `data: [DONE]` once
/// every choice has finished (chunks of several choices interleave, each naming its `index`);
/// with log-probabilities each text chunk carries those of the tokens it completes, and tokens
/// whose text never came (a stop string cut it) a last chunk of no text before the choice ends.
fn stream(s: Arc<AppState>, receivers: Vec<mpsc::UnboundedReceiver<Event>>, r: Reply, include_usage: bool) -> Sse<impl futures_util::Stream<Item = Result<SseEvent, Infallible>>> {
    let created = now();
    let model = s.opts.model_name.clone();
    let (kind, asked, total) = (r.kind, r.asked, receivers.len());
    let object = if kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" };
    let id = r.id;
    let chunk = move |choice: Value, usage: Option<Value>| -> SseEvent {
        let mut v = json!({"id": id, "object": object, "created": created, "model": model, "system_fingerprint": null,
                           "choices": if choice.is_null() { json!([]) } else { json!([choice]) }});
        if let Some(u) = usage {
            v["usage"] = u;
        } else if include_usage {
            v["usage"] = Value::Null;
        }
        SseEvent::default().data(v.to_string())
    };
    let delta = move |index: usize, text: Option<&str>, lp: Value, finish: Option<&str>| -> Value {
        match kind {
            Kind::Chat => {
                let d = match text {
                    Some(t) => json!({"content": t}),
                    None => json!({}),
                };
                json!({"index": index, "delta": d, "logprobs": lp, "finish_reason": finish})
            }
            Kind::Completion => json!({"index": index, "text": text.unwrap_or(""), "logprobs": lp, "finish_reason": finish}),
        }
    };
    // Per choice: the tokens whose text has not come yet, and where the legacy API's offsets stand.
    let mut pending: Vec<(Vec<TokenLogprob>, TextOffsets)> = (0..total).map(|_| Default::default()).collect();
    // A chat reply's role first; an echoed prompt at once, or with its scores when they come.
    let first: Vec<SseEvent> = match kind {
        Kind::Chat => (0..total).map(|i| chunk(json!({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}), None)).collect(),
        Kind::Completion => (0..total)
            .filter(|_| !asked)
            .filter_map(|i| r.echo[i].as_ref().map(|e| chunk(delta(i, Some(&e.text), Value::Null, None), None)))
            .collect(),
    };
    let echo = r.echo;
    let (mut finished, mut completion_tokens, prompt_tokens) = (0, 0, r.prompt_tokens);
    let merged = futures_util::stream::select_all(receivers.into_iter().enumerate().map(|(i, rx)| tokio_stream::wrappers::UnboundedReceiverStream::new(rx).map(move |ev| (i, ev))));
    let events = merged.scan(false, move |ended, (i, ev)| {
        if *ended {
            return futures_util::future::ready(None);
        }
        let (tokens, offsets) = &mut pending[i];
        let mut lp = |tokens: &mut Vec<TokenLogprob>| logprobs_value(&s, kind, asked, &std::mem::take(tokens), offsets);
        let out: Vec<SseEvent> = match ev {
            Event::Logprobs(t) => {
                tokens.push(t);
                vec![]
            }
            Event::PromptLogprobs(scored) => match &echo[i] {
                Some(e) => {
                    let (text, lp) = echoed(&s, e, asked, &scored, offsets);
                    vec![chunk(delta(i, Some(&text), lp, None), None)]
                }
                None => vec![],
            },
            Event::Text(t) => vec![chunk(delta(i, Some(&t), lp(tokens), None), None)],
            Event::Done(f) => {
                let mut v = Vec::new();
                if !tokens.is_empty() {
                    v.push(chunk(delta(i, Some(""), lp(tokens), None), None));
                }
                v.push(chunk(delta(i, None, Value::Null, Some(reason(&f))), None));
                (finished, completion_tokens) = (finished + 1, completion_tokens + f.completion_tokens);
                if finished == total {
                    if include_usage {
                        v.push(chunk(Value::Null, Some(usage(prompt_tokens, completion_tokens))));
                    }
                    v.push(SseEvent::default().data("[DONE]"));
                    *ended = true;
                }
                v
            }
            Event::Failed(e) => {
                // The other choices end with the stream: their receivers are dropped.
                *ended = true;
                let err = server_error(e).body();
                vec![SseEvent::default().data(err.to_string()), SseEvent::default().data("[DONE]")]
            }
        };
        futures_util::future::ready(Some(out))
    });
    let events = events.flat_map(|out| futures_util::stream::iter(out.into_iter().map(Ok)));
    Sse::new(futures_util::stream::iter(first.into_iter().map(Ok)).chain(events)).keep_alive(axum::response::sse::KeepAlive::default())
}
