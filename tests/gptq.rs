//! GPTQ on small random layers against a straightforward implementation written here: f64
//! throughout, every column's error applied to all later columns at once (no lazy blocks), the
//! inverse Hessian by Gauss-Jordan elimination and its Cholesky factor by the textbook loop.
use awq_run::awq::gptq::{quantize_layer, GptqOptions, Hessian, Prepared, Quantizer};
use awq_run::quant::QuantScheme;
use candle_core::{Device, Tensor};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        let (u, v) = (self.next().max(1e-12), self.next());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
}

struct Case {
    out: usize,
    inp: usize,
    bits: u32,
    group: usize,
    act_order: bool,
    static_groups: bool,
    sym: bool,
    min_zero: f64,
}

/// The reference: codes `[out][in]` in the layer's input order (or, for dynamic act-order
/// groups, in quantization order), dequantized weight in the input order, loss.
fn reference(w: &[f64], h0: &[f64], c: &Case, damp: f64) -> (Vec<u8>, Vec<f64>, f64) {
    let (out, n) = (c.out, c.inp);
    let maxq = f64::from((1u32 << c.bits) - 1);
    let mut h = h0.to_vec();
    let mut w = w.to_vec();
    for i in 0..n {
        if h[i * n + i] == 0.0 {
            h[i * n + i] = 1.0;
            for r in 0..out {
                w[r * n + i] = 0.0;
            }
        }
    }
    let mut order: Vec<usize> = (0..n).collect();
    if c.act_order {
        order.sort_by(|&a, &b| h[b * n + b].partial_cmp(&h[a * n + a]).unwrap());
    }
    let g = if c.group == 0 { n } else { c.group };
    let params = |vals: &[f64]| -> (f64, f64) {
        let mn = vals.iter().cloned().fold(f64::INFINITY, f64::min);
        let mx = vals.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let (s, z) = if c.sym {
            let a = mn.abs().max(mx.abs());
            ((2.0 * a).max(1e-5) / maxq, (maxq + 1.0) / 2.0)
        } else {
            // The AWQ quantizer in f32, as the library's is (its inputs are f32 weights).
            let s = ((mx - mn) as f32).max(1e-5) / maxq as f32;
            let z = (-((mn as f32) / s).round()).clamp(0.0, maxq as f32);
            (f64::from(s), f64::from(z).max(c.min_zero))
        };
        (half::f16::from_f64(s).to_f64(), z)
    };
    // Static groups from the weight before the pass.
    let static_p: Vec<Vec<(f64, f64)>> = (0..n / g)
        .map(|gi| (0..out).map(|r| params(&w[r * n + gi * g..r * n + (gi + 1) * g])).collect())
        .collect();
    // Permuted H and W.
    let hp: Vec<f64> = (0..n * n).map(|ij| h[order[ij / n] * n + order[ij % n]]).collect();
    let mut wp: Vec<f64> = (0..out * n).map(|ri| w[(ri / n) * n + order[ri % n]]).collect();
    let mean = (0..n).map(|i| hp[i * n + i]).sum::<f64>() / n as f64;
    let mut a = hp.clone();
    for i in 0..n {
        a[i * n + i] += damp * mean;
    }
    // Gauss-Jordan inverse.
    let mut inv: Vec<f64> = (0..n * n).map(|ij| if ij / n == ij % n { 1.0 } else { 0.0 }).collect();
    for col in 0..n {
        let p = a[col * n + col];
        for j in 0..n {
            a[col * n + j] /= p;
            inv[col * n + j] /= p;
        }
        for r in 0..n {
            if r != col {
                let f = a[r * n + col];
                for j in 0..n {
                    a[r * n + j] -= f * a[col * n + j];
                    inv[r * n + j] -= f * inv[col * n + j];
                }
            }
        }
    }
    // Textbook Cholesky of the inverse; U = Lᵀ.
    let mut l = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..=i {
            let s: f64 = (0..j).map(|k| l[i * n + k] * l[j * n + k]).sum();
            l[i * n + j] = if i == j { (inv[i * n + i] - s).sqrt() } else { (inv[i * n + j] - s) / l[j * n + j] };
        }
    }
    let u = |i: usize, j: usize| l[j * n + i];
    let mut codes = vec![0u8; out * n];
    let mut dq = vec![0f64; out * n];
    let mut loss = 0.0;
    let mut cur: Vec<(f64, f64)> = Vec::new();
    let dynamic = c.act_order && !c.static_groups;
    for i in 0..n {
        if !(c.act_order && c.static_groups) && i % g == 0 {
            cur = (0..out).map(|r| params(&wp[r * n + i..r * n + i + g])).collect();
        }
        let d = u(i, i);
        for r in 0..out {
            let (s, z) = if c.act_order && c.static_groups { static_p[order[i] / g][r] } else { cur[r] };
            let x = wp[r * n + i];
            let q = ((x / s).round() + z).clamp(0.0, maxq);
            let deq = (q - z) * s;
            let col = if dynamic { i } else { order[i] };
            codes[r * n + col] = q as u8;
            dq[r * n + order[i]] = deq;
            loss += (x - deq) * (x - deq) / (2.0 * d * d);
            let e = (x - deq) / d;
            for j in i + 1..n {
                wp[r * n + j] -= e * u(i, j);
            }
        }
    }
    (codes, dq, loss)
}

fn check(c: Case, seed: u64) {
    let mut rng = Rng(seed);
    let tokens = 3 * c.inp + 7;
    // Inputs with uneven channel energies (so act-order matters) and one dead channel.
    let energy: Vec<f64> = (0..c.inp).map(|i| if i == 5 { 0.0 } else { 0.2 + 3.0 * rng.next() * rng.next() }).collect();
    let x: Vec<f64> = (0..tokens * c.inp).map(|t| rng.normal() * energy[t % c.inp]).collect();
    let mut h = vec![0f64; c.inp * c.inp];
    for t in 0..tokens {
        let row = &x[t * c.inp..(t + 1) * c.inp];
        for i in 0..c.inp {
            for j in 0..c.inp {
                h[i * c.inp + j] += 2.0 * row[i] * row[j] / tokens as f64;
            }
        }
    }
    let w32: Vec<f32> = (0..c.out * c.inp).map(|_| (rng.normal() * 0.05) as f32).collect();
    let w64: Vec<f64> = w32.iter().map(|&v| f64::from(v)).collect();
    let damp = 0.01;
    let (codes, dq, loss) = reference(&w64, &h, &c, damp);

    let o = GptqOptions { damp, act_order: c.act_order, static_groups: c.static_groups, true_sequential: true, sym: c.sym, propagate: 0.0, propagate_down: false };
    let prep = Prepared::new(&Hessian { h, dim: c.inp, tokens }, &o, "test layer").unwrap();
    let q = Quantizer { scheme: QuantScheme::new(c.bits, c.group).unwrap(), sym: c.sym, min_zero: c.min_zero };
    let w = Tensor::from_vec(w32, (c.out, c.inp), &Device::Cpu).unwrap();
    let got = quantize_layer(&w, &prep, &q, &o, &Device::Cpu).unwrap();
    let label = format!("{}x{} w{}g{} act_order={} static={} sym={}", c.out, c.inp, c.bits, c.group, c.act_order, c.static_groups, c.sym);
    assert_eq!(got.weight.codes, codes, "{label}: codes");
    assert!((got.loss - loss).abs() <= 1e-6 * loss, "{label}: loss {} vs {loss}", got.loss);
    assert_eq!(got.perm.is_some(), c.act_order && !c.static_groups, "{label}: permutation");
    // The dequantized weight, brought back to the input order, is the reference's.
    let stored = got.weight.dequantize();
    for r in 0..c.out {
        for j in 0..c.inp {
            let col = got.perm.as_ref().map_or(j, |p| p[j] as usize);
            let (a, b) = (f64::from(stored[r * c.inp + j]), dq[r * c.inp + col]);
            assert!((a - b).abs() <= 1e-6 * b.abs().max(1e-3), "{label}: w[{r}][{col}] {a} vs {b}");
        }
    }
}

fn case(out: usize, inp: usize, bits: u32, group: usize) -> Case {
    Case { out, inp, bits, group, act_order: false, static_groups: true, sym: false, min_zero: 0.0 }
}

#[test]
fn gptq_matches_a_straightforward_f64_implementation() {
    // 288 inputs: three lazy blocks (128, 128, 32) with group 32; 200 with group 40 (blocks of
    // 160, a partial last block); per-channel; 3 bits.
    check(case(24, 288, 4, 32), 1);
    check(case(17, 200, 4, 40), 2);
    check(case(9, 150, 4, 0), 3);
    check(case(16, 192, 3, 64), 4);
    check(Case { min_zero: 1.0, ..case(16, 160, 4, 32) }, 5);
}

#[test]
fn gptq_with_act_order_matches_the_reference() {
    check(Case { act_order: true, ..case(24, 288, 4, 32) }, 11);
    check(Case { act_order: true, static_groups: false, ..case(24, 288, 4, 32) }, 12);
    check(Case { act_order: true, static_groups: false, ..case(10, 130, 3, 0) }, 13);
}

#[test]
fn symmetric_gptq_matches_the_reference() {
    check(Case { sym: true, ..case(16, 256, 4, 64) }, 21);
    check(Case { sym: true, act_order: true, ..case(16, 256, 4, 64) }, 22);
}
