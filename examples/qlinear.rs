//! Quantize a random weight to 4 bits, run the W4A16 op, and print its error and speed against
//! the dense layer.
//!
//!   cargo run --release --example qlinear -- [N] [K] [GROUP]
use awq_run::linear::LinearLayer;
use awq_run::quant::cpu::Kernel;
use awq_run::linear::QuantLinear;
use awq_run::quant::{quantize_codes, QuantScheme};
use candle_core::{DType, Device, Tensor};
use std::time::Instant;

fn time_it(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(|a, b| a.total_cmp(b));
    t[reps / 2]
}

fn main() -> anyhow::Result<()> {
    let args: Vec<usize> = std::env::args().skip(1).map(|a| a.parse()).collect::<Result<_, _>>()?;
    let (n, k, g) = (args.first().copied().unwrap_or(4096), args.get(1).copied().unwrap_or(4096), args.get(2).copied().unwrap_or(128));
    let dev = Device::Cpu;
    let w = Tensor::randn(0f32, 0.05, (n, k), &dev)?;
    let q = quantize_codes(&w.flatten_all()?.to_vec1::<f32>()?, n, k, QuantScheme::new(4, g)?);
    let layer = QuantLinear::new(q, None, DType::F32, &dev)?;
    let wq = layer.dense_weight()?;
    println!("weight {n}x{k}, group {g}, kernel {:?}, {} threads", Kernel::detect(), rayon::current_num_threads());
    println!("{:>5} {:>12} {:>12} {:>10} {:>10} {:>8}", "M", "rel err", "vs fp err", "w4 ms", "f32 ms", "speedup");
    for m in [1usize, 8, 128] {
        let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
        let y = layer.forward(&x)?;
        // Error of the op against the dequantized weight (the kernel's own error), and the
        // quantization error against the original weight.
        let y_deq = x.matmul(&wq.t()?)?;
        let y_fp = x.matmul(&w.t()?)?;
        let rel = |a: &Tensor, b: &Tensor| -> anyhow::Result<f32> {
            Ok(((a - b)?.abs()?.max_all()?.to_scalar::<f32>()?) / b.abs()?.max_all()?.to_scalar::<f32>()?)
        };
        let reps = if m == 128 { 5 } else { 21 };
        let t_q = time_it(reps, || drop(layer.forward(&x).unwrap()));
        let wt = w.t()?;
        let t_f = time_it(reps, || drop(x.matmul(&wt).unwrap()));
        println!("{m:>5} {:>12.2e} {:>12.2e} {:>10.3} {:>10.3} {:>7.2}x", rel(&y, &y_deq)?, rel(&y, &y_fp)?, t_q * 1e3, t_f * 1e3, t_f / t_q);
    }
    Ok(())
}
