//! The fuzz targets' regression corpus as ordinary tests: every seed (built here from the tiny
//! model and, where scripts/fetch-models.sh has run, from the real SmolLM2 files) and every input
//! that once crashed a target (`fuzz/regressions/TARGET/`, one file per fixed bug) goes through
//! the same function libFuzzer calls, and must come back without a panic. `scripts/fuzz.sh` runs
//! the fuzzers themselves; `write_seeds` (ignored here) writes the seeds for it.
mod common;
#[path = "../fuzz/src/lib.rs"]
#[allow(dead_code)]
mod harness;

use awq_run::awq::{AwqOptions, Method};
use awq_run::model::Arch;
use awq_run::quant::QuantScheme;
use common::{Rng, TinySpec, CHATML_TEMPLATE};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

type Corpus = BTreeMap<&'static str, Vec<(String, Vec<u8>)>>;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(dir: &Path, name: &str) -> Option<Vec<u8>> {
    std::fs::read(dir.join(name)).ok()
}

/// A consistent AWQ linear for `harness::awq_linear`: 64 → 64, group 32, i32 codes, f32 scales.
fn awq_linear_seed(r: &mut Rng, bias: bool) -> Vec<u8> {
    let mut b = vec![3u8, 3, 3, bias as u8];
    let tensor = |b: &mut Vec<u8>, code: u8, dims: &[u8], values: &mut dyn FnMut() -> [u8; 4]| {
        b.push(code);
        b.extend_from_slice(dims);
        for _ in 0..dims.iter().map(|&d| d as usize).product::<usize>() {
            b.extend_from_slice(&values());
        }
    };
    let mut ints = || ((r.next_f32() * u32::MAX as f32) as u32).to_le_bytes();
    tensor(&mut b, 1, &[64, 8], &mut ints); // qweight [in, out/8] i32
    tensor(&mut b, 1, &[2, 8], &mut ints); // qzeros [in/g, out/8] i32
    tensor(&mut b, 7, &[2, 64], &mut || 0.01f32.to_le_bytes()); // scales [in/g, out] f32
    if bias {
        tensor(&mut b, 6, &[64], &mut || 0.5f32.to_le_bytes()); // bias [out] f32
    }
    b
}

/// A consistent GPTQ linear for `harness::awq_linear`: 64 → 64, group 32, `qweight` [in/8, out],
/// `qzeros` [groups, out/8], f32 scales, and a `g_idx` of 64 i32 (in natural order, or with the
/// two groups' inputs interleaved as act-order leaves them); the last byte picks the GPTQ layout.
fn gptq_linear_seed(r: &mut Rng, act_order: bool) -> Vec<u8> {
    let mut b = vec![3u8, 3, 3, 0];
    let tensor = |b: &mut Vec<u8>, code: u8, dims: &[u8], values: &mut dyn FnMut(usize) -> [u8; 4]| {
        b.push(code);
        b.extend_from_slice(dims);
        for i in 0..dims.iter().map(|&d| d as usize).product::<usize>() {
            b.extend_from_slice(&values(i));
        }
    };
    let mut ints = |_| ((r.next_f32() * u32::MAX as f32) as u32).to_le_bytes();
    tensor(&mut b, 1, &[8, 64], &mut ints); // qweight [in/8, out] i32
    // Stored as zero − 1: 7 in every nibble is a zero point of 8 (a stored 15 would be 16, out of range).
    tensor(&mut b, 1, &[2, 8], &mut |_| 0x7777_7777u32.to_le_bytes()); // qzeros [groups, out/8] i32
    tensor(&mut b, 7, &[2, 64], &mut |_| 0.01f32.to_le_bytes()); // scales [groups, out] f32
    b.push(5); // no bias
    let group = |i: usize| if act_order { i % 2 } else { i / 32 };
    tensor(&mut b, 3, &[64], &mut |i| (group(i) as i32).to_le_bytes()); // g_idx [in] i32
    b.push(1); // GPTQ, zeros stored minus one
    b
}

/// The seeds of every target.
fn seeds() -> Corpus {
    let mut c = Corpus::new();
    let tmp = tempfile::tempdir().unwrap();
    let mut add = |t: &'static str, name: &str, bytes: Vec<u8>| c.entry(t).or_default().push((name.to_string(), bytes));
    let tiny_tokenizer = serde_json::to_vec(&TinySpec::new(Arch::Llama).tokenizer_json()).unwrap();

    // Tiny models: as GGUF files and as HF directories (full precision, and RTN 4-bit).
    for (i, arch) in [Arch::Llama, Arch::Qwen2, Arch::Qwen3].into_iter().enumerate() {
        let mut spec = TinySpec::new(arch);
        spec.layers = 1;
        spec.tie = i == 1;
        let gguf = tmp.path().join(format!("tiny{i}.gguf"));
        spec.write_gguf(&gguf);
        add("gguf", &format!("tiny-{arch:?}"), std::fs::read(&gguf).unwrap());
        let dir = spec.write_dir(&tmp.path().join(format!("tiny{i}")));
        let files = ["config.json", "tokenizer.json", "model.safetensors"].map(|f| read(&dir, f).unwrap());
        add("model_dir", &format!("tiny-{arch:?}"), harness::frame(&[&files[0], &files[1], &files[2]]));
        add("configs", &format!("tiny-{arch:?}-config"), files[0].clone());
        if i == 0 {
            let assets = awq_run::ModelAssets::from_dir("tiny", &dir).unwrap();
            let out = tmp.path().join("tiny-rtn");
            let o = AwqOptions::new(Method::Rtn, QuantScheme::new(4, 32).unwrap());
            awq_run::awq::export::write_quantized(&assets, &out, &o, None, &candle_core::Device::Cpu, false).unwrap();
            let q = ["config.json", "model.safetensors"].map(|f| read(&out, f).unwrap());
            add("model_dir", "tiny-rtn-w4g32", harness::frame(&[&q[0], &tiny_tokenizer, &q[1]]));
            add("configs", "tiny-rtn-config", q[0].clone());
            let qc = serde_json::from_slice::<serde_json::Value>(&q[0]).unwrap()["quantization_config"].clone();
            add("configs", "tiny-rtn-quantization-config", serde_json::to_vec(&qc).unwrap());
            // GPTQ with act-order groups (a permuting g_idx), on random calibration tokens.
            let mut r = Rng::new(9);
            let vocab = TinySpec::new(arch).vocab();
            let blocks: Vec<Vec<u32>> = (0..4).map(|_| (0..48).map(|_| (r.next_f32() * vocab as f32) as u32 % vocab as u32).collect()).collect();
            let mut o = AwqOptions::new(Method::Gptq, QuantScheme::new(4, 32).unwrap());
            (o.gptq.act_order, o.gptq.static_groups) = (true, false);
            let out = tmp.path().join("tiny-gptq");
            awq_run::awq::export::write_quantized(&assets, &out, &o, Some(&blocks), &candle_core::Device::Cpu, false).unwrap();
            let q = ["config.json", "model.safetensors"].map(|f| read(&out, f).unwrap());
            add("model_dir", "tiny-gptq-act-order-w4g32", harness::frame(&[&q[0], &tiny_tokenizer, &q[1]]));
            let qc = serde_json::from_slice::<serde_json::Value>(&q[0]).unwrap()["quantization_config"].clone();
            add("configs", "tiny-gptq-quantization-config", serde_json::to_vec(&qc).unwrap());
        }
    }
    add("tokenizer", "tiny", tiny_tokenizer.clone());
    let mut r = Rng::new(3);
    add("awq_linear", "w64-g32", awq_linear_seed(&mut r, false));
    add("awq_linear", "w64-g32-bias", awq_linear_seed(&mut r, true));
    add("awq_linear", "gptq-w64-g32", gptq_linear_seed(&mut r, false));
    add("awq_linear", "gptq-w64-g32-act-order", gptq_linear_seed(&mut r, true));
    add("configs", "legacy-gptq-quantize-config", br#"{"bits": 4, "group_size": 128, "desc_act": true, "sym": true, "static_groups": false}"#.to_vec());
    add("configs", "legacy-quant-config", br#"{"w_bit": 4, "q_group_size": 128, "zero_point": true, "version": "GEMM"}"#.to_vec());
    add("configs", "generation-config", br#"{"temperature": 0.2, "top_p": 0.9, "top_k": 50, "min_p": 0.1, "repetition_penalty": 1.1, "eos_token_id": [2, 3]}"#.to_vec());
    let messages = b"You are helpful.\0What is the capital of France?\0Paris.\0And of Italy?".to_vec();
    add("chat_template", "chatml", harness::frame(&[CHATML_TEMPLATE.as_bytes(), &messages]));
    let pythonic = "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'].strip() | upper }}{% elif loop.index0 % 2 == 0 %}[INST] {{ m.content | tojson }}{% else %}{{ m.content.split(' ') | join('_') }}{{ eos_token }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ raise_exception('x') if messages | length > 9 else '' }}{% endif %}";
    add("chat_template", "pythonic", harness::frame(&[pythonic.as_bytes(), &messages]));

    // The real files, where scripts/fetch-models.sh has fetched them.
    // Server requests the handlers accept, one per family of fields.
    let weather = r#"{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}"#;
    let requests = [
        ("chat-sampling", r#"{"model": "m", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], "temperature": 0.7, "top_p": 0.9, "top_k": 40, "min_p": 0.05, "max_tokens": 16, "stop": ["\n\n", "END"], "seed": 7, "frequency_penalty": 0.5, "stream": true, "stream_options": {"include_usage": true}, "n": 2, "logprobs": true, "top_logprobs": 3}"#.to_string()),
        ("chat-json-schema", r#"{"messages": [{"role": "user", "content": [{"type": "text", "text": "A cat"}]}], "response_format": {"type": "json_schema", "json_schema": {"name": "cat", "schema": {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}}}}, "logit_bias": {"5": -100, "17": 3.5}}"#.to_string()),
        ("chat-guided-regex", r#"{"messages": [{"role": "user", "content": "x"}], "guided_regex": "[0-9]{3}-[a-z]+", "repetition_penalty": 1.1, "max_completion_tokens": 8}"#.to_string()),
        ("chat-tools-required", format!(r#"{{"messages": [{{"role": "user", "content": "Weather in Oslo?"}}, {{"role": "assistant", "content": null, "tool_calls": [{{"id": "c1", "type": "function", "function": {{"name": "get_weather", "arguments": "{{\"city\": \"Oslo\"}}"}}}}]}}, {{"role": "tool", "tool_call_id": "c1", "content": "sunny"}}], "tools": [{weather}], "tool_choice": "required", "parallel_tool_calls": false}}"#)),
        ("chat-tools-named", format!(r#"{{"messages": [{{"role": "user", "content": "Weather?"}}], "tools": [{weather}], "tool_choice": {{"type": "function", "function": {{"name": "get_weather"}}}}}}"#)),
        ("chat-tools-auto", format!(r#"{{"messages": [{{"role": "user", "content": "Weather?"}}], "tools": [{weather}], "guided_choice": ["a", "b"]}}"#)),
        ("completion-token-ids", r#"{"prompt": [[1, 2, 3], [4, 5]], "max_tokens": 4, "echo": true, "logprobs": 2, "structured_outputs": {"choice": ["yes", "no"]}}"#.to_string()),
    ];
    for (name, body) in requests {
        add("request", name, body.into_bytes());
    }
    // Replies read for tool calls: parser byte, piece-size byte, text.
    let replies: [(u8, &str); 4] = [
        (0, "Let me check. <tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}</tool_call>"),
        (0, "<tool_call>[{\"name\": \"a\", \"arguments\": {}}, {\"name\": \"b\", \"parameters\": {\"x\": 1}}]</tool_call>"),
        (1, "{\"name\": \"a\", \"parameters\": {\"x\": [1, 2]}}; {\"name\": \"b\", \"parameters\": {}}"),
        (2, "Sure. [TOOL_CALLS][{\"name\": \"a\", \"arguments\": {\"s\": \"é\"}}]"),
    ];
    for (i, (parser, text)) in replies.iter().enumerate() {
        let mut b = vec![*parser, 2 + i as u8];
        b.extend_from_slice(text.as_bytes());
        add("tool_calls", &format!("reply-{i}"), b);
    }
    let real = repo().join("models/smollm2-135m-instruct");
    if let Some(cfg) = read(&real, "config.json") {
        add("configs", "smollm2-config", cfg.clone());
        let spec = TinySpec::new(Arch::Llama);
        let dir = spec.write_dir(&tmp.path().join("tiny-real-config"));
        let st = read(&dir, "model.safetensors").unwrap();
        add("model_dir", "smollm2-config-tiny-weights", harness::frame(&[&cfg, &tiny_tokenizer, &st]));
    }
    if let Some(g) = read(&real, "generation_config.json") {
        add("configs", "smollm2-generation-config", g);
    }
    if let Some(t) = read(&real, "tokenizer.json") {
        add("tokenizer", "smollm2", t);
    }
    if let Some(tc) = read(&real, "tokenizer_config.json") {
        let v: serde_json::Value = serde_json::from_slice(&tc).unwrap();
        if let Some(t) = v["chat_template"].as_str() {
            add("chat_template", "smollm2", harness::frame(&[t.as_bytes(), &messages]));
        }
    }
    let awq = repo().join("models/smollm2-135m-instruct-awq");
    if let Some(cfg) = read(&awq, "config.json") {
        add("configs", "smollm2-awq-config", cfg);
    }
    if let Ok(g) = std::fs::read(repo().join("models/gguf/SmolLM2-135M-Instruct.Q4_1.gguf")) {
        // The metadata and tensor infos of the real file; its tensor data is cut off.
        add("gguf", "smollm2-head", g[..g.len().min(2 << 20)].to_vec());
    }
    c
}

/// Every file of `fuzz/regressions/TARGET/`.
fn regressions() -> Corpus {
    let mut c = Corpus::new();
    for t in harness::TARGETS {
        let dir = repo().join("fuzz/regressions").join(t);
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        let mut files: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        files.sort();
        for f in files {
            let name = f.file_name().unwrap().to_string_lossy().into_owned();
            c.entry(*t).or_default().push((name, std::fs::read(&f).unwrap()));
        }
    }
    c
}

#[test]
fn every_target_has_seeds() {
    let s = seeds();
    for t in harness::TARGETS {
        assert!(s.get(t).is_some_and(|v| !v.is_empty()), "no seeds for {t}");
    }
}

#[test]
fn seeds_and_regressions_run_without_a_panic() {
    let mut n = 0;
    for corpus in [seeds(), regressions()] {
        for (target, inputs) in corpus {
            for (name, bytes) in inputs {
                let ok = std::panic::catch_unwind(|| {
                    harness::run(target, &bytes);
                })
                .is_ok();
                assert!(ok, "fuzz target {target} panicked on {name}");
                n += 1;
            }
        }
    }
    eprintln!("{n} inputs ran");
}

#[test]
fn the_seeds_reach_the_end() {
    // A seed that fails at the first check explores little: the built ones must load and run
    // (a model answers, a template renders) all the way.
    for (target, inputs) in seeds() {
        for (name, bytes) in inputs {
            // Two seeds are cut on purpose: the real GGUF's head, real config over tiny weights.
            let partial = name == "smollm2-head" || name == "smollm2-config-tiny-weights";
            if !partial {
                assert!(harness::run(target, &bytes), "seed {name} of {target} is refused");
            }
        }
    }
}

/// Writes the seeds to `$FUZZ_SEED_DIR/TARGET/NAME` for scripts/fuzz.sh.
#[test]
#[ignore]
fn write_seeds() {
    let root = PathBuf::from(std::env::var("FUZZ_SEED_DIR").expect("FUZZ_SEED_DIR"));
    for (target, inputs) in seeds() {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        for (name, bytes) in inputs {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    }
}
