//! `awq-run selftest --bench`: copy bandwidth, GEMV bandwidth at Llama-2-7B shapes (weights
//! rotated through more copies than L2 holds), GEMM TFLOP/s against cuBLAS f16 on the same
//! shapes, as JSON rows.
use super::timing::{time_events, time_graph, time_graphs_interleaved};
use super::{random_vec, random_weight};
use crate::cuda::L2Prefetch;
use crate::quant::cuda::{gemv_many_with, gemv_max_tokens, skinny_kernels_built, launch, skinny_many_with, skinny_supported, skinny_wgmma_available, skinny_wgmma_variant, sm90_available, sm90_plan, SkinnyKernel, CudaQ4, GemmKernel, GemvKernel, GemvOptions, Sm90Plan};
use crate::rng::Rng;
use candle_core::{DType, Device, Result, Tensor};

/// A GEMV benchmark's inputs at `k` x `n` (g = 128): the bytes one call moves (codes, scales,
/// activations, output), copies of one random weight, enough that the weights never sit in the
/// 50 MB L2 between calls, and one f16 token.
fn gemv_bench_inputs(device: &Device, r: &mut Rng, k: usize, n: usize) -> Result<(usize, Vec<CudaQ4>, Tensor)> {
    let bytes = n * k / 2 + n * (k / 128) * 4 + 2 * k + 2 * n;
    let copies = (256 << 20) / bytes + 2;
    let one = random_weight(r, n, k, 128);
    let ws = (0..copies).map(|_| CudaQ4::new(&one, device)).collect::<Result<Vec<_>>>()?;
    let x = Tensor::from_vec(random_vec(r, k), (1, k), device)?.to_dtype(DType::F16)?;
    Ok((bytes, ws, x))
}

/// Benchmarks on the device (JSON rows): copy bandwidth, GEMV GB/s at Llama-2-7B shapes (weights
/// rotated through more copies than L2 holds), GEMM TFLOP/s against cuBLAS f16 on the same shapes.
/// Kernels are timed as CUDA-graph replays (see [`time_graph`]); the GEMV also one call at a time.
/// `only`: the sections to run (`gemv`, `gemv-splits`, `small-m`, `gemm`; empty: all); the copy
/// bandwidth is always measured.
pub fn bench(device: &Device, only: &[String]) -> Result<Vec<serde_json::Value>> {
    for s in only {
        if !BENCH_SECTIONS.contains(&s.as_str()) {
            candle_core::bail!("--bench-section {s}: not a section (one of {})", BENCH_SECTIONS.join(", "));
        }
    }
    let want = |s: &str| only.is_empty() || only.iter().any(|o| o == s);
    let mut rows = Vec::new();
    // Copy: 1 GiB read + 1 GiB written.
    let buf = Tensor::ones(1usize << 29, DType::F16, device)?;
    let t = time_events(device, 5, 10, |_| buf.copy().map(|_| ()))?;
    let copy_gbs = 2.0 * (1u64 << 30) as f64 / t / 1e9;
    rows.push(serde_json::json!({"what": "device-to-device copy, 1 GiB", "gb_s": copy_gbs}));
    drop(buf);
    let mut r = Rng::new(7);
    // (k = in, n = out) as Llama-2-7B's q/k/v/o, gate/up, down, lm_head.
    let gemv_shapes: &[(usize, usize)] = if want("gemv") { &[(4096, 11008), (4096, 4096), (11008, 4096), (4096, 32000)] } else { &[] };
    for &(k, n) in gemv_shapes {
        let (bytes, ws, x) = gemv_bench_inputs(device, &mut r, k, n)?;
        let copies = ws.len();
        let t = time_graph(device, 7, 100, |i| ws[i % copies].gemv(&x).map(|_| ()))?;
        let t_issue = time_events(device, 7, 100, |i| ws[i % copies].gemv(&x).map(|_| ()))?;
        let with = |kernel: GemvKernel| -> Result<f64> {
            time_graph(device, 7, 100, |i| gemv_many_with(&[&ws[i % copies]], &x, GemvOptions { kernel, ..Default::default() }).map(|_| ()))
        };
        let (t_ring, t_cc) = (with(GemvKernel::Ring)?, with(GemvKernel::CudaCores)?);
        let x8 = Tensor::from_vec(random_vec(&mut r, 8 * k), (8, k), device)?.to_dtype(DType::F16)?;
        let t8 = time_graph(device, 7, 100, |i| ws[i % copies].gemv(&x8).map(|_| ()))?;
        // Chained as in decode: each GEMV's blocks, as they finish, pull the next call's weights
        // (the next copy) into L2, up to 8 MiB.
        let hints: Vec<L2Prefetch> = ws.iter().map(|w| L2Prefetch::with_budget(&[w.q.clone(), w.sz.clone()], 8 << 20)).collect();
        let t_chained = time_graph(device, 7, 100, |i| {
            let o = GemvOptions { prefetch: hints[(i + 1) % copies], ..Default::default() };
            gemv_many_with(&[&ws[i % copies]], &x, o).map(|_| ())
        })?;
        let of_copy = |t: f64| bytes as f64 / t / 1e9 / copy_gbs;
        rows.push(serde_json::json!({
            "what": format!("gemv K={k} N={n} M=1 f16"), "us": t * 1e6, "gb_s": bytes as f64 / t / 1e9, "of_copy": of_copy(t),
            "ring_us": t_ring * 1e6, "ring_of_copy": of_copy(t_ring), "cuda_cores_us": t_cc * 1e6,
            "us_issued_one_by_one": t_issue * 1e6, "m8_us": t8 * 1e6,
            "chained_8mib_hint_us": t_chained * 1e6, "chained_of_copy": of_copy(t_chained),
        }));
    }
    // GEMV k-split sweep (the default choice is the row above).
    let sweep_shapes: &[(usize, usize)] = if want("gemv-splits") { &[(4096, 11008), (4096, 4096), (4096, 32000), (11008, 4096)] } else { &[] };
    for &(k, n) in sweep_shapes {
        let (bytes, ws, x) = gemv_bench_inputs(device, &mut r, k, n)?;
        let copies = ws.len();
        let mut sweep = Vec::new();
        for splits in [1usize, 2, 3, 4, 6, 8] {
            let o = GemvOptions { splits: Some(splits), ..Default::default() };
            let t = time_graph(device, 5, 100, |i| gemv_many_with(&[&ws[i % copies]], &x, o).map(|_| ()))?;
            sweep.push(serde_json::json!({"splits": splits, "us": t * 1e6, "gb_s": bytes as f64 / t / 1e9}));
        }
        rows.push(serde_json::json!({"what": format!("gemv split sweep K={k} N={n}"), "sweep": sweep}));
    }
    if want("small-m") {
        rows.extend(small_m(device, &mut r)?);
    }
    // GEMM against cuBLAS (f16 weights of the same shape): the mma.sync kernel, the wgmma one
    // with its default plan and with each tile size and split, the wgmma skinny GEMM in tiles.
    let gemm_shapes: &[(usize, usize)] = if want("gemm") { &[(4096, 11008), (11008, 4096), (4096, 4096)] } else { &[] };
    for &(k, n) in gemm_shapes {
        let one = random_weight(&mut r, n, k, 128);
        let w = CudaQ4::new(&one, device)?;
        let dense = w.dequantize(DType::F16)?;
        for m in [64usize, 256, 512, 1024, 3584, 4096] {
            let x = Tensor::from_vec(random_vec(&mut r, m * k), (m, k), device)?.to_dtype(DType::F16)?;
            let flops = 2.0 * (m * n * k) as f64;
            let iters = (2e12 / flops).clamp(5.0, 200.0) as usize;
            let (w, x, dense) = (&w, &x, &dense);
            type Timed<'a> = (String, Box<dyn FnMut(usize) -> Result<()> + 'a>);
            // cuBLAS and the GEMMs in alternation (see time_graphs_interleaved).
            let mut fs: Vec<Timed> = vec![
                ("cublas_f16".into(), Box::new(move |_| x.matmul(&dense.t()?).map(|_| ()))),
                ("sm80_gemm".into(), Box::new(move |_| w.gemm_with(x, GemmKernel::Sm80).map(|_| ()))),
            ];
            let sm90 = sm90_available(device);
            if sm90 {
                fs.push(("sm90_gemm".into(), Box::new(move |_| w.gemm_with(x, GemmKernel::Sm90).map(|_| ()))));
                for tokens in [256, 128] {
                    for splits in 1..=3 {
                        let plan = Sm90Plan { tokens, splits };
                        fs.push((format!("sm90 {plan}"), Box::new(move |_| w.gemm_with(x, GemmKernel::Sm90With(plan)).map(|_| ()))));
                    }
                }
            }
            // The wgmma skinny GEMM in tiles of 128 tokens, against the GEMMs.
            if skinny_wgmma_available(device) && m <= 1024 {
                let variant = skinny_wgmma_variant(launch::skinny_slots(m));
                fs.push(("skinny_wgmma".into(), Box::new(move |_| skinny_many_with(&[w], x, None, Some(variant)).map(|_| ()))));
            }
            let (keys, fs): (Vec<String>, Vec<_>) = fs.into_iter().unzip();
            let t = time_graphs_interleaved(device, 9, iters, fs)?;
            let us: serde_json::Map<String, serde_json::Value> = keys.iter().zip(&t).map(|(key, v)| (key.clone(), serde_json::json!(v * 1e6))).collect();
            let sms = match device {
                Device::Cuda(d) => crate::cuda::device_limits(d)?.sms,
                _ => 1,
            };
            let plan = sm90.then(|| sm90_plan(m, w.np, k, sms).to_string());
            rows.push(serde_json::json!({
                "what": format!("gemm K={k} N={n} M={m} f16"),
                "us": us,
                "sm90_plan": plan,
                "cublas_f16_tflops": flops / t[0] / 1e12,
                "sm90_over_cublas": sm90.then(|| t[0] / t[2]),
                "sm80_over_cublas": t[0] / t[1],
            }));
        }
    }
    Ok(rows)
}

/// The sections of [`bench`].
pub const BENCH_SECTIONS: [&str; 4] = ["gemv", "gemv-splits", "small-m", "gemm"];

/// Few tokens (batched decode, speculative verification): cuBLAS on the f16 weight, the W4 path
/// `forward` takes, the sm_80 GEMM, the sm_90 GEMM where it runs, the ring GEMV (to 64 tokens)
/// and every skinny GEMM kernel built for the tokens, in alternation, at the GPU issue's shapes.
/// Both weights rotate through more copies than L2 holds, as a model's layers do, so neither is
/// timed out of L2. Each row: µs per kernel under its key, and `w4_over_cublas`.
fn small_m(device: &Device, r: &mut Rng) -> Result<Vec<serde_json::Value>> {
    let mut rows = Vec::new();
    for (k, n) in [(4096usize, 11008usize), (11008, 4096), (4096, 4096)] {
        let (_, ws, _) = gemv_bench_inputs(device, r, k, n)?;
        let dense_one = ws[0].dequantize(DType::F16)?;
        let dense_copies = (256usize << 20) / (2 * n * k) + 2;
        let dense = (0..dense_copies).map(|_| dense_one.copy()).collect::<Result<Vec<_>>>()?;
        let (wc, dc) = (ws.len(), dense.len());
        for m in [1usize, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128] {
            let x = Tensor::from_vec(random_vec(r, m * k), (m, k), device)?.to_dtype(DType::F16)?;
            let (ws, x, dense) = (&ws, &x, &dense);
            type Timed<'a> = (String, Box<dyn FnMut(usize) -> Result<()> + 'a>);
            let mut fs: Vec<Timed> = vec![
                ("cublas_f16".into(), Box::new(move |i| x.matmul(&dense[i % dc].t()?).map(|_| ()))),
                ("w4".into(), Box::new(move |i| ws[i % wc].forward(x).map(|_| ()))),
                ("sm80_gemm".into(), Box::new(move |i| ws[i % wc].gemm_with(x, GemmKernel::Sm80).map(|_| ()))),
            ];
            if sm90_available(device) {
                fs.push(("sm90_gemm".into(), Box::new(move |i| ws[i % wc].gemm_with(x, GemmKernel::Sm90).map(|_| ()))));
            }
            if m <= gemv_max_tokens(DType::F16) {
                let ring = GemvOptions { kernel: GemvKernel::Ring, ..Default::default() };
                fs.push(("ring_gemv".into(), Box::new(move |i| gemv_many_with(&[&ws[i % wc]], x, ring).map(|_| ()))));
            }
            // Every skinny kernel built for these tokens at its default k slices, then the
            // slices swept for the wgmma ones where the choice is least obvious (session 18
            // swept the mma.sync ones), for the mma.sync kernel of two k-step warps, and for
            // the cluster ends, against the global end at the same slices.
            let kernels = if skinny_supported(&[&ws[0]], m, DType::F16) { skinny_kernels_built(m, device) } else { Vec::new() };
            for &kernel in &kernels {
                fs.push((format!("skinny {kernel}"), Box::new(move |i| skinny_many_with(&[&ws[i % wc]], x, None, Some(kernel)).map(|_| ()))));
            }
            let swept = matches!(m, 16 | 32 | 64 | 128);
            for &kernel in kernels.iter().filter(|k| swept && (k.cluster() || matches!(k, SkinnyKernel::Wgmma { .. }) || **k == SkinnyKernel::Mma { k_warps: 2 })) {
                let sweep: &[usize] = if kernel.cluster() { &[2, 4] } else { &[2, 4, 8, 16] };
                for &sp in sweep {
                    fs.push((format!("skinny {kernel} splits {sp}"), Box::new(move |i| skinny_many_with(&[&ws[i % wc]], x, Some(sp), Some(kernel)).map(|_| ()))));
                }
            }
            let (keys, fs): (Vec<String>, Vec<_>) = fs.into_iter().unzip();
            let t = time_graphs_interleaved(device, 9, 100, fs)?;
            let us: serde_json::Map<String, serde_json::Value> = keys.into_iter().zip(&t).map(|(key, v)| (key, serde_json::json!(v * 1e6))).collect();
            rows.push(serde_json::json!({ "what": format!("small-m K={k} N={n} M={m} f16"), "us": us, "w4_over_cublas": t[0] / t[1] }));
        }
    }
    Ok(rows)
}
