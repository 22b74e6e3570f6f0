//! The W4A8 GEMV against the W4A8 GEMM at a few tokens, on SmolLM2-135M's shapes (w4g64): the
//! measurement behind `A8_GEMM_MIN_TOKENS` (AVX512-VNNI CPUs only). Medians in µs.
//!
//!   cargo run --release --example a8_crossover
use awq_run::quant::cpu::{acts::QuantizedActs, gemm_a8, w4a8, PackedQ4};
use awq_run::quant::{quantize_codes, QuantScheme};
use awq_run::rng::Rng;
use std::time::Instant;

/// Median over 7 runs of the mean time of 50 calls, after 20 warm-up calls.
fn median_us(f: &dyn Fn()) -> f64 {
    for _ in 0..20 {
        f();
    }
    let mut v: Vec<f64> = (0..7)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..50 {
                f();
            }
            t.elapsed().as_secs_f64() / 50.0 * 1e6
        })
        .collect();
    v.sort_by(f64::total_cmp);
    v[3]
}

fn main() {
    if !gemm_a8::available() {
        eprintln!("this CPU has no AVX512-VNNI: the W4A8 GEMM does not run here");
        return;
    }
    let mut rng = Rng::new(1);
    for &(name, n, k) in &[("q/k/v", 960usize, 576usize), ("gate/up", 3072, 576), ("down", 576, 1536), ("o", 576, 576)] {
        // Enough copies (≥ 48 MB) that each call reads its weight from memory, as a model does.
        let copies = (48 << 20) / (n * k / 2);
        let wf: Vec<f32> = (0..n * k).map(|_| rng.normal() * 0.05).collect();
        let q = quantize_codes(&wf, n, k, QuantScheme::new(4, 64).unwrap());
        let ws: Vec<PackedQ4> = (0..copies).map(|_| PackedQ4::from_quantized(&q)).collect();
        let next = std::cell::Cell::new(0usize);
        let w = || {
            next.set((next.get() + 1) % copies);
            &ws[next.get()]
        };
        for m in [1usize, 2, 4, 8, 12, 16, 24, 32, 48] {
            let x: Vec<f32> = (0..m * k).map(|_| rng.normal()).collect();
            let (gemv_acts, gemm_acts) = (QuantizedActs::new(&x, m, k, false), QuantizedActs::new(&x, m, k, true));
            let gemv = median_us(&|| {
                std::hint::black_box(w4a8::matmul_acts(&[w()], &gemv_acts, w4a8::A8Path::detect()));
            });
            let gemm = median_us(&|| {
                std::hint::black_box(gemm_a8::matmul_many(&[w()], &gemm_acts));
            });
            println!("{name:8} {n}x{k} m={m:2}: GEMV {gemv:7.1} µs  GEMM {gemm:7.1} µs  GEMM {:.2}× faster", gemv / gemm);
        }
    }
}
