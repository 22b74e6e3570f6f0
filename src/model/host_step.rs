//! The CPU forward step without candle's op-by-op machinery: new tokens for each of several
//! sequences (one while a sequence decodes, a short prompt chunk while it prefills; one sequence
//! for chat and generate, the whole batch for the server), through host buffers and fused
//! loops. A decode step of SmolLM2 otherwise makes about 20 candle ops per block — an
//! allocation and a dispatch each, on vectors of 576 values — and that bookkeeping cost as much
//! as the 4-bit arithmetic itself; a prompt's tokens paid it once per sequence for rope, the
//! cache writes and attention.
//!
//! Per block: the residual add and RMS norm in one loop per token (a prompt's rows over the
//! kernel threads); q/k/v in one call of the kernel threads (the activations quantized once,
//! [`crate::quant::cpu::PackedQ4::matmul_many`]); rope at each token's own position; the keys
//! and values of every new token written straight into the cache's storage; then attention per
//! (token, head) over that storage in place, split over the kernel threads — a prompt chunk's
//! tokens are rows of their own, each attending over the positions up to its own; o_proj; add +
//! norm; gate/up in one call; silu·mul read from that call's output; down_proj. A decode token's
//! arithmetic is that of the candle ops it replaces (the same sums in the same order), so a
//! sequence decodes to the same tokens whichever path runs it; a prompt token's attention sums
//! in another order than the general path's tiled prompt attention (`causal_attention_cpu`),
//! within rounding (tested against the whole-sequence pass). Linear layers other than packed
//! 4-bit ones (dense, f16, GPTQ with an input permutation) run their own `forward` on the
//! step's rows.
use super::attention_cpu;
use super::llama::{Block, Model};
use super::paged::{KvPool, SeqKv, BLOCK_TOKENS};
use crate::linear::{Capability, Linear};
use crate::quant::cpu::pool::SendPtr;
use crate::quant::cpu::{pool, Kernel, PackedQ4};
use candle_core::{CpuStorage, DType, Device, InplaceOp1, Layout, Result, Storage, Tensor};

/// Where the step's sequences keep their keys and values.
pub(crate) enum KvTarget<'a> {
    /// The per-layer caches of one sequence ([`super::layers::KvCache`], `[1, kv_heads, alloc,
    /// head_dim]`), its next position `pos`.
    Contiguous { cache: &'a mut super::layers::Cache, pos: usize },
    /// Sequences of the paged pool, each at its own next position (`kv.len()`); blocks reserved.
    Paged { pool: &'a KvPool, seqs: &'a [&'a SeqKv] },
}

/// The longest prompt chunk a sequence may feed to the host step. Its tokens attend one by one
/// over the cache, each reading all the positions before it, which costs the square of the
/// chunk's length in cache reads; longer chunks go through the general path, whose attention
/// multiplies whole matrices. On the 2-core EPYC VM (`cargo run --release --example
/// prefill_step`, six runs alternated with `AWQ_RUN_HOST_STEP=0`, medians) the host step
/// prefilled SmolLM2 AWQ at 1711 against 1575 tok/s for 8 × 69 tokens, 1573 / 1464 for 4 × 128,
/// 1361 / 1312 for one 69-token prompt and 1424 / 1030 for one of 128; with the limit raised,
/// 256- and 512-token prompts ran alike on both paths.
pub(crate) const HOST_CHUNK_MAX: usize = 128;

/// Whether the host step runs `model`'s steps: CPU, f32 activations, and not turned off
/// with `AWQ_RUN_HOST_STEP=0` (to compare with the op-by-op path).
pub(crate) fn applies(model: &Model) -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let on = *ON.get_or_init(|| std::env::var("AWQ_RUN_HOST_STEP").map_or(true, |v| v != "0"));
    on && model.device.is_cpu() && model.dtype == DType::F32
}

/// Runs `f` on `t`'s values (contiguous f32 on the CPU).
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    if t.dtype() != DType::F32 {
        candle_core::bail!("host step: expects f32 CPU tensors, got {:?}", t.dtype());
    }
    with_slice(t, f)
}

fn host_vec(t: &Tensor) -> Result<Vec<f32>> {
    with_f32(t, <[f32]>::to_vec)
}

/// candle's RMS norm of one row (the same f32 sum and order): `y = x / sqrt(mean(x²) + eps) · w`.
fn rms_norm_row(x: &[f32], w: &[f32], eps: f32, y: &mut [f32]) {
    let sum2: f32 = x.iter().map(|v| v * v).sum();
    let m = (sum2 / x.len() as f32 + eps).sqrt();
    for ((d, s), a) in y.iter_mut().zip(x).zip(w) {
        *d = *s / m * *a;
    }
}

/// candle-nn's rotate-half rope of one head at the table row `cos`, `sin` (`head_dim / 2` each).
fn rope_head(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = x.len() / 2;
    for i in 0..half {
        let (x1, x2) = (x[i], x[i + half]);
        x[i] = x1 * cos[i] - x2 * sin[i];
        x[i + half] = x1 * sin[i] + x2 * cos[i];
    }
}

/// The packed 4-bit weights of `layers` where all of them are packed, take their input in order
/// and share its width and group size (so one kernel call serves them).
fn packed_set<'a>(layers: &[&'a Linear]) -> Option<Vec<&'a PackedQ4>> {
    let ws: Option<Vec<&PackedQ4>> = layers
        .iter()
        .map(|l| match l.capability() {
            Capability::Quantized(q) if q.input_perm().is_none() => q.packed(),
            _ => None,
        })
        .collect();
    ws.filter(|ws| ws.iter().all(|w| w.shape.k == ws[0].shape.k && w.shape.group_size == ws[0].shape.group_size))
}

/// `x` (`[m][k]`) through `layers` sharing it, each output `[m][n_i]` in its own buffer; biases
/// added.
fn project(layers: &[&Linear], x: &[f32], m: usize) -> Result<Vec<Vec<f32>>> {
    let k = x.len() / m;
    let mut outs: Vec<Vec<f32>> = match packed_set(layers) {
        Some(ws) => {
            let mut outs = PackedQ4::matmul_many_split(&ws, x, m, Kernel::Auto);
            for (o, l) in outs.iter_mut().zip(layers) {
                if let Some(b) = l.bias() {
                    let b = host_vec(&b.to_dtype(DType::F32)?)?;
                    for row in o.chunks_exact_mut(b.len()) {
                        for (v, bv) in row.iter_mut().zip(&b) {
                            *v += bv;
                        }
                    }
                }
            }
            return Ok(outs);
        }
        None => Vec::with_capacity(layers.len()),
    };
    let xt = Tensor::from_slice(x, (m, k), &Device::Cpu)?;
    for l in layers {
        outs.push(host_vec(&l.forward(&xt)?.to_dtype(DType::F32)?.contiguous()?)?);
    }
    Ok(outs)
}

/// Copies `rows` (each `len` values, the `i`-th to offset `offsets[i]`) into a tensor's storage.
struct WriteRows<'a> {
    data: &'a [f32],
    offsets: &'a [usize],
    len: usize,
}

impl InplaceOp1 for WriteRows<'_> {
    fn name(&self) -> &'static str {
        "awq-host-kv-write"
    }
    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
        let base = l.start_offset();
        let rows = self.data.chunks_exact(self.len).zip(self.offsets);
        match s {
            CpuStorage::F32(v) => rows.for_each(|(row, &off)| v[base + off..base + off + self.len].copy_from_slice(row)),
            // The f16 cache rounds as candle's `to_dtype` does (to nearest), so the general
            // path's writes of the same keys store the same bits.
            CpuStorage::F16(v) => rows.for_each(|(row, &off)| half::slice::HalfFloatSliceExt::convert_from_f32_slice(&mut v[base + off..base + off + self.len], row)),
            _ => candle_core::bail!("host step: the KV cache is neither f32 nor f16"),
        }
        Ok(())
    }
}

/// Where position `p` of a sequence keeps its key (and value) for KV head `j`: an element offset
/// into the layer's K (V) storage.
#[derive(Clone, Copy)]
enum Addr<'a> {
    /// `[1, kv_heads, alloc, head_dim]`.
    HeadMajor { alloc: usize, hd: usize },
    /// `[rows, kv_heads, head_dim]`, rows from the sequence's blocks.
    Paged { blocks: &'a [u32], kvh: usize, hd: usize },
}

impl Addr<'_> {
    #[inline]
    fn offset(&self, j: usize, p: usize) -> usize {
        match *self {
            Addr::HeadMajor { alloc, hd } => (j * alloc + p) * hd,
            Addr::Paged { blocks, kvh, hd } => {
                let row = blocks[p / BLOCK_TOKENS] as usize * BLOCK_TOKENS + p % BLOCK_TOKENS;
                (row * kvh + j) * hd
            }
        }
    }
}

/// One sequence of the step: its position and where its keys and values live.
struct Seq<'a> {
    pos: usize,
    addr: Addr<'a>,
}

impl Model {
    /// The host step: logits `[seqs, vocab]` (f32) of the last new token of each sequence, where
    /// sequence `i` of `kv` feeds the next `counts[i]` of `tokens` at its next positions (one
    /// while it decodes, a prompt chunk while it prefills; see [`HOST_CHUNK_MAX`]). Advances
    /// nothing: the caller counts the written positions (the contiguous cache's length, the
    /// pool's `advance`).
    pub(crate) fn host_step(&self, tokens: &[u32], counts: &[usize], kv: KvTarget) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (h, kvh, hd) = (cfg.num_attention_heads, cfg.num_kv_heads(), cfg.head_dim());
        let hidden = cfg.hidden_size;
        let s_n = tokens.len();
        self.check_tokens(tokens)?;
        if counts.contains(&0) || counts.iter().sum::<usize>() != s_n {
            candle_core::bail!("host step: {s_n} tokens for sequences of {counts:?}");
        }
        let eps = cfg.rms_norm_eps as f32;
        let mut kv = kv;
        // Every token's position and the addressing of its sequence (a prompt chunk's tokens
        // are rows of their own, attending causally through the cache they are written to
        // first); the contiguous cache's buffers grown to hold them.
        let seqs: Vec<Seq> = match &mut kv {
            KvTarget::Contiguous { cache, pos } => {
                let [n] = counts else { candle_core::bail!("host step: one sequence in a contiguous cache, not {}", counts.len()) };
                let need = *pos + n;
                let cap = cache.capacity;
                for layer in cache.layers.iter_mut() {
                    layer.reserve_shape((1, kvh, hd), DType::F32, &Device::Cpu, need, cap)?;
                }
                let alloc = cache.layers.first().map_or(0, |l| l.allocated());
                (*pos..need).map(|p| Seq { pos: p, addr: Addr::HeadMajor { alloc, hd } }).collect()
            }
            KvTarget::Paged { seqs, .. } => {
                if seqs.len() != counts.len() {
                    candle_core::bail!("host step: {} sequences, {} token counts", seqs.len(), counts.len());
                }
                let mut rows = Vec::with_capacity(s_n);
                for (s, &n) in seqs.iter().zip(counts) {
                    if KvPool::blocks_for(s.len() + n) > s.blocks() {
                        candle_core::bail!("host step: position {} has no KV block reserved", s.len() + n - 1);
                    }
                    rows.extend((s.len()..s.len() + n).map(|p| Seq { pos: p, addr: Addr::Paged { blocks: s.block_ids(), kvh, hd } }));
                }
                rows
            }
        };
        for s in &seqs {
            if s.pos >= self.context_len() {
                candle_core::bail!("position {} is beyond the model's context of {} tokens", s.pos + 1, self.context_len());
            }
        }
        let half = hd / 2;
        // Each sequence's rows of the rope tables (not the whole tables: they cover the context).
        let table_rows = |t: &Tensor| -> Result<Vec<f32>> { with_f32(t, |v| seqs.iter().flat_map(|s| v[s.pos * half..(s.pos + 1) * half].iter().copied()).collect()) };
        let (cos, sin) = (table_rows(self.rope.cos())?, table_rows(self.rope.sin())?);

        // Embeddings, in f32.
        let ids = Tensor::new(tokens, &Device::Cpu)?;
        let mut x = host_vec(&self.embed_tokens.index_select(&ids, 0)?.to_dtype(DType::F32)?)?;
        let mut delta: Option<Vec<f32>> = None;
        let mut normed = vec![0f32; s_n * hidden];
        let scale = 1.0 / (hd as f32).sqrt();
        for (li, block) in self.layers.iter().enumerate() {
            add_norm(&mut x, delta.as_deref(), &block.input_layernorm.weight, eps, &mut normed, hidden)?;
            let a = &block.self_attn;
            let mut qkv = project(&[&a.q_proj, &a.k_proj, &a.v_proj], &normed, s_n)?;
            let v = qkv.pop().expect("three projections");
            let mut k = qkv.pop().expect("three projections");
            let mut q = qkv.pop().expect("three projections");
            if let (Some(qn), Some(kn)) = (&a.q_norm, &a.k_norm) {
                let (qw, kw) = (host_vec(&qn.weight)?, host_vec(&kn.weight)?);
                head_norms(&mut q, &qw, qn.eps as f32, hd);
                head_norms(&mut k, &kw, kn.eps as f32, hd);
            }
            for si in 0..seqs.len() {
                let (c, sn) = (&cos[si * half..(si + 1) * half], &sin[si * half..(si + 1) * half]);
                for head in q[si * h * hd..(si + 1) * h * hd].chunks_exact_mut(hd) {
                    rope_head(head, c, sn);
                }
                for head in k[si * kvh * hd..(si + 1) * kvh * hd].chunks_exact_mut(hd) {
                    rope_head(head, c, sn);
                }
            }
            let (kc, vc) = layer_tensors(&kv, li)?;
            // Each sequence's new key and value rows, head by head, at their place in storage.
            let offsets: Vec<usize> = seqs.iter().flat_map(|s| (0..kvh).map(move |j| s.addr.offset(j, s.pos))).collect();
            kc.inplace_op1(&WriteRows { data: &k, offsets: &offsets, len: hd })?;
            vc.inplace_op1(&WriteRows { data: &v, offsets: &offsets, len: hd })?;
            // Keys and values in the cache's dtype: f32, or f16 in a half-size paged cache.
            let attn = match kc.dtype() {
                DType::F16 => attend::<half::f16>(&q, &kc, &vc, &seqs, h, kvh, hd, scale, cfg.sliding_window)?,
                _ => attend::<f32>(&q, &kc, &vc, &seqs, h, kvh, hd, scale, cfg.sliding_window)?,
            };
            let o = project(&[&a.o_proj], &attn, s_n)?.pop().expect("one projection");
            delta = Some(o);
            add_norm(&mut x, delta.as_deref(), &block.post_attention_layernorm.weight, eps, &mut normed, hidden)?;
            delta = Some(self.mlp_host(block, &normed, s_n)?);
        }
        if let Some(d) = &delta {
            for (a, b) in x.iter_mut().zip(d) {
                *a += b;
            }
        }
        // The head for each sequence's last token only (a chunk's other rows predict nothing).
        let last: Vec<f32> = if counts.iter().all(|&n| n == 1) {
            x
        } else {
            let mut last = Vec::with_capacity(counts.len() * hidden);
            let mut end = 0;
            for &n in counts {
                end += n;
                last.extend_from_slice(&x[(end - 1) * hidden..end * hidden]);
            }
            last
        };
        let xt = Tensor::from_vec(last, (counts.len(), hidden), &Device::Cpu)?;
        self.head(&xt)
    }

    fn mlp_host(&self, block: &Block, normed: &[f32], m: usize) -> Result<Vec<f32>> {
        let mlp = &block.mlp;
        // The general path's silu · up (its vector exp; libm's, one value at a time, was 1.5 %
        // of an 8-sequence step on the calling thread alone), read from the fused gate/up
        // output where one call gives it (a prompt's rows were otherwise copied out of it into
        // two buffers first, on the calling thread alone).
        let layers = [&mlp.gate_proj, &mlp.up_proj];
        let act = match packed_set(&layers).filter(|ws| ws[0].shape.n == ws[1].shape.n && layers.iter().all(|l| l.bias().is_none())) {
            Some(ws) => super::cpu_math::silu_mul_rows_host(&PackedQ4::matmul_many(&ws, normed, m, Kernel::Auto), ws[0].shape.n),
            None => {
                let mut gu = project(&layers, normed, m)?;
                let up = gu.pop().expect("two projections");
                let gate = gu.pop().expect("two projections");
                super::cpu_math::silu_mul_host(&gate, &up)
            }
        };
        Ok(project(&[&mlp.down_proj], &act, m)?.pop().expect("one projection"))
    }
}

/// `x += delta` (where given), then `normed` = the RMS norm of each row of `x` with weight `w`.
fn add_norm(x: &mut [f32], delta: Option<&[f32]>, w: &Tensor, eps: f32, normed: &mut [f32], hidden: usize) -> Result<()> {
    // A prompt's rows over the kernel threads (a decode step's few stay on this one).
    let rows_n = x.len() / hidden;
    let (xs, out) = (SendPtr(x.as_mut_ptr()), SendPtr(normed.as_mut_ptr()));
    with_f32(w, |w| {
        pool::for_ranges(rows_n, 16, |rows| {
            for r in rows {
                // SAFETY: tasks take disjoint rows of `x` and `normed`, which outlive the call.
                let (xr, yr) = unsafe { (xs.row(r, hidden), out.row(r, hidden)) };
                if let Some(d) = delta {
                    for (a, b) in xr.iter_mut().zip(&d[r * hidden..(r + 1) * hidden]) {
                        *a += b;
                    }
                }
                rms_norm_row(xr, w, eps, yr);
            }
        })
    })
}

/// Qwen3's per-head RMS norms of q or k.
fn head_norms(x: &mut [f32], w: &[f32], eps: f32, hd: usize) {
    let mut tmp = vec![0f32; hd];
    for head in x.chunks_exact_mut(hd) {
        rms_norm_row(head, w, eps, &mut tmp);
        head.copy_from_slice(&tmp);
    }
}

/// Layer `li`'s K and V storage tensors.
fn layer_tensors(kv: &KvTarget, li: usize) -> Result<(Tensor, Tensor)> {
    match kv {
        KvTarget::Contiguous { cache, .. } => {
            let Some((k, v)) = cache.layers[li].buffers() else { candle_core::bail!("host step: the KV cache of layer {li} has no buffers") };
            Ok((k.clone(), v.clone()))
        }
        KvTarget::Paged { pool, .. } => pool.layer(li),
    }
}

/// Attention of every sequence's query heads over its cached positions (its own new one
/// included), split over the kernel threads; `[seqs][h · hd]`.
#[allow(clippy::too_many_arguments)]
fn attend<T: attention_cpu::KvElem + candle_core::WithDType>(q: &[f32], kc: &Tensor, vc: &Tensor, seqs: &[Seq], h: usize, kvh: usize, hd: usize, scale: f32, window: Option<usize>) -> Result<Vec<f32>> {
    let mut out = vec![0f32; seqs.len() * h * hd];
    let n_rep = h / kvh;
    let out_ptr = SendPtr(out.as_mut_ptr());
    // A task takes the query heads `heads_per_task` at a time. With sequences enough to keep
    // every thread busy, a whole sequence: its keys and values are then read front to back
    // once (the kernel takes every KV head of a few positions before the next ones). With
    // fewer, the query heads of one KV head, or one query head for one sequence alone, so that
    // the few tasks still split evenly over the threads. A head's arithmetic is the same in
    // every case, so a sequence's tokens do not depend on what it is batched with.
    let threads = pool::threads();
    let heads_per_task = if seqs.len() >= 4 * threads {
        h
    } else if seqs.len() * kvh >= 4 * threads {
        n_rep
    } else {
        1
    };
    let tasks_per_seq = h / heads_per_task;
    // Longest sequences first: the threads take tasks in order, and the long ones last would
    // leave one thread working alone at the end.
    let mut order: Vec<usize> = (0..seqs.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(seqs[i].pos));
    let attend_all = |k: &[T], v: &[T]| {
        pool::run(seqs.len() * tasks_per_seq, &|task| {
            let si = order[task / tasks_per_seq];
            let s = &seqs[si];
            // candle's mask for a sliding window keeps positions p with p + window ≥ pos.
            let first = window.map_or(0, |w| s.pos.saturating_sub(w));
            let h0 = (task % tasks_per_seq) * heads_per_task;
            let rows = si * h + h0..si * h + h0 + heads_per_task;
            // One query head alone is a group of one; otherwise whole groups of `n_rep`.
            let (groups, rep) = if heads_per_task == 1 { (h0 / n_rep..h0 / n_rep + 1, 1) } else { (h0 / n_rep..(h0 + heads_per_task) / n_rep, n_rep) };
            // SAFETY: each task writes its own (sequence, head) rows of `out`.
            let o = unsafe { out_ptr.range(rows.start * hd..rows.end * hd) };
            let key = |j: usize, p: usize| &k[s.addr.offset(j, p)..][..hd];
            let value = |j: usize, p: usize| &v[s.addr.offset(j, p)..][..hd];
            attention_cpu::attend_heads(&q[rows.start * hd..rows.end * hd], groups, rep, first..s.pos + 1, key, value, scale, o);
        });
    };
    with_slice::<T, _>(kc, |k| with_slice::<T, _>(vc, |v| attend_all(k, v)))??;
    Ok(out)
}

/// Runs `f` on `t`'s values (contiguous, of element type `T`, on the CPU).
fn with_slice<T: candle_core::WithDType, R>(t: &Tensor, f: impl FnOnce(&[T]) -> R) -> Result<R> {
    let (s, l) = t.storage_and_layout();
    let Storage::Cpu(cs) = &*s else { candle_core::bail!("host step: expects CPU tensors") };
    let Some((a, b)) = l.contiguous_offsets() else { candle_core::bail!("host step: expects contiguous tensors") };
    Ok(f(&cs.as_slice::<T>()?[a..b]))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One sequence alone (a head per task), a few (the query heads of a KV head per task) and
    /// many (a whole sequence per task, longest first): every output row has the bits of the
    /// one head's attention on its own.
    #[test]
    fn attention_tasks_over_grouped_heads_match_one_head_at_a_time() {
        let mut r = crate::rng::Rng::new(11);
        let (h, kvh, hd, alloc) = (6, 2, 16, 40);
        for n_seqs in [1, 2 * pool::threads(), 4 * pool::threads() + 1] {
            let seqs: Vec<Seq> = (0..n_seqs).map(|i| Seq { pos: (7 * i + 3) % alloc, addr: Addr::HeadMajor { alloc, hd } }).collect();
            let q: Vec<f32> = (0..n_seqs * h * hd).map(|_| r.unit()).collect();
            let kv = |r: &mut crate::rng::Rng| Tensor::from_vec((0..kvh * alloc * hd).map(|_| r.unit()).collect::<Vec<f32>>(), (1, kvh, alloc, hd), &Device::Cpu).unwrap();
            let (kc, vc) = (kv(&mut r), kv(&mut r));
            let got = attend::<f32>(&q, &kc, &vc, &seqs, h, kvh, hd, 0.25, None).unwrap();
            let (k, v) = (host_vec(&kc).unwrap(), host_vec(&vc).unwrap());
            for (si, s) in seqs.iter().enumerate() {
                for head in 0..h {
                    let j = head / (h / kvh);
                    let mut want = vec![0f32; hd];
                    let qv = &q[(si * h + head) * hd..][..hd];
                    attention_cpu::attend_head(qv, 0..s.pos + 1, |p| &k[s.addr.offset(j, p)..][..hd], |p| &v[s.addr.offset(j, p)..][..hd], 0.25, &mut want);
                    assert_eq!(&got[(si * h + head) * hd..][..hd], &want[..], "{n_seqs} sequences: sequence {si} head {head}");
                }
            }
        }
    }
}
