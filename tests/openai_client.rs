//! The official `openai` Python package against `awq-run serve` on the real SmolLM2 AWQ model:
//! a streamed chat completion, a whole one, log-probabilities (chat and legacy completion),
//! a prompt scored (echo), several choices, structured output (a pydantic model through the
//! client's `parse`, vLLM's `guided_choice`), a named tool call and the model list, as a user's script would do them
//! with `base_url` pointed at the server. The package is installed from PyPI into a virtual
//! environment under target/ (once; later runs reuse it). Skipped, saying why, where the model
//! (scripts/fetch-models.sh) or python3 is missing.
mod common;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The pinned client version (the one this test was written against).
const OPENAI: &str = "openai==3.57.0";

const SCRIPT: &str = r#"
import json, sys
from openai import OpenAI
client = OpenAI(base_url=sys.argv[1] + "/v1", api_key="unused")
model = client.models.list().data[0].id
question = [{"role": "user", "content": "What is the capital of France?"}]
stream = client.chat.completions.create(model=model, messages=question, stream=True, max_tokens=24,
                                        temperature=0, stream_options={"include_usage": True})
text, finish, usage, chunks = "", None, None, 0
for chunk in stream:
    chunks += 1
    if chunk.usage:
        usage = chunk.usage.completion_tokens
    if chunk.choices:
        text += chunk.choices[0].delta.content or ""
        finish = chunk.choices[0].finish_reason or finish
whole = client.chat.completions.create(model=model, messages=question, max_tokens=24, temperature=0)
# Log-probabilities, as the client's types parse them: chat (top_logprobs) and legacy (logprobs=N).
lp = client.chat.completions.create(model=model, messages=question, max_tokens=24, temperature=0,
                                    logprobs=True, top_logprobs=3)
content = lp.choices[0].logprobs.content
legacy = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8,
                                   temperature=0, logprobs=2)
ll = legacy.choices[0].logprobs
scored = client.completions.create(model=model, prompt="The capital of France is Paris.", max_tokens=0,
                                   echo=True, logprobs=1, temperature=0)
sl = scored.choices[0].logprobs
several = client.chat.completions.create(model=model, messages=question, max_tokens=8, temperature=0.8, n=3, seed=4)
# Structured output as users ask for it: a pydantic model through the client's parse helper
# (response_format json_schema, strict), and vLLM's guided_choice through extra_body.
from pydantic import BaseModel
class City(BaseModel):
    city: str
    country: str
parsed = client.chat.completions.parse(model=model, temperature=0, max_tokens=60, response_format=City,
    messages=[{"role": "user", "content": "Which city is the capital of France? Answer in JSON."}])
choice = client.chat.completions.create(model=model, messages=question, temperature=0, max_tokens=8,
                                        extra_body={"guided_choice": ["Paris", "Lyon", "Nice"]})
# A tool call, named, as agent frameworks make them.
weather = {"type": "function", "function": {"name": "get_weather", "description": "Current weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                           "unit": {"enum": ["celsius", "fahrenheit"]}},
                          "required": ["city", "unit"]}}}
called = client.chat.completions.create(model=model, temperature=0, max_tokens=60, tools=[weather],
    tool_choice={"type": "function", "function": {"name": "get_weather"}},
    messages=[{"role": "user", "content": "What is the weather in Paris?"}])
call = called.choices[0].message.tool_calls[0]
print(json.dumps({"model": model, "streamed": text, "finish": finish, "usage": usage, "chunks": chunks,
                  "whole": whole.choices[0].message.content, "whole_usage": whole.usage.completion_tokens,
                  "lp_text": b"".join(bytes(c.bytes) for c in content).decode("utf-8", "replace"),
                  "lp_tokens": len(content), "lp_usage": lp.usage.completion_tokens,
                  "lp_greedy": all(c.top_logprobs[0].token == c.token and c.logprob <= 0 for c in content),
                  "lp_top": sorted({len(c.top_logprobs) for c in content}),
                  "legacy_tokens": len(ll.tokens), "legacy_usage": legacy.usage.completion_tokens,
                  "legacy_top": all(t in d for t, d in zip(ll.tokens, ll.top_logprobs)),
                  "legacy_text": "".join(ll.tokens) == legacy.choices[0].text,
                  "several": [c.index for c in several.choices],
                  "parsed": parsed.choices[0].message.parsed.model_dump(), "parsed_finish": parsed.choices[0].finish_reason,
                  "choice": choice.choices[0].message.content,
                  "call": [call.function.name, json.loads(call.function.arguments), call.type],
                  "scored_text": scored.choices[0].text, "scored_first": sl.token_logprobs[0],
                  "scored_rest": [lp for lp in sl.token_logprobs[1:]],
                  "scored_usage": [scored.usage.prompt_tokens, scored.usage.completion_tokens]}))
"#;

fn venv_python() -> Option<PathBuf> {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/openai-venv");
    let python = venv.join("bin/python");
    let ready = venv.join(format!(".installed-{OPENAI}"));
    if ready.exists() {
        return Some(python);
    }
    let ok = |c: &mut Command| c.status().is_ok_and(|s| s.success());
    if !ok(Command::new("python3").args(["-m", "venv", venv.to_str()?])) {
        eprintln!("skipped: python3 -m venv failed");
        return None;
    }
    assert!(ok(Command::new(&python).args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", OPENAI])), "pip install {OPENAI} failed");
    std::fs::write(&ready, "").unwrap();
    Some(python)
}

#[test]
fn the_openai_python_client_streams_from_the_server() {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/smollm2-135m-instruct-awq");
    if !model.join("model.safetensors").exists() {
        eprintln!("skipped: {} is missing (run scripts/fetch-models.sh)", model.display());
        return;
    }
    let Some(python) = venv_python() else { return };
    let (mut server, site) = common::spawn_server(&model, &["--max-batch", "4"]);
    let out = Command::new(&python).args(["-c", SCRIPT, &site]).output().unwrap();
    let _ = server.kill();
    let _ = server.wait();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["model"], "smollm2-135m-instruct-awq");
    let streamed = v["streamed"].as_str().unwrap();
    assert!(streamed.contains("Paris"), "{v}");
    assert_eq!(v["whole"], v["streamed"], "greedy: streamed and whole agree");
    assert_eq!(v["usage"], v["whole_usage"]);
    assert!(v["chunks"].as_u64().unwrap() > 3, "{v}");
    assert!(v["finish"] == "stop" || v["finish"] == "length", "{v}");
    // Log-probabilities: a greedy reply's tokens are each the most likely, their bytes are the
    // reply, and the legacy endpoint's alternatives hold the generated token.
    assert_eq!(v["lp_text"], v["whole"], "{v}");
    assert_eq!(v["lp_tokens"], v["lp_usage"], "{v}");
    assert_eq!(v["lp_greedy"], true, "{v}");
    assert_eq!(v["lp_top"], serde_json::json!([3]), "{v}");
    assert_eq!(v["legacy_tokens"], v["legacy_usage"], "{v}");
    assert_eq!(v["legacy_top"], true, "{v}");
    assert_eq!(v["legacy_text"], true, "{v}");
    assert_eq!(v["several"], serde_json::json!([0, 1, 2]), "n choices in order");
    // Structured output: the reply parses into the client's pydantic model; a guided choice is
    // one of the choices. (Greedy picks token by token: after this question SmolLM2's likeliest
    // first tokens are "The", then "L", so its choice is "Lyon".)
    assert_eq!(v["parsed_finish"], "stop", "{v}");
    assert!(v["parsed"]["city"].as_str().is_some_and(|c| c.contains("Paris")), "{v}");
    assert!(v["parsed"]["country"].is_string(), "{v}");
    assert!(["Paris", "Lyon", "Nice"].contains(&v["choice"].as_str().unwrap_or("")), "{v}");
    // The tool call: the function named, its arguments JSON of its schema (SmolLM2 fills in
    // the city asked about).
    assert_eq!((&v["call"][0], &v["call"][2]), (&serde_json::json!("get_weather"), &serde_json::json!("function")), "{v}");
    assert!(v["call"][1]["city"].as_str().is_some_and(|c| c.contains("Paris")), "{v}");
    assert!(v["call"][1]["unit"] == "celsius" || v["call"][1]["unit"] == "fahrenheit", "{v}");
    // Scoring a text (lm-eval's loglikelihood request): the prompt echoed, each token after the
    // first with its log-probability, nothing generated. " Paris" after "The capital of France
    // is" is the likely word: its token's probability is above one half.
    assert_eq!(v["scored_text"], "The capital of France is Paris.", "{v}");
    assert!(v["scored_first"].is_null(), "{v}");
    let rest: Vec<f64> = v["scored_rest"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    assert_eq!(rest.len() as u64 + 1, v["scored_usage"][0].as_u64().unwrap(), "{v}");
    assert_eq!(v["scored_usage"][1], 0, "{v}");
    assert!(rest.iter().all(|&lp| lp <= 0.0) && rest.iter().any(|&lp| lp > 0.5f64.ln()), "{v}");
}
