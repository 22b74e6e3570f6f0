//! `awq-run serve` end to end: the real binary on a random loopback port, on the tiny model,
//! driven by a real HTTP client (ureq): OpenAI objects and chunks, stop strings, limits, many
//! concurrent streams against the same requests alone, a client that goes away, every bad input
//! with its status and error JSON, the API key, a full queue, the prefix cache,
//! log-probabilities, several choices and prompts in one request, prompts of token ids, the
//! tokenizer endpoints and echoed prompts scored.
mod common;
use common::TinySpec;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::process::Child;
use std::time::{Duration, Instant};

struct Server {
    child: Child,
    base: String,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the server on the tiny llama with `extra` flags; returns once it listens.
fn start(extra: &[&str]) -> Server {
    start_with(TinySpec::new(awq_run::model::Arch::Llama), extra)
}

fn start_with(spec: TinySpec, extra: &[&str]) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let model = spec.write_dir(&dir.path().join("tiny"));
    let (child, base) = common::spawn_server(&model, extra);
    Server { child, base, _dir: dir }
}

impl Server {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
    /// POSTs `body`; returns the status and the parsed JSON (error statuses included).
    fn post(&self, path: &str, body: &str, key: Option<&str>) -> (u16, Value, Option<String>) {
        let mut r = ureq::post(&self.url(path)).set("Content-Type", "application/json");
        if let Some(k) = key {
            r = r.set("Authorization", &format!("Bearer {k}"));
        }
        let resp = match r.send_string(body) {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{path}: {e}"),
        };
        let (status, retry) = (resp.status(), resp.header("Retry-After").map(str::to_string));
        (status, resp.into_json().unwrap(), retry)
    }
    fn chat(&self, body: Value) -> Value {
        let (status, v, _) = self.post("/v1/chat/completions", &body.to_string(), None);
        assert_eq!(status, 200, "{v}");
        v
    }
    /// A streamed chat completion: the content, the chunks, and whether [DONE] came last.
    fn stream(&self, mut body: Value) -> (String, Vec<Value>) {
        body["stream"] = json!(true);
        let resp = ureq::post(&self.url("/v1/chat/completions")).send_string(&body.to_string()).unwrap();
        assert_eq!(resp.header("Content-Type"), Some("text/event-stream"));
        let mut chunks = Vec::new();
        let mut done = false;
        for line in BufReader::new(resp.into_reader()).lines() {
            let line = line.unwrap();
            let Some(data) = line.strip_prefix("data: ") else { continue };
            assert!(!done, "data after [DONE]");
            if data == "[DONE]" {
                done = true;
                continue;
            }
            chunks.push(serde_json::from_str::<Value>(data).unwrap());
        }
        assert!(done, "the stream did not end with [DONE]");
        let text = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
        (text, chunks)
    }
    /// Sends each request alone, then all of them at once as streams: every reply must be the
    /// same both ways (`how`: what the batch was, for the message).
    fn assert_batched_as_alone(&self, requests: &[Value], how: &str) {
        let alone: Vec<String> = requests.iter().map(|r| self.chat(r.clone())["choices"][0]["message"]["content"].as_str().unwrap().to_string()).collect();
        let batched: Vec<String> = std::thread::scope(|scope| {
            let handles: Vec<_> = requests.iter().map(|r| scope.spawn(|| self.stream(r.clone()).0)).collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (i, (a, b)) in alone.iter().zip(&batched).enumerate() {
            assert_eq!(a, b, "request {i}: alone vs {how}");
        }
    }
    fn metric(&self, name: &str) -> f64 {
        let text = ureq::get(&self.url("/metrics")).call().unwrap().into_string().unwrap();
        text.lines()
            .find(|l| l.starts_with(&format!("awq_run_{name}{{")))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no metric {name} in\n{text}"))
    }
}

fn greedy(content: &str, max_tokens: usize) -> Value {
    json!({"messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": max_tokens})
}

#[test]
fn chat_completions_streamed_and_whole_agree() {
    let s = start(&[]);
    let v = s.chat(greedy("hello there", 12));
    assert_eq!(v["object"], "chat.completion");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    let choice = &v["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    let text = choice["message"]["content"].as_str().unwrap().to_string();
    let u = &v["usage"];
    let completion = u["completion_tokens"].as_u64().unwrap();
    assert!(u["prompt_tokens"].as_u64().unwrap() > 3 && completion <= 12, "{u}");
    assert_eq!(u["total_tokens"].as_u64().unwrap(), u["prompt_tokens"].as_u64().unwrap() + completion);
    let finish = choice["finish_reason"].as_str().unwrap();
    assert!(finish == "stop" || (finish == "length" && completion == 12), "{finish} after {completion}");

    let mut body = greedy("hello there", 12);
    body["stream_options"] = json!({"include_usage": true});
    let (streamed, chunks) = s.stream(body);
    assert_eq!(streamed, text, "greedy: the stream and the whole answer are the same text");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["id"], chunks[0]["id"]);
    }
    let last_choice = chunks.iter().rev().find(|c| !c["choices"].as_array().unwrap().is_empty()).unwrap();
    assert_eq!(last_choice["choices"][0]["finish_reason"], finish);
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"].as_array().unwrap().len(), 0);
    assert_eq!(usage["usage"], *u);

    // The plain completion endpoint, the model list, health and metrics.
    let (status, c, _) = s.post("/v1/completions", &json!({"prompt": "hello", "max_tokens": 5, "temperature": 0}).to_string(), None);
    assert_eq!(status, 200, "{c}");
    assert_eq!(c["object"], "text_completion");
    assert!(c["choices"][0]["text"].is_string());
    let models: Value = ureq::get(&s.url("/v1/models")).call().unwrap().into_json().unwrap();
    assert_eq!(models["data"][0]["id"], "tiny");
    assert_eq!(models["data"][0]["max_model_len"], 256);
    let health: Value = ureq::get(&s.url("/health")).call().unwrap().into_json().unwrap();
    assert_eq!(health["status"], "ok");
    assert!(s.metric("requests_total") >= 3.0);
    assert!(s.metric("generation_tokens_total") >= 1.0);
    assert_eq!(s.metric("time_to_first_token_seconds_count"), s.metric("requests_finished_total"));
    let page = ureq::get(&s.url("/")).call().unwrap().into_string().unwrap();
    assert!(page.contains("<title>awq-run chat</title>"));
}

/// The bytes of the tokens a chat `logprobs.content` list holds, end to end.
fn logprob_bytes(content: &[Value]) -> Vec<u8> {
    content.iter().flat_map(|c| c["bytes"].as_array().unwrap().iter().map(|b| b.as_u64().unwrap() as u8)).collect()
}

#[test]
fn log_probabilities_come_with_every_generated_token() {
    let s = start(&[]);
    let mut body = greedy("tell the hero", 16);
    body["logprobs"] = json!(true);
    body["top_logprobs"] = json!(3);
    let v = s.chat(body.clone());
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap().clone();
    assert_eq!(content.len() as u64, v["usage"]["completion_tokens"].as_u64().unwrap(), "one entry per generated token");
    for c in &content {
        let (lp, top) = (c["logprob"].as_f64().unwrap(), c["top_logprobs"].as_array().unwrap());
        assert!(lp <= 0.0 && top.len() == 3, "{c}");
        // Greedy: the generated token is the most likely one, and the alternatives fall.
        assert_eq!((&top[0]["token"], top[0]["logprob"].as_f64().unwrap()), (&c["token"], lp), "{c}");
        assert!(top.windows(2).all(|w| w[0]["logprob"].as_f64() >= w[1]["logprob"].as_f64()), "{c}");
        let p: f64 = top.iter().map(|t| t["logprob"].as_f64().unwrap().exp()).sum();
        assert!(p <= 1.0 + 1e-5, "{c}");
    }
    // The tokens' bytes are the reply (the tiny model's specials, which the text leaves out,
    // aside).
    let mut joined = String::from_utf8_lossy(&logprob_bytes(&content)).into_owned();
    for special in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] {
        joined = joined.replace(special, "");
    }
    assert_eq!(joined, text);
    // Without asking, none; streamed, the chunks carry the same entries in order.
    assert!(s.chat(greedy("tell the hero", 16))["choices"][0]["logprobs"].is_null());
    let (streamed, chunks) = s.stream(body);
    assert_eq!(streamed, text);
    let in_chunks: Vec<Value> = chunks.iter().filter_map(|c| c["choices"][0]["logprobs"]["content"].as_array()).flatten().cloned().collect();
    assert_eq!(in_chunks, content);

    // The legacy endpoint's shape: tokens, their log-probabilities, alternatives holding the
    // generated token, offsets into the text.
    let (status, v, _) = s.post("/v1/completions", &json!({"prompt": "the world", "max_tokens": 10, "temperature": 0, "logprobs": 2}).to_string(), None);
    assert_eq!(status, 200, "{v}");
    let lp = &v["choices"][0]["logprobs"];
    let tokens = lp["tokens"].as_array().unwrap();
    assert_eq!(tokens.len() as u64, v["usage"]["completion_tokens"].as_u64().unwrap(), "{v}");
    let offsets: Vec<u64> = lp["text_offset"].as_array().unwrap().iter().map(|o| o.as_u64().unwrap()).collect();
    assert!(offsets.first() == Some(&0) && offsets.windows(2).all(|w| w[0] <= w[1]), "{v}");
    for (i, t) in tokens.iter().enumerate() {
        let top = lp["top_logprobs"][i].as_object().unwrap();
        assert!(top.contains_key(t.as_str().unwrap()) && top.len() <= 3, "{v}");
        assert_eq!(top[t.as_str().unwrap()], lp["token_logprobs"][i], "{v}");
    }
}

#[test]
fn token_id_prompts_and_the_tokenizer_endpoints() {
    let s = start(&[]);
    let post = |path: &str, body: Value| {
        let (status, v, _) = s.post(path, &body.to_string(), None);
        (status, v)
    };
    let (status, t) = post("/tokenize", json!({"prompt": "the world"}));
    assert_eq!(status, 200, "{t}");
    let ids = t["tokens"].clone();
    assert_eq!((t["count"].as_u64(), &t["max_model_len"]), (Some(ids.as_array().unwrap().len() as u64), &json!(256)), "{t}");
    // A prompt of token ids answers as its text does; several mix.
    let ask = |prompt: Value| post("/v1/completions", json!({"prompt": prompt, "max_tokens": 6, "temperature": 0})).1;
    let by_text = ask(json!("the world"));
    let by_ids = ask(ids.clone());
    assert_eq!((&by_ids["choices"][0]["text"], &by_ids["usage"]), (&by_text["choices"][0]["text"], &by_text["usage"]));
    let both = ask(json!([ids.clone(), "the world"]));
    assert_eq!(both["choices"][0]["text"], both["choices"][1]["text"]);
    assert_eq!(post("/detokenize", json!({"tokens": ids})).1["prompt"], "the world");
    // Messages go through the chat template as a chat request's do.
    let msgs = json!([{"role": "user", "content": "hello there"}]);
    let counted = post("/tokenize", json!({"messages": msgs})).1["count"].clone();
    assert_eq!(counted, s.chat(json!({"messages": msgs, "max_tokens": 1}))["usage"]["prompt_tokens"]);
    let bare = post("/tokenize", json!({"messages": msgs, "add_generation_prompt": false})).1["count"].as_u64().unwrap();
    assert!(bare < counted.as_u64().unwrap());
    // Ids outside the vocabulary, and missing fields, are named.
    for (path, body, param) in [
        ("/v1/completions", json!({"prompt": [5, 100000]}), "prompt"),
        ("/v1/completions", json!({"prompt": ["x", [100000]]}), "prompt[1]"),
        ("/detokenize", json!({"tokens": [-1]}), "tokens"),
        ("/detokenize", json!({}), "tokens"),
        ("/tokenize", json!({}), "prompt"),
        ("/tokenize", json!({"messages": "x"}), "messages"),
    ] {
        let (status, v) = post(path, body.clone());
        assert_eq!((status, &v["error"]["param"]), (400, &json!(param)), "{path} {body}: {v}");
    }
    s.chat(greedy("still serving", 2));
}

/// The chunks of a streamed legacy completion.
fn stream_completion(s: &Server, mut body: Value) -> Vec<Value> {
    body["stream"] = json!(true);
    let resp = ureq::post(&s.url("/v1/completions")).send_string(&body.to_string()).unwrap();
    BufReader::new(resp.into_reader())
        .lines()
        .map(Result::unwrap)
        .filter_map(|l| l.strip_prefix("data: ").filter(|d| *d != "[DONE]").map(|d| serde_json::from_str(d).unwrap()))
        .collect()
}

#[test]
fn an_echoed_prompt_is_scored_as_the_model_scores_it() {
    let s = start(&[]);
    let prompt = "tell the other hero the order of the world";
    // Scoring alone (lm-eval's loglikelihood request): max_tokens 0, echo, logprobs.
    let (status, v, _) = s.post("/v1/completions", &json!({"prompt": prompt, "max_tokens": 0, "echo": true, "logprobs": 2, "temperature": 0}).to_string(), None);
    assert_eq!(status, 200, "{v}");
    let c = &v["choices"][0];
    assert_eq!((c["text"].as_str(), &c["finish_reason"], &v["usage"]["completion_tokens"]), (Some(prompt), &json!("length"), &json!(0)), "{v}");
    let lp = &c["logprobs"];
    let n = v["usage"]["prompt_tokens"].as_u64().unwrap() as usize;
    assert_eq!(lp["tokens"].as_array().unwrap().len(), n);
    assert!(lp["token_logprobs"][0].is_null() && lp["top_logprobs"][0].is_null(), "{lp}");
    let served: f64 = (1..n).map(|i| lp["token_logprobs"][i].as_f64().unwrap()).sum();
    // The library's own scoring of the same tokens (the perplexity path).
    let ids: Vec<u32> = s.post("/tokenize", &json!({"prompt": prompt}).to_string(), None).1["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect();
    let model = awq_run::assets::ModelAssets::load(s._dir.path().join("tiny").to_str().unwrap()).unwrap().load_model(&candle_core::Device::Cpu, candle_core::DType::F32).unwrap();
    let logits = model.forward_all(&candle_core::Tensor::new(ids.as_slice(), &candle_core::Device::Cpu).unwrap().unsqueeze(0).unwrap()).unwrap();
    let nll = awq_run::engine::eval::window_nll(&logits.get(0).unwrap(), &ids).unwrap();
    assert!((served + nll).abs() < 1e-3 * nll.abs().max(1.0), "served {served} vs the library's {}", -nll);

    // With tokens generated after it: the prompt leads the text and the lists; the generated part
    // is what the request without echo gives.
    let body = json!({"prompt": prompt, "max_tokens": 5, "echo": true, "logprobs": 1, "temperature": 0});
    let (_, v, _) = s.post("/v1/completions", &body.to_string(), None);
    let (_, plain, _) = s.post("/v1/completions", &json!({"prompt": prompt, "max_tokens": 5, "temperature": 0}).to_string(), None);
    let text = v["choices"][0]["text"].as_str().unwrap();
    assert_eq!(text, format!("{prompt}{}", plain["choices"][0]["text"].as_str().unwrap()));
    let generated = v["usage"]["completion_tokens"].as_u64().unwrap() as usize;
    assert_eq!(v["choices"][0]["logprobs"]["tokens"].as_array().unwrap().len(), n + generated, "{v}");
    // Streamed: the prompt and its scores first, then the rest, the same in all.
    let chunks = stream_completion(&s, body);
    assert_eq!(chunks[0]["choices"][0]["text"], prompt);
    let streamed: String = chunks.iter().filter_map(|c| c["choices"][0]["text"].as_str()).collect();
    assert_eq!(streamed, text);
    let lists: Vec<Value> = chunks.iter().filter_map(|c| c["choices"][0]["logprobs"]["token_logprobs"].as_array()).flatten().cloned().collect();
    assert_eq!(Value::Array(lists), v["choices"][0]["logprobs"]["token_logprobs"]);
    // echo without logprobs only leads the text; 0 tokens without echo, and echo in chat, are refused.
    let (_, v, _) = s.post("/v1/completions", &json!({"prompt": prompt, "max_tokens": 2, "echo": true}).to_string(), None);
    assert!(v["choices"][0]["text"].as_str().unwrap().starts_with(prompt) && v["choices"][0]["logprobs"].is_null(), "{v}");
    let (status, v, _) = s.post("/v1/completions", &json!({"prompt": prompt, "max_tokens": 0}).to_string(), None);
    assert_eq!((status, &v["error"]["param"]), (400, &json!("max_tokens")), "{v}");
    let (status, v, _) = s.post("/v1/chat/completions", &json!({"messages": [{"role": "user", "content": "x"}], "echo": true}).to_string(), None);
    assert_eq!((status, &v["error"]["param"]), (400, &json!("echo")), "{v}");
}

#[test]
fn stop_token_ids_end_a_reply_and_min_tokens_holds_them_back() {
    let s = start(&[]);
    let tok = awq_run::assets::tokenizer::from_value(&TinySpec::new(awq_run::model::Arch::Llama).tokenizer_json()).unwrap();
    let id_of = |bytes: &[u8]| (0..tok.get_vocab_size(true) as u32).find(|&i| awq_run::assets::tokenizer::token_bytes(&tok, i) == bytes).unwrap();
    let mut body = greedy("tell the hero", 10);
    body["ignore_eos"] = json!(true);
    body["logprobs"] = json!(true);
    let v = s.chat(body.clone());
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap().clone();
    let ids: Vec<u32> = content.iter().map(|c| id_of(&logprob_bytes(std::slice::from_ref(c)))).collect();
    // The first token after the second that did not come before.
    let k = (2..ids.len()).find(|&k| !ids[..k].contains(&ids[k])).expect("a new token among ten");
    body["stop_token_ids"] = json!([ids[k]]);
    let stopped = s.chat(body.clone());
    assert_eq!((&stopped["usage"]["completion_tokens"], &stopped["choices"][0]["finish_reason"]), (&json!(k), &json!("stop")), "{stopped}");
    let want = String::from_utf8_lossy(&logprob_bytes(&content[..k])).into_owned();
    assert_eq!(stopped["choices"][0]["message"]["content"], want);
    // Held back until min_tokens: the reply goes on past where it stopped.
    body["min_tokens"] = json!(k + 2);
    let held = s.chat(body);
    let n = held["usage"]["completion_tokens"].as_u64().unwrap() as usize;
    assert!(n >= k + 2, "{held}");
    let held_ids: Vec<u32> = held["choices"][0]["logprobs"]["content"].as_array().unwrap().iter().map(|c| id_of(&logprob_bytes(std::slice::from_ref(c)))).collect();
    assert_eq!(&held_ids[..k], &ids[..k]);
    assert!(!held_ids[..k + 2].contains(&ids[k]), "{held_ids:?}");
}

/// Structured output: replies held to a list of choices, a regular expression or a JSON schema,
/// sampled (several seeds, batched together as `n` choices) and greedy, streamed and whole, in
/// both endpoints; a grammar's end ends the reply even under `ignore_eos`.
#[test]
fn structured_output_holds_replies_to_their_grammar() {
    let s = start(&[]);
    let chat = |extra: Value| {
        let mut body = json!({"messages": [{"role": "user", "content": "answer me"}], "temperature": 1.0, "max_tokens": 40, "n": 6, "seed": 3});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        let v = s.chat(body);
        v["choices"].as_array().unwrap().iter().map(|c| (c["message"]["content"].as_str().unwrap().to_string(), c["finish_reason"].as_str().unwrap().to_string())).collect::<Vec<_>>()
    };
    for (text, finish) in chat(json!({"guided_choice": ["yes", "no", "maybe not"]})) {
        assert!(["yes", "no", "maybe not"].contains(&text.as_str()) && finish == "stop", "{text:?} {finish}");
    }
    for (text, finish) in chat(json!({"guided_regex": "[0-9]{3}-[a-c]{2,4}", "ignore_eos": true})) {
        let (digits, letters) = text.split_once('-').unwrap_or_else(|| panic!("{text:?}"));
        assert!(digits.len() == 3 && digits.bytes().all(|b| b.is_ascii_digit()), "{text:?}");
        assert!((2..=4).contains(&letters.len()) && letters.bytes().all(|b| (b'a'..=b'c').contains(&b)), "{text:?}");
        assert_eq!(finish, "stop");
    }
    let schema = json!({"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["answer", "n"], "additionalProperties": false, "x-guidance": {"whitespace_flexible": false}});
    let texts = chat(json!({"response_format": {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema, "strict": true}}}));
    let mut seen = std::collections::HashSet::new();
    for (text, finish) in texts {
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        assert!(v["answer"] == "yes" || v["answer"] == "no", "{v}");
        assert!(v["n"].as_u64().is_some_and(|n| n <= 9) && v.as_object().unwrap().len() == 2, "{v}");
        assert_eq!(finish, "stop");
        seen.insert(text);
    }
    assert!(seen.len() > 1, "six seeds drew one reply: {seen:?}");
    // Greedy, streamed and whole alike; the legacy endpoint too.
    let mut body = greedy("pick one", 20);
    body["guided_choice"] = json!(["alpha", "beta", "gamma"]);
    let whole = s.chat(body.clone())["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    assert!(["alpha", "beta", "gamma"].contains(&whole.as_str()), "{whole:?}");
    assert_eq!(s.stream(body).0, whole);
    let (status, v, _) = s.post("/v1/completions", &json!({"prompt": "the", "max_tokens": 30, "guided_regex": "(hello|world)!", "temperature": 0}).to_string(), None);
    assert_eq!(status, 200, "{v}");
    assert!(["hello!", "world!"].contains(&v["choices"][0]["text"].as_str().unwrap()), "{v}");
    // A grammar longer than max_tokens: cut there, as any reply.
    let (text, finish) = chat(json!({"guided_regex": "x{50}", "max_tokens": 5})).remove(0);
    assert_eq!((text.as_str(), finish.as_str()), ("xxxxx", "length"));
}

/// Tool calls: a named function's arguments held to its schema (whole and streamed as
/// `tool_calls` deltas), `required` calls of any of them as a list, a conversation that carries
/// calls and their results back; `auto`, tools in a legacy completion and tools beside another
/// format are refused by name.
#[test]
fn tool_calls_named_and_required() {
    // The tools' description takes some 500 tokens of the byte-level tokenizer.
    let s = start_with(TinySpec { max_pos: 2048, ..TinySpec::new(awq_run::model::Arch::Llama) }, &[]);
    let compact = json!({"whitespace_flexible": false});
    let tools = json!([
        {"type": "function", "function": {"name": "set_light", "description": "Turn a light on or off",
            "parameters": {"type": "object", "properties": {"on": {"type": "boolean"}, "room": {"enum": ["hall", "den"]}}, "required": ["on", "room"], "x-guidance": compact}}},
        {"type": "function", "function": {"name": "ring", "parameters": {"type": "object", "properties": {"times": {"type": "integer", "minimum": 1, "maximum": 3}}, "required": ["times"], "x-guidance": compact}}},
    ]);
    let body = |choice: Value| json!({"messages": [{"role": "user", "content": "lights please"}], "tools": tools, "tool_choice": choice, "temperature": 0, "max_tokens": 60});
    let named = json!({"type": "function", "function": {"name": "set_light"}});
    let v = s.chat(body(named.clone()));
    let choice = &v["choices"][0];
    assert_eq!((&choice["finish_reason"], &choice["message"]["content"]), (&json!("stop"), &Value::Null), "{v}");
    let call = &choice["message"]["tool_calls"][0];
    assert_eq!((&call["type"], &call["function"]["name"]), (&json!("function"), &json!("set_light")), "{v}");
    assert!(call["id"].as_str().unwrap().starts_with("call_"), "{v}");
    let args: Value = serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert!(args["on"].is_boolean() && (args["room"] == "hall" || args["room"] == "den") && args.as_object().unwrap().len() == 2, "{args}");
    // Streamed: the first delta names the call, the rest add to its arguments.
    let (_, chunks) = s.stream(body(named));
    let deltas: Vec<&Value> = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["tool_calls"].get(0)).collect();
    assert_eq!((&deltas[0]["function"]["name"], &deltas[0]["index"]), (&json!("set_light"), &json!(0)), "{chunks:?}");
    assert!(deltas[0]["id"].is_string() && deltas[1..].iter().all(|d| d.get("id").is_none()));
    let streamed: String = deltas.iter().map(|d| d["function"]["arguments"].as_str().unwrap()).collect();
    assert_eq!(streamed, call["function"]["arguments"].as_str().unwrap());
    // Required: a list of calls, each of a tool given.
    for stream in [false, true] {
        let calls: Vec<Value> = if stream {
            let (_, chunks) = s.stream(body(json!("required")));
            let finish = chunks.iter().rev().find_map(|c| c["choices"][0]["finish_reason"].as_str()).unwrap().to_string();
            assert_eq!(finish, "tool_calls");
            chunks.iter().filter_map(|c| c["choices"][0]["delta"]["tool_calls"].as_array()).flatten().cloned().collect()
        } else {
            let v = s.chat(body(json!("required")));
            assert_eq!(v["choices"][0]["finish_reason"], "tool_calls", "{v}");
            v["choices"][0]["message"]["tool_calls"].as_array().unwrap().clone()
        };
        assert!(!calls.is_empty());
        for c in &calls {
            let args: Value = serde_json::from_str(c["function"]["arguments"].as_str().unwrap()).unwrap();
            match c["function"]["name"].as_str().unwrap() {
                "set_light" => assert!(args["on"].is_boolean(), "{args}"),
                "ring" => assert!(args["times"].as_u64().is_some_and(|n| (1..=3).contains(&n)), "{args}"),
                other => panic!("a call of {other}"),
            }
        }
    }
    // A conversation that carries a call and its result back; "none" answers in text.
    let mut follow = body(json!("none"));
    follow["messages"] = json!([
        {"role": "user", "content": "lights please"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "set_light", "arguments": "{\"on\":true,\"room\":\"den\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "done"},
    ]);
    let v = s.chat(follow);
    assert!(v["choices"][0]["message"]["content"].is_string() && v["choices"][0]["message"].get("tool_calls").is_none(), "{v}");
    for (b, param) in [
        (json!({"messages": [{"role": "user", "content": "x"}], "tools": tools}), "tool_choice"),
        (json!({"messages": [{"role": "user", "content": "x"}], "tools": tools, "tool_choice": "required", "guided_regex": "a"}), "guided_regex"),
    ] {
        let (status, v, _) = s.post("/v1/chat/completions", &b.to_string(), None);
        assert_eq!((status, &v["error"]["param"]), (400, &json!(param)), "{v}");
    }
    let (status, v, _) = s.post("/v1/completions", &json!({"prompt": "x", "tools": tools}).to_string(), None);
    assert_eq!((status, &v["error"]["param"]), (400, &json!("tools")), "{v}");
}

/// `tool_choice: "auto"` with `--tool-call-parser hermes`: calls the model writes in
/// `<tool_call>` blocks are taken out of its text, whole and streamed (the reply is forced here
/// by a regex: a random model writes no calls of its own).
#[test]
fn auto_tool_calls_are_read_out_of_the_text() {
    let s = start_with(TinySpec { max_pos: 2048, ..TinySpec::new(awq_run::model::Arch::Llama) }, &["--tool-call-parser", "hermes"]);
    let tools = json!([{"type": "function", "function": {"name": "ring", "parameters": {"type": "object", "properties": {"times": {"type": "integer"}}}}}]);
    let body = |regex: &str| json!({"messages": [{"role": "user", "content": "ring twice"}], "tools": tools, "tool_choice": "auto", "temperature": 0, "max_tokens": 200, "guided_regex": regex});
    let with_call = r#"Sure\. <tool_call>\{"name": "ring", "arguments": \{"times": 2\}\}</tool_call>"#;
    let v = s.chat(body(with_call));
    let m = &v["choices"][0]["message"];
    assert_eq!((&m["content"], &v["choices"][0]["finish_reason"]), (&json!("Sure."), &json!("tool_calls")), "{v}");
    assert_eq!((&m["tool_calls"][0]["function"]["name"], &m["tool_calls"][0]["function"]["arguments"]), (&json!("ring"), &json!(r#"{"times":2}"#)), "{v}");
    let (content, chunks) = s.stream(body(with_call));
    assert_eq!(content, "Sure. ");
    let calls: Vec<&Value> = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["tool_calls"].get(0)).collect();
    assert_eq!(calls.len(), 1, "{chunks:?}");
    assert_eq!((&calls[0]["index"], &calls[0]["function"]["name"], &calls[0]["function"]["arguments"]), (&json!(0), &json!("ring"), &json!(r#"{"times":2}"#)));
    assert!(calls[0]["id"].is_string());
    let finish = chunks.iter().rev().find_map(|c| c["choices"][0]["finish_reason"].as_str()).unwrap();
    assert_eq!(finish, "tool_calls");
    // No block: a plain reply; a block that is not a call stays text.
    for (regex, text) in [("no call", "no call"), ("<tool_call>oops</tool_call>", "<tool_call>oops</tool_call>")] {
        let v = s.chat(body(regex));
        assert_eq!(v["choices"][0]["message"]["content"], text, "{v}");
        assert!(v["choices"][0]["message"].get("tool_calls").is_none() && v["choices"][0]["finish_reason"] == "stop", "{v}");
        assert_eq!(s.stream(body(regex)).0, text);
    }
}

/// `--tool-call-parser llama3_json`: a reply that is nothing but `{"name", "parameters"}` calls
/// (Llama 3's special `<|python_tag|>` left out of the text) is calls, streamed once it ends;
/// the tools are described in the system message with how to write a call.
#[test]
fn llama3_json_calls_are_read_out_of_the_text() {
    let s = start_with(TinySpec { max_pos: 2048, ..TinySpec::new(awq_run::model::Arch::Llama) }, &["--tool-call-parser", "llama3_json"]);
    let tools = json!([{"type": "function", "function": {"name": "ring", "parameters": {"type": "object", "properties": {"times": {"type": "integer"}}}}}]);
    let body = |regex: &str| json!({"messages": [{"role": "user", "content": "ring"}], "tools": tools, "temperature": 0, "max_tokens": 200, "guided_regex": regex});
    let calls = r#"\{"name": "ring", "parameters": \{"times": 2\}\}; \{"name": "ring", "parameters": \{\}\}"#;
    let v = s.chat(body(calls));
    let m = &v["choices"][0]["message"];
    assert_eq!((&m["content"], &v["choices"][0]["finish_reason"]), (&Value::Null, &json!("tool_calls")), "{v}");
    let got: Vec<(&Value, &Value)> = m["tool_calls"].as_array().unwrap().iter().map(|c| (&c["function"]["name"], &c["function"]["arguments"])).collect();
    assert_eq!(got, [(&json!("ring"), &json!(r#"{"times":2}"#)), (&json!("ring"), &json!("{}"))], "{v}");
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 40, "the tools and how to call them in the prompt: {v}");
    let (content, chunks) = s.stream(body(calls));
    assert_eq!(content, "");
    let deltas: Vec<&Value> = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["tool_calls"].get(0)).collect();
    assert_eq!(deltas.iter().map(|d| d["index"].as_u64().unwrap()).collect::<Vec<_>>(), [0, 1], "{chunks:?}");
    // Text is text, streamed as it comes; JSON that is not a call stays text.
    for text in ["no call", r#"{"answer": 2}"#] {
        let regex = text.replace('{', "\\{").replace('}', "\\}");
        let v = s.chat(body(&regex));
        assert_eq!((&v["choices"][0]["message"]["content"], &v["choices"][0]["finish_reason"]), (&json!(text), &json!("stop")), "{v}");
        assert_eq!(s.stream(body(&regex)).0, text);
    }
}

/// Without `--tool-call-parser`, a chat template that teaches `<tool_call>` blocks turns the
/// hermes parser on; `--tool-call-parser none` turns it off again; a template without tools
/// (the tiny model's ChatML) leaves `auto` refused.
#[test]
fn the_tool_call_parser_is_read_off_the_chat_template() {
    let dir = tempfile::tempdir().unwrap();
    let model = TinySpec { max_pos: 2048, ..TinySpec::new(awq_run::model::Arch::Llama) }.write_dir(&dir.path().join("tiny"));
    let config = model.join("tokenizer_config.json");
    let mut tc: Value = serde_json::from_slice(&std::fs::read(&config).unwrap()).unwrap();
    tc["chat_template"] = json!(format!("{{# calls come in <tool_call></tool_call> blocks #}}{}", tc["chat_template"].as_str().unwrap()));
    std::fs::write(&config, tc.to_string()).unwrap();
    let tools = json!([{"type": "function", "function": {"name": "ring", "parameters": {"type": "object", "properties": {}}}}]);
    let body = json!({"messages": [{"role": "user", "content": "ring"}], "tools": tools, "temperature": 0, "max_tokens": 100, "guided_regex": r#"<tool_call>\{"name": "ring", "arguments": \{\}\}</tool_call>"#});
    let (child, base) = common::spawn_server(&model, &[]);
    let s = Server { child, base, _dir: dir };
    let v = s.chat(body.clone());
    assert_eq!((&v["choices"][0]["message"]["tool_calls"][0]["function"]["name"], &v["choices"][0]["finish_reason"]), (&json!("ring"), &json!("tool_calls")), "{v}");
    let (child, base) = common::spawn_server(&model, &["--tool-call-parser", "none"]);
    let off = Server { child, base, _dir: tempfile::tempdir().unwrap() };
    let (status, v, _) = off.post("/v1/chat/completions", &body.to_string(), None);
    assert_eq!((status, &v["error"]["param"]), (400, &json!("tool_choice")), "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("--tool-call-parser"), "{v}");
    let plain = start(&[]);
    let (status, _, _) = plain.post("/v1/chat/completions", &body.to_string(), None);
    assert_eq!(status, 400, "ChatML names no syntax");
}

/// `logit_bias`: +100 all but forces a token, −100 bans it; log-probabilities stay the raw ones.
#[test]
fn logit_bias_forces_and_bans_tokens() {
    let s = start(&[]);
    let tok = awq_run::assets::tokenizer::from_value(&TinySpec::new(awq_run::model::Arch::Llama).tokenizer_json()).unwrap();
    let q = tok.token_to_id("q").unwrap();
    let mut body = greedy("hello there", 6);
    body["ignore_eos"] = json!(true);
    body["logprobs"] = json!(true);
    body["top_logprobs"] = json!(2);
    let plain = s.chat(body.clone());
    let first = &plain["choices"][0]["logprobs"]["content"][0];
    body["logit_bias"] = json!({q.to_string(): 100});
    let forced = s.chat(body.clone());
    assert_eq!(forced["choices"][0]["message"]["content"], "qqqqqq", "{forced}");
    let lp = forced["choices"][0]["logprobs"]["content"][0]["logprob"].as_f64().unwrap();
    assert!(lp < -0.5, "the raw log-probability of the forced token, not ~0: {lp}");
    let first_id = tok.encode(first["token"].as_str().unwrap(), false).unwrap().get_ids()[0];
    body["logit_bias"] = json!({first_id.to_string(): -100});
    let banned = s.chat(body);
    let got = &banned["choices"][0]["logprobs"]["content"][0];
    assert_ne!(got["token"], first["token"], "{banned}");
    // The banned token was the best: greedy now takes the raw row's second best.
    assert_eq!(got["token"], first["top_logprobs"][1]["token"], "{plain}");
    assert_eq!(got["logprob"], first["top_logprobs"][1]["logprob"]);
}

#[test]
fn stop_strings_and_max_tokens() {
    let s = start(&[]);
    // Find a prompt whose greedy reply is long enough to cut.
    let (prompt, full) = ["hello", "the world", "order her", "tell the hero", "lore", "other"]
        .iter()
        .map(|p| (p.to_string(), s.chat(greedy(p, 24))["choices"][0]["message"]["content"].as_str().unwrap().to_string()))
        .find(|(_, t)| t.chars().count() >= 6)
        .expect("some greedy reply of 6 characters or more");
    // A stop string from the middle of the reply, spanning whatever tokens it spans.
    let chars: Vec<char> = full.chars().collect();
    let stop: String = chars[2..5].iter().collect();
    let cut = &full[..full.find(&stop).unwrap()];
    for stream in [false, true] {
        let mut body = greedy(&prompt, 24);
        body["stop"] = json!(["never-appears", stop]);
        let text = if stream {
            s.stream(body).0
        } else {
            let v = s.chat(body);
            assert_eq!(v["choices"][0]["finish_reason"], "stop");
            v["choices"][0]["message"]["content"].as_str().unwrap().to_string()
        };
        assert_eq!(text, cut, "stop {stop:?} in {full:?} (stream: {stream})");
    }
    // max_tokens (and its new name) caps the reply.
    for key in ["max_tokens", "max_completion_tokens"] {
        let v = s.chat(json!({"messages": [{"role": "user", "content": prompt}], "temperature": 0, key: 2}));
        assert!(v["usage"]["completion_tokens"].as_u64().unwrap() <= 2);
    }
}

#[test]
fn sixteen_concurrent_streams_match_their_answers_alone() {
    let s = start(&["--max-batch", "16"]);
    let requests: Vec<Value> = (0..16)
        .map(|i| {
            let words = ["hello", "the", "world", "order", "tell", "her", "other", "hero"];
            let content: Vec<&str> = (0..1 + i % 5).map(|j| words[(i + j) % words.len()]).collect();
            // Half greedy, half sampled with their own seeds: both must not depend on the batch.
            if i % 2 == 0 {
                greedy(&content.join(" "), 32)
            } else {
                json!({"messages": [{"role": "user", "content": content.join(" ")}], "temperature": 0.9, "seed": i, "max_tokens": 32})
            }
        })
        .collect();
    s.assert_batched_as_alone(&requests, "batched with 15 others");
    assert_eq!(s.metric("kv_blocks_used"), 0.0, "every finished sequence gave its blocks back");
    // 32 requests of up to 32 tokens: alone they take one sequence per step; together the
    // mean batch must be well above one.
    let mean = s.metric("batched_sequences_total") / s.metric("steps_total");
    assert!(mean > 1.5, "mean batch {mean}");
}

/// With the f32 cache (`--kv-cache-dtype f32`; the CPU's default is f16, which the other tests
/// run on): concurrent greedy streams give the answers they give alone on the same server, and
/// every block comes back.
#[test]
fn an_f32_kv_cache_serves_batched_streams_as_alone() {
    let s = start(&["--max-batch", "8", "--kv-cache-dtype", "f32"]);
    let requests: Vec<Value> = (0..8).map(|i| greedy(["hello world", "tell her", "the order", "other hero"][i % 4], 24 + i)).collect();
    s.assert_batched_as_alone(&requests, "batched over an f32 cache");
    assert_eq!(s.metric("kv_blocks_used"), 0.0);
}

/// The prefix cache: a prompt that starts like an earlier one (the same request again, or the
/// next turn of a conversation) takes the earlier one's whole KV blocks instead of computing
/// them, and answers as it would have from scratch; `--no-prefix-cache` computes everything.
#[test]
fn a_repeated_prefix_is_taken_from_the_cache_and_answers_the_same() {
    let question = "tell the other hero the order of the world, and tell her the world order";
    let first = greedy(question, 24);
    let plain = start(&["--no-prefix-cache"]);
    let want = plain.chat(first.clone());
    plain.chat(first.clone());
    assert_eq!((plain.metric("prefix_cache_hit_tokens_total"), plain.metric("kv_blocks_cached")), (0.0, 0.0));

    let s = start(&[]);
    let got = s.chat(first.clone());
    assert_eq!(s.metric("prefix_cache_hit_tokens_total"), 0.0, "nothing was cached before the first request");
    let prompt_tokens = got["usage"]["prompt_tokens"].as_f64().unwrap();
    assert!(prompt_tokens > 48.0, "the prompt spans several blocks ({prompt_tokens} tokens)");
    assert!(s.metric("kv_blocks_cached") > 0.0, "the finished request's whole blocks stay cached");
    assert_eq!(s.metric("kv_blocks_used"), 0.0);
    let again = s.chat(first.clone());
    let hits = s.metric("prefix_cache_hit_tokens_total");
    // Whole blocks only, and the prompt's last token is always computed.
    assert_eq!(hits, ((prompt_tokens - 1.0) / 16.0).floor() * 16.0);
    for v in [&got, &again] {
        assert_eq!(v["choices"][0]["message"]["content"], want["choices"][0]["message"]["content"], "cached vs computed prefix");
        assert_eq!(v["usage"]["prompt_tokens"], want["usage"]["prompt_tokens"]);
    }
    // The next turn of the conversation starts with the whole first turn.
    let answer = got["choices"][0]["message"]["content"].as_str().unwrap();
    let turn = json!({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}, {"role": "user", "content": "and then?"}], "temperature": 0, "max_tokens": 8});
    let cached_turn = s.chat(turn.clone());
    assert!(s.metric("prefix_cache_hit_tokens_total") - hits >= hits, "the second turn reused the first turn's prompt blocks");
    assert_eq!(cached_turn["choices"][0]["message"]["content"], plain.chat(turn)["choices"][0]["message"]["content"]);
    assert_eq!(s.metric("kv_blocks_used"), 0.0, "shared blocks are given back by every holder");

    // Choices of one new prompt: the first prefills it, the others wait a step and adopt its
    // whole blocks instead of computing them beside it; all answer as one alone.
    let fresh = "tell the hero of the other world the order of the world, and then her order";
    let hits = s.metric("prefix_cache_hit_tokens_total");
    let mut body = greedy(fresh, 12);
    body["n"] = json!(4);
    let four = s.chat(body);
    let tokens = four["usage"]["prompt_tokens"].as_f64().unwrap();
    assert_eq!(s.metric("prefix_cache_hit_tokens_total") - hits, 3.0 * ((tokens - 1.0) / 16.0).floor() * 16.0, "{four}");
    let alone = plain.chat(greedy(fresh, 12));
    for c in four["choices"].as_array().unwrap() {
        assert_eq!(c["message"]["content"], alone["choices"][0]["message"]["content"]);
    }
}

#[test]
fn a_client_that_goes_away_frees_its_kv_blocks() {
    // A long context, so the reply is still being generated when the client leaves.
    let mut spec = TinySpec::new(awq_run::model::Arch::Llama);
    spec.max_pos = 8192;
    let s = start_with(spec, &[]);
    let body = json!({"messages": [{"role": "user", "content": "hello"}], "temperature": 1.0, "max_tokens": 8000, "ignore_eos": true, "stream": true, "seed": 1});
    let resp = ureq::post(&s.url("/v1/chat/completions")).send_string(&body.to_string()).unwrap();
    let mut lines = BufReader::new(resp.into_reader()).lines();
    for _ in 0..3 {
        lines.next().unwrap().unwrap();
    }
    drop(lines);
    let t = Instant::now();
    while s.metric("requests_cancelled_total") < 1.0 || s.metric("kv_blocks_used") > 0.0 {
        assert!(t.elapsed() < Duration::from_secs(20), "the cancelled sequence kept its blocks");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(s.metric("requests_finished_total"), 0.0);
    // The server keeps serving.
    s.chat(greedy("hello", 3));
}

#[test]
fn bad_requests_get_openai_errors() {
    let s = start(&["--served-model-name", "tiny-w4"]);
    let long = "hello ".repeat(400);
    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("/v1/chat/completions", "{not json".into(), 400, "body"),
        ("/v1/chat/completions", "[1, 2]".into(), 400, "body"),
        ("/v1/chat/completions", json!({"messages": []}).to_string(), 400, "messages"),
        ("/v1/chat/completions", json!({"messages": "hi"}).to_string(), 400, "messages"),
        ("/v1/chat/completions", json!({"messages": [{"role": "user", "content": 5}]}).to_string(), 400, "messages[0].content"),
        ("/v1/chat/completions", json!({"messages": [{"role": "user", "content": "x"}], "temperature": "warm"}).to_string(), 400, "temperature"),
        ("/v1/chat/completions", json!({"messages": [{"role": "user", "content": "x"}], "top_p": 7}).to_string(), 400, "top_p"),
        ("/v1/chat/completions", json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}).to_string(), 400, "max_tokens"),
        ("/v1/chat/completions", json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 100000}).to_string(), 400, "max_tokens"),
        ("/v1/chat/completions", json!({"messages": [{"role": "user", "content": long}]}).to_string(), 400, "messages"),
        ("/v1/chat/completions", json!({"messages": [{"role": "user", "content": "x"}], "model": "gpt-4"}).to_string(), 404, "model"),
        ("/v1/completions", json!({"prompt": 3}).to_string(), 400, "prompt"),
        ("/v1/chat/completions", json!({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}).to_string(), 400, "top_logprobs"),
        ("/v1/chat/completions", json!({"messages": [{"role": "user", "content": "x"}], "logprobs": true, "top_logprobs": 50}).to_string(), 400, "top_logprobs"),
        ("/v1/completions", json!({"prompt": "x", "logprobs": true}).to_string(), 400, "logprobs"),
        ("/v1/chat/completions", json!({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}}).to_string(), 400, "response_format.type"),
        ("/v1/chat/completions", json!({"messages": [{"role": "user", "content": "x"}], "guided_regex": "(unclosed"}).to_string(), 400, "guided_regex"),
        ("/v1/chat/completions", json!({"messages": [{"role": "user", "content": "x"}], "guided_json": {"type": "integer", "minimum": 5, "maximum": 2}}).to_string(), 400, "guided_json"),
        ("/v1/chat/completions", json!({"messages": [{"role": "user", "content": "x"}], "guided_choice": []}).to_string(), 400, "guided_choice"),
        ("/v1/chat/completions", json!({"messages": [{"role": "user", "content": "x"}], "guided_choice": ["a"], "guided_regex": "a"}).to_string(), 400, "guided_choice"),
        ("/v1/chat/completions", json!({"messages": [{"role": "user", "content": "x"}], "logit_bias": {"100000": 5}}).to_string(), 400, "logit_bias"),
        ("/v1/chat/completions", json!({"messages": [{"role": "user", "content": "x"}], "logit_bias": {"5": 500}}).to_string(), 400, "logit_bias"),
        ("/v1/chat/completions", json!({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}], "tool_choice": "required"}).to_string(), 400, "tools[0].function"),
        ("/v1/chat/completions", json!({"messages": [{"role": "user", "content": "x"}], "n": 0}).to_string(), 400, "n"),
        ("/v1/chat/completions", json!({"messages": [{"role": "user", "content": "x"}], "stop_token_ids": [100000]}).to_string(), 400, "stop_token_ids"),
        ("/v1/chat/completions", json!({"messages": [{"role": "user", "content": "x"}], "min_tokens": 1000}).to_string(), 400, "min_tokens"),
        ("/v1/completions", json!({"prompt": [[1, 2], [3, 1000]]}).to_string(), 400, "prompt[1]"),
    ];
    for (path, body, status, param) in cases {
        let (got, v, _) = s.post(path, &body, None);
        assert_eq!(got, status, "{body}: {v}");
        let e = &v["error"];
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        assert!(e["type"].is_string() && e.get("code").is_some(), "{v}");
        assert_eq!(e["param"], param, "{body}: {v}");
    }
    // The context error names both lengths.
    let (_, v, _) = s.post("/v1/chat/completions", &json!({"messages": [{"role": "user", "content": long}]}).to_string(), None);
    let m = v["error"]["message"].as_str().unwrap();
    assert!(m.contains("256") && m.contains("tokens"), "{m}");
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    // Unknown paths and methods.
    let r = ureq::get(&s.url("/v1/nothing")).call().unwrap_err();
    assert!(matches!(r, ureq::Error::Status(404, _)));
    let r = ureq::get(&s.url("/v1/chat/completions")).call().unwrap_err();
    assert!(matches!(r, ureq::Error::Status(405, _)));
    // Still serving, under the served name.
    let v = s.chat(json!({"messages": [{"role": "user", "content": "x"}], "model": "tiny-w4", "max_tokens": 2}));
    assert_eq!(v["model"], "tiny-w4");
}

#[test]
fn api_key_is_required_when_set() {
    let s = start(&["--api-key", "sesame"]);
    let body = greedy("hello", 2).to_string();
    for key in [None, Some("wrong")] {
        let (status, v, _) = s.post("/v1/chat/completions", &body, key);
        assert_eq!(status, 401, "{v}");
        assert_eq!(v["error"]["type"], "authentication_error");
    }
    let (status, _, _) = s.post("/v1/chat/completions", &body, Some("sesame"));
    assert_eq!(status, 200);
    // Health and the page stay open.
    assert_eq!(ureq::get(&s.url("/health")).call().unwrap().status(), 200);
}

#[test]
fn a_full_queue_answers_429_and_the_server_goes_on() {
    let s = start(&["--max-batch", "1", "--max-queue", "1"]);
    let long = json!({"messages": [{"role": "user", "content": "hello"}], "temperature": 1.0, "seed": 3, "max_tokens": 150}).to_string();
    let statuses: Vec<(u16, Option<String>)> = std::thread::scope(|scope| {
        let hs: Vec<_> = (0..6).map(|_| scope.spawn(|| {
            let (st, _, retry) = s.post("/v1/chat/completions", &long, None);
            (st, retry)
        })).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let refused: Vec<_> = statuses.iter().filter(|(st, _)| *st == 429).collect();
    assert!(!refused.is_empty(), "{statuses:?}");
    assert!(refused.iter().all(|(_, retry)| retry.as_deref() == Some("1")), "{statuses:?}");
    assert!(statuses.iter().all(|(st, _)| *st == 200 || *st == 429), "{statuses:?}");
    assert!(s.metric("requests_rejected_total") >= refused.len() as f64);
    // More choices than the queue ever holds is the request's fault, not the moment's.
    let (status, v, _) = s.post("/v1/chat/completions", &json!({"messages": [{"role": "user", "content": "x"}], "n": 2}).to_string(), None);
    assert_eq!((status, &v["error"]["param"]), (400, &json!("n")), "{v}");
    s.chat(greedy("hello", 3));
}

#[test]
fn several_choices_and_prompts_are_each_a_sequence_and_come_back_in_order() {
    let s = start(&[]);
    // n sampled choices: choice 0 is what the request alone draws (its seed), the others differ
    // by their own seeds; streamed, each choice's chunks carry its index.
    let sampled = |n: usize| json!({"messages": [{"role": "user", "content": "tell the hero"}], "temperature": 1.0, "seed": 11, "max_tokens": 10, "n": n});
    let one = s.chat(sampled(1));
    let three = s.chat(sampled(3));
    let texts: Vec<&str> = (0..3).map(|i| three["choices"][i]["message"]["content"].as_str().unwrap()).collect();
    assert_eq!((0..3).map(|i| three["choices"][i]["index"].as_u64().unwrap()).collect::<Vec<_>>(), vec![0, 1, 2]);
    assert_eq!(texts[0], one["choices"][0]["message"]["content"].as_str().unwrap());
    assert!(texts[1] != texts[0] || texts[2] != texts[0], "{three}");
    assert_eq!(three["usage"]["prompt_tokens"], one["usage"]["prompt_tokens"], "the prompt counts once");
    assert!(three["usage"]["completion_tokens"].as_u64().unwrap() > one["usage"]["completion_tokens"].as_u64().unwrap(), "{three}");
    let mut body = sampled(3);
    body["stream_options"] = json!({"include_usage": true});
    let (_, chunks) = s.stream(body);
    for (i, want) in texts.iter().enumerate() {
        let mine: Vec<&Value> = chunks.iter().filter(|c| c["choices"][0]["index"] == i).collect();
        assert_eq!(mine[0]["choices"][0]["delta"]["role"], "assistant");
        let text: String = mine.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
        assert_eq!(&text, want, "choice {i}");
        assert_eq!(mine.iter().filter(|c| c["choices"][0]["finish_reason"].is_string()).count(), 1, "choice {i}");
    }
    assert_eq!(chunks.last().unwrap()["usage"], three["usage"]);

    // Several prompts of a legacy completion, n each: prompt-major order, each choice as its
    // prompt alone answers it.
    let (status, v, _) = s.post("/v1/completions", &json!({"prompt": ["the world", "hello"], "n": 2, "max_tokens": 6, "temperature": 0}).to_string(), None);
    assert_eq!(status, 200, "{v}");
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 4);
    for (i, prompt) in ["the world", "the world", "hello", "hello"].iter().enumerate() {
        let (_, alone, _) = s.post("/v1/completions", &json!({"prompt": prompt, "max_tokens": 6, "temperature": 0}).to_string(), None);
        assert_eq!((choices[i]["index"].as_u64(), &choices[i]["text"]), (Some(i as u64), &alone["choices"][0]["text"]), "choice {i}");
    }
    // A prompt too long among them is named.
    let long = "hello ".repeat(400);
    let (status, v, _) = s.post("/v1/completions", &json!({"prompt": ["hi", long]}).to_string(), None);
    assert_eq!(status, 400, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().starts_with("prompt[1] has"), "{v}");
}

#[test]
fn a_kv_cache_smaller_than_the_context_limits_requests_to_it() {
    // 2 blocks of 16 tokens: the served context becomes 32 tokens (as vLLM caps max_model_len).
    let s = start(&["--kv-blocks", "2"]);
    let models: Value = ureq::get(&s.url("/v1/models")).call().unwrap().into_json().unwrap();
    assert_eq!(models["data"][0]["max_model_len"], 32);
    let (status, v, _) = s.post("/v1/chat/completions", &json!({"messages": [{"role": "user", "content": "hello ".repeat(12)}]}).to_string(), None);
    assert_eq!(status, 400, "{v}");
    let m = v["error"]["message"].as_str().unwrap();
    assert!(m.contains("KV cache") && m.contains("32"), "{v}");
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    // Short requests run to the end of that context ("length"), sharing the two blocks.
    for _ in 0..3 {
        let v = s.chat(json!({"messages": [{"role": "user", "content": "hi"}], "temperature": 1.0, "ignore_eos": true}));
        assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");
        assert!(v["usage"]["total_tokens"].as_u64().unwrap() <= 32);
    }
    assert_eq!(s.metric("requests_failed_total"), 0.0);
}

#[test]
fn preempted_sequences_are_recomputed_and_answer_as_alone() {
    // 6 blocks (96 positions) for 4 sequences of about 50 tokens each: some are swapped out
    // and prefilled again later (vLLM's recompute), and must still give their own answers.
    let s = start(&["--kv-blocks", "6", "--max-batch", "4"]);
    let requests: Vec<Value> = ["hello", "the world", "order her", "tell"]
        .iter()
        .map(|p| json!({"messages": [{"role": "user", "content": p}], "temperature": 0, "max_tokens": 36, "ignore_eos": true}))
        .collect();
    let alone: Vec<Value> = requests.iter().map(|r| s.chat(r.clone())["choices"][0]["message"]["content"].clone()).collect();
    assert_eq!(s.metric("preemptions_total"), 0.0);
    let together: Vec<Value> = std::thread::scope(|scope| {
        let hs: Vec<_> = requests.iter().map(|r| scope.spawn(|| s.chat(r.clone())["choices"][0]["message"]["content"].clone())).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(alone, together);
    assert!(s.metric("preemptions_total") > 0.0, "the pool was never short");
    assert_eq!((s.metric("kv_blocks_used"), s.metric("requests_failed_total")), (0.0, 0.0));
}

/// `serve --dummy-weights` (the throughput measurements' model): random weights of a preset
/// shape, a tokenizer of bytes and placeholder words, and replies that stream visible text of the
/// length asked for.
#[test]
fn a_dummy_model_serves_streams_of_the_length_asked_for() {
    use std::process::{Command, Stdio};
    let mut child = Command::new(common::bin())
        .args(["serve", "--dummy-weights", "--config", "smollm2-135m", "--weights", "w4", "--group-size", "64"])
        .args(["--device", "cpu", "--host", "127.0.0.1", "--port", "0", "--max-batch", "2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr = line.split("http://").nth(1).and_then(|r| r.split_whitespace().next()).unwrap_or_else(|| panic!("no address in {line:?}"));
    let s = Server { child, base: format!("http://{addr}"), _dir: tempfile::tempdir().unwrap() };
    let models: Value = ureq::get(&s.url("/v1/models")).call().unwrap().into_json().unwrap();
    assert_eq!(models["data"][0]["id"], "dummy-smollm2-135m");
    let body = json!({"messages": [{"role": "user", "content": "Hello there, wörld."}], "max_tokens": 6, "ignore_eos": true});
    let (text, chunks) = s.stream(body.clone());
    assert!(!text.trim().is_empty(), "no visible text in {chunks:?}");
    let whole = s.chat(body);
    assert_eq!(whole["usage"]["completion_tokens"], 6);
    assert_eq!(whole["choices"][0]["finish_reason"], "length");
    assert!(whole["usage"]["prompt_tokens"].as_u64().unwrap() > 19, "one token per byte: {}", whole["usage"]);
}
