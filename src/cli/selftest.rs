//! `awq-run selftest`: checks the CUDA kernels against the CPU kernel; `--bench` measures the
//! GEMV's bandwidth. Exits non-zero on any mismatch.
use anyhow::{bail, Result};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The device to test (cuda or cuda:N).
    #[arg(long, default_value = "cuda")]
    pub device: String,
    /// Seed of the random inputs (a fresh one per run by default).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Also benchmark the kernels on the device (JSON lines): GEMV bandwidth at Llama-2-7B shapes
    /// against the copy bandwidth, GEMM TFLOP/s against cuBLAS.
    #[arg(long)]
    pub bench: bool,
    /// Benchmark without running the checks first (for profilers).
    #[arg(long, requires = "bench")]
    pub bench_only: bool,
    /// Run only these benchmark sections (repeatable): gemv, gemv-splits, small-m, gemm.
    #[arg(long = "bench-section", requires = "bench", value_name = "SECTION")]
    pub bench_sections: Vec<String>,
}

#[cfg(feature = "cuda")]
pub fn run(a: Args) -> Result<()> {
    use awq_run::selftest;
    let device = awq_run::engine::device::parse_device(Some(&a.device))?;
    if !device.is_cuda() {
        bail!("--device {}: the self-test checks the CUDA kernels", a.device);
    }
    let seed = a.seed.unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64));
    let (pass, fail) = if a.bench_only {
        (0, 0)
    } else {
        // The kernels under the model, then the AWQ pass's own (a room selftest does not import).
        let (p1, f1) = selftest::run(&device, seed)?;
        let (p2, f2) = awq_run::awq::clip_device::self_test(&device, seed)?;
        (p1 + p2, f1 + f2)
    };
    if !a.bench_only {
        println!("{pass} passed, {fail} failed (seed {seed})");
    }
    if a.bench {
        for row in selftest::bench::bench(&device, &a.bench_sections)? {
            println!("{row}");
        }
    }
    if fail > 0 {
        bail!("{fail} kernel checks failed");
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
pub fn run(a: Args) -> Result<()> {
    bail!("--device {}: this awq-run was built without CUDA (cargo build --release --features cuda)", a.device)
}
