//! AWQ against RTN on the real SmolLM2-135M (group size 64: its 576-wide rows do not divide by
//! 128): both checkpoints written, loaded back and scored on the wiki text.
mod common;
use std::process::Command;

fn run(args: &[&str]) -> String {
    let o = Command::new(common::bin()).args(args).output().unwrap();
    assert!(o.status.success(), "awq-run {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).to_string()
}

fn ppl(model: &str, wiki: &str) -> f64 {
    let out = run(&["eval", "--model", model, "--text", wiki, "--seqlen", "512", "--max-windows", "8", "--json"]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    v["perplexity"].as_f64().unwrap()
}

#[test]
fn awq_checkpoint_has_lower_perplexity_than_rtn() {
    let (Some(dir), Some(wiki), Some(c4)) = (common::smollm2_dir(), common::data_file("wiki.utf8"), common::data_file("c4.utf8")) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let (d, w, c) = (dir.to_str().unwrap(), wiki.to_str().unwrap(), c4.to_str().unwrap());
    let awq = tmp.path().join("awq");
    let rtn = tmp.path().join("rtn");
    run(&["quantize", "--model", d, "--out", awq.to_str().unwrap(), "--method", "awq", "--group-size", "64", "--calib", c, "--n-samples", "8", "--seqlen", "256"]);
    run(&["quantize", "--model", d, "--out", rtn.to_str().unwrap(), "--method", "rtn", "--group-size", "64"]);
    let (p_fp, p_awq, p_rtn) = (ppl(d, w), ppl(awq.to_str().unwrap(), w), ppl(rtn.to_str().unwrap(), w));
    eprintln!("wiki ppl, 8 windows of 512: FP {p_fp:.3}, RTN w4g64 {p_rtn:.3}, AWQ w4g64 {p_awq:.3}");
    assert!(p_awq < p_rtn, "AWQ {p_awq} is not below RTN {p_rtn}");
    assert!(p_fp < p_awq);
    // The report covers every block's three groups (SmolLM2 has GQA: no o_proj group).
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(awq.join("awq_report.json")).unwrap()).unwrap();
    assert_eq!(report["groups"].as_array().unwrap().len(), 30 * 3);
}
