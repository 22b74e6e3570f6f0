//! A reply in OpenAI's shapes from the engine's events: one object with every choice
//! ([`collect`]) or Server-Sent Events ([`stream`]), with the choices' log-probabilities and
//! echoed prompts.
use super::logprobs::{self, TextOffsets};
use super::openai::{ApiError, ApiResult, ToolCalls};
use super::tool_parser::{self, Piece};
use super::AppState;
use crate::engine::logprobs::TokenLogprob;
use crate::engine::scheduler::{Event, Finish, FinishReason};
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::Json;
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::Arc;
use tokio::sync::mpsc;

/// The two completion endpoints differ in how the prompt is made and how chunks look.
#[derive(Clone, Copy, PartialEq)]
pub enum Kind {
    Chat,
    Completion,
}

/// A 500 in OpenAI's shape, for what went wrong on our side.
pub fn server_error(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", None, e.to_string())
}

/// What every choice of one reply shares.
pub struct Reply {
    pub id: String,
    pub kind: Kind,
    /// Whether the request asked for log-probabilities.
    pub asked: bool,
    /// The prompts' tokens, each prompt counted once whatever `n` (as OpenAI and vLLM count them).
    pub prompt_tokens: usize,
    /// Per choice, the prompt that leads its text (`echo`).
    pub echo: Vec<Option<Echo>>,
    /// How a chat reply's text calls tools (`tool_choice`), if it does: a named call's text is
    /// its arguments, a required choice's a JSON list of `{"name", "parameters"}`, an auto
    /// reply's text may hold calls in the model's own syntax.
    pub tools: Option<ToolCalls>,
}

/// One call in OpenAI's shape (`arguments` as JSON text), with a new id.
fn tool_call(name: &str, arguments: &str) -> Value {
    json!({"id": format!("call_{}", super::routes::next_id()), "type": "function", "function": {"name": name, "arguments": arguments}})
}

/// Calls (name, arguments) in OpenAI's shape, each with a new id.
fn tool_calls(calls: &[(String, String)]) -> Vec<Value> {
    calls.iter().map(|(name, arguments)| tool_call(name, arguments)).collect()
}

/// A call as a streamed delta holds it: [`tool_call`] with its place among the reply's calls.
fn tool_call_delta(index: usize, name: &str, arguments: &str) -> Value {
    let mut call = tool_call(name, arguments);
    call["index"] = json!(index);
    call
}

/// The calls (name, arguments) a required tool choice's text holds, or `None` where it is not a
/// whole list (cut by `max_tokens`).
fn required_calls(text: &str) -> Option<Vec<(String, String)>> {
    let list: Vec<Value> = serde_json::from_str(text).ok()?;
    list.iter().map(|c| Some((c.get("name")?.as_str()?.to_string(), c.get("parameters")?.to_string()))).collect()
}

/// A chat choice's `message` and `finish_reason` for `text`, with tool calls where it makes
/// them: a named function's call ends as the reply did (`stop`, as vLLM and OpenAI end a forced
/// call), a required choice's whole list with `tool_calls`; a list cut short stays text.
fn chat_message(text: String, tools: Option<&ToolCalls>, done: &Finish) -> (Value, &'static str) {
    match tools {
        Some(ToolCalls::Named(t)) => (json!({"role": "assistant", "content": null, "tool_calls": [tool_call(&t.name, &text)]}), reason(done)),
        Some(ToolCalls::Required(..)) => match required_calls(&text) {
            Some(calls) => (json!({"role": "assistant", "content": null, "tool_calls": tool_calls(&calls)}), "tool_calls"),
            None => (json!({"role": "assistant", "content": text}), reason(done)),
        },
        Some(ToolCalls::Auto(parser)) => match tool_parser::parse(*parser, &text) {
            (_, calls) if calls.is_empty() => (json!({"role": "assistant", "content": text}), reason(done)),
            (content, calls) => (json!({"role": "assistant", "content": content, "tool_calls": tool_calls(&calls)}), "tool_calls"),
        },
        None => (json!({"role": "assistant", "content": text}), reason(done)),
    }
}

/// A prompt echoed at the start of a legacy completion's text.
pub struct Echo {
    pub text: String,
    pub tokens: Vec<u32>,
}

/// The text and `logprobs` (null unless asked for) that an echoed prompt leads a choice with;
/// `scored`: the engine's scores of its tokens after the first.
fn echoed(s: &AppState, e: &Echo, asked: bool, scored: &[TokenLogprob], offsets: &mut TextOffsets) -> (String, Value) {
    let lp = if asked { logprobs::echoed_prompt(&s.tokenizer, &e.tokens, scored, offsets) } else { Value::Null };
    (e.text.clone(), lp)
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
pub async fn collect(s: Arc<AppState>, receivers: Vec<mpsc::UnboundedReceiver<Event>>, r: Reply) -> ApiResult<Json<Value>> {
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
            Kind::Chat => {
                let (message, finish) = chat_message(text, r.tools.as_ref(), &done);
                json!({"index": index, "message": message, "logprobs": lp, "finish_reason": finish})
            }
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
/// A named tool call streams its arguments as `tool_calls` deltas (the first with the call's id
/// and name); a required choice's list is parsed whole, its calls sent in one chunk at the end;
/// with `auto`, text outside the model's call blocks streams as content and each block, once
/// closed, as one `tool_calls` delta per call.
pub fn stream(s: Arc<AppState>, receivers: Vec<mpsc::UnboundedReceiver<Event>>, r: Reply, include_usage: bool) -> Sse<impl futures_util::Stream<Item = Result<SseEvent, Infallible>>> {
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
    let tools = r.tools.clone();
    // Per choice: whether its named call's first delta (id and name) went out.
    let mut call_opened = vec![false; total];
    let delta = move |index: usize, text: Option<&str>, lp: Value, finish: Option<&str>, opened: &mut bool| -> Value {
        match kind {
            Kind::Chat => {
                let d = match (text, &tools) {
                    (Some(t), Some(ToolCalls::Named(tool))) if !std::mem::replace(opened, true) => json!({"tool_calls": [tool_call_delta(0, &tool.name, t)]}),
                    (Some(t), Some(ToolCalls::Named(_))) => json!({"tool_calls": [{"index": 0, "function": {"arguments": t}}]}),
                    (Some(t), _) => json!({"content": t}),
                    (None, _) => json!({}),
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
            .filter_map(|i| r.echo[i].as_ref().map(|e| chunk(delta(i, Some(&e.text), Value::Null, None, &mut false), None)))
            .collect(),
    };
    let echo = r.echo;
    let required = matches!(r.tools, Some(ToolCalls::Required(..)));
    let auto = if let Some(ToolCalls::Auto(parser)) = r.tools { Some(parser) } else { None };
    // Per choice, a required tool choice's text until it is whole; with auto, the scanner of
    // its text and the calls found so far.
    let mut held = vec![String::new(); total];
    let mut scanners: Vec<(tool_parser::Scanner, usize)> = auto.map_or_else(Vec::new, |p| (0..total).map(|_| (tool_parser::Scanner::new(p), 0)).collect());
    // Chunks of an auto reply's pieces, the pending log-probabilities with the first.
    let pieces_chunks = move |i: usize, pieces: Vec<Piece>, lp: &mut dyn FnMut() -> Value, calls: &mut usize| -> Vec<Value> {
        pieces
            .into_iter()
            .map(|p| {
                let d = match p {
                    Piece::Text(t) => json!({"content": t}),
                    Piece::Call { name, arguments } => {
                        *calls += 1;
                        json!({"tool_calls": [tool_call_delta(*calls - 1, &name, &arguments)]})
                    }
                };
                json!({"index": i, "delta": d, "logprobs": lp(), "finish_reason": null})
            })
            .collect()
    };
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
                    vec![chunk(delta(i, Some(&text), lp, None, &mut call_opened[i]), None)]
                }
                None => vec![],
            },
            Event::Text(t) if required => {
                held[i] += &t;
                vec![]
            }
            Event::Text(t) if auto.is_some() => {
                let (scanner, calls) = &mut scanners[i];
                let pieces = scanner.push(&t);
                pieces_chunks(i, pieces, &mut || lp(tokens), calls).into_iter().map(|c| chunk(c, None)).collect()
            }
            Event::Text(t) => vec![chunk(delta(i, Some(&t), lp(tokens), None, &mut call_opened[i]), None)],
            Event::Done(f) => {
                let mut v = Vec::new();
                let mut finish = reason(&f);
                if required {
                    let text = std::mem::take(&mut held[i]);
                    let d = match required_calls(&text) {
                        Some(calls) => {
                            finish = "tool_calls";
                            let calls: Vec<Value> = calls.iter().enumerate().map(|(k, (name, arguments))| tool_call_delta(k, name, arguments)).collect();
                            json!({"tool_calls": calls})
                        }
                        None => json!({"content": text}),
                    };
                    v.push(chunk(json!({"index": i, "delta": d, "logprobs": lp(tokens), "finish_reason": null}), None));
                } else if auto.is_some() {
                    let (scanner, calls) = &mut scanners[i];
                    let pieces = scanner.finish();
                    v.extend(pieces_chunks(i, pieces, &mut || lp(tokens), calls).into_iter().map(|c| chunk(c, None)));
                    if *calls > 0 {
                        finish = "tool_calls";
                    }
                }
                if !required && !tokens.is_empty() {
                    v.push(chunk(delta(i, Some(""), lp(tokens), None, &mut call_opened[i]), None));
                }
                v.push(chunk(delta(i, None, Value::Null, Some(finish), &mut call_opened[i]), None));
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
