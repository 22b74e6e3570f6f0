//! Times the CPU 4-bit kernels (exact W4A16 and W4A8 on every path this CPU has) and the 8-bit
//! head kernel on SmolLM2-135M's shapes, M = 1 .. 128; prints medians in µs. A quick look while
//! working on a kernel; the criterion benchmark (`cargo bench --bench qlinear`) is the record.
//!
//!   cargo run --release --example cpu_kernels -- [REPS]
use awq_run::quant::cpu::q8::Q8Weight;
use awq_run::quant::cpu::{A8Path, Kernel, PackedQ4};
use awq_run::quant::{quantize_codes, QuantScheme};
use awq_run::rng::Rng;
mod timing;

/// The median of `reps` timed calls after a warm-up, in µs.
fn median_us(reps: usize, f: impl FnMut()) -> f64 {
    timing::time_us(reps, f).0
}

fn main() -> anyhow::Result<()> {
    let reps: usize = std::env::args().nth(1).map(|a| a.parse()).transpose()?.unwrap_or(51);
    let mut rng = Rng::new(7);
    println!("{} threads; W4A8 paths {:?}", rayon::current_num_threads(), A8Path::available());
    let shapes = [("gate/up", 1536, 576), ("down", 576, 1536), ("q/o", 576, 576)];
    for (name, n, k) in shapes {
        let wf: Vec<f32> = (0..n * k).map(|_| rng.normal() * 0.05).collect();
        let w = PackedQ4::from_quantized(&quantize_codes(&wf, n, k, QuantScheme::new(4, 64)?));
        for m in [1usize, 2, 4, 8, 16, 128] {
            let x: Vec<f32> = (0..m * k).map(|_| rng.normal()).collect();
            let exact = median_us(reps, || drop(w.matmul(&x, m, Kernel::detect())));
            let mut line = format!("{name:>8} {n}x{k} m={m:<4} exact {exact:>9.1} µs");
            for p in A8Path::available() {
                let t = median_us(reps, || drop(w.matmul(&x, m, Kernel::A8(p))));
                line += &format!("  {p:?} {t:>9.1} ({:.2}x)", exact / t);
            }
            println!("{line}");
        }
    }
    let (n, k) = (49152, 576);
    let wf: Vec<f32> = (0..n * k).map(|_| rng.normal() * 0.05).collect();
    let head = Q8Weight::quantize(n, k, |o, row| row.copy_from_slice(&wf[o * k..(o + 1) * k]));
    for m in [1, 4, 8] {
        let x: Vec<f32> = (0..m * k).map(|_| rng.normal()).collect();
        let mut line = format!("{:>8} {n}x{k} m={m:<3} int8", "head");
        for p in A8Path::available() {
            let t = median_us(reps.min(21), || drop(head.matmul(&x, m, p)));
            line += &format!("  {p:?} {t:>9.1} µs ({:.1} GB/s)", (n * k) as f64 / t / 1e3);
        }
        println!("{line}");
    }
    Ok(())
}
