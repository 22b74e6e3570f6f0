//! `awq-run eval`: perplexity against an independent loop, and its bad input.
mod common;
use awq_run::model::Arch;
use awq_run::ModelAssets;
use candle_core::{DType, Device, Tensor};
use common::{bin, TinySpec};
use std::process::Command;

/// Perplexity by a plain loop over the model's logits: log-softmax, gather, mean (in f64).
fn reference_ppl(m: &awq_run::model::Model, tokens: &[u32], seqlen: usize, windows: usize) -> f64 {
    let (mut nll, mut n) = (0f64, 0usize);
    for w in 0..windows {
        let chunk = &tokens[w * seqlen..(w + 1) * seqlen];
        let input = Tensor::new(chunk, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let logits = m.forward_all(&input).unwrap().squeeze(0).unwrap().to_vec2::<f32>().unwrap();
        for t in 0..seqlen - 1 {
            let row = &logits[t];
            let max = row.iter().fold(f32::MIN, |a, &b| a.max(b)) as f64;
            let lse = max + row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
            nll += lse - row[chunk[t + 1] as usize] as f64;
            n += 1;
        }
    }
    (nll / n as f64).exp()
}

#[test]
fn perplexity_matches_an_independent_loop_on_a_tiny_model() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = TinySpec::new(Arch::Qwen3).write_dir(tmp.path());
    let a = ModelAssets::load(dir.to_str().unwrap()).unwrap();
    let m = a.load_model(&Device::Cpu, DType::F32).unwrap();
    let mut r = common::Rng::new(3);
    let tokens: Vec<u32> = (0..170).map(|_| (r.next_f32() * 260.0) as u32).collect();
    let want = reference_ppl(&m, &tokens, 40, 4);
    // One window per pass, and several (3: the last pass takes the one left).
    for batch in [1, 3] {
        let got = awq_run::engine::eval::perplexity(&m, &tokens, 40, None, batch, |_, _| {}).unwrap();
        assert_eq!((got.windows, got.tokens_scored), (4, 4 * 39));
        assert!(((got.perplexity - want) / want).abs() < 1e-4, "batch {batch}: {} vs {want}", got.perplexity);
    }
}

#[test]
fn perplexity_matches_an_independent_loop_on_smollm2() {
    let (Some(dir), Some(wiki)) = (common::smollm2_dir(), common::data_file("wiki.utf8")) else { return };
    let a = ModelAssets::load(dir.to_str().unwrap()).unwrap();
    let m = a.load_model(&Device::Cpu, DType::F32).unwrap();
    let text = std::fs::read_to_string(wiki).unwrap();
    let tokens = a.encode(&text[..20_000], true).unwrap();
    let got = awq_run::engine::eval::perplexity(&m, &tokens, 128, Some(3), 1, |_, _| {}).unwrap();
    let want = reference_ppl(&m, &tokens, 128, 3);
    assert!(((got.perplexity - want) / want).abs() < 1e-4, "{} vs {want}", got.perplexity);
    assert!(got.perplexity > 2.0 && got.perplexity < 100.0, "{}", got.perplexity);
}

fn eval_cli(dir: &std::path::Path, text: &std::path::Path, extra: &[&str]) -> (bool, String, String) {
    let mut args = vec!["eval", "--model", dir.to_str().unwrap(), "--text", text.to_str().unwrap()];
    args.extend_from_slice(extra);
    let o = Command::new(bin()).args(&args).output().unwrap();
    (o.status.success(), String::from_utf8_lossy(&o.stdout).into(), String::from_utf8_lossy(&o.stderr).into())
}

#[test]
fn eval_cli_prints_perplexity_and_json() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = TinySpec::new(Arch::Llama).write_dir(&tmp.path().join("m"));
    let text = tmp.path().join("t.txt");
    std::fs::write(&text, "hello the world, tell her the other order. ".repeat(20)).unwrap();
    let (ok, out, err) = eval_cli(&dir, &text, &["--seqlen", "64"]);
    assert!(ok, "{err}");
    assert!(out.contains("perplexity: ") && out.contains("windows: "), "{out}");
    let (ok, out, err) = eval_cli(&dir, &text, &["--seqlen", "64", "--json", "--max-windows", "2"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["windows"], 2);
    assert_eq!(v["tokens_scored"], 126);
    // --fake-quant evaluates a quantization without writing anything.
    let calib = tmp.path().join("c.txt");
    std::fs::write(&calib, "hello the world\n".repeat(100)).unwrap();
    let report = tmp.path().join("report.json");
    let fq = ["--seqlen", "64", "--fake-quant", "awq:3:32", "--calib", calib.to_str().unwrap(), "--n-samples", "4", "--calib-seqlen", "16"];
    let (ok, out, err) = eval_cli(&dir, &text, &[&fq[..], &["--report", report.to_str().unwrap()]].concat());
    assert!(ok && out.contains("perplexity: "), "{err}");
    // --report: the pass's per-group ratios and losses, per-layer clipping and errors.
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(r["bits"], 3);
    assert_eq!(r["groups"][0]["losses"].as_array().unwrap().len(), 20);
    assert_eq!(r["layers"][0]["layer"], "q_proj");
    assert!(r["layers"][2]["clip_shrink"].as_f64().is_some(), "{}", r["layers"][2]);
    // An unwritable --report fails before the pass, naming the flag.
    let bad = tmp.path().join("no-such-dir").join("r.json");
    let (ok, _, err) = eval_cli(&dir, &text, &[&fq[..], &["--report", bad.to_str().unwrap()]].concat());
    assert!(!ok && err.contains("--report") && err.contains("no-such-dir") && !err.contains("fake-quantized with"), "{err}");
    // A pass that fails leaves nothing at --report (the report is written beside it and renamed).
    let unwritten = tmp.path().join("unwritten.json");
    let missing = tmp.path().join("missing-calib.txt");
    let fq_bad = ["--seqlen", "64", "--fake-quant", "awq:3:32", "--calib", missing.to_str().unwrap(), "--report", unwritten.to_str().unwrap()];
    let (ok, _, err) = eval_cli(&dir, &text, &fq_bad);
    assert!(!ok && err.contains("missing-calib.txt"), "{err}");
    assert!(!unwritten.exists());
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with(".tmp")).count(), 0);
    let (ok, _, err) = eval_cli(&dir, &text, &["--seqlen", "64", "--fake-quant", "rtn:4"]);
    assert!(!ok && err.contains("METHOD:BITS:GROUP"), "{err}");
}

#[test]
fn eval_bad_input() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = TinySpec::new(Arch::Llama).write_dir(&tmp.path().join("m"));
    let short = tmp.path().join("short.txt");
    std::fs::write(&short, "hello the world").unwrap();
    let (ok, _, err) = eval_cli(&dir, &short, &["--seqlen", "64"]);
    assert!(!ok && err.contains("shorter than one window"), "{err}");
    let bin_file = tmp.path().join("latin1.txt");
    std::fs::write(&bin_file, b"caf\xe9 au lait").unwrap();
    let (ok, _, err) = eval_cli(&dir, &bin_file, &["--seqlen", "64"]);
    assert!(!ok && err.contains("latin1.txt") && err.contains("not valid UTF-8"), "{err}");
    let long = tmp.path().join("long.txt");
    std::fs::write(&long, "hello ".repeat(400)).unwrap();
    let (ok, _, err) = eval_cli(&dir, &long, &["--seqlen", "300"]);
    assert!(!ok && err.contains("beyond the model's context of 256"), "{err}");
    let (ok, _, err) = eval_cli(&dir, &tmp.path().join("absent.txt"), &["--seqlen", "64"]);
    assert!(!ok && err.contains("absent.txt"), "{err}");
}
