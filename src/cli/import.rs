//! `awq-run import`: GGUF to an HF-layout directory.
use anyhow::Result;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The .gguf file.
    pub gguf: PathBuf,
    /// Output directory (HF layout).
    #[arg(long)]
    pub out: PathBuf,
    /// Tensor dtype in the written safetensors: f16, bf16 or f32.
    #[arg(long, default_value = "f16")]
    pub dtype: String,
    /// Replace an existing output directory.
    #[arg(long)]
    pub force: bool,
}

pub fn run(a: Args) -> Result<()> {
    let dtype = awq_run::engine::device::parse_dtype(Some(&a.dtype), &candle_core::Device::Cpu)?;
    let t = std::time::Instant::now();
    let out = awq_run::assets::import::import_gguf(&a.gguf, &a.out, dtype, a.force)?;
    eprintln!("imported {} -> {} in {:.1}s", a.gguf.display(), out.display(), t.elapsed().as_secs_f64());
    Ok(())
}
