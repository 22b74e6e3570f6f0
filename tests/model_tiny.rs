//! The model, loaders and bad-input errors on tiny random models built by the tests.
mod common;
use awq_run::model::Arch;
use awq_run::ModelAssets;
use candle_core::{DType, Device, Tensor};
use common::{rel_err, TinySpec};

fn load(dir: &std::path::Path) -> (ModelAssets, awq_run::model::Model) {
    let a = ModelAssets::load(dir.to_str().unwrap()).unwrap();
    let m = a.load_model(&Device::Cpu, DType::F32).unwrap();
    (a, m)
}

fn err_of(dir: &std::path::Path) -> String {
    match ModelAssets::load(dir.to_str().unwrap()).and_then(|a| a.load_model(&Device::Cpu, DType::F32)) {
        Ok(_) => panic!("{} loaded but should not", dir.display()),
        Err(e) => e.to_string(),
    }
}

const PROMPT: [u32; 9] = [1, 40, 71, 80, 80, 83, 2, 260, 100];

#[test]
fn kv_cache_matches_full_sequence_for_every_arch() {
    for arch in [Arch::Llama, Arch::Mistral, Arch::Qwen2, Arch::Qwen3] {
        let tmp = tempfile::tempdir().unwrap();
        let mut spec = TinySpec::new(arch);
        spec.tie = arch == Arch::Llama;
        let (_, m) = load(&spec.write_dir(tmp.path()));
        let tokens = Tensor::new(&PROMPT, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let full = m.forward_all(&tokens).unwrap().squeeze(0).unwrap();
        // Prefill 4 tokens, then one at a time, then the remaining 2 as a chunk.
        let mut cache = m.new_cache_with(64, Some(DType::F32)).unwrap();
        let mut rows = vec![m.forward_all_cached(&tokens.narrow(1, 0, 4).unwrap(), &mut cache).unwrap().squeeze(0).unwrap()];
        for i in 4..7 {
            rows.push(m.forward_all_cached(&tokens.narrow(1, i, 1).unwrap(), &mut cache).unwrap().squeeze(0).unwrap());
        }
        rows.push(m.forward_all_cached(&tokens.narrow(1, 7, 2).unwrap(), &mut cache).unwrap().squeeze(0).unwrap());
        let inc = Tensor::cat(&rows, 0).unwrap();
        let e = rel_err(&inc, &full);
        assert!(e < 1e-5, "{arch:?}: incremental vs full rel err {e}");
        // Truncating the cache and re-running the tail gives the same logits again.
        cache.truncate(5);
        let again = m.forward_all_cached(&tokens.narrow(1, 5, 4).unwrap(), &mut cache).unwrap().squeeze(0).unwrap();
        assert!(rel_err(&again, &full.narrow(0, 5, 4).unwrap()) < 1e-5, "{arch:?}: truncate");
    }
}

/// The CPU's plain cache stores f16 by default (as the server's paged one): the host step and
/// the general path (prompt chunks through candle's ops, which convert the cached rows back to
/// f32) both stay within f16 rounding of the full f32 pass, and the f32 cache is still there.
#[test]
fn the_cpu_cache_stores_f16_by_default() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, m) = load(&TinySpec::new(Arch::Llama).write_dir(tmp.path()));
    let tokens = Tensor::new(&PROMPT, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let full = m.forward_all(&tokens).unwrap().squeeze(0).unwrap();
    let mut cache = m.new_cache(64);
    assert_eq!(cache.store_dtype(), Some(DType::F16));
    let mut rows = vec![m.forward_all_cached(&tokens.narrow(1, 0, 4).unwrap(), &mut cache).unwrap().squeeze(0).unwrap()];
    for i in 4..9 {
        rows.push(m.forward(&tokens.narrow(1, i, 1).unwrap(), &mut cache).unwrap());
    }
    let buffers = cache.layers[0].buffers().unwrap();
    assert_eq!((buffers.0.dtype(), buffers.1.dtype()), (DType::F16, DType::F16));
    let inc = Tensor::cat(&rows, 0).unwrap();
    let e = rel_err(&inc, &full);
    assert!(e > 0.0 && e < 1e-2, "f16 cache vs full pass rel err {e}");
    assert_eq!(m.new_cache_with(64, Some(DType::F32)).unwrap().store_dtype(), Some(DType::F32));
    let bf16 = m.new_cache_with(64, Some(DType::BF16)).unwrap_err().to_string();
    assert!(bf16.contains("--kv-cache-dtype bf16"), "{bf16}");
}

#[test]
fn qwen2_bias_and_qwen3_norms_change_the_output() {
    // The same weights with and without the variant's extra tensors must differ, proving the
    // biases / q-k norms are used.
    for arch in [Arch::Qwen2, Arch::Qwen3] {
        let tmp = tempfile::tempdir().unwrap();
        let spec = TinySpec::new(arch);
        let dir = spec.write_dir(tmp.path());
        let (_, m) = load(&dir);
        let tokens = Tensor::new(&PROMPT, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let with = m.forward_all(&tokens).unwrap();
        let mut plain = spec.clone();
        plain.arch = Arch::Llama;
        let tmp2 = tempfile::tempdir().unwrap();
        let mut t = spec.tensors();
        t.retain(|k, _| !k.ends_with("_proj.bias") && !k.contains("q_norm") && !k.contains("k_norm"));
        let d2 = plain.write_dir(tmp2.path());
        candle_core::safetensors::save(&t, d2.join("model.safetensors")).unwrap();
        let (_, m2) = load(&d2);
        let without = m2.forward_all(&tokens).unwrap();
        assert!(rel_err(&with, &without) > 1e-3, "{arch:?} variant has no effect");
        // And a qwen2 checkpoint without its biases is refused, naming the tensor.
        if arch == Arch::Qwen2 {
            let tmp3 = tempfile::tempdir().unwrap();
            let d3 = spec.write_dir(tmp3.path());
            candle_core::safetensors::save(&t, d3.join("model.safetensors")).unwrap();
            let e = err_of(&d3);
            assert!(e.contains("q_proj.bias"), "{e}");
        }
    }
}

#[test]
fn gguf_import_keeps_the_recommended_sampling_settings() {
    use candle_core::quantized::gguf_file::Value;
    let tmp = tempfile::tempdir().unwrap();
    let gguf = tmp.path().join("tiny.gguf");
    let extra = vec![
        ("general.sampling.temp".to_string(), Value::F32(0.6)),
        ("general.sampling.top_k".to_string(), Value::I32(20)),
        ("general.sampling.min_p".to_string(), Value::F32(0.1)),
    ];
    TinySpec::new(Arch::Llama).write_gguf_with(&gguf, extra);
    let out = tmp.path().join("imported");
    awq_run::assets::import::import_gguf(&gguf, &out, DType::F32, false).unwrap();
    let g: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("generation_config.json")).unwrap()).unwrap();
    assert_eq!((g["temperature"].as_f64(), g["top_k"].as_u64(), g["min_p"].as_f64()), (Some(0.6), Some(20), Some(0.1)), "{g}");
    assert!(g.get("top_p").is_none(), "{g}");
    // And they become the model's sampling defaults.
    let a = awq_run::ModelAssets::load(out.to_str().unwrap()).unwrap();
    let p = awq_run::engine::sampling::SamplingParams::default().with_generation_config(&a.generation_config, "g").unwrap();
    assert_eq!((p.temperature, p.top_k, p.min_p, p.top_p), (0.6, Some(20), Some(0.1), Some(0.95)));
}

#[test]
fn gguf_import_round_trip_and_direct_load() {
    for arch in [Arch::Llama, Arch::Qwen2, Arch::Qwen3] {
        let tmp = tempfile::tempdir().unwrap();
        let spec = TinySpec::new(arch);
        let hf = spec.write_dir(&tmp.path().join("hf"));
        let gguf = tmp.path().join("tiny.gguf");
        spec.write_gguf(&gguf);
        let out = tmp.path().join("imported");
        awq_run::assets::import::import_gguf(&gguf, &out, DType::F32, false).unwrap();
        for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
            assert!(out.join(f).exists(), "{f} missing");
        }
        // The imported tensors are the original HF tensors (q/k un-permuted) exactly.
        let orig = candle_core::safetensors::load(hf.join("model.safetensors"), &Device::Cpu).unwrap();
        let imp = candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
        assert_eq!(orig.len(), imp.len());
        for (k, v) in &orig {
            assert_eq!(rel_err(&imp[k], v), 0.0, "{arch:?}: {k}");
        }
        // Same logits from the original directory, the imported one and the GGUF itself.
        let tokens = Tensor::new(&PROMPT, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let l_hf = load(&hf).1.forward_all(&tokens).unwrap();
        let l_imp = load(&out).1.forward_all(&tokens).unwrap();
        let l_gguf = load(&gguf).1.forward_all(&tokens).unwrap();
        assert_eq!(rel_err(&l_imp, &l_hf), 0.0);
        assert_eq!(rel_err(&l_gguf, &l_hf), 0.0);
        // Tokenizer and template came along.
        let a = ModelAssets::load(out.to_str().unwrap()).unwrap();
        assert_eq!(a.eos_ids, vec![2]);
        assert!(a.chat_template.as_deref().unwrap().contains("<|im_start|>"));
        assert_eq!(a.encode("<|im_start|>hello", false).unwrap()[0], 1);
        // An existing output is refused without --force.
        let e = awq_run::assets::import::import_gguf(&gguf, &out, DType::F32, false).unwrap_err().to_string();
        assert!(e.contains("already exists") && e.contains("--force"), "{e}");
        awq_run::assets::import::import_gguf(&gguf, &out, DType::F16, true).unwrap();
    }
}

#[test]
fn tokenizer_round_trips_text() {
    let spec = TinySpec::new(Arch::Llama);
    let tok = awq_run::assets::tokenizer::from_value(&spec.tokenizer_json()).unwrap();
    let text = "hello the world, 123 ünïcode\n\t<|im_end|>";
    let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
    // Digits are split one by one; special tokens are single ids.
    assert!(ids.contains(&2));
    let digits: Vec<u32> = "123".chars().map(|c| tok.token_to_id(&c.to_string()).unwrap()).collect();
    assert!(ids.windows(3).any(|w| w == digits.as_slice()), "{ids:?}");
    assert_eq!(tok.decode(&ids, false).unwrap(), text);
}

#[test]
fn chat_template_from_the_model_renders_history() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = TinySpec::new(Arch::Llama).write_dir(tmp.path());
    let a = ModelAssets::load(dir.to_str().unwrap()).unwrap();
    let t = awq_run::engine::chat_template::ChatTemplate::new(a.chat_template.as_deref().unwrap(), a.bos_token.as_deref(), a.eos_token.as_deref()).unwrap();
    use awq_run::engine::chat_template::Message;
    let s = t.render(&[Message::new("system", "be brief"), Message::new("user", "hi"), Message::new("assistant", "hello"), Message::new("user", "again")], true).unwrap();
    assert_eq!(s, "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n<|im_start|>user\nagain<|im_end|>\n<|im_start|>assistant\n");
}

#[test]
fn generation_is_deterministic_and_stops() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, m) = load(&TinySpec::new(Arch::Llama).write_dir(tmp.path()));
    let p = awq_run::engine::generation::SamplingParams { temperature: 0.8, top_p: Some(0.9), max_tokens: 12, seed: 3, ..Default::default() };
    let mut g = awq_run::engine::generation::Generator::new(&m, &a.tokenizer, vec![]);
    let (t1, s1) = g.generate(&PROMPT, &p, None, |_| Ok(())).unwrap();
    let (t2, s2) = g.generate(&PROMPT, &p, None, |_| Ok(())).unwrap();
    assert_eq!(t1, t2);
    assert_eq!(t1.len(), 12);
    assert_eq!(s1.stop, awq_run::engine::generation::StopReason::MaxTokens);
    // The second run reused the cached prompt but the last token.
    assert_eq!(s2.prefilled_tokens, 1);
    let e = g.generate(&[], &p, None, |_| Ok(())).unwrap_err().to_string();
    assert!(e.contains("prompt is empty"), "{e}");
    let e = g.generate(&[1, 5000, 2], &p, None, |_| Ok(())).unwrap_err().to_string();
    assert!(e.contains("token id 5000 is out of range"), "{e}");
    let bad = Tensor::new(&[[1u32, 9999]], &Device::Cpu).unwrap();
    assert!(m.forward_all(&bad).unwrap_err().to_string().contains("token id 9999"));
}

// ---- bad input ----

fn tiny_dir(tmp: &tempfile::TempDir) -> std::path::PathBuf {
    TinySpec::new(Arch::Llama).write_dir(tmp.path())
}

#[test]
fn missing_config_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tiny_dir(&tmp);
    std::fs::remove_file(d.join("config.json")).unwrap();
    let e = err_of(&d);
    assert!(e.contains("config.json is missing"), "{e}");
}

#[test]
fn corrupt_config_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tiny_dir(&tmp);
    std::fs::write(d.join("config.json"), "{ not json").unwrap();
    let e = err_of(&d);
    assert!(e.contains("config.json") && e.contains("invalid JSON"), "{e}");
}

#[test]
fn unknown_architecture_lists_supported() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tiny_dir(&tmp);
    let mut c: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(d.join("config.json")).unwrap()).unwrap();
    c["architectures"] = serde_json::json!(["GPTNeoXForCausalLM"]);
    std::fs::write(d.join("config.json"), c.to_string()).unwrap();
    let e = err_of(&d);
    assert!(e.contains("GPTNeoXForCausalLM") && e.contains("LlamaForCausalLM") && e.contains("Qwen3ForCausalLM"), "{e}");
}

#[test]
fn missing_safetensors_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tiny_dir(&tmp);
    std::fs::remove_file(d.join("model.safetensors")).unwrap();
    let e = err_of(&d);
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn truncated_or_bit_flipped_safetensors_name_the_file_and_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tiny_dir(&tmp);
    let f = d.join("model.safetensors");
    let whole = std::fs::read(&f).unwrap();
    // Cut in the data: the first tensor left without its bytes is named.
    std::fs::write(&f, &whole[..whole.len() - 100]).unwrap();
    let e = err_of(&d);
    assert!(e.contains("model.safetensors") && e.contains("cut short") && e.contains("tensor model."), "{e}");
    // Cut in the header.
    std::fs::write(&f, &whole[..20]).unwrap();
    let e = err_of(&d);
    assert!(e.contains("model.safetensors") && e.contains("header"), "{e}");
    // A flipped bit in a tensor's name: that tensor is missing, and named.
    let mut flipped = whole.clone();
    let at = 8 + flipped[8..].windows(7).position(|w| w == b"layers.").unwrap() + 2;
    flipped[at] ^= 0x01;
    std::fs::write(&f, &flipped).unwrap();
    let e = err_of(&d);
    assert!(e.contains("tensor") && e.contains("model."), "{e}");
    // A flipped bit in the header's JSON syntax.
    let mut flipped = whole;
    flipped[8] ^= 0x20;
    std::fs::write(&f, &flipped).unwrap();
    let e = err_of(&d);
    assert!(e.contains("model.safetensors") && e.contains("not a valid safetensors"), "{e}");
}

#[test]
fn corrupt_safetensors_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tiny_dir(&tmp);
    std::fs::write(d.join("model.safetensors"), b"\x10\x00\x00\x00\x00\x00\x00\x00garbage").unwrap();
    let e = err_of(&d);
    assert!(e.contains("model.safetensors") && e.contains("not a valid safetensors"), "{e}");
}

#[test]
fn wrong_tensor_shape_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = TinySpec::new(Arch::Llama);
    let d = spec.write_dir(tmp.path());
    let mut t = spec.tensors();
    t.insert("model.layers.1.mlp.up_proj.weight".into(), Tensor::zeros((7, 64), DType::F32, &Device::Cpu).unwrap());
    candle_core::safetensors::save(&t, d.join("model.safetensors")).unwrap();
    let e = err_of(&d);
    assert!(e.contains("model.layers.1.mlp.up_proj.weight"), "{e}");
}

#[test]
fn missing_tokenizer_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tiny_dir(&tmp);
    std::fs::remove_file(d.join("tokenizer.json")).unwrap();
    let e = err_of(&d);
    assert!(e.contains("tokenizer.json is missing"), "{e}");
}

#[test]
fn nonexistent_model_path_is_explained() {
    let e = ModelAssets::load("./no/such/dir").err().unwrap().to_string();
    assert!(e.contains("no such directory"), "{e}");
}

/// The CPU host step (what `Model::forward` runs for one token, and for a prompt of up to 128,
/// on the CPU in f32) against the op-by-op pass over the whole sequence: a 3-token prompt, a
/// 2-token chunk, then one token at a time; every architecture (tied head, q/k/v biases, q/k
/// norms, a sliding window shorter than the sequence), full precision and 4-bit.
#[test]
fn host_step_matches_the_full_pass() {
    for arch in [Arch::Llama, Arch::Mistral, Arch::Qwen2, Arch::Qwen3] {
        let tmp = tempfile::tempdir().unwrap();
        let mut spec = TinySpec::new(arch);
        spec.tie = arch == Arch::Llama;
        let dir = spec.write_dir(&tmp.path().join("fp"));
        if arch == Arch::Mistral {
            let p = dir.join("config.json");
            let mut c: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
            c["sliding_window"] = serde_json::json!(3);
            std::fs::write(&p, serde_json::to_vec(&c).unwrap()).unwrap();
        }
        let assets = ModelAssets::load(dir.to_str().unwrap()).unwrap();
        let q4 = tmp.path().join("rtn");
        let o = awq_run::awq::AwqOptions::new(awq_run::awq::Method::Rtn, awq_run::quant::QuantScheme::new(4, 32).unwrap());
        awq_run::awq::export::write_quantized(&assets, &q4, &o, None, &Device::Cpu, false).unwrap();
        for (what, d) in [("fp", dir.clone()), ("w4", q4)] {
            let (_, m) = load(&d);
            let tokens = Tensor::new(&PROMPT, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
            let full = m.forward_all(&tokens).unwrap().squeeze(0).unwrap();
            let mut cache = m.new_cache_with(64, Some(DType::F32)).unwrap();
            let mut fed = 0;
            for n in [3, 2].into_iter().chain(std::iter::repeat(1)) {
                if fed == PROMPT.len() {
                    break;
                }
                let got = m.forward(&tokens.narrow(1, fed, n).unwrap(), &mut cache).unwrap().squeeze(0).unwrap();
                fed += n;
                let e = rel_err(&got, &full.get(fed - 1).unwrap());
                assert!(e < 1e-5, "{arch:?} {what}: {n} tokens to position {}, host step vs full pass rel err {e}", fed - 1);
            }
            assert_eq!(cache.len(), PROMPT.len(), "{arch:?} {what}: the cache counts every token");
        }
    }
}

/// The engine refuses, before queueing, what would fail a whole batch's step or could never be
/// met: token ids outside the vocabulary (in the prompt or among the stop tokens), `min_tokens`
/// above `max_tokens`, more than 20 alternatives per token; the server checks these by field
/// first, and the engine again for any other caller.
#[test]
fn the_engine_refuses_requests_that_would_fail_a_batch() {
    use awq_run::engine::sampling::SamplingParams;
    use awq_run::engine::scheduler::{Engine, Request, SchedulerConfig, SubmitError};
    let dir = tempfile::tempdir().unwrap();
    let path = TinySpec::new(Arch::Llama).write_dir(&dir.path().join("tiny"));
    let assets = ModelAssets::load(path.to_str().unwrap()).unwrap();
    let model = assets.load_model(&Device::Cpu, DType::F32).unwrap();
    let vocab = model.cfg.vocab_size as u32;
    let cfg = SchedulerConfig { max_batch: 2, max_queue: 4, kv_blocks: 64, prefill_chunk: 64, kv_dtype: None, prefix_cache: true };
    let engine = Engine::start(model, assets.tokenizer.clone(), assets.eos_ids.clone(), cfg).unwrap();
    let request = |prompt: Vec<u32>| Request {
        prompt,
        params: SamplingParams { max_tokens: 4, ..Default::default() },
        stop: vec![],
        ignore_eos: false,
        stop_token_ids: vec![],
        min_tokens: 0,
        logprobs: None,
        prompt_logprobs: None,
        logit_bias: vec![],
        constraint: None,
        sink: Box::new(std::sync::mpsc::channel().0),
    };
    let refused = |r: Request, says: &str| match engine.submit(r) {
        Err(SubmitError::BadParams(m)) => assert!(m.contains(says), "{m}"),
        other => panic!("{other:?}: expected a refusal saying {says:?}"),
    };
    refused(request(vec![5, vocab]), &format!("token id {vocab} is outside the vocabulary"));
    refused(Request { stop_token_ids: vec![vocab + 7], ..request(vec![5]) }, &format!("token id {} is outside the vocabulary", vocab + 7));
    refused(Request { logit_bias: vec![(vocab, 1.0)], ..request(vec![5]) }, &format!("token id {vocab} is outside the vocabulary"));
    refused(Request { min_tokens: 5, ..request(vec![5]) }, "min_tokens (5) is more than max_tokens (4)");
    refused(Request { logprobs: Some(21), ..request(vec![5]) }, "21 alternatives per token");
    refused(Request { prompt_logprobs: Some(30), ..request(vec![5]) }, "30 alternatives per token");
    // max_tokens 0 is taken only to score the prompt.
    refused(Request { params: SamplingParams { max_tokens: 0, ..Default::default() }, ..request(vec![5]) }, "max-tokens");
    assert_eq!(engine.submit(Request { params: SamplingParams { max_tokens: 0, ..Default::default() }, prompt_logprobs: Some(0), ..request(vec![5, 6]) }), Ok(()));
    assert_eq!(engine.metrics.requests_rejected.load(std::sync::atomic::Ordering::Relaxed), 0, "refusals of bad requests are not queue rejections");
}
