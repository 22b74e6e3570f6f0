//! Writes the token ids that `eval --fake-quant awq:…` uses — the calibration blocks and the
//! evaluation text — as little-endian u32 files, so that an independent implementation
//! (scripts/awq_reference.py) can run the same search and the same perplexity windows.
//!
//!   cargo run --release --example awq_tokens -- MODEL CALIB_TEXT N_SAMPLES SEQLEN EVAL_TEXT OUT_DIR
use anyhow::{bail, Context, Result};
use awq_run::assets::ModelAssets;
use awq_run::awq::calib;
use std::path::{Path, PathBuf};

fn write_u32(path: &Path, ids: &[u32]) -> Result<()> {
    let bytes: Vec<u8> = ids.iter().flat_map(|t| t.to_le_bytes()).collect();
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

fn main() -> Result<()> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    if a.len() != 6 {
        bail!("usage: awq_tokens MODEL CALIB_TEXT N_SAMPLES SEQLEN EVAL_TEXT OUT_DIR");
    }
    let assets = ModelAssets::load(&a[0])?;
    let n: usize = a[2].parse().context("N_SAMPLES")?;
    let seqlen: usize = a[3].parse().context("SEQLEN")?;
    let blocks = calib::calibration_blocks(&assets, Path::new(&a[1]), n, seqlen)?;
    let out = PathBuf::from(&a[5]);
    std::fs::create_dir_all(&out)?;
    write_u32(&out.join("calib.u32"), &blocks.concat())?;
    let eval = assets.encode(&calib::read_text(Path::new(&a[4]))?, true)?;
    write_u32(&out.join("eval.u32"), &eval)?;
    println!("{} calibration blocks of {seqlen}, {} evaluation tokens -> {}", blocks.len(), eval.len(), out.display());
    Ok(())
}
