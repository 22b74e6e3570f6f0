//! Microbenchmarks of the CPU 4-bit op at SmolLM2-135M and Llama-2-7B shapes, M = 1, 4, 8, 16,
//! 128: exact (W4A16) and W4A8 (the best integer path this CPU has), against candle's f32 matmul
//! and candle's own quantized matmul (Q4_0 and Q4K); and SmolLM2's 49152 × 576 head in f16
//! (candle's matmul) against the 8-bit head.
//!
//!   cargo bench --bench qlinear [-- FILTER]
use awq_run::linear::{HalfLinear, Int8Linear, LinearLayer, QuantLinear};
use awq_run::quant::cpu::{A8Path, Kernel};
use awq_run::quant::{quantize_codes, QuantScheme};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::time::Duration;

/// (name, out = N, in = K)
const SHAPES: &[(&str, usize, usize)] = &[
    ("smollm2 gate/up", 1536, 576),
    ("smollm2 down", 576, 1536),
    ("smollm2 q/o", 576, 576),
    ("llama2-7b q/k/v/o", 4096, 4096),
    ("llama2-7b gate/up", 11008, 4096),
    ("llama2-7b down", 4096, 11008),
];

fn bench(c: &mut Criterion) {
    let dev = Device::Cpu;
    for &(name, n, k) in SHAPES {
        let g = if k % 128 == 0 { 128 } else { 64 };
        let w = Tensor::randn(0f32, 0.05, (n, k), &dev).unwrap();
        let wv = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let q = QuantLinear::new(quantize_codes(&wv, n, k, QuantScheme::new(4, g).unwrap()), None, DType::F32, &dev).unwrap();
        let q40 = QMatMul::from_qtensor(QTensor::quantize(&w, GgmlDType::Q4_0).unwrap()).unwrap();
        // Q4K needs rows divisible by its 256-wide super-blocks (SmolLM2's 576 and 1536 are not).
        let q4k = (k % 256 == 0).then(|| QMatMul::from_qtensor(QTensor::quantize(&w, GgmlDType::Q4K).unwrap()).unwrap());
        let wt = w.t().unwrap();
        let mut group = c.benchmark_group(format!("{name} {n}x{k}"));
        group.sample_size(10).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(2));
        for m in [1usize, 4, 8, 16, 128] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
            group.throughput(Throughput::Elements((m * n * k) as u64));
            group.bench_with_input(BenchmarkId::new(format!("awq w4g{g} exact"), m), &x, |b, x| b.iter(|| q.forward_cpu(x, Kernel::detect()).unwrap()));
            group.bench_with_input(BenchmarkId::new(format!("awq w4g{g} w4a8"), m), &x, |b, x| b.iter(|| q.forward_cpu(x, Kernel::A8(A8Path::detect())).unwrap()));
            group.bench_with_input(BenchmarkId::new("candle f32", m), &x, |b, x| b.iter(|| x.matmul(&wt).unwrap()));
            group.bench_with_input(BenchmarkId::new("candle q4_0", m), &x, |b, x| b.iter(|| q40.forward(x).unwrap()));
            if let Some(q4k) = &q4k {
                group.bench_with_input(BenchmarkId::new("candle q4k", m), &x, |b, x| b.iter(|| q4k.forward(x).unwrap()));
            }
        }
        group.finish();
    }
    let (n, k) = (49152, 576);
    let w = Tensor::randn(0f32, 0.05, (n, k), &dev).unwrap().to_dtype(DType::F16).unwrap();
    let f16_head = HalfLinear::new(w.clone(), None).unwrap();
    let int8_head = Int8Linear::new(&w, None).unwrap();
    let mut group = c.benchmark_group(format!("smollm2 head {n}x{k}"));
    group.sample_size(10).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(2));
    for m in [1usize, 4] {
        let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
        group.bench_with_input(BenchmarkId::new("f16", m), &x, |b, x| b.iter(|| f16_head.forward(x).unwrap()));
        group.bench_with_input(BenchmarkId::new("int8", m), &x, |b, x| b.iter(|| int8_head.forward(x).unwrap()));
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
