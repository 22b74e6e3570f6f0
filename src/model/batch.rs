//! One forward step for many sequences at once, over the paged KV cache ([`super::paged`]): the
//! continuous-batching step of the server. Every sequence brings its new tokens (one while it
//! decodes, a chunk of its prompt while it prefills); all of them go through each linear layer
//! together as rows of one batch, so the weights are read once per step, not once per sequence.
//! Attention runs per sequence, at its own positions, over its own cached keys and values.
use super::llama::{Attention, BlockHints, Model};
use super::paged::{KvPool, SeqKv};
use crate::cuda::L2Prefetch;
use candle_core::{DType, Result, Tensor};

/// One sequence's part of a step: the tokens it feeds and its KV blocks (reserved by the caller
/// for `kv.len() + tokens.len()` positions).
pub struct StepSeq<'a> {
    pub tokens: &'a [u32],
    pub kv: &'a mut SeqKv,
}

/// Where a sequence's rows sit in the step's batch, and what its attention needs.
struct Slot {
    /// First row of the sequence's tokens in the batch.
    start: usize,
    /// Its new tokens.
    n: usize,
    /// Positions cached before this step.
    offset: usize,
    /// Pool rows of all its positions after this step.
    rows: Tensor,
    /// The causal mask of its new tokens (none for one token).
    mask: Option<Tensor>,
    /// On CUDA, the positions of its new tokens and their pool rows (u32 on the device): rope
    /// and the KV write then take one launch each per layer ([`Attention::attend_paged`]).
    #[cfg(feature = "cuda")]
    new_at: Option<(Tensor, Tensor)>,
}

impl Attention {
    /// Attention for every sequence of a step (`normed`: `[1, rows, hidden]`, sequences one after
    /// another): q/k/v for all rows at once, then per sequence rope at its positions, its new keys
    /// and values written to layer `layer` of `pool`, attention over all its positions.
    fn attend_paged(&self, normed: &Tensor, rope: &super::layers::Rope, pool: &KvPool, layer: usize, slots: &[Slot], kvs: &[&SeqKv]) -> Result<Tensor> {
        let (h, kvh, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let qkv = crate::linear::forward_shared(&[&self.q_proj, &self.k_proj, &self.v_proj], normed, &L2Prefetch::none())?;
        let mut outs = Vec::with_capacity(slots.len());
        for (s, kv) in slots.iter().zip(kvs) {
            let q = qkv[0].narrow(1, s.start, s.n)?.reshape((1, s.n, h, hd))?;
            let k = qkv[1].narrow(1, s.start, s.n)?.reshape((1, s.n, kvh, hd))?;
            let v = qkv[2].narrow(1, s.start, s.n)?.reshape((s.n, kvh, hd))?;
            let (q, k) = match (&self.q_norm, &self.k_norm) {
                (Some(qn), Some(kn)) => (qn.forward(&q)?, kn.forward(&k)?),
                _ => (q, k),
            };
            // q with rope applied, `[1, h, n, hd]`; the chunk's keys and values in the pool.
            #[cfg(feature = "cuda")]
            let fused = match &s.new_at {
                // The server's decode kernels for all of the chunk's tokens: candle's rope of q
                // and k and a copy per 16-position run into the pool were some 25 launches per
                // layer, which made a 150-token prompt's prefill step host-bound (45 ms on an
                // H100 against a fraction of that of GPU work).
                Some((pos, new_rows)) => {
                    let (kp, vp) = pool.layer(layer)?;
                    let q = super::cuda::rope_kv_write_rows(&q, &k, &v, &kp, &vp, rope.cos(), rope.sin(), pos, new_rows, h, kvh, hd)?;
                    Some(q.reshape((1, s.n, h, hd))?.transpose(1, 2)?)
                }
                None => None,
            };
            #[cfg(not(feature = "cuda"))]
            let fused: Option<Tensor> = None;
            let q = match fused {
                Some(q) => q,
                None => {
                    let q = rope.apply(&q.transpose(1, 2)?, s.offset)?;
                    let k = rope.apply(&k.transpose(1, 2)?, s.offset)?;
                    pool.write(layer, kv, &k.squeeze(0)?.transpose(0, 1)?, &v)?;
                    q
                }
            };
            // In the activation dtype (an f16 cache under f32 activations is read as f32).
            let (k_all, v_all) = pool.gather(layer, &s.rows)?;
            let (k_all, v_all) = (k_all.to_dtype(q.dtype())?, v_all.to_dtype(q.dtype())?);
            outs.push(self.scaled_dot_product(&q, &k_all, &v_all, s.mask.as_ref())?);
        }
        Tensor::cat(&outs, 1)
    }

    /// Attention for a step in which every sequence decodes one token, on CUDA: q/k/v for all rows
    /// at once, then one launch for rope at every sequence's own position with the keys and values
    /// written into the pool, and one for attention over every sequence's rows of the pool.
    #[cfg(feature = "cuda")]
    fn attend_paged_decode(&self, normed: &Tensor, rope: &super::layers::Rope, pool: &KvPool, layer: usize, t: &super::paged::DecodeTables) -> Result<Tensor> {
        let (h, kvh, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let b = normed.dim(1)?;
        let qkv = crate::linear::forward_shared(&[&self.q_proj, &self.k_proj, &self.v_proj], normed, &L2Prefetch::none())?;
        let (q, k) = match (&self.q_norm, &self.k_norm) {
            (Some(qn), Some(kn)) => (qn.forward(&qkv[0].reshape((1, b, h, hd))?)?, kn.forward(&qkv[1].reshape((1, b, kvh, hd))?)?),
            _ => (qkv[0].clone(), qkv[1].clone()),
        };
        let (kp, vp) = pool.layer(layer)?;
        let q = super::cuda::rope_kv_write_rows(&q, &k, &qkv[2], &kp, &vp, rope.cos(), rope.sin(), &t.pos, &t.new_rows, h, kvh, hd)?;
        let out = super::cuda::paged_attention(&q, &kp, &vp, &t.table, &t.lens, 1.0 / (hd as f32).sqrt())?;
        out.reshape((1, b, h * hd))
    }
}

impl Model {
    /// Runs one step for `seqs` (see the module docs) and returns the logits `[seqs, vocab]` (f32)
    /// of each sequence's last new token; every sequence's KV length grows by its tokens. The
    /// results equal [`Model::forward`]'s for each sequence alone, up to the rounding of
    /// batched linear layers.
    pub fn forward_batch(&self, pool: &KvPool, seqs: &mut [StepSeq]) -> Result<Tensor> {
        if seqs.is_empty() || seqs.iter().any(|s| s.tokens.is_empty()) {
            candle_core::bail!("a batch step needs at least one token per sequence");
        }
        let ids: Vec<u32> = seqs.iter().flat_map(|s| s.tokens.iter().copied()).collect();
        self.check_tokens(&ids)?;
        for s in seqs.iter() {
            let end = s.kv.len() + s.tokens.len();
            if end > self.context_len() {
                candle_core::bail!("position {end} is beyond the model's context of {} tokens", self.context_len());
            }
        }
        if super::host_step::applies(self) && seqs.iter().all(|s| s.tokens.len() <= super::host_step::HOST_CHUNK_MAX) {
            // Decoding sequences and short prompt chunks: the host step, over the pool in place.
            let kvs: Vec<&SeqKv> = seqs.iter().map(|s| &*s.kv).collect();
            let counts: Vec<usize> = seqs.iter().map(|s| s.tokens.len()).collect();
            let logits = self.on_pool(|| self.host_step(&ids, &counts, super::host_step::KvTarget::Paged { pool, seqs: &kvs }))?;
            for s in seqs.iter_mut() {
                pool.advance(s.kv, s.tokens.len());
            }
            return Ok(logits);
        }
        #[cfg(feature = "cuda")]
        if super::cuda::paged_decode_applies(&self.device, self.dtype, self.cfg.head_dim()) {
            let decoding = seqs.iter().filter(|s| s.tokens.len() == 1).count();
            if decoding == seqs.len() {
                return self.decode_batch_cuda(pool, seqs, &ids);
            }
            if decoding > 0 {
                return self.forward_batch_split(pool, seqs);
            }
        }
        let mut slots = Vec::with_capacity(seqs.len());
        let mut start = 0;
        for s in seqs.iter() {
            let (n, offset) = (s.tokens.len(), s.kv.len());
            let rows = pool.rows(s.kv, offset + n, &self.device)?;
            #[cfg(feature = "cuda")]
            let new_at = if super::cuda::paged_decode_applies(&self.device, self.dtype, self.cfg.head_dim()) {
                Some((Tensor::arange(offset as u32, (offset + n) as u32, &self.device)?, rows.narrow(0, offset, n)?))
            } else {
                None
            };
            slots.push(Slot {
                start,
                n,
                offset,
                rows,
                mask: self.mask(n, offset)?,
                #[cfg(feature = "cuda")]
                new_at,
            });
            start += n;
        }
        let logits = self.on_pool(|| -> Result<Tensor> {
            let kvs: Vec<&SeqKv> = seqs.iter().map(|s| &*s.kv).collect();
            let tokens = Tensor::new(ids.as_slice(), &self.device)?.unsqueeze(0)?;
            let x = self.blocks_with(&tokens, |layer, attn, normed| attn.attend_paged(normed, &self.rope, pool, layer, &slots, &kvs))?;
            let last: Vec<u32> = slots.iter().map(|s| (s.start + s.n - 1) as u32).collect();
            let last = Tensor::new(last.as_slice(), &self.device)?;
            self.head(&x.squeeze(0)?.index_select(&last, 0)?)
        })?;
        for s in seqs.iter_mut() {
            pool.advance(s.kv, s.tokens.len());
        }
        logits.to_dtype(DType::F32)
    }

    /// [`Model::forward_batch`] for a step that mixes decoding sequences (one token) with
    /// prefilling ones, as two passes: the decoding ones through the batched decode step, the
    /// others through the general path. On CUDA the general path attends sequence by sequence
    /// (a few kernels each per layer), so 60 decoding sequences riding along with a prompt chunk
    /// made a step of thousands of launches (inter-token p99 of 80–200 ms at 16–64 streams); the
    /// second pass over the weights costs far less. Logits rows in `seqs` order.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))] // CUDA's path; the tests run it on the CPU
    pub(crate) fn forward_batch_split(&self, pool: &KvPool, seqs: &mut [StepSeq]) -> Result<Tensor> {
        let (mut decode, mut prefill) = (Vec::new(), Vec::new());
        // Row of each sequence in [decode logits; prefill logits].
        let mut order = Vec::with_capacity(seqs.len());
        let n_decode = seqs.iter().filter(|s| s.tokens.len() == 1).count();
        for s in seqs.iter_mut() {
            if s.tokens.len() == 1 {
                order.push(decode.len() as u32);
                decode.push(StepSeq { tokens: s.tokens, kv: &mut *s.kv });
            } else {
                order.push((n_decode + prefill.len()) as u32);
                prefill.push(StepSeq { tokens: s.tokens, kv: &mut *s.kv });
            }
        }
        let mut parts = Vec::with_capacity(2);
        for group in [&mut decode, &mut prefill] {
            if !group.is_empty() {
                parts.push(self.forward_batch(pool, group)?);
            }
        }
        let all = Tensor::cat(&parts, 0)?;
        all.index_select(&Tensor::new(order.as_slice(), all.device())?, 0)
    }

    /// The hidden states `[1, rows, hidden]` of the step's tokens (`[1, rows]` u32 ids, checked
    /// by the caller) after every block (the last block's residual added), with
    /// `attend(layer, attention, normed)` as each block's attention over the paged cache.
    fn blocks_with(&self, tokens: &Tensor, attend: impl Fn(usize, &Attention, &Tensor) -> Result<Tensor>) -> Result<Tensor> {
        let mut x = self.embed(tokens)?;
        let mut delta: Option<Tensor> = None;
        for (layer, block) in self.layers.iter().enumerate() {
            let (nx, d) = block.forward_split_with(&x, delta.as_ref(), &BlockHints::default(), |normed: &Tensor| attend(layer, &block.self_attn, normed), None)?;
            x = nx;
            delta = Some(d);
        }
        match delta {
            Some(d) => x + d,
            None => Ok(x),
        }
    }
}

#[cfg(feature = "cuda")]
impl Model {
    /// [`Model::forward_batch`] when every sequence decodes, on CUDA: the linear layers at M =
    /// batch, and attention, rope and the KV writes in one launch each for the whole batch (the
    /// general path runs them sequence by sequence); replayed as a CUDA graph where one applies
    /// ([`super::batch_graph`]).
    fn decode_batch_cuda(&self, pool: &KvPool, seqs: &mut [StepSeq], ids: &[u32]) -> Result<Tensor> {
        let kvs: Vec<&SeqKv> = seqs.iter().map(|s| &*s.kv).collect();
        let logits = match super::batch_graph::forward(self, pool, &kvs, ids)? {
            Some(logits) => logits,
            None => {
                let (tokens, tables) = pool.decode_tables(&kvs, ids, &self.device)?;
                self.decode_batch_body(pool, &tables, &tokens)?
            }
        };
        for s in seqs.iter_mut() {
            pool.advance(s.kv, 1);
        }
        Ok(logits)
    }

    /// The batched decode step on the device: `tokens` `[1, batch]`, each sequence's rows and
    /// positions in `tables`; returns the logits `[batch, vocab]` in f32.
    pub(super) fn decode_batch_body(&self, pool: &KvPool, tables: &super::paged::DecodeTables, tokens: &Tensor) -> Result<Tensor> {
        let x = self.blocks_with(tokens, |layer, attn, normed| attn.attend_paged_decode(normed, &self.rope, pool, layer, tables))?;
        self.head(&x.squeeze(0)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::dummy;
    use candle_core::Device;

    /// Greedy continuation of `prompt` for `steps` tokens with the plain cache, in f32.
    fn alone(m: &Model, prompt: &[u32], steps: usize) -> (Vec<u32>, Vec<Vec<f32>>) {
        let mut cache = m.new_cache_with(m.context_len(), Some(DType::F32)).unwrap();
        let mut logits = m.forward(&Tensor::new(prompt, &Device::Cpu).unwrap().unsqueeze(0).unwrap(), &mut cache).unwrap();
        let (mut out, mut all) = (vec![], vec![]);
        for _ in 0..steps {
            let l = logits.squeeze(0).unwrap().to_vec1::<f32>().unwrap();
            let t = argmax(&l);
            all.push(l);
            out.push(t);
            logits = m.forward(&Tensor::new(&[t], &Device::Cpu).unwrap().unsqueeze(0).unwrap(), &mut cache).unwrap();
        }
        (out, all)
    }

    fn argmax(l: &[f32]) -> u32 {
        l.iter().enumerate().fold((0, f32::MIN), |b, (i, &x)| if x > b.1 { (i, x) } else { b }).0 as u32
    }

    fn tiny(w4: bool) -> Model {
        tiny_with_context(w4, 128)
    }

    fn tiny_with_context(w4: bool, context: usize) -> Model {
        let cfg: crate::model::Config = serde_json::from_value(serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100,
            "max_position_embeddings": context,
        }))
        .unwrap();
        dummy::dummy_model(&cfg, w4, 32, DType::F32, &Device::Cpu).unwrap()
    }

    /// Greedy continuation of `prompt` for `steps` tokens through [`Model::forward_batch`] alone
    /// in a pool of `kv` (the reference of a batch over an f16 cache, which the plain cache is not).
    fn alone_paged(m: &Model, prompt: &[u32], steps: usize, kv: DType) -> (Vec<u32>, Vec<Vec<f32>>) {
        let mut pool = KvPool::new(&m.cfg, 16, kv, &Device::Cpu).unwrap();
        let mut seq = SeqKv::default();
        let (mut out, mut all, mut feed) = (vec![], vec![], prompt.to_vec());
        for _ in 0..steps {
            let len = seq.len() + feed.len();
            pool.reserve(&mut seq, len).unwrap();
            let l = m.forward_batch(&pool, &mut [StepSeq { tokens: &feed, kv: &mut seq }]).unwrap();
            let l = l.get(0).unwrap().to_vec1::<f32>().unwrap();
            let t = argmax(&l);
            all.push(l);
            out.push(t);
            feed = vec![t];
        }
        (out, all)
    }

    #[test]
    fn batched_steps_match_each_sequence_alone() {
        for w4 in [false, true] {
            // The mixed first step in one pass, and split in two (CUDA's way).
            for split in [false, true] {
                batched_matches_alone(&tiny(w4), split, DType::F32);
            }
        }
    }

    /// Over an f16 cache (`serve --kv-cache-dtype f16` on the CPU): the same tokens and logits
    /// batched as alone in such a cache (the host decode step and the general prefill path store
    /// the same rounded keys and read them alike), and logits within 1e-3 of the f32 cache's
    /// (keys and values rounded to 11 significant bits moved the tiny model's logits, at most
    /// 0.5, by 9e-5) with the same greedy tokens.
    #[test]
    fn batched_steps_over_an_f16_cache_match_each_sequence_alone() {
        for w4 in [false, true] {
            let m = tiny(w4);
            batched_matches_alone(&m, false, DType::F16);
            let prompt: &[u32] = &[1, 5, 9, 13, 17, 21, 25, 2];
            let ((t16, l16), (t32, l32)) = (alone_paged(&m, prompt, 16, DType::F16), alone(&m, prompt, 16));
            let err = l16.iter().flatten().zip(l32.iter().flatten()).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            let top = l32.iter().flatten().fold(0f32, |a, b| a.max(b.abs()));
            assert!(err < 1e-3, "w4 {w4}: f16 cache logits differ from f32's by {err} (largest logit {top})");
            assert_eq!(t16, t32, "w4 {w4}: greedy tokens over the f16 and the f32 cache");
        }
    }

    fn batched_matches_alone(m: &Model, split: bool, kv: DType) {
        let prompts: [&[u32]; 3] = [&[1, 5, 9, 13, 17, 21, 25, 29, 33, 37, 41, 45, 49, 53, 57, 61, 65, 69, 2], &[3], &[7, 8, 9, 10, 11]];
        batched_prompts_match_alone(m, split, kv, &prompts, 16);
    }

    /// A prompt chunk longer than the host step takes ([`host_step::HOST_CHUNK_MAX`]) goes
    /// through the general path, alone and beside short chunks and decoding sequences; the
    /// tokens and logits are still those of each sequence alone.
    #[test]
    fn long_prompt_chunks_match_each_sequence_alone() {
        use crate::model::host_step::HOST_CHUNK_MAX;
        let long: Vec<u32> = (0..HOST_CHUNK_MAX as u32 + 40).map(|i| (i * 7 + 3) % 100).collect();
        for w4 in [false, true] {
            let m = tiny_with_context(w4, 2 * HOST_CHUNK_MAX + 64);
            let prompts: [&[u32]; 3] = [&long, &[3], &long[5..HOST_CHUNK_MAX]];
            batched_prompts_match_alone(&m, false, DType::F32, &prompts, 48);
        }
    }

    /// Sequence 0's prompt is fed in two chunks (7 tokens, then the rest) while the others
    /// prefill whole; then everyone decodes greedily, all in one batch, until each has `steps`
    /// tokens; each sequence's tokens and logits are compared with its run alone.
    fn batched_prompts_match_alone(m: &Model, split: bool, kv: DType, prompts: &[&[u32]; 3], blocks: usize) {
        let steps = 12;
        let mut pool = KvPool::new(&m.cfg, blocks, kv, &Device::Cpu).unwrap();
        let mut kvs: Vec<SeqKv> = prompts.iter().map(|_| SeqKv::default()).collect();
        let mut fed: Vec<Vec<u32>> = prompts.iter().map(|p| p.to_vec()).collect();
        let mut outs: Vec<Vec<u32>> = vec![vec![]; 3];
        let mut logits_seen: Vec<Vec<Vec<f32>>> = vec![vec![]; 3];
        // Step 0: sequence 0 prefills in two chunks (7 then the rest) while the others prefill
        // whole; from then on everyone decodes one token per step, all in one batch.
        let mut pending: Vec<Vec<u32>> = fed.clone();
        let mut chunk0 = pending[0].split_off(7);
        std::mem::swap(&mut chunk0, &mut pending[0]);
        let mut first = true;
        while outs.iter().any(|o| o.len() < steps) {
            let mut step: Vec<StepSeq> = Vec::new();
            let mut who = Vec::new();
            for (i, kv) in kvs.iter_mut().enumerate() {
                let tokens: &[u32] = if first && i == 0 { &chunk0 } else { &pending[i] };
                if outs[i].len() >= steps || tokens.is_empty() {
                    continue;
                }
                pool.reserve(kv, kv.len() + tokens.len()).unwrap();
                step.push(StepSeq { tokens, kv });
                who.push(i);
            }
            let mixed = step.iter().any(|s| s.tokens.len() == 1) && step.iter().any(|s| s.tokens.len() > 1);
            let l = if split && mixed { m.forward_batch_split(&pool, &mut step) } else { m.forward_batch(&pool, &mut step) }.unwrap();
            for (row, &i) in who.iter().enumerate() {
                let done_prompt = kvs[i].len() >= prompts[i].len();
                if first && i == 0 {
                    continue; // the chunk's logits are not a prediction yet
                }
                if done_prompt {
                    let lv = l.get(row).unwrap().to_vec1::<f32>().unwrap();
                    let t = argmax(&lv);
                    logits_seen[i].push(lv);
                    outs[i].push(t);
                    fed[i].push(t);
                    pending[i] = vec![t];
                }
            }
            first = false;
        }
        for i in 0..3 {
            let (want, want_logits) = if kv == DType::F32 { alone(m, prompts[i], steps) } else { alone_paged(m, prompts[i], steps, kv) };
            assert_eq!(outs[i], want, "sequence {i}");
            for (a, b) in logits_seen[i].iter().zip(&want_logits) {
                let err = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
                assert!(err < 1e-4, "sequence {i}: logits differ by {err}");
            }
        }
        for kv in kvs.iter_mut() {
            pool.release(kv);
        }
        assert_eq!(pool.free_blocks(), blocks);
    }
}
