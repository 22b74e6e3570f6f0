//! The quantization pass and AWQ checkpoints on tiny random models: round trip, an independent
//! decoder of the packed format, determinism, reading others' checkpoints, and bad input.
mod common;
use awq_run::awq::{AwqOptions, Method};
use awq_run::model::Arch;
use awq_run::quant::QuantScheme;
use awq_run::ModelAssets;
use candle_core::{DType, Device, Tensor};
use common::{rel_err, RandomTensor, Rng, TinySpec};
use std::path::{Path, PathBuf};

const PROMPT: [u32; 8] = [1, 40, 71, 80, 80, 83, 2, 100];

/// A calibration text of pseudo-words made of the tiny vocabulary's letters.
fn calib_text(dir: &Path) -> PathBuf {
    let mut r = Rng::new(11);
    let words = ["hello", "the", "world", "order", "tell", "her", "other", "hero", "lore"];
    let lines: Vec<String> = (0..80)
        .map(|_| (0..3).map(|_| words[(r.next_f32() * words.len() as f32) as usize % words.len()]).collect::<Vec<_>>().join(" "))
        .collect();
    let p = dir.join("calib.txt");
    std::fs::write(&p, lines.join("\n")).unwrap();
    p
}

fn options(method: Method, group: usize) -> AwqOptions {
    AwqOptions::new(method, QuantScheme::new(4, group).unwrap())
}

struct Fixture {
    _tmp: tempfile::TempDir,
    model: PathBuf,
    calib: PathBuf,
    root: PathBuf,
}

fn fixture(spec: &TinySpec) -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let model = spec.write_dir(&root.join("model"));
    let calib = calib_text(&root);
    Fixture { _tmp: tmp, model, calib, root }
}

fn calib_blocks(a: &ModelAssets, f: &Fixture) -> Vec<Vec<u32>> {
    awq_run::awq::calib::calibration_blocks(a, &f.calib, 6, 32).unwrap()
}

fn logits(m: &awq_run::model::Model) -> Tensor {
    let t = Tensor::new(&PROMPT, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    m.forward_all(&t).unwrap()
}

#[test]
fn checkpoint_round_trip_matches_in_memory_model() {
    // Llama with GQA (o_proj's scales shared over the query heads of a value head, or skipped
    // as AutoAWQ does), without GQA, qwen2 with biases, qwen3 with q/k norms.
    let mut no_gqa = TinySpec::new(Arch::Llama);
    no_gqa.kv_heads = no_gqa.heads;
    let mut tied = TinySpec::new(Arch::Llama);
    tied.tie = true;
    for spec in [tied, no_gqa, TinySpec::new(Arch::Qwen2), TinySpec::new(Arch::Qwen3)] {
        let f = fixture(&spec);
        let a = ModelAssets::load(f.model.to_str().unwrap()).unwrap();
        let blocks = calib_blocks(&a, &f);
        for (method, gqa_o_proj) in [(Method::Awq, true), (Method::Awq, false), (Method::Rtn, true)] {
            let mut o = options(method, 32);
            o.gqa_o_proj = gqa_o_proj;
            let calib = (method == Method::Awq).then_some(blocks.as_slice());
            let (mem, report) = awq_run::awq::fake_quantized_model(&a, &Device::Cpu, calib, &o).unwrap();
            if method == Method::Awq {
                let groups_per_block = if spec.kv_heads == spec.heads || gqa_o_proj { 4 } else { 3 };
                assert_eq!(report.groups.len(), spec.layers * groups_per_block, "{spec:?}");
                assert!(report.groups.iter().all(|g| g.loss_after <= g.loss_before * (1.0 + 1e-6)));
                // The per-ratio losses and the per-layer record that `--report` and awq_report.json carry.
                for g in &report.groups {
                    assert_eq!(g.losses.len(), o.n_grid);
                    assert_eq!(g.loss_after, g.losses.iter().copied().fold(f64::INFINITY, f64::min));
                }
                assert_eq!(report.layers.len(), spec.layers * 7);
                for l in &report.layers {
                    let clipped = !matches!(l.layer.as_str(), "q_proj" | "k_proj");
                    assert_eq!(l.clip_shrink.is_some(), clipped, "{}", l.layer);
                    assert!(l.clip_shrink.is_none_or(|r| (0.5..=1.0 + 1e-6).contains(&r)), "{l:?}");
                    assert!(l.output_mse.is_finite() && l.output_mse_rtn.is_finite(), "{l:?}");
                }
            }
            let out = f.root.join(format!("q-{method:?}-{gqa_o_proj}"));
            awq_run::awq::export::write_quantized(&a, &out, &o, calib, &Device::Cpu, false).unwrap();
            let qa = ModelAssets::load(out.to_str().unwrap()).unwrap();
            let loaded = qa.load_model(&Device::Cpu, DType::F32).unwrap();
            let e = rel_err(&logits(&loaded), &logits(&mem));
            assert!(e < 1e-3, "{:?} {method:?}: round trip rel err {e}", spec.arch);
            // The in-memory model differs from the checkpoint only by the f16 storage of the
            // unquantized tensors: every quantized linear is bit-identical.
            for (bm, bl) in mem.layers.iter().zip(&loaded.layers) {
                for ((n, lm), (_, ll)) in bm.linears().iter().zip(bl.linears().iter()) {
                    assert_eq!(awq_run::linear::quantized_weight(lm).unwrap(), awq_run::linear::quantized_weight(ll).unwrap(), "{n}");
                }
            }
        }
    }
}

/// Unpacks AutoAWQ GEMM tensors straight from docs/AWQ.md ("The AutoAWQ GEMM checkpoint"), sharing no code with
/// the packer: shift by 0, 4, ..., 28, then reorder with REVERSE.
fn decode_awq_gemm(words: &[i32], rows: usize, out: usize) -> Vec<Vec<u8>> {
    const REVERSE: [usize; 8] = [0, 4, 1, 5, 2, 6, 3, 7];
    let mut m = vec![vec![0u8; out]; rows];
    for r in 0..rows {
        for c in 0..out / 8 {
            let w = words[r * (out / 8) + c] as u32;
            let nibbles: Vec<u8> = (0..8).map(|k| ((w >> (4 * k)) & 0xF) as u8).collect();
            for j in 0..8 {
                m[r][8 * c + j] = nibbles[REVERSE[j]];
            }
        }
    }
    m
}

fn read_tensor_bytes(st: &safetensors::SafeTensors, name: &str) -> (Vec<usize>, Vec<u8>) {
    let t = st.tensor(name).unwrap_or_else(|_| panic!("{name} missing"));
    (t.shape().to_vec(), t.data().to_vec())
}

#[test]
fn independent_decoder_recovers_codes_and_weights() {
    let spec = TinySpec::new(Arch::Qwen2);
    let f = fixture(&spec);
    let a = ModelAssets::load(f.model.to_str().unwrap()).unwrap();
    let blocks = calib_blocks(&a, &f);
    let o = options(Method::Awq, 32);
    let (mem, _) = awq_run::awq::fake_quantized_model(&a, &Device::Cpu, Some(&blocks), &o).unwrap();
    let out = f.root.join("q");
    awq_run::awq::export::write_quantized(&a, &out, &o, Some(&blocks), &Device::Cpu, false).unwrap();
    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for (layer, block) in mem.layers.iter().enumerate() {
        for (name, lin) in block.linears() {
            let p = format!("model.layers.{layer}.{name}");
            let q = awq_run::linear::quantized_weight(lin).unwrap().unwrap();
            let (in_f, out_f, g) = (q.shape.k, q.shape.n, 32);
            let (shape, data) = read_tensor_bytes(&st, &format!("{p}.qweight"));
            assert_eq!(shape, vec![in_f, out_f / 8], "{p}.qweight");
            let words: Vec<i32> = data.chunks_exact(4).map(|b| i32::from_le_bytes(b.try_into().unwrap())).collect();
            let codes = decode_awq_gemm(&words, in_f, out_f);
            let (zshape, zdata) = read_tensor_bytes(&st, &format!("{p}.qzeros"));
            assert_eq!(zshape, vec![in_f / g, out_f / 8]);
            let zwords: Vec<i32> = zdata.chunks_exact(4).map(|b| i32::from_le_bytes(b.try_into().unwrap())).collect();
            let zeros = decode_awq_gemm(&zwords, in_f / g, out_f);
            let (sshape, sdata) = read_tensor_bytes(&st, &format!("{p}.scales"));
            assert_eq!(sshape, vec![in_f / g, out_f]);
            let scales: Vec<f32> = sdata.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect();
            let dense = lin.dense_weight().unwrap().to_vec2::<f32>().unwrap(); // [out, in]
            for i in 0..in_f {
                for o_ in 0..out_f {
                    assert_eq!(codes[i][o_], q.codes[o_ * in_f + i], "{p} code ({o_},{i})");
                    let z = zeros[i / g][o_];
                    assert_eq!(z, q.zeros[o_ * (in_f / g) + i / g], "{p} zero");
                    let w = (f32::from(codes[i][o_]) - f32::from(z)) * scales[(i / g) * out_f + o_];
                    assert_eq!(w, dense[o_][i], "{p} weight ({o_},{i})");
                }
            }
            if name.ends_with("q_proj") || name.ends_with("k_proj") || name.ends_with("v_proj") {
                assert!(st.tensor(&format!("{p}.bias")).is_ok(), "{p}.bias missing");
            }
        }
    }
    // The config carries the AutoAWQ quantization_config.
    let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    let qc = &cfg["quantization_config"];
    assert_eq!((qc["quant_method"].as_str(), qc["bits"].as_i64(), qc["group_size"].as_i64(), qc["version"].as_str()), (Some("awq"), Some(4), Some(32), Some("gemm")));
    assert_eq!(qc["zero_point"], true);
    for f_ in ["tokenizer.json", "tokenizer_config.json", "generation_config.json", "awq_report.json"] {
        assert!(out.join(f_).exists(), "{f_}");
    }
}

#[test]
fn quantization_is_deterministic() {
    let spec = TinySpec::new(Arch::Llama);
    let f = fixture(&spec);
    let a = ModelAssets::load(f.model.to_str().unwrap()).unwrap();
    let blocks = calib_blocks(&a, &f);
    let o = options(Method::Awq, 32);
    let (d1, d2) = (f.root.join("a"), f.root.join("b"));
    awq_run::awq::export::write_quantized(&a, &d1, &o, Some(&blocks), &Device::Cpu, false).unwrap();
    awq_run::awq::export::write_quantized(&a, &d2, &o, Some(&blocks), &Device::Cpu, false).unwrap();
    let mut names: Vec<String> = std::fs::read_dir(&d1).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().to_string()).collect();
    names.sort();
    for n in names.iter().filter(|n| *n != "awq_report.json") {
        assert_eq!(std::fs::read(d1.join(n)).unwrap(), std::fs::read(d2.join(n)).unwrap(), "{n} differs");
    }
    // The report differs only in its timings.
    let strip = |p: &Path| {
        let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(p.join("awq_report.json")).unwrap()).unwrap();
        v.as_object_mut().unwrap().remove("total_secs");
        v.as_object_mut().unwrap().remove("block_secs");
        v.as_object_mut().unwrap().remove("phase_secs");
        v
    };
    assert_eq!(strip(&d1), strip(&d2));
}

#[test]
fn shards_and_index_for_large_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let mut w = awq_run::checkpoint::ShardWriter::new(tmp.path(), 1000);
    for i in 0..5 {
        w.add(format!("t{i}"), Tensor::zeros(100, DType::F32, &Device::Cpu).unwrap()).unwrap();
    }
    w.finish().unwrap();
    let idx: serde_json::Value = serde_json::from_slice(&std::fs::read(tmp.path().join("model.safetensors.index.json")).unwrap()).unwrap();
    // 400-byte tensors, at most 1000 bytes a shard: two per shard.
    assert_eq!(idx["weight_map"]["t0"], "model-00001-of-00003.safetensors");
    assert_eq!(idx["weight_map"]["t1"], "model-00001-of-00003.safetensors");
    assert_eq!(idx["weight_map"]["t4"], "model-00003-of-00003.safetensors");
    for i in 1..=3 {
        assert!(tmp.path().join(format!("model-0000{i}-of-00003.safetensors")).exists());
    }
    assert_eq!(idx["metadata"]["total_size"], 2000);
}

fn rewrite_json(p: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(p, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

#[test]
fn reads_legacy_configs_and_refuses_other_formats() {
    let spec = TinySpec::new(Arch::Qwen2);
    let f = fixture(&spec);
    let a = ModelAssets::load(f.model.to_str().unwrap()).unwrap();
    let o = options(Method::Rtn, 32);
    let out = f.root.join("q");
    awq_run::awq::export::write_quantized(&a, &out, &o, None, &Device::Cpu, false).unwrap();
    let reference = logits(&ModelAssets::load(out.to_str().unwrap()).unwrap().load_model(&Device::Cpu, DType::F32).unwrap());
    let load = || ModelAssets::load(out.to_str().unwrap()).and_then(|a| a.load_model(&Device::Cpu, DType::F32));

    // Legacy quant_config.json (w_bit / q_group_size / "GEMM"), and quantize_config.json.
    rewrite_json(&out.join("config.json"), |c| {
        c.as_object_mut().unwrap().remove("quantization_config");
    });
    for file in ["quant_config.json", "quantize_config.json"] {
        std::fs::write(out.join(file), r#"{"zero_point": true, "q_group_size": 32, "w_bit": 4, "version": "GEMM"}"#).unwrap();
        assert_eq!(rel_err(&logits(&load().unwrap()), &reference), 0.0, "{file}");
        std::fs::remove_file(out.join(file)).unwrap();
    }
    // Extra keys are tolerated.
    rewrite_json(&out.join("config.json"), |c| {
        c["quantization_config"] = serde_json::json!({"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": true,
            "version": "gemm", "backend": "autoawq", "do_fuse": false, "fuse_max_seq_len": null, "modules_to_fuse": null,
            "exllama_config": null, "modules_to_not_convert": null});
    });
    assert_eq!(rel_err(&logits(&load().unwrap()), &reference), 0.0);
    // Other layouts and methods are refused, naming what was found.
    for (qc, expect) in [
        (serde_json::json!({"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemv"}), "\"gemv\""),
        (serde_json::json!({"quant_method": "awq", "bits": 4, "group_size": 32, "version": "exllama"}), "\"exllama\""),
        (serde_json::json!({"quant_method": "awq", "bits": 4, "group_size": 32, "version": "marlin"}), "\"marlin\""),
        // A GPTQ config over AWQ tensors: read as GPTQ, the layout's shapes do not match.
        (serde_json::json!({"quant_method": "gptq", "bits": 4, "group_size": 32}), "q_proj.qweight"),
        (serde_json::json!({"quant_method": "compressed-tensors"}), "\"compressed-tensors\""),
        (serde_json::json!({"quant_method": "bitsandbytes", "load_in_4bit": true}), "\"bitsandbytes\""),
    ] {
        rewrite_json(&out.join("config.json"), |c| c["quantization_config"] = qc.clone());
        let e = load().err().unwrap().to_string();
        assert!(e.contains(expect), "{expect}: {e}");
    }
}

// ---- bad input: each a clear error, nothing written ----

fn assert_nothing_written(root: &Path, out: &Path) {
    assert!(!out.exists(), "{} was written", out.display());
    for e in std::fs::read_dir(root).unwrap() {
        let n = e.unwrap().file_name().to_string_lossy().to_string();
        assert!(!n.contains(".tmp-"), "temporary directory {n} left behind");
    }
}

fn quantize_err(f: &Fixture, a: &ModelAssets, o: &AwqOptions, calib: Option<&[Vec<u32>]>, out: &Path) -> String {
    let e = awq_run::awq::export::write_quantized(a, out, o, calib, &Device::Cpu, false).expect_err("should fail").to_string();
    assert_nothing_written(&f.root, out);
    e
}

#[test]
fn group_size_that_does_not_divide_names_the_layer() {
    let f = fixture(&TinySpec::new(Arch::Llama));
    let a = ModelAssets::load(f.model.to_str().unwrap()).unwrap();
    let o = AwqOptions::new(Method::Rtn, QuantScheme::new(4, 128).unwrap());
    let e = quantize_err(&f, &a, &o, None, &f.root.join("out"));
    assert!(e.contains("model.layers.0.self_attn.q_proj") && e.contains("64") && e.contains("32, 64"), "{e}");
}

#[test]
fn calibration_shorter_than_one_block() {
    let f = fixture(&TinySpec::new(Arch::Llama));
    let a = ModelAssets::load(f.model.to_str().unwrap()).unwrap();
    std::fs::write(f.root.join("short.txt"), "hello the world").unwrap();
    let e = awq_run::awq::calib::calibration_blocks(&a, &f.root.join("short.txt"), 4, 512).unwrap_err().to_string();
    assert!(e.contains("short.txt") && e.contains("shorter than one block"), "{e}");
}

#[test]
fn nan_in_activations_is_refused() {
    let spec = TinySpec::new(Arch::Llama);
    let f = fixture(&spec);
    let mut t = spec.tensors();
    let w = t["model.layers.0.mlp.up_proj.weight"].clone();
    let nan = w.slice_assign(&[3..4, 5..6], &Tensor::new(&[[f32::NAN]], &Device::Cpu).unwrap()).unwrap();
    t.insert("model.layers.0.mlp.up_proj.weight".into(), nan);
    candle_core::safetensors::save(&t, f.model.join("model.safetensors")).unwrap();
    let a = ModelAssets::load(f.model.to_str().unwrap()).unwrap();
    let blocks = calib_blocks(&a, &f);
    let e = quantize_err(&f, &a, &options(Method::Awq, 32), Some(&blocks), &f.root.join("out"));
    assert!(e.contains("block 0") && e.contains("NaN or inf"), "{e}");
}

#[test]
fn out_inside_model_is_refused() {
    let f = fixture(&TinySpec::new(Arch::Llama));
    let a = ModelAssets::load(f.model.to_str().unwrap()).unwrap();
    let out = f.model.join("quantized");
    let e = awq_run::awq::export::write_quantized(&a, &out, &options(Method::Rtn, 32), None, &Device::Cpu, false).err().unwrap().to_string();
    assert!(e.contains("inside the model directory"), "{e}");
    assert!(!out.exists());
}

#[test]
fn existing_out_needs_force_and_bits_other_than_4_are_refused() {
    let f = fixture(&TinySpec::new(Arch::Llama));
    let a = ModelAssets::load(f.model.to_str().unwrap()).unwrap();
    let out = f.root.join("out");
    std::fs::create_dir(&out).unwrap();
    let e = awq_run::awq::export::write_quantized(&a, &out, &options(Method::Rtn, 32), None, &Device::Cpu, false).err().unwrap().to_string();
    assert!(e.contains("already exists") && e.contains("--force"), "{e}");
    awq_run::awq::export::write_quantized(&a, &out, &options(Method::Rtn, 32), None, &Device::Cpu, true).unwrap();
    let o3 = AwqOptions::new(Method::Rtn, QuantScheme::new(3, 32).unwrap());
    let e = quantize_err(&f, &a, &o3, None, &f.root.join("out3"));
    assert!(e.contains("--bits 3") && e.contains("4-bit"), "{e}");
}

#[test]
fn unsupported_architecture_is_refused_by_quantize() {
    let f = fixture(&TinySpec::new(Arch::Llama));
    rewrite_json(&f.model.join("config.json"), |c| c["architectures"] = serde_json::json!(["FalconForCausalLM"]));
    let out = f.root.join("out");
    let o = std::process::Command::new(common::bin())
        .args(["quantize", "--model", f.model.to_str().unwrap(), "--out", out.to_str().unwrap(), "--method", "rtn", "--group-size", "32"])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("FalconForCausalLM") && e.contains("LlamaForCausalLM"), "{e}");
    assert_nothing_written(&f.root, &out);
}

#[test]
fn quantize_cli_writes_a_checkpoint_that_generates() {
    let f = fixture(&TinySpec::new(Arch::Llama));
    let out = f.root.join("awq");
    let o = std::process::Command::new(common::bin())
        .args(["quantize", "--model", f.model.to_str().unwrap(), "--out", out.to_str().unwrap(), "--group-size", "32",
               "--calib", f.calib.to_str().unwrap(), "--n-samples", "4", "--seqlen", "32"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let g = std::process::Command::new(common::bin())
        .args(["generate", "--model", out.to_str().unwrap(), "--prompt", "hello", "--max-tokens", "4"])
        .output()
        .unwrap();
    assert!(g.status.success(), "{}", String::from_utf8_lossy(&g.stderr));
}

#[test]
fn bad_clip_flags_are_named_before_any_work() {
    let f = fixture(&TinySpec::new(Arch::Llama));
    for (flag, value, says) in [("--clip", "wide", "--clip wide"), ("--clip-tokens", "0", "--clip-tokens 0"), ("--clip-tokens", "many", "--clip-tokens many")] {
        let out = f.root.join("bad-clip");
        let o = std::process::Command::new(common::bin())
            .args(["quantize", "--model", f.model.to_str().unwrap(), "--out", out.to_str().unwrap(), "--group-size", "32"])
            .args(["--calib", f.calib.to_str().unwrap(), "--n-samples", "4", "--seqlen", "32", flag, value])
            .output()
            .unwrap();
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && e.contains(says), "{flag} {value}: {e}");
        assert_nothing_written(&f.root, &out);
    }
}

#[test]
fn folding_o_proj_scales_into_shared_value_heads_keeps_the_function() {
    // At 8 bits the quantization error is small, so a scale folded into the wrong v_proj row
    // (or not repeated over the right query heads) would stand out against it.
    let spec = TinySpec::new(Arch::Llama);
    assert!(spec.kv_heads < spec.heads, "the fixture has grouped-query attention");
    let f = fixture(&spec);
    let a = ModelAssets::load(f.model.to_str().unwrap()).unwrap();
    let blocks = calib_blocks(&a, &f);
    let fp = logits(&a.load_model(&Device::Cpu, DType::F32).unwrap());
    let mut errs = Vec::new();
    for gqa_o_proj in [true, false] {
        let mut o = AwqOptions::new(Method::Awq, QuantScheme::new(8, 32).unwrap());
        o.gqa_o_proj = gqa_o_proj;
        let (m, report) = awq_run::awq::fake_quantized_model(&a, &Device::Cpu, Some(&blocks), &o).unwrap();
        let o_groups: Vec<_> = report.groups.iter().filter(|g| g.layers == ["o_proj"]).collect();
        assert_eq!(o_groups.len(), if gqa_o_proj { spec.layers } else { 0 });
        // The searched ratio is not 0 somewhere, or the test shows nothing.
        assert!(!gqa_o_proj || o_groups.iter().any(|g| g.ratio > 0.0), "{o_groups:?}");
        errs.push(rel_err(&logits(&m), &fp));
    }
    assert!(errs[0] < 0.02 && errs[0] < errs[1] * 2.0 + 1e-3, "8-bit AWQ against full precision: with shared o_proj scales {} without {}", errs[0], errs[1]);
}

#[test]
fn awq_beats_rtn_on_a_planted_salient_channel() {
    let dev = Device::Cpu;
    let mut r = Rng::new(5);
    let (out, inp, tokens) = (64, 256, 1024);
    let w = r.tensor(&[out, inp], 0.05);
    let mut gain = vec![1f32; inp];
    gain[17] = 80.0;
    let x = r.tensor(&[tokens, inp], 1.0).broadcast_mul(&Tensor::new(gain.as_slice(), &dev).unwrap()).unwrap();
    let mse = |wq: &Tensor| {
        let d = (x.matmul(&wq.t().unwrap()).unwrap() - x.matmul(&w.t().unwrap()).unwrap()).unwrap();
        d.sqr().unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap()
    };
    for (bits, group) in [(4, 64), (3, 128)] {
        let p = QuantScheme::new(bits, group).unwrap();
        let rtn = mse(&awq_run::quant::fake_quantize(&w, p).unwrap());
        let (eff, c) = awq_run::awq::awq_linear(&w, &x, &AwqOptions::new(Method::Awq, p)).unwrap();
        let awq = mse(&eff);
        assert!(awq < 0.5 * rtn, "w{bits}g{group}: AWQ {awq} vs RTN {rtn}");
        assert!(c.ratio > 0.0);
        // Plain scaling at ratio 0 is exactly RTN.
        let mut plain = AwqOptions::new(Method::Awq, p);
        plain.duo_scaling = false;
        plain.n_grid = 1;
        plain.clip = false;
        let (eff0, c0) = awq_run::awq::awq_linear(&w, &x, &plain).unwrap();
        assert_eq!(c0.ratio, 0.0);
        assert_eq!(mse(&eff0), rtn);
    }
}

/// AutoAWQ's group quantizer in f64 (docs/AWQ.md, "The quantizer"), written here from the formula.
fn fake_quant_f64(w: &[f64], cols: usize, g: usize, bits: u32) -> Vec<f64> {
    let mc = f64::from((1u32 << bits) - 1);
    let mut out = vec![0.0; w.len()];
    for (row, o) in w.chunks(cols).zip(out.chunks_mut(cols)) {
        for (grp, og) in row.chunks(g).zip(o.chunks_mut(g)) {
            let mx = grp.iter().copied().fold(f64::MIN, f64::max);
            let mn = grp.iter().copied().fold(f64::MAX, f64::min);
            let scale = (mx - mn).max(1e-5) / mc;
            let zero = (-(mn / scale).round()).clamp(0.0, mc);
            for (v, q) in grp.iter().zip(og.iter_mut()) {
                *q = (((v / scale).round() + zero).clamp(0.0, mc) - zero) * scale;
            }
        }
    }
    out
}

#[test]
fn three_bit_scale_search_matches_a_straightforward_f64_search() {
    // Issue 18 compared the 3-bit path with AutoAWQ's semantics layer by layer and found the same
    // ratio in every group: this pins that, on a layer with outlier input channels, against the
    // duo-scaling grid written out in f64 here (no clipping, so that only the search is compared).
    let mut r = Rng::new(18);
    let (out, inp, tokens, g, bits) = (48, 128, 256, 64, 3);
    let w = r.tensor(&[out, inp], 0.05);
    let mut gain = vec![1f32; inp];
    for (i, c) in [5usize, 40, 77, 100].iter().enumerate() {
        gain[*c] = 10.0 * (i + 2) as f32;
    }
    let x = r.tensor(&[tokens, inp], 1.0).broadcast_mul(&Tensor::new(gain.as_slice(), &Device::Cpu).unwrap()).unwrap();
    let mut o = AwqOptions::new(Method::Awq, QuantScheme::new(bits, g).unwrap());
    o.clip = false;
    let (_, c) = awq_run::awq::awq_linear(&w, &x, &o).unwrap();

    let wv: Vec<f64> = w.flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(f64::from).collect();
    let xv: Vec<f64> = x.flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(f64::from).collect();
    let x_mean: Vec<f64> = (0..inp).map(|ch| (0..tokens).map(|t| xv[t * inp + ch].abs()).sum::<f64>() / tokens as f64).collect();
    let w_mean: Vec<f64> = (0..inp)
        .map(|ch| {
            let gs = ch / g * g;
            (0..out).map(|o| wv[o * inp + ch].abs() / (wv[o * inp + gs..o * inp + gs + g].iter().map(|v| v.abs()).fold(0.0, f64::max) + 1e-6)).sum::<f64>() / out as f64
        })
        .collect();
    let output = |wq: &[f64]| -> Vec<f64> {
        let mut y = Vec::with_capacity(tokens * out);
        for t in 0..tokens {
            for o in 0..out {
                y.push((0..inp).map(|k| xv[t * inp + k] * wq[o * inp + k]).sum::<f64>());
            }
        }
        y
    };
    let reference = output(&wv);
    let losses: Vec<f64> = (0..o.n_grid)
        .map(|i| {
            let a = i as f64 / o.n_grid as f64;
            let s: Vec<f64> = (0..inp).map(|ch| (x_mean[ch].powf(a) / (w_mean[ch].powf(1.0 - a) + 1e-4)).max(1e-4)).collect();
            let norm = (s.iter().copied().fold(f64::MIN, f64::max) * s.iter().copied().fold(f64::MAX, f64::min)).sqrt();
            let s: Vec<f64> = s.iter().map(|v| v / norm).collect();
            let scaled: Vec<f64> = wv.iter().enumerate().map(|(j, v)| v * s[j % inp]).collect();
            let q: Vec<f64> = fake_quant_f64(&scaled, inp, g, bits).iter().enumerate().map(|(j, v)| v / s[j % inp]).collect();
            output(&q).iter().zip(&reference).map(|(a, b)| (a - b).powi(2)).sum::<f64>() / reference.len() as f64
        })
        .collect();
    for (i, (ours, exact)) in c.losses.iter().zip(&losses).enumerate() {
        assert!((ours - exact).abs() <= 1e-3 * exact, "ratio {i}/{}: loss {ours} vs f64 {exact}", o.n_grid);
    }
    let best = losses.iter().copied().fold(f64::INFINITY, f64::min);
    let chosen = losses[(c.ratio * o.n_grid as f64).round() as usize];
    assert!(chosen <= best * (1.0 + 1e-3), "chose ratio {} (f64 loss {chosen}), the f64 optimum is {best}", c.ratio);
    assert!(c.ratio > 0.0, "outlier channels should make scaling worthwhile");
}

#[test]
fn the_ratio_grid_can_be_scored_on_a_subset_of_the_calibration() {
    let f = fixture(&TinySpec::new(Arch::Llama));
    let a = ModelAssets::load(f.model.to_str().unwrap()).unwrap();
    let blocks = calib_blocks(&a, &f);
    let mut o = options(Method::Awq, 32);
    o.search_samples = 2;
    let (m, report) = awq_run::awq::fake_quantized_model(&a, &Device::Cpu, Some(&blocks), &o).unwrap();
    assert_eq!((report.search_samples, report.calibration_blocks), (2, blocks.len()));
    // Scored on the subset, each group's choice is no worse there than plain RTN.
    assert!(report.groups.iter().all(|g| g.loss_after <= g.loss_before * (1.0 + 1e-6)));
    assert!(logits(&m).flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|v| v.is_finite()));
}
