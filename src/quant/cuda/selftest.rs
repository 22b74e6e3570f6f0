//! `awq-run selftest --device cuda`: every CUDA kernel against a CPU reference on fresh random
//! inputs of awkward shapes, outputs poisoned with NaN before each run; and `--bench`: GEMV
//! bandwidth, GEMM TFLOP/s against cuBLAS and the fused decode kernels, timed with CUDA events.
use super::{gemv_many, CudaQ4, GemmKernel, GemvKernel, GemvOptions};
use crate::quant::cpu::{Kernel, PackedQ4};
use crate::quant::{L2Prefetch, QuantizedWeight};
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
    (130, 320, 64),
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
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.unit()).collect()
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

/// [`max_rel_vec`] of a device result.
fn max_rel(got: &Tensor, want: &[f32]) -> Result<f32> {
    Ok(max_rel_vec(&host(got)?, want))
}

/// max |got - want| / max |want|; NaN (a poisoned, unwritten element) or a length mismatch gives
/// infinity.
fn max_rel_vec(got: &[f32], want: &[f32]) -> f32 {
    if got.len() != want.len() {
        return f32::INFINITY;
    }
    let num = got.iter().zip(want).map(|(g, w)| (g - w).abs()).fold(0f32, |a, d| if d.is_nan() { f32::INFINITY } else { a.max(d) });
    num / want.iter().fold(0f32, |a, w| a.max(w.abs())).max(1e-30)
}

fn host(t: &Tensor) -> Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

struct Tally {
    pass: usize,
    fail: usize,
}
impl Tally {
    fn check(&mut self, what: String, e: f32, tol: f32) {
        if e <= tol {
            self.pass += 1;
        } else {
            self.fail += 1;
            println!("FAIL {what}: rel err {e:e} (tolerance {tol:e})");
        }
    }
}

/// Tolerance for a result in `dt` (the weights are dequantized in f16 by the kernels).
fn tol(dt: DType) -> f32 {
    match dt {
        DType::BF16 => 1.6e-2,
        _ => 2e-3,
    }
}

/// Runs every check; prints one line per failure and a summary; returns (passed, failed).
pub fn run(device: &Device, seed: u64) -> Result<(usize, usize)> {
    let mut r = Rng(seed | 1);
    let mut t = Tally { pass: 0, fail: 0 };
    // A buffer the kernels under test are told to prefetch into L2 (a stand-in for the next
    // layer's weights).
    let hint_buf = Tensor::zeros(3 << 20, DType::U8, device)?;
    for &(n, k, g) in SHAPES {
        let packed = random_weight(&mut r, n, k, g);
        let cw = CudaQ4::new(&packed, device)?;
        // The download that rebuilds a device-only layer's host copy (checkpoints): exact.
        let back = cw.to_tiled()?.to_packed();
        let same = back.codes == packed.codes && back.scales == packed.scales && back.zeros == packed.zeros;
        t.check(format!("download n={n} k={k} g={g}"), if same { 0.0 } else { f32::INFINITY }, 0.0);
        // A CUDA layer keeps no host copy and reads its codes back from the device.
        let q = packed.to_quantized();
        let layer = crate::quant::QuantLinear::new(q.clone(), None, DType::F16, device)?;
        use crate::model::linear::LinearLayer;
        let kept = layer.packed().is_none() && layer.quantized()?.as_ref() == Some(&q);
        t.check(format!("device-only layer n={n} k={k} g={g}"), if kept { 0.0 } else { f32::INFINITY }, 0.0);
        let mut dense = vec![0f32; n * k];
        for (o, row) in dense.chunks_mut(k).enumerate() {
            packed.dequantize_row(o, row);
        }
        for dt in [DType::F16, DType::BF16, DType::F32] {
            t.check(format!("dequant {dt:?} n={n} k={k} g={g}"), max_rel(&cw.dequantize_with(dt, true)?, &dense)?, tol(dt));
            for &m in TOKENS {
                let x = Tensor::from_vec(r.vec(m * k), (m, k), device)?.to_dtype(dt)?;
                // The reference sees the same rounded activations.
                let want = packed.matmul(&host(&x)?, m, Kernel::Auto);
                if m <= super::GEMV_MAX_TOKENS {
                    t.check(format!("gemv {dt:?} n={n} k={k} g={g} m={m}"), max_rel(&cw.gemv(&x, true)?, &want)?, tol(dt));
                    if dt == DType::F16 {
                        let cc = super::gemv_many_with(&[&cw], &x, GemvOptions { kernel: GemvKernel::CudaCores, ..Default::default() }, true)?;
                        t.check(format!("gemv cuda-cores {dt:?} n={n} k={k} g={g} m={m}"), max_rel(&cc, &want)?, tol(dt));
                        if m == 1 {
                            // The ring kernel where the batch-1 kernel is the default.
                            let ring = super::gemv_many_with(&[&cw], &x, GemvOptions { kernel: GemvKernel::Ring, ..Default::default() }, true)?;
                            t.check(format!("gemv ring {dt:?} n={n} k={k} g={g} m={m}"), max_rel(&ring, &want)?, tol(dt));
                        }
                        // An L2 hint (another weight's buffers) must not change the result.
                        let o = GemvOptions { prefetch: L2Prefetch::of(&[hint_buf.clone()]), ..Default::default() };
                        let got = super::gemv_many_with(&[&cw], &x, o, true)?;
                        t.check(format!("gemv l2-hint {dt:?} n={n} k={k} g={g} m={m}"), max_rel(&got, &want)?, tol(dt));
                        // Split-k counts other than the default choice, where k has the steps.
                        for splits in [1usize, 2, 3, 5, 8].into_iter().filter(|&sp| k / 16 >= 4 * sp) {
                            let o = GemvOptions { splits: Some(splits), ..Default::default() };
                            let got = super::gemv_many_with(&[&cw], &x, o, true)?;
                            t.check(format!("gemv split {splits} {dt:?} n={n} k={k} g={g} m={m}"), max_rel(&got, &want)?, tol(dt));
                        }
                    }
                }
                if dt == DType::F16 && cw.gemm_supported() {
                    t.check(format!("gemm sm80 {dt:?} n={n} k={k} g={g} m={m}"), max_rel(&cw.gemm_with(&x, GemmKernel::Sm80, true)?, &want)?, tol(dt));
                    if super::sm90_available(device) {
                        t.check(format!("gemm sm90 {dt:?} n={n} k={k} g={g} m={m}"), max_rel(&cw.gemm_with(&x, GemmKernel::Sm90, true)?, &want)?, tol(dt));
                    }
                }
                if m > super::GEMV_MAX_TOKENS {
                    t.check(format!("forward {dt:?} n={n} k={k} g={g} m={m}"), max_rel(&cw.forward(&x)?, &want)?, tol(dt));
                }
            }
        }
    }
    fused_gemv(device, &mut r, &mut t)?;
    let hint = L2Prefetch::of(&[hint_buf]);
    decode_kernels(device, &mut r, &mut t, &hint)?;
    add_rms_norm_kernel(device, &mut r, &mut t, &hint)?;
    position_kernels(device, &mut r, &mut t)?;
    graph_decode(device, &mut t)?;
    Ok((t.pass, t.fail))
}

/// The rotary embedding, KV write and attention of the graph decode step (position read on the
/// device) against the eager ops at random positions.
fn position_kernels(device: &Device, r: &mut Rng, t: &mut Tally) -> Result<()> {
    use crate::model::cuda::{decode_attention_at, kv_write_at, rope_at};
    for (h, kvh, d, cap) in [(32, 32, 128, 300), (9, 3, 64, 77), (16, 2, 128, 1000)] {
        for dt in [DType::F16, DType::BF16, DType::F32] {
            let pos = (r.next() as usize) % cap;
            let half = d / 2;
            let cos = Tensor::from_vec(r.vec(cap * half), (cap, half), device)?.to_dtype(dt)?;
            let sin = Tensor::from_vec(r.vec(cap * half), (cap, half), device)?.to_dtype(dt)?;
            let step = Tensor::new(&[pos as u32], device)?;
            let q = Tensor::from_vec(r.vec(h * d), (1, 1, h * d), device)?.to_dtype(dt)?;
            let k = Tensor::from_vec(r.vec(kvh * d), (1, 1, kvh * d), device)?.to_dtype(dt)?;
            let v = Tensor::from_vec(r.vec(kvh * d), (1, 1, kvh * d), device)?.to_dtype(dt)?;
            let kc = Tensor::from_vec(r.vec(kvh * cap * d), (1, kvh, cap, d), device)?.to_dtype(dt)?;
            let vc = Tensor::from_vec(r.vec(kvh * cap * d), (1, kvh, cap, d), device)?.to_dtype(dt)?;
            // Reference: candle's rope on the narrowed tables, slice_set into copies of the caches.
            let (c1, s1) = (cos.narrow(0, pos, 1)?, sin.narrow(0, pos, 1)?);
            let want_q = candle_nn::rotary_emb::rope(&q.reshape((1, 1, h, d))?.transpose(1, 2)?.contiguous()?, &c1, &s1)?;
            let want_k = candle_nn::rotary_emb::rope(&k.reshape((1, 1, kvh, d))?.transpose(1, 2)?.contiguous()?, &c1, &s1)?;
            let (kw, vw) = (kc.copy()?, vc.copy()?);
            kw.slice_set(&want_k, 2, pos)?;
            vw.slice_set(&v.reshape((1, 1, kvh, d))?.transpose(1, 2)?.contiguous()?, 2, pos)?;
            let got_q = rope_at(&q, &cos, &sin, &step, h, d)?;
            t.check(format!("rope_at {dt:?} h={h} d={d} pos={pos}"), max_rel(&got_q, &host(&want_q)?)?, tol(dt));
            kv_write_at(&k, &v, &kc, &vc, &cos, &sin, &step, kvh, d)?;
            t.check(format!("kv_write_at K {dt:?} kvh={kvh} d={d} pos={pos}"), max_rel(&kc, &host(&kw)?)?, tol(dt));
            t.check(format!("kv_write_at V {dt:?} kvh={kvh} d={d} pos={pos}"), max_rel(&vc, &host(&vw)?)?, 0.0);
            let scale = 1.0 / (d as f32).sqrt();
            let want = crate::model::cuda::decode_attention(&got_q, &kw.narrow(2, 0, pos + 1)?, &vw.narrow(2, 0, pos + 1)?, scale)?;
            let got = decode_attention_at(&got_q, &kc, &vc, &step, scale)?;
            t.check(format!("decode_attention_at {dt:?} h={h} kvh={kvh} d={d} pos={pos}"), max_rel(&got, &host(&want)?)?, tol(dt));
        }
    }
    Ok(())
}

/// A whole dummy model decoding through the CUDA graph against eager decoding: same logits at
/// every step, and the graph actually in use.
fn graph_decode(device: &Device, t: &mut Tally) -> Result<()> {
    use crate::model::{dummy, graph::GraphState};
    for (w4, dt) in [(true, DType::F16), (false, DType::BF16)] {
        let cfg = dummy::preset("smollm2-135m").map_err(candle_core::Error::wrap)?;
        let model = dummy::dummy_model(&cfg, w4, 64, dt, device).map_err(candle_core::Error::wrap)?;
        let prompt = Tensor::new(&[1u32, 5, 9, 200, 17, 3], device)?.unsqueeze(0)?;
        let run = |graph: bool| -> Result<(Vec<Vec<f32>>, bool)> {
            let mut cache = model.new_cache(64);
            if !graph {
                cache.graph = GraphState::Off;
            }
            let mut logits = model.forward(&prompt, &mut cache)?;
            let mut all = vec![host(&logits)?];
            for _ in 0..8 {
                let next = logits.argmax(1)?.to_dtype(DType::U32)?.unsqueeze(0)?;
                logits = model.forward(&next, &mut cache)?;
                all.push(host(&logits)?);
            }
            Ok((all, matches!(cache.graph, GraphState::Ready(_))))
        };
        let (eager, _) = run(false)?;
        let (graphed, used) = run(true)?;
        let name = format!("graph decode {} {dt:?}", if w4 { "w4" } else { "dense" });
        if !used {
            t.check(format!("{name}: the graph was not used"), f32::INFINITY, 0.0);
            continue;
        }
        let worst = eager.iter().zip(&graphed).map(|(e, g)| max_rel_vec(g, e)).fold(0f32, f32::max);
        t.check(name, worst, if dt == DType::BF16 { 5e-2 } else { 1e-2 });
    }
    Ok(())
}

/// Several weights sharing an input in one GEMV launch (q/k/v with grouped-query heads, gate/up).
fn fused_gemv(device: &Device, r: &mut Rng, t: &mut Tally) -> Result<()> {
    for (ns, k, g) in [(vec![4096, 1024, 1024], 4096, 128), (vec![200, 64, 136], 576, 64), (vec![11008, 11008], 4096, 128)] {
        let packed: Vec<PackedQ4> = ns.iter().map(|&n| random_weight(r, n, k, g)).collect();
        let cws = packed.iter().map(|p| CudaQ4::new(p, device)).collect::<Result<Vec<_>>>()?;
        let refs: Vec<&CudaQ4> = cws.iter().collect();
        for dt in [DType::F16, DType::BF16] {
            for m in [1, 3, 8] {
                let x = Tensor::from_vec(r.vec(m * k), (m, k), device)?.to_dtype(dt)?;
                let xh = host(&x)?;
                let parts: Vec<Vec<f32>> = packed.iter().map(|p| p.matmul(&xh, m, Kernel::Auto)).collect();
                let want: Vec<f32> = (0..m).flat_map(|ti| parts.iter().zip(&ns).flat_map(move |(p, &n)| p[ti * n..(ti + 1) * n].to_vec())).collect();
                let got = gemv_many(&refs, &x, true)?;
                t.check(format!("fused gemv {dt:?} n={ns:?} k={k} g={g} m={m}"), max_rel(&got, &want)?, tol(dt));
            }
        }
    }
    Ok(())
}

/// Decode attention (GQA, cache views with spare capacity) and silu·mul against f32 loops.
fn decode_kernels(device: &Device, r: &mut Rng, t: &mut Tally, hint: &L2Prefetch) -> Result<()> {
    use crate::model::cuda::{attention_applies, decode_attention, silu_mul};
    for (b, h, kvh, d, len, alloc) in [(1, 32, 32, 128, 1, 256), (2, 8, 2, 64, 257, 300), (1, 28, 4, 128, 5000, 5000), (1, 4, 1, 128, 20000, 20001), (3, 9, 3, 64, 33, 64)] {
        for dt in [DType::F16, DType::BF16, DType::F32] {
            let q = Tensor::from_vec(r.vec(b * h * d), (b, h, 1, d), device)?.to_dtype(dt)?;
            let kc = Tensor::from_vec(r.vec(b * kvh * alloc * d), (b, kvh, alloc, d), device)?.to_dtype(dt)?;
            let vc = Tensor::from_vec(r.vec(b * kvh * alloc * d), (b, kvh, alloc, d), device)?.to_dtype(dt)?;
            let (k, v) = (kc.narrow(2, 0, len)?, vc.narrow(2, 0, len)?);
            if !attention_applies(&q, &k, &v) {
                t.check(format!("decode attention {dt:?} b={b} h={h} kvh={kvh} d={d} len={len}: not applicable"), f32::INFINITY, 0.0);
                continue;
            }
            let scale = 1.0 / (d as f32).sqrt();
            let (qh, kh, vh) = (host(&q)?, host(&kc)?, host(&vc)?);
            let mut want = vec![0f32; b * h * d];
            for bi in 0..b {
                for hi in 0..h {
                    let kv = hi / (h / kvh);
                    let qv = &qh[(bi * h + hi) * d..][..d];
                    let row = |src: &[f32], j: usize| -> Vec<f32> { src[((bi * kvh + kv) * alloc + j) * d..][..d].to_vec() };
                    let s: Vec<f64> = (0..len).map(|j| row(&kh, j).iter().zip(qv).map(|(a, b)| (*a as f64) * (*b as f64)).sum::<f64>() * scale as f64).collect();
                    let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let p: Vec<f64> = s.iter().map(|x| (x - mx).exp()).collect();
                    let z: f64 = p.iter().sum();
                    for (j, pj) in p.iter().enumerate() {
                        for (o, vv) in want[(bi * h + hi) * d..][..d].iter_mut().zip(row(&vh, j)) {
                            *o += (pj / z * vv as f64) as f32;
                        }
                    }
                }
            }
            let got = decode_attention(&q, &k, &v, scale)?;
            t.check(format!("decode attention {dt:?} b={b} h={h} kvh={kvh} d={d} len={len}"), max_rel(&got, &want)?, tol(dt));
        }
    }
    for (rows, cols) in [(1, 11008), (3, 1001), (8, 1536)] {
        for dt in [DType::F16, DType::BF16, DType::F32] {
            let fused = Tensor::from_vec(r.vec(rows * 2 * cols), (rows, 2 * cols), device)?.to_dtype(dt)?;
            let (a, b) = (fused.narrow(1, 0, cols)?, fused.narrow(1, cols, cols)?);
            let fh = host(&fused)?;
            let want: Vec<f32> = (0..rows * cols)
                .map(|i| {
                    let (ri, c) = (i / cols, i % cols);
                    let x = fh[ri * 2 * cols + c] as f64;
                    (x / (1.0 + (-x).exp()) * fh[ri * 2 * cols + cols + c] as f64) as f32
                })
                .collect();
            t.check(format!("silu_mul {dt:?} rows={rows} cols={cols}"), max_rel(&silu_mul(&a, &b, hint)?, &want)?, tol(dt));
        }
    }
    Ok(())
}

/// The fused residual add + RMS norm against an f64 loop over the separately added sum (and the
/// norm alone, without the residual).
fn add_rms_norm_kernel(device: &Device, r: &mut Rng, t: &mut Tally, hint: &L2Prefetch) -> Result<()> {
    use crate::model::cuda::add_rms_norm;
    let eps = 1e-5f32;
    for (rows, h) in [(1usize, 4096usize), (3, 576), (8, 1000), (17, 2048), (2, 45), (1, 9000)] {
        for dt in [DType::F16, DType::BF16, DType::F32] {
            let x = Tensor::from_vec(r.vec(rows * h), (1, rows, h), device)?.to_dtype(dt)?;
            let d = Tensor::from_vec(r.vec(rows * h), (1, rows, h), device)?.to_dtype(dt)?;
            let w = Tensor::from_vec(r.vec(h), h, device)?.to_dtype(dt)?;
            let wh = host(&w)?;
            let norm_of = |src: &[f32]| -> Vec<f32> {
                src.chunks(h)
                    .flat_map(|row| {
                        let ms = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / h as f64;
                        let scale = 1.0 / (ms + eps as f64).sqrt();
                        row.iter().zip(&wh).map(move |(&v, &wi)| (v as f64 * scale * wi as f64) as f32).collect::<Vec<_>>()
                    })
                    .collect()
            };
            let want_sum = host(&(&x + &d)?)?;
            let (sum, normed) = add_rms_norm(&x, Some(&d), &w, eps, hint)?;
            let what = format!("{dt:?} rows={rows} h={h}");
            t.check(format!("add_rms_norm sum {what}"), max_rel(&sum, &want_sum)?, tol(dt));
            t.check(format!("add_rms_norm norm {what}"), max_rel(&normed, &norm_of(&want_sum))?, tol(dt));
            let (same, normed) = add_rms_norm(&x, None, &w, eps, &L2Prefetch::none())?;
            t.check(format!("rms_norm alone {what}"), max_rel(&normed, &norm_of(&host(&x)?))?, tol(dt));
            t.check(format!("rms_norm alone passes x through {what}"), max_rel(&same, &host(&x)?)?, 0.0);
        }
    }
    Ok(())
}

/// Median GPU time of `f` in seconds: each of `reps` samples times `iters` calls between two CUDA
/// events, after a warm-up.
pub fn time_events(device: &Device, reps: usize, iters: usize, mut f: impl FnMut(usize) -> Result<()>) -> Result<f64> {
    let Device::Cuda(dev) = device else { candle_core::bail!("CUDA timing on a non-CUDA device") };
    let stream = dev.cuda_stream();
    use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
    use candle_core::cuda_backend::WrapErr;
    for i in 0..iters.min(8) {
        f(i)?;
    }
    device.synchronize()?;
    let mut samples = Vec::with_capacity(reps);
    for _ in 0..reps {
        let start = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).w()?;
        for i in 0..iters {
            f(i)?;
        }
        let end = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).w()?;
        samples.push(start.elapsed_ms(&end).w()? as f64 / 1e3 / iters as f64);
    }
    Ok(median(samples))
}

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(|a, b| a.total_cmp(b));
    samples[samples.len() / 2]
}

/// Median GPU time of one call of `f`, with `iters` calls captured in a CUDA graph and the graph
/// replayed `reps` times between events: kernel time without the host's cost of issuing each call.
pub fn time_graph(device: &Device, reps: usize, iters: usize, f: impl FnMut(usize) -> Result<()>) -> Result<f64> {
    let graph = capture(device, iters, f)?;
    Ok(median((0..reps).map(|_| replay_secs(device, &graph, iters)).collect::<Result<Vec<_>>>()?))
}

/// As [`time_graph`] for several kernels timed against each other: each round replays every
/// graph once, in an order that rotates, so the clock and temperature drift of a long run (an
/// H100 under tensor-core load slows by several percent within seconds) falls on all of them
/// alike. Medians per kernel, in the order given.
pub fn time_graphs_interleaved(device: &Device, rounds: usize, iters: usize, fs: Vec<Box<dyn FnMut(usize) -> Result<()> + '_>>) -> Result<Vec<f64>> {
    let graphs = fs.into_iter().map(|f| capture(device, iters, f)).collect::<Result<Vec<_>>>()?;
    let mut samples = vec![Vec::with_capacity(rounds); graphs.len()];
    for r in 0..rounds {
        for j in 0..graphs.len() {
            let g = (j + r) % graphs.len();
            samples[g].push(replay_secs(device, &graphs[g], iters)?);
        }
    }
    Ok(samples.into_iter().map(median).collect())
}

/// `iters` calls of `f` captured in a CUDA graph, after a warm-up, and replayed once.
fn capture(device: &Device, iters: usize, mut f: impl FnMut(usize) -> Result<()>) -> Result<candle_core::cuda_backend::cudarc::driver::CudaGraph> {
    use candle_core::cuda_backend::cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
    use candle_core::cuda_backend::WrapErr;
    let Device::Cuda(dev) = device else { candle_core::bail!("CUDA timing on a non-CUDA device") };
    let stream = dev.cuda_stream();
    for i in 0..iters.min(8) {
        f(i)?;
    }
    device.synchronize()?;
    stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED).w()?;
    let body = (0..iters).try_for_each(&mut f);
    let graph = stream.end_capture(CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH).w();
    body?;
    let Some(graph) = graph? else { candle_core::bail!("empty graph") };
    graph.launch().w()?;
    device.synchronize()?;
    Ok(graph)
}

/// Seconds per call of one timed replay of `graph` (`iters` calls).
fn replay_secs(device: &Device, graph: &candle_core::cuda_backend::cudarc::driver::CudaGraph, iters: usize) -> Result<f64> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
    use candle_core::cuda_backend::WrapErr;
    let Device::Cuda(dev) = device else { candle_core::bail!("CUDA timing on a non-CUDA device") };
    let stream = dev.cuda_stream();
    let start = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).w()?;
    graph.launch().w()?;
    let end = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).w()?;
    Ok(start.elapsed_ms(&end).w()? as f64 / 1e3 / iters as f64)
}

/// A GEMV benchmark's inputs at `k` x `n` (g = 128): the bytes one call moves (codes, scales,
/// activations, output), copies of one random weight, enough that the weights never sit in the
/// 50 MB L2 between calls, and one f16 token.
fn gemv_bench_inputs(device: &Device, r: &mut Rng, k: usize, n: usize) -> Result<(usize, Vec<CudaQ4>, Tensor)> {
    let bytes = n * k / 2 + n * (k / 128) * 4 + 2 * k + 2 * n;
    let copies = (256 << 20) / bytes + 2;
    let one = random_weight(r, n, k, 128);
    let ws = (0..copies).map(|_| CudaQ4::new(&one, device)).collect::<Result<Vec<_>>>()?;
    let x = Tensor::from_vec(r.vec(k), (1, k), device)?.to_dtype(DType::F16)?;
    Ok((bytes, ws, x))
}

/// Benchmarks on the device (JSON rows): copy bandwidth, GEMV GB/s at Llama-2-7B shapes (weights
/// rotated through more copies than L2 holds), GEMM TFLOP/s against cuBLAS f16 on the same shapes.
/// Kernels are timed as CUDA-graph replays (see [`time_graph`]); the GEMV also one call at a time.
pub fn bench(device: &Device) -> Result<Vec<serde_json::Value>> {
    let mut rows = Vec::new();
    // Copy: 1 GiB read + 1 GiB written.
    let buf = Tensor::ones(1usize << 29, DType::F16, device)?;
    let t = time_events(device, 5, 10, |_| buf.copy().map(|_| ()))?;
    let copy_gbs = 2.0 * (1u64 << 30) as f64 / t / 1e9;
    rows.push(serde_json::json!({"what": "device-to-device copy, 1 GiB", "gb_s": copy_gbs}));
    drop(buf);
    let mut r = Rng(7);
    // (k = in, n = out) as Llama-2-7B's q/k/v/o, gate/up, down, lm_head.
    for (k, n) in [(4096usize, 11008usize), (4096, 4096), (11008, 4096), (4096, 32000)] {
        let (bytes, ws, x) = gemv_bench_inputs(device, &mut r, k, n)?;
        let copies = ws.len();
        let t = time_graph(device, 7, 100, |i| ws[i % copies].gemv(&x, false).map(|_| ()))?;
        let t_issue = time_events(device, 7, 100, |i| ws[i % copies].gemv(&x, false).map(|_| ()))?;
        let with = |kernel: GemvKernel| -> Result<f64> {
            time_graph(device, 7, 100, |i| super::gemv_many_with(&[&ws[i % copies]], &x, GemvOptions { kernel, ..Default::default() }, false).map(|_| ()))
        };
        let (t_ring, t_cc) = (with(GemvKernel::Ring)?, with(GemvKernel::CudaCores)?);
        let x8 = Tensor::from_vec(r.vec(8 * k), (8, k), device)?.to_dtype(DType::F16)?;
        let t8 = time_graph(device, 7, 100, |i| ws[i % copies].gemv(&x8, false).map(|_| ()))?;
        // Chained as in decode: each GEMV's blocks, as they finish, pull the next call's weights
        // (the next copy) into L2, up to 8 MiB.
        let hints: Vec<L2Prefetch> = ws.iter().map(|w| L2Prefetch::with_budget(&[w.q.clone(), w.sz.clone()], 8 << 20)).collect();
        let t_chained = time_graph(device, 7, 100, |i| {
            let o = GemvOptions { prefetch: hints[(i + 1) % copies], ..Default::default() };
            super::gemv_many_with(&[&ws[i % copies]], &x, o, false).map(|_| ())
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
    for (k, n) in [(4096usize, 11008usize), (4096, 4096), (4096, 32000), (11008, 4096)] {
        let (bytes, ws, x) = gemv_bench_inputs(device, &mut r, k, n)?;
        let copies = ws.len();
        let mut sweep = Vec::new();
        for splits in [1usize, 2, 3, 4, 6, 8] {
            let o = GemvOptions { splits: Some(splits), ..Default::default() };
            let t = time_graph(device, 5, 100, |i| super::gemv_many_with(&[&ws[i % copies]], &x, o, false).map(|_| ()))?;
            sweep.push(serde_json::json!({"splits": splits, "us": t * 1e6, "gb_s": bytes as f64 / t / 1e9}));
        }
        rows.push(serde_json::json!({"what": format!("gemv split sweep K={k} N={n}"), "sweep": sweep}));
    }
    // GEMM against cuBLAS (f16 weights of the same shape), and dequantize + cuBLAS.
    for (k, n) in [(4096usize, 11008usize), (4096, 4096)] {
        let one = random_weight(&mut r, n, k, 128);
        let w = CudaQ4::new(&one, device)?;
        let dense = w.dequantize(DType::F16)?;
        for m in [16usize, 64, 256, 1024, 4096] {
            let x = Tensor::from_vec(r.vec(m * k), (m, k), device)?.to_dtype(DType::F16)?;
            let flops = 2.0 * (m * n * k) as f64;
            let iters = (2e12 / flops).clamp(5.0, 200.0) as usize;
            // cuBLAS and the GEMMs in alternation (see time_graphs_interleaved).
            let mut fs: Vec<Box<dyn FnMut(usize) -> Result<()>>> = vec![
                Box::new(|_| x.matmul(&dense.t()?).map(|_| ())),
                Box::new(|_| w.gemm_with(&x, GemmKernel::Sm80, false).map(|_| ())),
                Box::new(|_| x.matmul(&w.dequantize(DType::F16)?.t()?).map(|_| ())),
            ];
            let sm90 = super::sm90_available(device);
            if sm90 {
                fs.push(Box::new(|_| w.gemm_with(&x, GemmKernel::Sm90, false).map(|_| ())));
            }
            let t = time_graphs_interleaved(device, 9, iters, fs)?;
            let (t_cublas, t_w4, t_deq, t_sm90) = (t[0], t[1], t[2], sm90.then(|| t[3]));
            rows.push(serde_json::json!({
                "what": format!("gemm K={k} N={n} M={m} f16"),
                "w4_sm80_mma_tflops": flops / t_w4 / 1e12,
                "w4_sm90_wgmma_tflops": t_sm90.map(|t| flops / t / 1e12),
                "sm90_over_cublas": t_sm90.map(|t| t_cublas / t),
                "cublas_f16_tflops": flops / t_cublas / 1e12,
                "dequant_cublas_tflops": flops / t_deq / 1e12,
                "sm80_over_cublas": t_cublas / t_w4,
            }));
        }
    }
    Ok(rows)
}
