//! Faults a user meets: `quantize` killed outright at any moment, and output locations that
//! cannot be written. (Corrupt model files are in model_tiny.rs.)
mod common;
use awq_run::model::Arch;
use common::{bin, TinySpec};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// A calibration text long enough that the AWQ pass on the tiny model takes a while.
fn calib(dir: &Path) -> std::path::PathBuf {
    let words = ["hello", "the", "world", "order", "tell", "her", "other", "hero", "lore"];
    let lines: Vec<String> = (0..400).map(|i| (0..6).map(|j| words[(i * 7 + j * 3) % words.len()]).collect::<Vec<_>>().join(" ")).collect();
    let p = dir.join("calib.txt");
    std::fs::write(&p, lines.join("\n")).unwrap();
    p
}

fn quantize_args<'a>(model: &'a str, out: &'a str, calib: &'a str) -> Vec<&'a str> {
    vec!["quantize", "--model", model, "--out", out, "--method", "awq", "--group-size", "32", "--calib", calib, "--n-samples", "16", "--seqlen", "64", "--force"]
}

/// Entries of `dir` that are temporary outputs (`.q.tmp-...`).
fn temporaries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().to_string()).filter(|n| n.starts_with(".q.tmp-")).collect()
}

#[test]
fn quantize_killed_at_any_moment_leaves_no_partial_output() {
    let tmp = tempfile::tempdir().unwrap();
    let model = TinySpec::new(Arch::Llama).write_dir(&tmp.path().join("m"));
    let calib = calib(tmp.path());
    let outdir = tmp.path().join("out");
    std::fs::create_dir(&outdir).unwrap();
    let out = outdir.join("q");
    let (m, o, c) = (model.to_str().unwrap(), out.to_str().unwrap(), calib.to_str().unwrap());
    // How long a whole run takes here, to spread the kills over it.
    let t0 = Instant::now();
    let full = Command::new(bin()).args(quantize_args(m, o, c)).output().unwrap();
    assert!(full.status.success(), "{}", String::from_utf8_lossy(&full.stderr));
    let whole = t0.elapsed();
    std::fs::remove_dir_all(&out).unwrap();
    let mut killed = 0;
    for frac in [0.02, 0.1, 0.25, 0.4, 0.55, 0.7, 0.85, 0.95] {
        let mut child = Command::new(bin()).args(quantize_args(m, o, c)).stderr(std::process::Stdio::null()).spawn().unwrap();
        std::thread::sleep(whole.mul_f64(frac));
        let finished = child.try_wait().unwrap().is_some();
        child.kill().unwrap_or(()); // SIGKILL: no destructor, no cleanup runs
        child.wait().unwrap();
        killed += usize::from(!finished);
        // Either nothing is at --out, or a complete checkpoint that loads.
        if out.exists() {
            for f in ["config.json", "model.safetensors", "awq_report.json", "tokenizer.json"] {
                assert!(out.join(f).exists(), "kill at {frac}: {f} missing from a visible checkpoint");
            }
            awq_run::ModelAssets::load(o).unwrap().load_model(&candle_core::Device::Cpu, candle_core::DType::F32).unwrap();
            std::fs::remove_dir_all(&out).unwrap();
        }
    }
    assert!(killed >= 4, "only {killed} of the runs were still going when killed");
    // A later run is not tripped up by what the killed ones left, and clears it away.
    let again = Command::new(bin()).args(quantize_args(m, o, c)).output().unwrap();
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    assert!(out.join("model.safetensors").exists());
    assert_eq!(temporaries(&outdir), Vec::<String>::new(), "temporary directories left behind");
    // A run killed during --force replacement leaves the old checkpoint or the new one, whole.
    for delay in [whole.mul_f64(0.5), whole.mul_f64(0.9)] {
        let mut child = Command::new(bin()).args(quantize_args(m, o, c)).stderr(std::process::Stdio::null()).spawn().unwrap();
        std::thread::sleep(delay);
        child.kill().unwrap_or(());
        child.wait().unwrap();
        assert!(out.join("config.json").exists() && out.join("model.safetensors").exists(), "no whole checkpoint at --out after a kill");
    }
}

#[test]
fn unwritable_output_location_fails_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let model = TinySpec::new(Arch::Llama).write_dir(&tmp.path().join("m"));
    let calib = calib(tmp.path());
    // A regular file where the output's directory should be (root ignores permission bits, so a
    // read-only directory would not stop the tests' root user).
    let blocker = tmp.path().join("file");
    std::fs::write(&blocker, "not a directory").unwrap();
    let out = blocker.join("q");
    let t0 = Instant::now();
    let o = Command::new(bin()).args(quantize_args(model.to_str().unwrap(), out.to_str().unwrap(), calib.to_str().unwrap())).output().unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{e}");
    assert!(e.contains("cannot create the output's directory") && e.contains("is a file, not a directory"), "{e}");
    assert!(!e.contains("wrote"), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(30));
}
