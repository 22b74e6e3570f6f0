//! The `awq-run` binary driven as a user would: generate, chat over stdin, hub cache, errors.
mod common;
use awq_run::model::Arch;
use common::{bin, TinySpec};
use std::io::Write;
use std::process::{Command, Stdio};

fn run_chat(dir: &std::path::Path, input: &str) -> (bool, String, String) {
    let mut child = Command::new(bin())
        .args(["chat", "--model", dir.to_str().unwrap(), "--show-prompt", "--temperature", "0", "--max-tokens", "4"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

fn prompts(stderr: &str) -> Vec<String> {
    stderr
        .split("--- prompt ---\n")
        .skip(1)
        .map(|s| s.split("\n--- end of prompt ---").next().unwrap().to_string())
        .collect()
}

#[test]
fn chat_keeps_history_clears_and_exits() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = TinySpec::new(Arch::Llama).write_dir(tmp.path());
    let (ok, _stdout, stderr) = run_chat(&dir, "hello there\nsecond question\n/clear\nthird\n/exit\n");
    assert!(ok, "chat failed: {stderr}");
    let p = prompts(&stderr);
    assert_eq!(p.len(), 3, "{stderr}");
    assert!(p[0].ends_with("<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n"), "{}", p[0]);
    // The second prompt holds the whole first exchange, then the new question.
    assert!(p[1].starts_with("<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n"), "{}", p[1]);
    assert_eq!(p[1].matches("<|im_start|>assistant\n").count(), 2, "{}", p[1]);
    assert!(p[1].contains("<|im_start|>user\nsecond question<|im_end|>"), "{}", p[1]);
    // After /clear the first exchange is gone.
    assert!(!p[2].contains("hello there") && p[2].contains("third"), "{}", p[2]);
    assert!(stderr.contains("conversation cleared"));
}

#[test]
fn chat_system_and_help_commands() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = TinySpec::new(Arch::Llama).write_dir(tmp.path());
    let (ok, _, stderr) = run_chat(&dir, "/help\n/system be terse\nhi\n/bogus\n");
    assert!(ok, "{stderr}");
    assert!(stderr.contains("/clear") && stderr.contains("unknown command /bogus"), "{stderr}");
    assert!(prompts(&stderr)[0].starts_with("<|im_start|>system\nbe terse<|im_end|>"), "{stderr}");
}

#[test]
fn chat_drops_oldest_turns_when_context_is_full() {
    let tmp = tempfile::tempdir().unwrap();
    let mut spec = TinySpec::new(Arch::Llama);
    spec.max_pos = 64;
    let dir = spec.write_dir(tmp.path());
    let (ok, _, stderr) = run_chat(&dir, "one two three four five\nsix seven eight nine ten\neleven twelve thirteen\n");
    assert!(ok, "{stderr}");
    assert!(stderr.contains("dropped the") && stderr.contains("oldest messages"), "{stderr}");
}

#[test]
fn chat_shows_and_changes_the_sampling_settings() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = TinySpec::new(Arch::Llama).write_dir(tmp.path());
    let (ok, _, stderr) = run_chat(&dir, "/settings\n/set temperature 0.25\n/set top_k off\n/settings\n/set top_p 3\n/set\n/set colour red\nhi\n/exit\n");
    assert!(ok, "{stderr}");
    // run_chat passes --temperature 0; the rest are llama.cpp's defaults.
    assert!(stderr.contains("temperature     0\n") && stderr.contains("top_k           40"), "{stderr}");
    assert!(stderr.contains("(temperature set)") && stderr.contains("temperature     0.25"), "{stderr}");
    assert!(stderr.contains("top_k           off"), "{stderr}");
    assert!(stderr.contains("--top-p must be in (0, 1]"), "{stderr}");
    assert!(stderr.contains("usage: /set NAME VALUE") && stderr.contains("unknown setting \"colour\""), "{stderr}");
    // The conversation still runs after refused settings.
    assert_eq!(prompts(&stderr).len(), 1, "{stderr}");
}

#[test]
fn chat_saves_loads_and_reports_stats() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = TinySpec::new(Arch::Llama).write_dir(&tmp.path().join("m"));
    let saved = tmp.path().join("conv.json");
    let f = saved.to_str().unwrap();
    let input = format!("/stats\nfirst question\n/stats\n/save {f}\n/clear\n/load {f}\nsecond question\n/load {f}.missing\n/save\n/exit\n");
    let (ok, _, stderr) = run_chat(&dir, &input);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("(no reply yet)"), "{stderr}");
    assert!(stderr.contains("last reply: prompt:") && stderr.contains("of 256 tokens used"), "{stderr}");
    // run_chat caps replies at 4 tokens: the reply is cut, and says so.
    assert!(stderr.contains("(cut at 4 tokens"), "{stderr}");
    assert!(stderr.contains("(saved 2 messages to") && stderr.contains("(loaded 2 messages from"), "{stderr}");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&saved).unwrap()).unwrap();
    assert_eq!((v[0]["role"].as_str(), v[0]["content"].as_str(), v[1]["role"].as_str()), (Some("user"), Some("first question"), Some("assistant")), "{v}");
    // After /clear and /load the next prompt carries the loaded exchange.
    let p = prompts(&stderr);
    assert_eq!(p.len(), 2, "{stderr}");
    assert!(p[1].contains("first question") && p[1].contains("second question"), "{}", p[1]);
    assert!(stderr.contains("conv.json.missing") && stderr.contains("usage: /save FILE"), "{stderr}");
}

#[test]
fn sampling_settings_come_from_generation_config_then_flags() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = TinySpec::new(Arch::Llama).write_dir(tmp.path());
    let generate = |extra: &[&str]| -> (bool, String) {
        let mut args = vec!["generate", "--model", dir.to_str().unwrap(), "--prompt", "hello", "--max-tokens", "2"];
        args.extend_from_slice(extra);
        let out = Command::new(bin()).args(&args).output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into())
    };
    let (ok, e) = generate(&[]);
    assert!(ok && e.contains("sampling: temperature 0.8, top_p 0.95, top_k 40, min_p 0.05, repeat_penalty 1 (last 64 tokens)"), "{e}");
    let g = dir.join("generation_config.json");
    std::fs::write(&g, r#"{"bos_token_id": 1, "eos_token_id": 2, "temperature": 0.3, "top_k": 7, "top_p": 1.0, "repetition_penalty": 1.2}"#).unwrap();
    let (ok, e) = generate(&[]);
    assert!(ok && e.contains("sampling: temperature 0.3, top_p off, top_k 7, min_p 0.05, repeat_penalty 1.2"), "{e}");
    let (ok, e) = generate(&["--top-k", "3", "--min-p", "0", "--temperature", "0"]);
    assert!(ok && e.contains("sampling: temperature 0, top_p off, top_k 3, min_p off"), "{e}");
    std::fs::write(&g, r#"{"temperature": "hot"}"#).unwrap();
    let (ok, e) = generate(&[]);
    assert!(!ok && e.contains("generation_config.json") && e.contains("temperature"), "{e}");
}

#[test]
fn without_model_chat_and_generate_prefer_the_4bit_default() {
    let tmp = tempfile::tempdir().unwrap();
    let models = tmp.path().join("models");
    TinySpec::new(Arch::Llama).write_dir(&models.join("smollm2-135m-instruct"));
    let in_tmp = |args: &[&str]| -> (bool, String) {
        let out = Command::new(bin()).args(args).current_dir(tmp.path()).output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into())
    };
    let gen = ["generate", "--prompt", "hi", "--max-tokens", "2", "--temperature", "0"];
    // Only the full-precision model: that one.
    let (ok, e) = in_tmp(&gen);
    assert!(ok && e.contains("loaded models/smollm2-135m-instruct (") && e.contains("full precision"), "{e}");
    // With the 4-bit checkpoint beside it (what scripts/fetch-models.sh makes): the checkpoint.
    let (ok, e) = in_tmp(&["quantize", "--model", "models/smollm2-135m-instruct", "--out", "models/smollm2-135m-instruct-awq", "--method", "rtn", "--group-size", "32"]);
    assert!(ok, "{e}");
    let (ok, e) = in_tmp(&gen);
    assert!(ok && e.contains("loaded models/smollm2-135m-instruct-awq (") && e.contains("AWQ w4g32"), "{e}");
    let mut child = Command::new(bin()).args(["chat", "--max-tokens", "2"]).current_dir(tmp.path()).stdin(Stdio::piped()).stderr(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(b"/exit\n").unwrap();
    let out = child.wait_with_output().unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && e.contains("loaded models/smollm2-135m-instruct-awq ("), "{e}");
    // quantize and eval keep taking the full-precision model.
    let (ok, e) = in_tmp(&["quantize", "--out", "models/again", "--method", "rtn", "--group-size", "32"]);
    assert!(ok && e.contains("quantizing models/smollm2-135m-instruct with"), "{e}");
}

#[test]
fn generate_streams_and_reports_speed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = TinySpec::new(Arch::Qwen2).write_dir(tmp.path());
    let out = Command::new(bin())
        .args(["generate", "--model", dir.to_str().unwrap(), "--prompt", "hello", "--max-tokens", "5", "--temperature", "0"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("tok/s"), "{stderr}");
}

/// `generate --choice / --regex / --json-schema / --grammar`: the reply is what the grammar
/// allows (sampled, several seeds); two grammars, a bad regex, a missing file are errors naming
/// the flag.
#[test]
fn generate_holds_the_reply_to_a_grammar() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = TinySpec::new(Arch::Llama).write_dir(&tmp.path().join("tiny"));
    let run = |extra: &[&str]| {
        let mut args = vec!["generate", "--model", dir.to_str().unwrap(), "--prompt", "hello", "--max-tokens", "40", "--temperature", "1"];
        args.extend_from_slice(extra);
        let out = Command::new(bin()).args(&args).output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).trim_end().to_string(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    for seed in ["1", "2", "3"] {
        let (ok, text, e) = run(&["--seed", seed, "--choice", "red", "--choice", "green"]);
        assert!(ok && (text == "red" || text == "green"), "{text:?} {e}");
        let (ok, text, e) = run(&["--seed", seed, "--regex", "[xyz]{4}!"]);
        assert!(ok && text.len() == 5 && text.ends_with('!') && text[..4].bytes().all(|b| b"xyz".contains(&b)), "{text:?} {e}");
        let (ok, text, e) = run(&["--seed", seed, "--json-schema", r#"{"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": false, "x-guidance": {"whitespace_flexible": false}}"#]);
        assert!(ok && (text == r#"{"ok":true}"# || text == r#"{"ok":false}"#), "{text:?} {e}");
    }
    let lark = tmp.path().join("g.lark");
    std::fs::write(&lark, "start: \"<\" (\"a\" | \"b\") \">\"\n").unwrap();
    let (ok, text, e) = run(&["--grammar", lark.to_str().unwrap()]);
    assert!(ok && (text == "<a>" || text == "<b>"), "{text:?} {e}");
    for (extra, says) in [
        (&["--regex", "a", "--choice", "b"][..], "--regex and --choice both"),
        (&["--regex", "(a"][..], "--regex: "),
        (&["--json-schema", "/nonexistent/schema.json"][..], "--json-schema /nonexistent/schema.json"),
        (&["--json-schema", "[1]"][..], "--json-schema [1]"),
        (&["--grammar", "/nonexistent/g.lark"][..], "--grammar /nonexistent/g.lark"),
    ] {
        let (ok, _, e) = run(extra);
        assert!(!ok && e.contains(says), "{extra:?}: {e}");
    }
}

#[test]
fn generate_refuses_empty_prompt() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = TinySpec::new(Arch::Llama).write_dir(tmp.path());
    let out = Command::new(bin()).args(["generate", "--model", dir.to_str().unwrap(), "--prompt", "  "]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--prompt is empty"));
}

#[test]
fn hub_id_loads_from_hf_cache_offline() {
    let tmp = tempfile::tempdir().unwrap();
    // The HF cache layout: hub/models--owner--name/{refs/main, snapshots/<commit>/...}
    let repo = tmp.path().join("hub/models--tiny-org--tiny-llama");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    TinySpec::new(Arch::Llama).write_dir(&repo.join("snapshots").join(commit));
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    for offline in ["1", ""] {
        let out = Command::new(bin())
            .args(["generate", "--model", "tiny-org/tiny-llama", "--prompt", "hi", "--max-tokens", "3"])
            .env("HF_HOME", tmp.path())
            .env("HF_HUB_OFFLINE", offline)
            // Any network access would go here and fail.
            .env("HF_ENDPOINT", "http://127.0.0.1:9")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    // A repo that is not in the cache, offline, is explained.
    let out = Command::new(bin())
        .args(["generate", "--model", "tiny-org/absent", "--prompt", "hi"])
        .env("HF_HOME", tmp.path())
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && e.contains("tiny-org/absent") && e.contains("HF_HUB_OFFLINE"), "{e}");
}

#[test]
fn missing_default_model_says_how_to_fetch() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(bin()).args(["chat"]).current_dir(tmp.path()).stdin(Stdio::null()).output().unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && e.contains("scripts/fetch-models.sh"), "{e}");
}

#[test]
fn bench_reports_speed_and_explains_bad_flags() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = TinySpec::new(Arch::Llama).write_dir(tmp.path());
    let out = Command::new(bin())
        .args(["bench", "--model", dir.to_str().unwrap(), "--prompt-len", "16", "--gen", "4", "--repeats", "1", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["decode_tok_s"].as_f64().unwrap() > 0.0 && v["prefill_tok_s"].as_f64().unwrap() > 0.0);
    let err = |args: &[&str]| {
        let o = Command::new(bin()).args(args).output().unwrap();
        assert!(!o.status.success());
        String::from_utf8_lossy(&o.stderr).to_string()
    };
    assert!(err(&["bench", "--dummy-weights"]).contains("--config"));
    assert!(err(&["bench", "--dummy-weights", "--config", "gpt-5"]).contains("llama-2-7b"));
    assert!(err(&["bench", "--dummy-weights", "--config", "smollm2-135m", "--weights", "int3"]).contains("--weights int3"));
    // SmolLM2's 576-wide layers hold no whole 128-groups: an error naming the flag, not a panic.
    let e = err(&["bench", "--dummy-weights", "--config", "smollm2-135m", "--weights", "w4", "--group-size", "128"]);
    assert!(e.contains("--group-size 128") && e.contains("576") && !e.contains("panicked"), "{e}");
    assert!(err(&["bench", "--model", dir.to_str().unwrap(), "--prompt-len", "300"]).contains("does not fit the context"));
    assert!(err(&["bench", "--model", dir.to_str().unwrap(), "--requant", "q2"]).contains("--requant q2"));
}

#[test]
fn selftest_needs_a_cuda_build_or_device() {
    let o = Command::new(bin()).args(["selftest", "--device", "cuda"]).output().unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    if cfg!(feature = "cuda") {
        assert!(!e.is_empty());
    } else {
        assert!(e.contains("--features cuda"), "{e}");
    }
}

#[test]
fn bad_device_dtype_and_sampling_flags_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = TinySpec::new(Arch::Llama).write_dir(tmp.path());
    let d = dir.to_str().unwrap();
    let err = |extra: &[&str]| {
        let mut args = vec!["generate", "--model", d, "--prompt", "hi"];
        args.extend_from_slice(extra);
        let o = Command::new(bin()).args(&args).output().unwrap();
        assert!(!o.status.success(), "{extra:?} succeeded");
        String::from_utf8_lossy(&o.stderr).to_string()
    };
    assert!(err(&["--device", "tpu"]).contains("--device tpu"));
    assert!(err(&["--device", "cuda:x"]).contains("bad device index"));
    assert!(err(&["--dtype", "f8"]).contains("--dtype f8"));
    assert!(err(&["--top-p", "1.5"]).contains("--top-p"));
    assert!(err(&["--top-k", "0"]).contains("--top-k"));
    assert!(err(&["--max-tokens", "0"]).contains("--max-tokens"));
    assert!(err(&["--threads", "0"]).contains("--threads 0"));
}

/// The server's limits are checked before anything is loaded: zero is refused by name.
#[test]
fn serve_refuses_zero_limits_by_flag_name() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = TinySpec::new(Arch::Llama).write_dir(tmp.path());
    for flag in ["--max-batch", "--prefill-chunk", "--kv-blocks", "--kv-cache-mb"] {
        let o = Command::new(bin()).args(["serve", "--model", dir.to_str().unwrap(), "--device", "cpu", "--port", "0", flag, "0"]).output().unwrap();
        assert!(!o.status.success(), "{flag} 0 started a server");
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(stderr.contains(flag), "{flag} 0: {stderr}");
    }
}

#[test]
fn bench_serve_refuses_zero_counts_by_flag_name() {
    // Checked before any request, so no server is needed on the URL.
    for flag in ["--rounds", "--gen", "--requests-per-client"] {
        let o = Command::new(bin()).args(["bench-serve", "--url", "http://127.0.0.1:9", flag, "0"]).output().unwrap();
        assert!(!o.status.success(), "{flag} 0 ran");
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(stderr.contains(flag) && stderr.contains("must be positive"), "{flag} 0: {stderr}");
    }
}

#[test]
fn generate_refuses_an_unknown_kv_cache_dtype() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = TinySpec::new(Arch::Llama).write_dir(tmp.path());
    let o = Command::new(bin()).args(["generate", "--model", dir.to_str().unwrap(), "--prompt", "hi", "--kv-cache-dtype", "bf16"]).output().unwrap();
    assert!(!o.status.success());
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("--kv-cache-dtype bf16: expected auto, f16 or f32"), "{stderr}");
}

#[test]
fn serve_refuses_a_kv_cache_dtype_it_cannot_read() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = TinySpec::new(Arch::Llama).write_dir(tmp.path());
    // An unknown name, and an f32 cache under f16 activations (the cache takes the activation
    // dtype, or f16 under f32 on the CPU).
    for extra in [&["--kv-cache-dtype", "bf16"][..], &["--kv-cache-dtype", "f32", "--dtype", "f16"]] {
        let o = Command::new(bin()).args(["serve", "--model", dir.to_str().unwrap(), "--device", "cpu", "--port", "0"]).args(extra).output().unwrap();
        assert!(!o.status.success(), "{extra:?} started a server");
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(stderr.contains("--kv-cache-dtype"), "{extra:?}: {stderr}");
    }
}

#[test]
fn serve_refuses_an_unknown_tool_call_parser() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = TinySpec::new(Arch::Llama).write_dir(tmp.path());
    let o = Command::new(bin()).args(["serve", "--model", dir.to_str().unwrap(), "--port", "0", "--tool-call-parser", "pythonic"]).output().unwrap();
    assert!(!o.status.success(), "started a server");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("--tool-call-parser") && stderr.contains("hermes") && stderr.contains("llama3_json"), "{stderr}");
}

#[test]
fn quantize_dummy_weights_times_the_pass_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    // RTN keeps this quick on the CI's CPU; the pass and its report are the same code as AWQ's.
    let out = Command::new(bin())
        .current_dir(tmp.path())
        .args(["quantize", "--dummy-weights", "--config", "smollm2-135m", "--method", "rtn", "--group-size", "64", "--device", "cpu"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["config"], "smollm2-135m");
    assert_eq!(v["method"], "rtn");
    assert!(v["total_secs"].as_f64().unwrap() > 0.0);
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0, "nothing may be written");

    // Bad combinations are refused, naming the flag.
    let out = Command::new(bin()).args(["quantize", "--dummy-weights", "--group-size", "64"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--config"));
    let out = Command::new(bin()).args(["quantize", "--dummy-weights", "--config", "llama-2-7b", "--out", "x"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--out"));
    let out = Command::new(bin()).args(["quantize", "--dummy-weights", "--config", "gpt-9", "--method", "rtn"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("gpt-9"));
}
