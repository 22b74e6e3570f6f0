//! `awq-run selftest --device cuda`: every CUDA kernel (the 4-bit GEMV/GEMMs of
//! `quant::cuda`, the decode kernels of `model::cuda`, the decode graph) against a CPU reference
//! on fresh random inputs of awkward shapes, outputs poisoned with NaN before each run
//! ([`crate::cuda::poison`]). `--bench` ([`bench`]) measures them with the harness of [`timing`].
pub mod bench;
pub mod timing;

use crate::cuda::{poison, L2Prefetch};
use crate::linear::QuantLinear;
use crate::quant::cpu::{Kernel, PackedQ4};
use crate::quant::cuda::{gemv_many, gemv_many_with, gemv_max_tokens, skinny_capable, skinny_kernels_built, skinny_many, skinny_many_with, skinny_supported, sm90_available, CudaQ4, GemmKernel, GemvKernel, GemvOptions, Sm90Plan, GEMV_MAX_TOKENS, SM90_MAX_SPLITS};
use crate::quant::{QuantizedWeight, WeightShape};
use crate::rng::Rng;
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
    // Group size 32 on whole 64-wide k tiles: the skinny GEMMs' two groups a tile.
    (72, 320, 32),
    (136, 576, 64),
    (8, 384, 128),
    (24, 1536, 1536),
    (130, 320, 64),
];
pub const TOKENS: &[usize] = &[1, 2, 3, 7, 8, 9, 16, 21, 33, 64, 65, 128, 1000];

/// `n` uniform values in [-1, 1).
fn random_vec(r: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| r.unit()).collect()
}

/// A random 4-bit weight in the CPU layout (the reference's).
fn random_weight(r: &mut Rng, n: usize, k: usize, g: usize) -> PackedQ4 {
    PackedQ4::from_quantized(&QuantizedWeight::random_q4(WeightShape::new(n, k, g), r))
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
    let mut r = Rng::new(seed);
    let mut t = Tally { pass: 0, fail: 0 };
    let _poisoned = poison::enable();
    // Every kernel module a server loads before its first request (the names it loads exist).
    if let Device::Cuda(dev) = device {
        let loaded = crate::model::cuda::preload_kernels(dev);
        if let Err(e) = &loaded {
            println!("preload: {e}");
        }
        t.check("preload kernel modules".into(), if loaded.is_ok() { 0.0 } else { f32::INFINITY }, 0.0);
    }
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
        let layer = QuantLinear::new(q.clone(), None, DType::F16, device)?;
        let kept = layer.packed().is_none() && layer.quantized()? == q;
        t.check(format!("device-only layer n={n} k={k} g={g}"), if kept { 0.0 } else { f32::INFINITY }, 0.0);
        let mut dense = vec![0f32; n * k];
        for (o, row) in dense.chunks_mut(k).enumerate() {
            packed.dequantize_row(o, row);
        }
        for dt in [DType::F16, DType::BF16, DType::F32] {
            t.check(format!("dequant {dt:?} n={n} k={k} g={g}"), max_rel(&cw.dequantize(dt)?, &dense)?, tol(dt));
            for &m in TOKENS {
                let x = Tensor::from_vec(random_vec(&mut r, m * k), (m, k), device)?.to_dtype(dt)?;
                // The reference sees the same rounded activations.
                let want = packed.matmul(&host(&x)?, m, Kernel::Auto);
                if m <= gemv_max_tokens(dt) {
                    t.check(format!("gemv {dt:?} n={n} k={k} g={g} m={m}"), max_rel(&cw.gemv(&x)?, &want)?, tol(dt));
                    if dt == DType::F16 {
                        if m <= GEMV_MAX_TOKENS {
                            let cc = gemv_many_with(&[&cw], &x, GemvOptions { kernel: GemvKernel::CudaCores, ..Default::default() })?;
                            t.check(format!("gemv cuda-cores {dt:?} n={n} k={k} g={g} m={m}"), max_rel(&cc, &want)?, tol(dt));
                        }
                        // The ring kernel where the few-token kernel is the default.
                        let ring = gemv_many_with(&[&cw], &x, GemvOptions { kernel: GemvKernel::Ring, ..Default::default() })?;
                        t.check(format!("gemv ring {dt:?} n={n} k={k} g={g} m={m}"), max_rel(&ring, &want)?, tol(dt));
                        // An L2 hint (another weight's buffers) must not change the result.
                        let o = GemvOptions { prefetch: L2Prefetch::of(std::slice::from_ref(&hint_buf)), ..Default::default() };
                        let got = gemv_many_with(&[&cw], &x, o)?;
                        t.check(format!("gemv l2-hint {dt:?} n={n} k={k} g={g} m={m}"), max_rel(&got, &want)?, tol(dt));
                        // Split-k counts other than the default choice, where k has the steps.
                        for splits in [1usize, 2, 3, 5, 8].into_iter().filter(|&sp| k / 16 >= 4 * sp) {
                            let o = GemvOptions { splits: Some(splits), ..Default::default() };
                            let got = gemv_many_with(&[&cw], &x, o)?;
                            t.check(format!("gemv split {splits} {dt:?} n={n} k={k} g={g} m={m}"), max_rel(&got, &want)?, tol(dt));
                        }
                    }
                }
                if skinny_capable(&[&cw], m, dt) {
                    // The default kernel at the default k slices, one, and an odd count (uneven
                    // slices, some maybe empty).
                    for splits in [None, Some(1), Some(3)] {
                        let got = skinny_many(&[&cw], &x, splits)?;
                        t.check(format!("skinny {splits:?} {dt:?} n={n} k={k} g={g} m={m}"), max_rel(&got, &want)?, tol(dt));
                    }
                    // Every kernel built for these tokens on this device (each k-step grouping,
                    // each wgmma pipeline depth), at the default slices and an odd count (uneven
                    // slices, some maybe empty).
                    for kernel in skinny_kernels_built(m, device) {
                        // A cluster end takes 2 or 4 slices; it adds them in the order the
                        // global end does, so both give the same bits.
                        let counts: &[Option<usize>] = if kernel.cluster() { &[None, Some(2), Some(4)] } else { &[None, Some(3)] };
                        for &splits in counts {
                            let got = skinny_many_with(&[&cw], &x, splits, Some(kernel))?;
                            t.check(format!("skinny {kernel} {splits:?} {dt:?} n={n} k={k} g={g} m={m}"), max_rel(&got, &want)?, tol(dt));
                            if let (Some(sp), true) = (splits, kernel.cluster()) {
                                let global = skinny_many_with(&[&cw], &x, Some(sp), Some(kernel.with_cluster(false)))?;
                                t.check(format!("skinny {kernel} = global end, {sp} slices, {dt:?} n={n} k={k} g={g} m={m}"), max_rel(&got, &host(&global)?)?, 0.0);
                            }
                        }
                    }
                }
                if dt == DType::F16 && cw.gemm_supported() {
                    t.check(format!("gemm sm80 {dt:?} n={n} k={k} g={g} m={m}"), max_rel(&cw.gemm_with(&x, GemmKernel::Sm80)?, &want)?, tol(dt));
                    if sm90_available(device) {
                        t.check(format!("gemm sm90 {dt:?} n={n} k={k} g={g} m={m}"), max_rel(&cw.gemm_with(&x, GemmKernel::Sm90)?, &want)?, tol(dt));
                        // Every tile size and k split (uneven runs of k tiles where they do not divide).
                        for tokens in [256, 128] {
                            for splits in (1..=SM90_MAX_SPLITS).filter(|&sp| sp <= k / 64 && m > 8) {
                                let plan = Sm90Plan { tokens, splits };
                                let got = cw.gemm_with(&x, GemmKernel::Sm90With(plan))?;
                                t.check(format!("gemm sm90 {plan} {dt:?} n={n} k={k} g={g} m={m}"), max_rel(&got, &want)?, tol(dt));
                            }
                        }
                    }
                }
                if m > gemv_max_tokens(dt) {
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
    batched_step(device, &mut t)?;
    paged_kernels(device, &mut r, &mut t)?;
    logits_top_k(device, &mut r, &mut t)?;
    Ok((t.pass, t.fail))
}

/// The logits top-k kernel against the host selection, exactly (ids and value bits): rows of
/// normal values, of f16-rounded ones (ties, as an f16 lm_head gives), of four distinct values
/// (ties across the k-th place), with NaN, infinities and signed zeros sprinkled in.
fn logits_top_k(device: &Device, r: &mut Rng, t: &mut Tally) -> Result<()> {
    use crate::model::cuda::topk::logits_top_k;
    use crate::model::logits::{top_k_of, top_k_rows};
    for (rows, vocab, k) in [(1, 1, 1), (3, 7, 7), (5, 255, 40), (2, 256, 256), (4, 257, 8), (64, 32000, 40), (3, 32000, 256), (2, 128256, 40), (1, 49152, 1), (7, 1000, 255)] {
        for case in 0..4 {
            let vals: Vec<f32> = (0..rows * vocab)
                .map(|_| match case {
                    0 => r.normal() * 3.0,
                    1 => half::f16::from_f32(r.normal() * 4.0).to_f32(),
                    2 => (r.below(4) as f32) - 1.0,
                    _ => match r.below(40) {
                        0 => f32::NAN,
                        1 => f32::INFINITY,
                        2 => f32::NEG_INFINITY,
                        3 => -0.0,
                        4 => 0.0,
                        _ => r.normal(),
                    },
                })
                .collect();
            let logits = Tensor::from_vec(vals.clone(), (rows, vocab), device)?;
            let want: Vec<Vec<(u32, f32)>> = vals.chunks(vocab).map(|row| top_k_of(row, k)).collect();
            let same = |got: &[Vec<(u32, f32)>]| got.len() == want.len() && got.iter().zip(&want).all(|(g, w)| g.len() == w.len() && g.iter().zip(w).all(|(a, b)| a.0 == b.0 && a.1.to_bits() == b.1.to_bits()));
            let (v, i) = logits_top_k(&logits, k)?;
            let got: Vec<Vec<(u32, f32)>> = i.to_vec2::<u32>()?.into_iter().zip(v.to_vec2::<f32>()?).map(|(i, v)| i.into_iter().zip(v).collect()).collect();
            let what = format!("logits top-k rows={rows} vocab={vocab} k={k} case={case}");
            t.check(what.clone(), if same(&got) { 0.0 } else { f32::INFINITY }, 0.0);
            t.check(format!("{what} (top_k_rows)"), if same(&top_k_rows(&logits, k)?) { 0.0 } else { f32::INFINITY }, 0.0);
        }
    }
    Ok(())
}

/// The rotary embedding, KV write and attention of the graph decode step (position read on the
/// device) against the eager ops at random positions.
fn position_kernels(device: &Device, r: &mut Rng, t: &mut Tally) -> Result<()> {
    use crate::model::cuda::{decode_attention_at, rope_kv_write_at};
    for (h, kvh, d, cap) in [(32, 32, 128, 300), (9, 3, 64, 77), (16, 2, 128, 1000)] {
        for dt in [DType::F16, DType::BF16, DType::F32] {
            let pos = r.below(cap as u64) as usize;
            let half = d / 2;
            let cos = Tensor::from_vec(random_vec(r, cap * half), (cap, half), device)?.to_dtype(dt)?;
            let sin = Tensor::from_vec(random_vec(r, cap * half), (cap, half), device)?.to_dtype(dt)?;
            let step = Tensor::new(&[pos as u32], device)?;
            let q = Tensor::from_vec(random_vec(r, h * d), (1, 1, h * d), device)?.to_dtype(dt)?;
            let k = Tensor::from_vec(random_vec(r, kvh * d), (1, 1, kvh * d), device)?.to_dtype(dt)?;
            let v = Tensor::from_vec(random_vec(r, kvh * d), (1, 1, kvh * d), device)?.to_dtype(dt)?;
            let kc = Tensor::from_vec(random_vec(r, kvh * cap * d), (1, kvh, cap, d), device)?.to_dtype(dt)?;
            let vc = Tensor::from_vec(random_vec(r, kvh * cap * d), (1, kvh, cap, d), device)?.to_dtype(dt)?;
            // Reference: candle's rope on the narrowed tables, slice_set into copies of the caches.
            let (c1, s1) = (cos.narrow(0, pos, 1)?, sin.narrow(0, pos, 1)?);
            let want_q = candle_nn::rotary_emb::rope(&q.reshape((1, 1, h, d))?.transpose(1, 2)?.contiguous()?, &c1, &s1)?;
            let want_k = candle_nn::rotary_emb::rope(&k.reshape((1, 1, kvh, d))?.transpose(1, 2)?.contiguous()?, &c1, &s1)?;
            let (kw, vw) = (kc.copy()?, vc.copy()?);
            kw.slice_set(&want_k, 2, pos)?;
            vw.slice_set(&v.reshape((1, 1, kvh, d))?.transpose(1, 2)?.contiguous()?, 2, pos)?;
            let got_q = rope_kv_write_at(&q, &k, &v, &kc, &vc, &cos, &sin, &step, h, kvh, d)?;
            t.check(format!("rope_kv_write_at q {dt:?} h={h} d={d} pos={pos}"), max_rel(&got_q, &host(&want_q)?)?, tol(dt));
            t.check(format!("rope_kv_write_at K {dt:?} kvh={kvh} d={d} pos={pos}"), max_rel(&kc, &host(&kw)?)?, tol(dt));
            t.check(format!("rope_kv_write_at V {dt:?} kvh={kvh} d={d} pos={pos}"), max_rel(&vc, &host(&vw)?)?, 0.0);
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

/// The server's continuous-batching step on the device: three sequences stepped together over
/// the paged KV cache (the first prefilling in two chunks while the others prefill whole, then
/// all decoding in one batch) against each sequence alone through `Model::forward`, fed the same
/// tokens (the alone run's greedy ones). Batched linears sum in another order than the batch-1
/// GEMV and the paged attention reads its keys through a gather, so the logits agree within the
/// graph check's tolerance, not bit for bit.
fn batched_step(device: &Device, t: &mut Tally) -> Result<()> {
    use crate::model::{batch::StepSeq, dummy, paged::{KvPool, SeqKv}};
    let prompts: [&[u32]; 3] = [&[1, 5, 9, 13, 17, 21, 25, 29, 33, 37, 41, 45, 49, 53, 57, 61, 65, 69, 2], &[3], &[7, 8, 9, 10, 11]];
    let steps = 8;
    for (w4, dt) in [(true, DType::F16), (false, DType::F16), (true, DType::BF16)] {
        let cfg = dummy::preset("smollm2-135m").map_err(candle_core::Error::wrap)?;
        let model = dummy::dummy_model(&cfg, w4, 64, dt, device).map_err(candle_core::Error::wrap)?;
        // Alone: the greedy continuation and the logits before each of its tokens.
        let mut alone = Vec::new();
        for p in prompts {
            let mut cache = model.new_cache(64);
            let (mut toks, mut logits) = (vec![], vec![]);
            let mut l = model.forward(&Tensor::new(p, device)?.unsqueeze(0)?, &mut cache)?;
            for _ in 0..steps {
                let lv = host(&l)?;
                let next = lv.iter().enumerate().fold((0usize, f32::MIN), |b, (i, &x)| if x > b.1 { (i, x) } else { b }).0 as u32;
                toks.push(next);
                logits.push(lv);
                l = model.forward(&Tensor::new(&[next], device)?.unsqueeze(0)?, &mut cache)?;
            }
            alone.push((toks, logits));
        }
        // Batched, teacher-forced with those tokens.
        let mut pool = KvPool::new(&model.cfg, 32, dt, device)?.with_prefix_cache(true);
        let mut kvs: Vec<SeqKv> = prompts.iter().map(|_| SeqKv::default()).collect();
        let mut seen: Vec<Vec<Vec<f32>>> = vec![vec![]; prompts.len()];
        let mut fed = [0usize; 3]; // tokens of each sequence (prompt, then continuation) fed so far
        let feed = |i: usize, from: usize, n: usize| -> Vec<u32> { prompts[i].iter().chain(&alone[i].0).skip(from).take(n).copied().collect() };
        let mut step_no = 0;
        while seen.iter().any(|s| s.len() < steps) {
            let mut toks: Vec<Vec<u32>> = Vec::new();
            let mut who = Vec::new();
            for i in 0..prompts.len() {
                if seen[i].len() >= steps {
                    continue;
                }
                let n = if fed[i] < prompts[i].len() { if i == 0 && step_no == 0 { 7 } else { prompts[i].len() - fed[i] } } else { 1 };
                toks.push(feed(i, fed[i], n));
                who.push(i);
            }
            let mut step: Vec<StepSeq> = Vec::new();
            let mut next = toks.iter();
            for (i, kv) in kvs.iter_mut().enumerate() {
                if !who.contains(&i) {
                    continue;
                }
                let Some(tk) = next.next() else { break };
                pool.reserve(kv, kv.len() + tk.len()).map_err(|e| candle_core::Error::Msg(format!("batched step: sequence {i}: {e:?}")))?;
                step.push(StepSeq { tokens: tk, kv });
            }
            let l = model.forward_batch(&pool, &mut step)?;
            for (row, &i) in who.iter().enumerate() {
                fed[i] += toks[row].len();
                pool.commit(&mut kvs[i], &feed(i, 0, fed[i]));
                if fed[i] >= prompts[i].len() {
                    seen[i].push(host(&l.get(row)?)?);
                }
            }
            step_no += 1;
        }
        // The prefix cache: the first prompt again, its first whole block adopted from the
        // sequence above, the rest computed over it; its logits as those of the prompt alone.
        let mut again = SeqKv::default();
        let adopted = pool.adopt_prefix(&mut again, prompts[0]);
        pool.reserve(&mut again, prompts[0].len()).map_err(|e| candle_core::Error::Msg(format!("prefix cache: {e:?}")))?;
        let rest = &prompts[0][adopted..];
        let l = model.forward_batch(&pool, &mut [StepSeq { tokens: rest, kv: &mut again }])?;
        let err = if adopted == 16 { max_rel_vec(&host(&l.get(0)?)?, &alone[0].1[0]) } else { f32::INFINITY };
        t.check(format!("prefix-cached prompt {} {dt:?}", if w4 { "w4" } else { "dense" }), err, if dt == DType::BF16 { 5e-2 } else { 1e-2 });
        pool.release(&mut again);
        let worst = (0..prompts.len()).flat_map(|i| seen[i].iter().zip(&alone[i].1).map(|(b, a)| max_rel_vec(b, a)).collect::<Vec<_>>()).fold(0f32, f32::max);
        t.check(format!("batched step {} {dt:?}", if w4 { "w4" } else { "dense" }), worst, if dt == DType::BF16 { 5e-2 } else { 1e-2 });
        for kv in kvs.iter_mut() {
            pool.release(kv);
        }
    }
    Ok(())
}

/// The server's batched decode kernels against f64 loops: rope at each token's own position, the
/// KV write into pool rows, and attention through a row table over sequences of mixed lengths
/// (one chunk, several, one position; GQA; rows drawn at random, so sequences share rows).
fn paged_kernels(device: &Device, r: &mut Rng, t: &mut Tally) -> Result<()> {
    use crate::model::cuda::{paged_attention, rope_kv_write_rows};
    let pool_rows = 1200;
    for (h, kvh, d, lens) in [(32, 8, 128, vec![1usize, 17, 300]), (9, 3, 64, vec![600, 5]), (4, 4, 256, vec![256, 257, 1000, 2]), (28, 4, 128, vec![33])] {
        let b = lens.len();
        let width = *lens.iter().max().unwrap_or(&1);
        for dt in [DType::F16, DType::BF16, DType::F32] {
            let half = d / 2;
            let positions = 1100;
            let angles: Vec<f32> = (0..positions * half).map(|i| (i / half) as f32 * 0.37f32.powi((i % half) as i32 % 7 + 1)).collect();
            let cos = Tensor::from_vec(angles.iter().map(|a| a.cos()).collect::<Vec<_>>(), (positions, half), device)?.to_dtype(dt)?;
            let sin = Tensor::from_vec(angles.iter().map(|a| a.sin()).collect::<Vec<_>>(), (positions, half), device)?.to_dtype(dt)?;
            let (ch, sh) = (host(&cos)?, host(&sin)?);
            let pos: Vec<u32> = lens.iter().map(|&l| (l - 1) as u32).collect();
            // Distinct rows, as the server gives each new token its own: two tokens writing one
            // row leave whichever write lands last, and the exact V check then fails by chance
            // (as it did with seed 1796509781570450471).
            let mut new_rows: Vec<u32> = Vec::with_capacity(b);
            while new_rows.len() < b {
                let row = r.below(pool_rows as u64) as u32;
                if !new_rows.contains(&row) {
                    new_rows.push(row);
                }
            }
            let pos_t = Tensor::new(pos.as_slice(), device)?;
            let rows_t = Tensor::new(new_rows.as_slice(), device)?;
            // rope_kv_write_rows: q read as columns of a wider row in place (as the batched step
            // reads its fused q/k/v output) and as a contiguous copy, k and v as columns of one
            // wider row, written into a random pool (twice, the same values at the same rows).
            let wide = Tensor::from_vec(random_vec(r, b * (h * d + 40)), (b, h * d + 40), device)?.to_dtype(dt)?;
            let x = wide.narrow(1, 24, h * d)?;
            let xh = host(&x)?;
            let rotate = |src: &[f32], p: usize, out: &mut [f32]| {
                for i in 0..half {
                    let (c, s) = (ch[p * half + i] as f64, sh[p * half + i] as f64);
                    let (a, bb) = (src[i] as f64, src[i + half] as f64);
                    out[i] = (a * c - bb * s) as f32;
                    out[i + half] = (bb * c + a * s) as f32;
                }
            };
            let mut want = vec![0f32; b * h * d];
            for (bi, &p) in pos.iter().enumerate().take(b) {
                for hi in 0..h {
                    let o = (bi * h + hi) * d;
                    rotate(&xh[o..o + d], p as usize, &mut want[o..o + d]);
                }
            }
            let kp = Tensor::from_vec(random_vec(r, pool_rows * kvh * d), (pool_rows, kvh, d), device)?.to_dtype(dt)?;
            let vp = Tensor::from_vec(random_vec(r, pool_rows * kvh * d), (pool_rows, kvh, d), device)?.to_dtype(dt)?;
            let (mut kwant, mut vwant) = (host(&kp)?, host(&vp)?);
            let kv = Tensor::from_vec(random_vec(r, b * (2 * kvh * d + 8)), (b, 2 * kvh * d + 8), device)?.to_dtype(dt)?;
            let (k, v) = (kv.narrow(1, 0, kvh * d)?, kv.narrow(1, kvh * d + 8, kvh * d)?);
            let (kh, vh) = (host(&k)?, host(&v)?);
            for bi in 0..b {
                for hi in 0..kvh {
                    let (src, dst) = ((bi * kvh + hi) * d, (new_rows[bi] as usize * kvh + hi) * d);
                    rotate(&kh[src..src + d], pos[bi] as usize, &mut kwant[dst..dst + d]);
                    vwant[dst..dst + d].copy_from_slice(&vh[src..src + d]);
                }
            }
            for (what, x) in [("view", x.clone()), ("contiguous", x.contiguous()?)] {
                let got = rope_kv_write_rows(&x, &k, &v, &kp, &vp, &cos, &sin, &pos_t, &rows_t, h, kvh, d)?;
                t.check(format!("rope_kv_write_rows q {what} {dt:?} b={b} h={h} d={d}"), max_rel(&got, &want)?, tol(dt));
            }
            t.check(format!("rope_kv_write_rows K {dt:?} b={b} kvh={kvh} d={d}"), max_rel(&kp, &kwant)?, tol(dt));
            t.check(format!("rope_kv_write_rows V {dt:?} b={b} kvh={kvh} d={d}"), max_rel(&vp, &vwant)?, 0.0);
            // paged_attention through a random row table.
            let table: Vec<u32> = (0..b * width).map(|_| r.below(pool_rows as u64) as u32).collect();
            let q = Tensor::from_vec(random_vec(r, b * h * d), (b, h, d), device)?.to_dtype(dt)?;
            let (qh, kph, vph) = (host(&q)?, host(&kp)?, host(&vp)?);
            let scale = 1.0 / (d as f64).sqrt();
            let mut want = vec![0f32; b * h * d];
            for bi in 0..b {
                for hi in 0..h {
                    let kv = hi / (h / kvh);
                    let qv = &qh[(bi * h + hi) * d..][..d];
                    let row = |src: &[f32], j: usize| -> Vec<f32> { src[(table[bi * width + j] as usize * kvh + kv) * d..][..d].to_vec() };
                    let s: Vec<f64> = (0..lens[bi]).map(|j| row(&kph, j).iter().zip(qv).map(|(a, c)| *a as f64 * *c as f64).sum::<f64>() * scale).collect();
                    let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let p: Vec<f64> = s.iter().map(|x| (x - mx).exp()).collect();
                    let z: f64 = p.iter().sum();
                    let mut acc = vec![0f64; d];
                    for (j, pj) in p.iter().enumerate() {
                        for (a, vv) in acc.iter_mut().zip(row(&vph, j)) {
                            *a += pj / z * vv as f64;
                        }
                    }
                    for (o, a) in want[(bi * h + hi) * d..][..d].iter_mut().zip(acc) {
                        *o = a as f32;
                    }
                }
            }
            let table_t = Tensor::from_vec(table, (b, width), device)?;
            let lens_t = Tensor::new(lens.iter().map(|&l| l as u32).collect::<Vec<_>>().as_slice(), device)?;
            let got = paged_attention(&q, &kp, &vp, &table_t, &lens_t, scale as f32)?;
            t.check(format!("paged attention {dt:?} h={h} kvh={kvh} d={d} lens={lens:?}"), max_rel(&got, &want)?, tol(dt));
        }
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
            for m in [1, 3, 8, 12, 40].into_iter().filter(|&m| m <= gemv_max_tokens(dt)) {
                let x = Tensor::from_vec(random_vec(r, m * k), (m, k), device)?.to_dtype(dt)?;
                let xh = host(&x)?;
                let parts: Vec<Vec<f32>> = packed.iter().map(|p| p.matmul(&xh, m, Kernel::Auto)).collect();
                let want: Vec<f32> = (0..m).flat_map(|ti| parts.iter().zip(&ns).flat_map(move |(p, &n)| p[ti * n..(ti + 1) * n].to_vec())).collect();
                let got = gemv_many(&refs, &x)?;
                t.check(format!("fused gemv {dt:?} n={ns:?} k={k} g={g} m={m}"), max_rel(&got, &want)?, tol(dt));
                if skinny_supported(&refs, m, dt) {
                    let got = skinny_many(&refs, &x, None)?;
                    t.check(format!("fused skinny {dt:?} n={ns:?} k={k} g={g} m={m}"), max_rel(&got, &want)?, tol(dt));
                }
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
            let q = Tensor::from_vec(random_vec(r, b * h * d), (b, h, 1, d), device)?.to_dtype(dt)?;
            let kc = Tensor::from_vec(random_vec(r, b * kvh * alloc * d), (b, kvh, alloc, d), device)?.to_dtype(dt)?;
            let vc = Tensor::from_vec(random_vec(r, b * kvh * alloc * d), (b, kvh, alloc, d), device)?.to_dtype(dt)?;
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
            let fused = Tensor::from_vec(random_vec(r, rows * 2 * cols), (rows, 2 * cols), device)?.to_dtype(dt)?;
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
            let x = Tensor::from_vec(random_vec(r, rows * h), (1, rows, h), device)?.to_dtype(dt)?;
            let d = Tensor::from_vec(random_vec(r, rows * h), (1, rows, h), device)?.to_dtype(dt)?;
            let w = Tensor::from_vec(random_vec(r, h), h, device)?.to_dtype(dt)?;
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
