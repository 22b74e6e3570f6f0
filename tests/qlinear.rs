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

/// The W4A8 kernel's promise: the exact result for the weights times the activations rounded
/// to int8 per 32-block, hence within `Σ_i |w_i| · d_b(i) / 2` of the W4A16 result (`d` =
/// the block's max |x| / 127), on every path this CPU has.
#[test]
fn w4a8_stays_within_its_bound_on_every_path() {
    use awq_run::quant::cpu::A8Path;
    let mut rng = Rng::new(17);
    let shapes = [(8, 32, 32), (24, 96, 32), (40, 192, 64), (13, 160, 32), (136, 576, 64), (8, 1536, 1536), (37, 1280, 128), (9, 288, 96)];
    for &(n, k, g) in &shapes {
        for bias in [false, true] {
            let (l, q, b) = layer(&mut rng, n, k, g, bias);
            let w = q.dequantize();
            for m in [1, 2, 3, 5, 8, 17, 70] {
                let x: Vec<f32> = (0..m * k).map(|_| rng.normal() * if rng.unit() < 0.05 { 20.0 } else { 1.0 }).collect();
                let want = reference(&q, b.as_deref(), &x, m);
                let xt = Tensor::from_slice(&x, (m, k), &Device::Cpu).unwrap();
                for path in A8Path::available() {
                    let got = l.forward_cpu(&xt, Kernel::A8(path)).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    for t in 0..m {
                        let d: Vec<f64> = x[t * k..(t + 1) * k].chunks(32).map(|c| c.iter().fold(0f64, |a, v| a.max(v.abs() as f64)) / 127.0).collect();
                        for o in 0..n {
                            let row = &w[o * k..(o + 1) * k];
                            let bound: f64 = row.iter().enumerate().map(|(i, wi)| wi.abs() as f64 * d[i / 32] / 2.0).sum();
                            let mag: f64 = row.iter().zip(&x[t * k..]).map(|(wi, xi)| (wi * xi).abs() as f64).sum();
                            let e = (got[t * n + o] as f64 - want[t * n + o]).abs();
                            assert!(e <= bound + 1e-5 * mag + 1e-5, "{path:?} n={n} k={k} g={g} m={m} t={t} o={o}: error {e} over the bound {bound}");
                        }
                    }
                }
            }
        }
    }
}

/// The 8-bit head: weights and activations both rounded per 32-block, so the error is within
/// `Σ_i (|x_i|·dw/2 + |w_i|·dx/2 + dw·dx/4)` of the f64 product.
#[test]
fn int8_linear_stays_within_its_bound() {
    use awq_run::linear::Int8Linear;
    let mut rng = Rng::new(23);
    for &(n, k) in &[(8, 32), (40, 96), (301, 576), (7, 1024)] {
        let w: Vec<f32> = (0..n * k).map(|_| rng.normal() * 0.05).collect();
        let wt = Tensor::from_slice(&w, (n, k), &Device::Cpu).unwrap();
        let l = Int8Linear::new(&wt.to_dtype(DType::F16).unwrap(), None).unwrap();
        let w: Vec<f32> = wt.to_dtype(DType::F16).unwrap().to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        for m in [1, 4, 9] {
            let x: Vec<f32> = (0..m * k).map(|_| rng.normal()).collect();
            let got = l.forward(&Tensor::from_slice(&x, (m, k), &Device::Cpu).unwrap()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for t in 0..m {
                let xt = &x[t * k..(t + 1) * k];
                for o in 0..n {
                    let row = &w[o * k..(o + 1) * k];
                    let (mut want, mut bound) = (0f64, 0f64);
                    for b in 0..k / 32 {
                        let amax = |v: &[f32]| v.iter().fold(0f64, |a, v| a.max(v.abs() as f64)) / 127.0;
                        let (wb, xb) = (&row[b * 32..b * 32 + 32], &xt[b * 32..b * 32 + 32]);
                        let (dw, dx) = (amax(wb), amax(xb));
                        for (wi, xi) in wb.iter().zip(xb) {
                            want += *wi as f64 * *xi as f64;
                            bound += xi.abs() as f64 * dw / 2.0 + wi.abs() as f64 * dx / 2.0 + dw * dx / 4.0;
                        }
                    }
                    let e = (got[t * n + o] as f64 - want).abs();
                    assert!(e <= bound * 1.001 + 1e-5, "n={n} k={k} m={m} t={t} o={o}: error {e} over the bound {bound}");
                }
            }
        }
    }
}

/// Weights sharing an input (q/k/v, gate/up) in one call give each weight's own result: the
/// same bits as separate calls on every inner loop, and through the layer (biases included)
/// what `forward` gives.
#[test]
fn fused_weights_match_separate_calls() {
    use awq_run::quant::cpu::{A8Path, PackedQ4};
    let mut rng = Rng::new(17);
    // Group 96 (three chunks) takes the W4A8 kernel's per-chunk tables; 64 the shifted ones.
    for &(k, g) in &[(192, 64), (192, 96), (576, 64)] {
        let parts: Vec<(QuantLinear, QuantizedWeight, Option<Vec<f32>>)> = [(40, true), (24, false), (8, true)].iter().map(|&(n, b)| layer(&mut rng, n, k, g, b)).collect();
        let packed: Vec<&PackedQ4> = parts.iter().map(|p| p.0.packed().unwrap()).collect();
        let mut ks = kernels();
        ks.extend(A8Path::available().into_iter().map(Kernel::A8));
        for m in [1, 3, 9, 70] {
            let x: Vec<f32> = (0..m * k).map(|_| rng.normal()).collect();
            for &kern in &ks {
                let fused = PackedQ4::matmul_many(&packed, &x, m, kern);
                let total: usize = packed.iter().map(|w| w.shape.n).sum();
                let mut start = 0;
                for w in &packed {
                    let alone = w.matmul(&x, m, kern);
                    for t in 0..m {
                        for o in 0..w.shape.n {
                            let (a, b) = (fused[t * total + start + o], alone[t * w.shape.n + o]);
                            // The blocked GEMM (8+ tokens on the exact path) sums per block of
                            // rows, which now spans two weights: rounding only. Elsewhere each
                            // row's sum is the same arithmetic.
                            let gemm = m >= 8 && !matches!(kern, Kernel::A8(_));
                            let tol = if gemm { 1e-5 * b.abs().max(1.0) } else { 0.0 };
                            assert!((a - b).abs() <= tol, "{kern:?} k={k} g={g} m={m} t={t} row {o} of {}: {a} vs {b}", w.shape.n);
                        }
                    }
                    start += w.shape.n;
                }
            }
            let xt = Tensor::from_slice(&x, (1, m, k), &Device::Cpu).unwrap();
            let layers: Vec<&QuantLinear> = parts.iter().map(|p| &p.0).collect();
            let outs = QuantLinear::forward_fused(&layers, &xt, &awq_run::cuda::L2Prefetch::none()).unwrap().expect("the fused CPU path applies");
            for (p, got) in parts.iter().zip(outs) {
                let want = p.0.forward(&xt).unwrap();
                assert_eq!(got.dims(), want.dims());
                let d = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(d <= 1e-5, "k={k} g={g} m={m}: fused layer output differs by {d}");
            }
        }
    }
}
