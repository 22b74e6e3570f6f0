//! The W4A16 linear against an f64 reference computed from the dequantized weights, on fresh
//! random inputs of awkward shapes, for every CPU inner loop this machine has and for the
//! tensor-op (Metal / device) path.
mod common;
use awq_run::linear::LinearLayer;
use awq_run::quant::cpu::Kernel;
use awq_run::linear::QuantLinear;
use awq_run::quant::{quantize_codes, QuantScheme, QuantizedWeight};
use candle_core::{DType, Device, Tensor};
use common::{RandomTensor, Rng};

fn reference(q: &QuantizedWeight, bias: Option<&[f32]>, x: &[f32], m: usize) -> Vec<f64> {
    let w = q.dequantize();
    let (n, k) = (q.shape.n, q.shape.k);
    let mut y = vec![0f64; m * n];
    for t in 0..m {
        for o in 0..n {
            let mut acc = bias.map_or(0.0, |b| b[o] as f64);
            for i in 0..k {
                acc += x[t * k + i] as f64 * w[o * k + i] as f64;
            }
            y[t * n + o] = acc;
        }
    }
    y
}

fn max_rel(got: &[f32], want: &[f64]) -> f64 {
    let num = got.iter().zip(want).map(|(g, w)| (*g as f64 - w).abs()).fold(0.0, f64::max);
    let den = want.iter().map(|w| w.abs()).fold(0.0, f64::max).max(1e-30);
    num / den
}

fn layer(rng: &mut Rng, n: usize, k: usize, g: usize, bias: bool) -> (QuantLinear, QuantizedWeight, Option<Vec<f32>>) {
    let w: Vec<f32> = (0..n * k).map(|_| rng.normal() * 0.1).collect();
    let mut q = quantize_codes(&w, n, k, QuantScheme::new(4, g).unwrap());
    // Checkpoints store scales as f16, and so does the packed layer.
    q.scales.iter_mut().for_each(|s| *s = half::f16::from_f32(*s).to_f32());
    let b: Option<Vec<f32>> = bias.then(|| (0..n).map(|_| rng.normal()).collect());
    let bt = b.as_ref().map(|b| Tensor::from_slice(b, n, &Device::Cpu).unwrap());
    let l = QuantLinear::new(q.clone(), bt, DType::F32, &Device::Cpu).unwrap();
    assert!(l.packed().is_some());
    (l, q, b)
}

fn kernels() -> Vec<Kernel> {
    let mut k = vec![Kernel::Scalar];
    if Kernel::detect() != Kernel::Scalar {
        k.push(Kernel::detect());
    }
    k
}

#[test]
fn f32_matches_f64_reference_on_awkward_shapes() {
    let mut rng = Rng::new(42);
    // (n, k, group): N multiples of 8, K multiples of the group size, per-channel included.
    let shapes = [(8, 32, 32), (24, 96, 32), (40, 192, 64), (72, 384, 128), (136, 576, 64), (8, 1536, 1536), (200, 1280, 128)];
    for &(n, k, g) in &shapes {
        for bias in [false, true] {
            let (l, q, b) = layer(&mut rng, n, k, g, bias);
            for m in [1, 3, 17, 128] {
                let x: Vec<f32> = (0..m * k).map(|_| rng.normal()).collect();
                let want = reference(&q, b.as_deref(), &x, m);
                let xt = Tensor::from_slice(&x, (m, k), &Device::Cpu).unwrap();
                for kern in kernels() {
                    let got = l.forward_cpu(&xt, kern).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    let e = max_rel(&got, &want);
                    assert!(e < 1e-5, "{kern:?} n={n} k={k} g={g} m={m} bias={bias}: rel err {e}");
                }
                let got = l.forward(&xt).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                assert!(max_rel(&got, &want) < 1e-5, "auto n={n} k={k} m={m}");
                let got = l.forward_dequant(&xt).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let e = max_rel(&got, &want);
                assert!(e < 1e-5, "tensor-op path n={n} k={k} g={g} m={m}: rel err {e}");
            }
        }
    }
}

#[test]
fn non_contiguous_and_batched_inputs() {
    let mut rng = Rng::new(7);
    let (n, k) = (48, 256);
    let (l, q, b) = layer(&mut rng, n, k, 64, true);
    // [k, 2, 5] transposed to [5, 2, k]: strided, 3-D.
    let base = rng.tensor(&[k, 2, 5], 1.0);
    let x = base.permute((2, 1, 0)).unwrap();
    assert!(!x.is_contiguous());
    let xc: Vec<f32> = x.contiguous().unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let want = reference(&q, b.as_deref(), &xc, 10);
    let y = l.forward(&x).unwrap();
    assert_eq!(y.dims(), &[5, 2, n]);
    assert!(max_rel(&y.flatten_all().unwrap().to_vec1::<f32>().unwrap(), &want) < 1e-5);
    let y = l.forward_dequant(&x).unwrap();
    assert!(max_rel(&y.flatten_all().unwrap().to_vec1::<f32>().unwrap(), &want) < 1e-5);
}

#[test]
fn half_precision_activations() {
    let mut rng = Rng::new(9);
    let (n, k) = (64, 512);
    let (l, q, b) = layer(&mut rng, n, k, 128, true);
    for (dt, tol) in [(DType::F16, 2e-3), (DType::BF16, 1.6e-2)] {
        for m in [1, 17] {
            let x = rng.tensor(&[m, k], 1.0).to_dtype(dt).unwrap();
            // The reference sees the same rounded activations.
            let xr: Vec<f32> = x.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let want = reference(&q, b.as_deref(), &xr, m);
            for y in [l.forward(&x).unwrap(), l.forward_dequant(&x).unwrap()] {
                assert_eq!(y.dtype(), dt);
                let got: Vec<f32> = y.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                let e = max_rel(&got, &want);
                assert!(e < tol, "{dt:?} m={m}: rel err {e}");
            }
        }
    }
}

#[test]
fn codes_survive_repacking() {
    let mut rng = Rng::new(1);
    let (l, q, _) = layer(&mut rng, 24, 192, 64, false);
    assert_eq!(l.quantized().unwrap(), q);
    // q·s + (−z·s) against (q − z)·s: equal up to one rounding of f32 scales.
    let dense = l.dense_weight().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let want: Vec<f64> = q.dequantize().iter().map(|&v| v as f64).collect();
    assert!(max_rel(&dense, &want) < 1e-6);
}

#[test]
fn f16_weight_linear_matches_f64_reference() {
    let mut rng = Rng::new(21);
    // K not a multiple of 16 exercises the scalar tail of the F16C loop.
    for &(n, k) in &[(40, 576), (24, 77), (130, 1024)] {
        let w = rng.tensor(&[n, k], 0.1).to_dtype(DType::F16).unwrap();
        let wv: Vec<f32> = w.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let l = awq_run::linear::HalfLinear::new(w, None).unwrap();
        for m in [1, 3, 17, 128] {
            let x: Vec<f32> = (0..m * k).map(|_| rng.normal()).collect();
            let mut want = vec![0f64; m * n];
            for t in 0..m {
                for o in 0..n {
                    want[t * n + o] = (0..k).map(|i| x[t * k + i] as f64 * wv[o * k + i] as f64).sum();
                }
            }
            let xt = Tensor::from_slice(&x, (m, k), &Device::Cpu).unwrap();
            let got = l.forward(&xt).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let e = max_rel(&got, &want);
            assert!(e < 1e-5, "n={n} k={k} m={m}: rel err {e}");
        }
    }
}
