//! A synthetic linear layer whose input has one salient channel (100x larger activations than
//! the rest): round-to-nearest vs AWQ output error, side by side.
//!
//!   cargo run --release --example salient_channel
use awq_run::awq::{awq_linear, AwqOptions, Method};
use awq_run::quant::{fake_quantize, QuantScheme};
use candle_core::{Device, Tensor};

fn output_mse(x: &Tensor, w: &Tensor, wq: &Tensor) -> anyhow::Result<f32> {
    let d = (x.matmul(&wq.t()?)? - x.matmul(&w.t()?)?)?;
    Ok(d.sqr()?.mean_all()?.to_scalar::<f32>()?)
}

fn main() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let (out, inp, tokens, salient) = (256, 512, 2048, 37);
    let w = Tensor::randn(0f32, 0.05, (out, inp), &dev)?;
    // Activations: unit noise, and channel `salient` carrying 100x more.
    let mut gain = vec![1f32; inp];
    gain[salient] = 100.0;
    let x = Tensor::randn(0f32, 1.0, (tokens, inp), &dev)?.broadcast_mul(&Tensor::new(gain.as_slice(), &dev)?)?;
    println!("layer {out}x{inp}, {tokens} tokens, salient input channel {salient} (100x)");
    println!("{:<10} {:>6} {:>14} {:>14} {:>8} {:>8}", "quant", "group", "RTN MSE", "AWQ MSE", "AWQ/RTN", "ratio");
    for (bits, group) in [(4, 128), (4, 64), (3, 128), (3, 64)] {
        let p = QuantScheme::new(bits, group)?;
        let rtn = output_mse(&x, &w, &fake_quantize(&w, p)?)?;
        let (eff, choice) = awq_linear(&w, &x, &AwqOptions::new(Method::Awq, p))?;
        let awq = output_mse(&x, &w, &eff)?;
        println!("{:<10} {:>6} {:>14.6e} {:>14.6e} {:>8.3} {:>8.2}", format!("int{bits}"), group, rtn, awq, awq / rtn, choice.ratio);
    }
    Ok(())
}
