//! GPTQ and AWQ+GPTQ on tiny random models: checkpoints written, read back and compared with
//! the in-memory model; a checkpoint in AutoGPTQ's layout (act-order `g_idx`) made by a packer
//! written here; bad input.
mod common;
use awq_run::awq::{AwqOptions, Method};
use awq_run::model::Arch;
use awq_run::quant::QuantScheme;
use awq_run::ModelAssets;
use candle_core::{DType, Device, Tensor};
use common::{rel_err, Rng, TinySpec};
use std::collections::HashMap;
use std::path::Path;

const PROMPT: [u32; 8] = [1, 40, 71, 80, 80, 83, 2, 100];

fn logits(m: &awq_run::model::Model) -> Tensor {
    let t = Tensor::new(&PROMPT, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    m.forward_all(&t).unwrap()
}

/// Random calibration blocks (GPTQ needs more tokens than inputs for a useful Hessian).
fn calib(vocab: usize) -> Vec<Vec<u32>> {
    let mut r = Rng::new(5);
    (0..6).map(|_| (0..48).map(|_| (r.next_f32() * vocab as f32) as u32 % vocab as u32).collect()).collect()
}

fn gptq_options(method: Method, f: impl FnOnce(&mut awq_run::awq::gptq::GptqOptions)) -> AwqOptions {
    let mut o = AwqOptions::new(method, QuantScheme::new(4, 32).unwrap());
    f(&mut o.gptq);
    o
}

fn read_json(p: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

#[test]
fn gptq_checkpoints_round_trip_to_the_fake_quantized_model() {
    for spec in [TinySpec::new(Arch::Llama), TinySpec::new(Arch::Qwen2)] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = spec.write_dir(&tmp.path().join("model"));
        let a = ModelAssets::load(dir.to_str().unwrap()).unwrap();
        let blocks = calib(spec.vocab());
        let fp = logits(&a.load_model(&Device::Cpu, DType::F32).unwrap());
        let variants: Vec<(&str, AwqOptions)> = vec![
            ("gptq", gptq_options(Method::Gptq, |_| {})),
            ("gptq act-order static", gptq_options(Method::Gptq, |g| g.act_order = true)),
            ("gptq act-order g_idx", gptq_options(Method::Gptq, |g| (g.act_order, g.static_groups) = (true, false))),
            ("gptq sym, not sequential", gptq_options(Method::Gptq, |g| (g.sym, g.true_sequential) = (true, false))),
            ("awq+gptq", gptq_options(Method::AwqGptq, |_| {})),
            ("gptq error propagation", gptq_options(Method::Gptq, |g| g.propagate = 0.5)),
            ("awq+gptq act-order error propagation into down_proj", gptq_options(Method::AwqGptq, |g| (g.act_order, g.propagate, g.propagate_down) = (true, 1.0, true))),
        ];
        for (label, o) in variants {
            let label = format!("{:?} {label}", spec.arch);
            let (mem, report) = awq_run::awq::fake_quantized_model(&a, &Device::Cpu, Some(&blocks), &o).unwrap();
            assert_eq!(report.layers.len(), spec.layers * 7, "{label}");
            for l in &report.layers {
                assert!(l.hessian_trace.unwrap() > 0.0 && l.gptq_loss.unwrap() >= 0.0 && l.damp == Some(0.01), "{label}: {l:?}");
                // GPTQ beats round-to-nearest (asymmetric, as is GPTQ here) on the inputs it saw
                // (under error propagation its error is against other inputs: not comparable).
                assert!(o.gptq.sym || o.gptq.propagate > 0.0 || l.output_mse <= l.output_mse_rtn * 1.05, "{label} {} {}: {} vs RTN {}", l.block, l.layer, l.output_mse, l.output_mse_rtn);
            }
            let want = logits(&mem);
            assert!(rel_err(&want, &fp) < 0.5, "{label}: the quantized model is far from full precision");
            let out = tmp.path().join(label.replace([' ', ','], "-"));
            awq_run::awq::export::write_quantized(&a, &out, &o, Some(&blocks), &Device::Cpu, false).unwrap();
            let qc = &read_json(&out.join("config.json"))["quantization_config"];
            let gptq_layout = o.method == Method::Gptq;
            assert_eq!(qc["quant_method"], if gptq_layout { "gptq" } else { "awq" }, "{label}");
            if gptq_layout {
                assert_eq!(qc["desc_act"], o.gptq.act_order, "{label}");
                assert_eq!(qc["sym"], o.gptq.sym, "{label}");
                assert_eq!(qc["checkpoint_format"], "gptq", "{label}");
                let st = candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
                let g_idx = st["model.layers.0.mlp.down_proj.g_idx"].to_vec1::<i32>().unwrap();
                let natural = g_idx.iter().enumerate().all(|(i, &g)| g as usize == i / 32);
                let dynamic_groups = o.gptq.act_order && !o.gptq.static_groups;
                assert_eq!(natural, !dynamic_groups, "{label}: g_idx {g_idx:?}");
            }
            let back = ModelAssets::load(out.to_str().unwrap()).unwrap().load_model(&Device::Cpu, DType::F32).unwrap();
            let e = rel_err(&logits(&back), &want);
            assert!(e < 1e-3, "{label}: checkpoint vs in memory {e}");
        }
    }
}

#[test]
fn error_propagation_leaves_the_first_layers_alone_and_moves_the_later_ones() {
    // Block 0's q/k/v see the embeddings in both streams: no drift, the same codes. Every later
    // layer reads inputs the quantized layers before it changed, and is rounded differently.
    let spec = TinySpec::new(Arch::Llama);
    let tmp = tempfile::tempdir().unwrap();
    let dir = spec.write_dir(&tmp.path().join("model"));
    let a = ModelAssets::load(dir.to_str().unwrap()).unwrap();
    let blocks = calib(spec.vocab());
    let run = |alpha: f64| awq_run::awq::fake_quantized_model(&a, &Device::Cpu, Some(&blocks), &gptq_options(Method::Gptq, |g| g.propagate = alpha)).unwrap().1;
    let (plain, prop) = (run(0.0), run(1.0));
    for (p, q) in plain.layers.iter().zip(&prop.layers) {
        assert_eq!((p.block, &p.layer), (q.block, &q.layer));
        let first = p.block == 0 && ["q_proj", "k_proj", "v_proj"].contains(&p.layer.as_str());
        assert_eq!(p.gptq_loss == q.gptq_loss, first, "block {} {}: loss {:?} vs {:?}", p.block, p.layer, p.gptq_loss, q.gptq_loss);
    }
    // down_proj is left out unless asked for: asked, it is rounded differently.
    let down = |r: &awq_run::awq::Report| r.layers.iter().filter(|l| l.layer == "down_proj").map(|l| l.gptq_loss).collect::<Vec<_>>();
    let with_down = awq_run::awq::fake_quantized_model(&a, &Device::Cpu, Some(&blocks), &gptq_options(Method::Gptq, |g| (g.propagate, g.propagate_down) = (1.0, true))).unwrap().1;
    assert_ne!(down(&with_down), down(&prop));
}

/// Packs `codes` (`[out][in]`, natural input order) in AutoGPTQ's layout, written here from the
/// format's description: 8 inputs per int32 along the input dimension, plain nibble order.
fn pack_qweight(codes: &[u8], out: usize, inp: usize) -> Vec<i32> {
    let mut w = vec![0u32; inp / 8 * out];
    for i in 0..inp {
        for o in 0..out {
            w[(i / 8) * out + o] |= u32::from(codes[o * inp + i]) << (4 * (i % 8));
        }
    }
    w.into_iter().map(|x| x as i32).collect()
}

/// A model quantized by a round-to-nearest written here, with act-order groups (a random
/// assignment of inputs to groups), stored as AutoGPTQ stores it; and the same weights
/// dequantized, as a full-precision model.
fn autogptq_checkpoint(spec: &TinySpec, root: &Path, legacy_config: bool) -> (std::path::PathBuf, std::path::PathBuf) {
    let g = 32;
    let mut r = Rng::new(77);
    let src = spec.tensors();
    let mut packed: HashMap<String, Tensor> = HashMap::new();
    let mut dense: HashMap<String, Tensor> = HashMap::new();
    let cpu = Device::Cpu;
    for (name, t) in &src {
        let Some(prefix) = name.strip_suffix(".weight").filter(|p| p.contains("_proj")) else {
            let t16 = t.to_dtype(DType::F16).unwrap();
            packed.insert(name.clone(), t16.clone());
            dense.insert(name.clone(), t16.to_dtype(DType::F32).unwrap());
            continue;
        };
        if name.contains("bias") {
            continue;
        }
        let (out, inp) = t.dims2().unwrap();
        let w = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // Inputs shuffled into groups, as act-order leaves them.
        let mut order: Vec<usize> = (0..inp).collect();
        for i in (1..inp).rev() {
            order.swap(i, (r.next_f32() * (i + 1) as f32) as usize % (i + 1));
        }
        let mut g_idx = vec![0i32; inp];
        for (j, &c) in order.iter().enumerate() {
            g_idx[c] = (j / g) as i32;
        }
        let groups = inp / g;
        let (mut codes, mut deq) = (vec![0u8; out * inp], vec![0f32; out * inp]);
        let (mut zeros, mut scales) = (vec![0u32; groups * out], vec![0f32; groups * out]);
        for o in 0..out {
            for gi in 0..groups {
                let members: Vec<usize> = (0..inp).filter(|&c| g_idx[c] as usize == gi).collect();
                let mn = members.iter().map(|&c| w[o * inp + c]).fold(f32::INFINITY, f32::min);
                let mx = members.iter().map(|&c| w[o * inp + c]).fold(f32::NEG_INFINITY, f32::max);
                let s = half::f16::from_f32((mx - mn) / 15.0).to_f32();
                let z = (-(mn / s).round()).clamp(1.0, 15.0);
                zeros[gi * out + o] = z as u32;
                scales[gi * out + o] = s;
                for &c in &members {
                    let q = ((w[o * inp + c] / s).round() + z).clamp(0.0, 15.0);
                    codes[o * inp + c] = q as u8;
                    deq[o * inp + c] = (q - z) * s;
                }
            }
        }
        let mut qz = vec![0u32; groups * out / 8];
        for gi in 0..groups {
            for o in 0..out {
                qz[gi * out / 8 + o / 8] |= (zeros[gi * out + o] - 1) << (4 * (o % 8));
            }
        }
        packed.insert(format!("{prefix}.qweight"), Tensor::from_vec(pack_qweight(&codes, out, inp), (inp / 8, out), &cpu).unwrap());
        packed.insert(format!("{prefix}.qzeros"), Tensor::from_vec(qz.into_iter().map(|x| x as i32).collect::<Vec<_>>(), (groups, out / 8), &cpu).unwrap());
        packed.insert(format!("{prefix}.scales"), Tensor::from_vec(scales, (groups, out), &cpu).unwrap().to_dtype(DType::F16).unwrap());
        packed.insert(format!("{prefix}.g_idx"), Tensor::from_vec(g_idx, inp, &cpu).unwrap());
        dense.insert(name.clone(), Tensor::from_vec(deq, (out, inp), &cpu).unwrap());
    }
    for (name, t) in &src {
        if name.ends_with(".bias") {
            let t16 = t.to_dtype(DType::F16).unwrap();
            packed.insert(name.clone(), t16.clone());
            dense.insert(name.clone(), t16.to_dtype(DType::F32).unwrap());
        }
    }
    let q = spec.write_dir(&root.join("autogptq"));
    let d = spec.write_dir(&root.join("dequantized"));
    candle_core::safetensors::save(&packed, q.join("model.safetensors")).unwrap();
    candle_core::safetensors::save(&dense, d.join("model.safetensors")).unwrap();
    let qc = serde_json::json!({"bits": 4, "group_size": g, "desc_act": true, "sym": false, "damp_percent": 0.01, "true_sequential": true});
    if legacy_config {
        std::fs::write(q.join("quantize_config.json"), qc.to_string()).unwrap();
    } else {
        let mut c = read_json(&q.join("config.json"));
        c["quantization_config"] = qc;
        c["quantization_config"]["quant_method"] = "gptq".into();
        std::fs::write(q.join("config.json"), c.to_string()).unwrap();
    }
    (q, d)
}

#[test]
fn an_autogptq_checkpoint_with_act_order_groups_loads_and_matches() {
    for (spec, legacy) in [(TinySpec::new(Arch::Llama), false), (TinySpec::new(Arch::Qwen2), true)] {
        let tmp = tempfile::tempdir().unwrap();
        let (q, d) = autogptq_checkpoint(&spec, tmp.path(), legacy);
        let want = logits(&ModelAssets::load(d.to_str().unwrap()).unwrap().load_model(&Device::Cpu, DType::F32).unwrap());
        let got = logits(&ModelAssets::load(q.to_str().unwrap()).unwrap().load_model(&Device::Cpu, DType::F32).unwrap());
        let e = rel_err(&got, &want);
        assert!(e < 1e-3, "{:?}: {e}", spec.arch);
    }
}

#[test]
fn bad_gptq_checkpoints_are_refused_naming_what_is_wrong() {
    let spec = TinySpec::new(Arch::Llama);
    let tmp = tempfile::tempdir().unwrap();
    let (q, _) = autogptq_checkpoint(&spec, tmp.path(), false);
    let load = || ModelAssets::load(q.to_str().unwrap()).and_then(|a| a.load_model(&Device::Cpu, DType::F32)).err().map(|e| e.to_string());
    // 3 bits.
    let mut c = read_json(&q.join("config.json"));
    c["quantization_config"]["bits"] = 3.into();
    std::fs::write(q.join("config.json"), c.to_string()).unwrap();
    let e = load().expect("3-bit refused");
    assert!(e.contains("bits 3") && e.contains("config.json"), "{e}");
    c["quantization_config"]["bits"] = 4.into();
    std::fs::write(q.join("config.json"), c.to_string()).unwrap();
    assert!(load().is_none());
    // A g_idx one entry short.
    let mut st = candle_core::safetensors::load(q.join("model.safetensors"), &Device::Cpu).unwrap();
    let name = "model.layers.1.mlp.up_proj.g_idx";
    st.insert(name.to_string(), st[name].narrow(0, 0, spec.hidden - 1).unwrap());
    candle_core::safetensors::save(&st, q.join("model.safetensors")).unwrap();
    let e = load().expect("short g_idx refused");
    assert!(e.contains("model.layers.1.mlp.up_proj") && e.contains("g_idx has 63 values"), "{e}");
}

#[test]
fn gptq_flags_with_other_methods_and_impossible_outputs_are_refused() {
    let spec = TinySpec::new(Arch::Llama);
    let tmp = tempfile::tempdir().unwrap();
    let dir = spec.write_dir(&tmp.path().join("model"));
    let run = |args: &[&str]| {
        let o = std::process::Command::new(common::bin()).args(args).output().unwrap();
        assert!(!o.status.success(), "{args:?} succeeded");
        String::from_utf8_lossy(&o.stderr).to_string()
    };
    let out = tmp.path().join("out");
    let m = dir.to_str().unwrap();
    let o = out.to_str().unwrap();
    let e = run(&["quantize", "--model", m, "--out", o, "--method", "awq", "--act-order"]);
    assert!(e.contains("--act-order") && e.contains("gptq"), "{e}");
    let e = run(&["quantize", "--model", m, "--out", o, "--method", "rtn", "--damp", "0.1"]);
    assert!(e.contains("--damp"), "{e}");
    let e = run(&["quantize", "--model", m, "--out", o, "--method", "gptq", "--damp=-1"]);
    assert!(e.contains("--damp -1"), "{e}");
    let e = run(&["quantize", "--model", m, "--out", o, "--method", "gptq", "--static-groups", "false"]);
    assert!(e.contains("--static-groups") && e.contains("--act-order"), "{e}");
    let e = run(&["quantize", "--model", m, "--out", o, "--method", "awq+gptq", "--group-size", "32", "--act-order", "--static-groups", "false"]);
    assert!(e.contains("--static-groups false") && e.contains("g_idx"), "{e}");
    assert!(!out.exists(), "nothing is written");
    let e = run(&["quantize", "--model", m, "--out", o, "--method", "gptq", "--propagate", "1.5"]);
    assert!(e.contains("--propagate 1.5") && e.contains("between 0 and 1"), "{e}");
    let e = run(&["quantize", "--model", m, "--out", o, "--method", "awq", "--propagate", "0.5"]);
    assert!(e.contains("--propagate") && e.contains("gptq"), "{e}");
    let e = run(&["quantize", "--model", m, "--out", o, "--method", "gptq", "--propagate-down-proj", "true"]);
    assert!(e.contains("--propagate-down-proj") && e.contains("--propagate only"), "{e}");
    let e = run(&["eval", "--model", m, "--text", m, "--act-order"]);
    assert!(e.contains("--act-order") && e.contains("--fake-quant"), "{e}");
}
