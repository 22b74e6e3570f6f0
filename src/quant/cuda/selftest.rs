//! `awq-run selftest --device cuda`: every CUDA kernel against the CPU kernel on fresh random
//! inputs of awkward shapes, outputs poisoned with NaN before each run; and `--bench`: GEMV
//! bandwidth at Llama-2-7B shapes against the card's device-to-device copy bandwidth.
use super::CudaQ4;
use crate::quant::cpu::{Kernel, PackedQ4};
use crate::quant::QuantizedWeight;
use candle_core::{DType, Device, Result, Tensor};

/// (n = out, k = in, group): real models' shapes and odd multiples of the group size.
pub const SHAPES: &[(usize, usize, usize)] = &[
    (4096, 4096, 128),
    (11008, 4096, 128),
    (4096, 11008, 128),
    (1536, 576, 64),
    (576, 1536, 64),
    (192, 576, 64),
    (3584, 18944, 128),
    (200, 224, 32),
    (136, 576, 64),
    (8, 384, 128),
    (24, 1536, 1536),
];
pub const TOKENS: &[usize] = &[1, 2, 3, 7, 8, 9, 16, 33, 128, 1000];

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
}

fn random_weight(r: &mut Rng, n: usize, k: usize, g: usize) -> PackedQ4 {
    let groups = k / g;
    let q = QuantizedWeight {
        bits: 4,
        out_features: n,
        in_features: k,
        group_size: g,
        codes: (0..n * k).map(|_| (r.next() & 0xF) as u8).collect(),
        zeros: (0..n * groups).map(|_| (r.next() % 16) as u8).collect(),
        scales: (0..n * groups).map(|_| 0.002 + 0.01 * r.unit().abs()).collect(),
    };
    PackedQ4::from_quantized(&q)
}

fn max_rel(got: &Tensor, want: &[f32]) -> Result<f32> {
    let got = got.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let mut num = 0f32;
    for (g, w) in got.iter().zip(want) {
        let d = (g - w).abs();
        // NaN (a poisoned, unwritten element) must fail.
        num = if d.is_nan() { f32::INFINITY } else { num.max(d) };
    }
    let den = want.iter().fold(0f32, |a, w| a.max(w.abs())).max(1e-30);
    Ok(num / den)
}

/// Runs every check; prints one line per failure and a summary; returns (passed, failed).
pub fn run(device: &Device, seed: u64) -> Result<(usize, usize)> {
    let mut r = Rng(seed | 1);
    let (mut pass, mut fail) = (0, 0);
    for &(n, k, g) in SHAPES {
        let packed = random_weight(&mut r, n, k, g);
        let cw = CudaQ4::new(&packed, device)?;
        for dt in [DType::F16, DType::BF16] {
            let tol = if dt == DType::F16 { 2e-3 } else { 1.6e-2 };
            // The dequantization kernel, element by element.
            let mut host = vec![0f32; n * k];
            for (o, row) in host.chunks_mut(k).enumerate() {
                packed.dequantize_row(o, row);
            }
            let e = max_rel(&cw.dequantize_with(dt, true)?, &host)?;
            if e <= tol {
                pass += 1;
            } else {
                fail += 1;
                println!("FAIL dequant {dt:?} n={n} k={k} g={g}: rel err {e:e}");
            }
            for &m in TOKENS {
                let xv: Vec<f32> = (0..m * k).map(|_| r.unit()).collect();
                let x = Tensor::from_vec(xv, (m, k), device)?.to_dtype(dt)?;
                // The reference sees the same rounded activations.
                let xr = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                let want = packed.matmul(&xr, m, Kernel::Auto);
                let (what, got) = if m <= super::GEMV_MAX_TOKENS {
                    ("gemv", cw.gemv(&x, true)?)
                } else {
                    ("dequant+gemm", cw.forward(&x)?)
                };
                let e = max_rel(&got, &want)?;
                if e <= tol {
                    pass += 1;
                } else {
                    fail += 1;
                    println!("FAIL {what} {dt:?} n={n} k={k} g={g} m={m}: rel err {e:e}");
                }
            }
        }
    }
    Ok((pass, fail))
}

fn time_it(device: &Device, iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    device.synchronize()?;
    let t = std::time::Instant::now();
    for _ in 0..iters {
        f()?;
    }
    device.synchronize()?;
    Ok(t.elapsed().as_secs_f64() / iters as f64)
}

/// GEMV bandwidth at Llama-2-7B shapes (batch 1, f16) and the device-to-device copy bandwidth.
pub fn bench(device: &Device) -> Result<Vec<serde_json::Value>> {
    let mut rows = Vec::new();
    // Copy: 1 GiB read + 1 GiB written.
    let buf = Tensor::zeros(1usize << 29, DType::F16, device)?;
    let t = time_it(device, 20, || buf.copy().map(|_| ()))?;
    let copy_gbs = 2.0 * (1u64 << 30) as f64 / t / 1e9;
    rows.push(serde_json::json!({"what": "device-to-device copy, 1 GiB", "gb_s": copy_gbs}));
    let mut r = Rng(7);
    // (k = in, n = out) as Llama-2-7B's q/k/v/o, gate/up, down, lm_head.
    for (k, n) in [(4096usize, 4096usize), (4096, 11008), (11008, 4096), (4096, 32000)] {
        let packed = random_weight(&mut r, n, k, 128);
        let cw = CudaQ4::new(&packed, device)?;
        let x = Tensor::ones((1, k), DType::F16, device)?;
        let t = time_it(device, 200, || cw.gemv(&x, false).map(|_| ()))?;
        let bytes = n * k / 2 + n * (k / 128) * 3 + 2 * k + 2 * n;
        let gbs = bytes as f64 / t / 1e9;
        rows.push(serde_json::json!({"what": format!("gemv K={k} N={n} M=1 f16"), "us": t * 1e6, "gb_s": gbs, "of_copy": gbs / copy_gbs}));
    }
    Ok(rows)
}
