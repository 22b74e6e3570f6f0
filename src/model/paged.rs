//! A paged KV cache shared by many sequences, as vLLM's PagedAttention has it: the keys and
//! values of every layer live in one pool of fixed-size blocks (`BLOCK_TOKENS` positions each),
//! and each sequence holds a list of block ids that grows a block at a time. Memory follows the
//! tokens actually cached, never a sequence's whole context, and a finished sequence gives its
//! blocks back for the next one at once.
//!
//! Blocks whose positions hold a known prompt prefix are shared between sequences (the prefix
//! cache, see [`super::kv_blocks`]): a sequence adopts them at admission and computes only the
//! rest of its prompt.
//!
//! Storage per layer is one tensor `[blocks * BLOCK_TOKENS, kv_heads, head_dim]`: one position's
//! keys (all heads) are one contiguous row, so writing a token is one row copy and gathering a
//! sequence is one `index_select` over its rows.
use super::config::Config;
use super::kv_blocks::Blocks;
use candle_core::{DType, Device, Result, Tensor};

/// Positions per block (vLLM's default block size).
pub const BLOCK_TOKENS: usize = 16;

/// Why a sequence could not get the blocks it needs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the KV cache is full: {needed} more blocks of {BLOCK_TOKENS} tokens are needed, {free} of {total} are free")]
pub struct PoolFull {
    pub needed: usize,
    pub free: usize,
    pub total: usize,
}

/// The blocks of one sequence and how many positions of them are filled.
#[derive(Debug, Default)]
pub struct SeqKv {
    blocks: Vec<u32>,
    len: usize,
    /// The prefix-cache identity of each leading block registered or adopted so far.
    chain: Vec<u64>,
}

impl SeqKv {
    /// Positions cached (the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn blocks(&self) -> usize {
        self.blocks.len()
    }
    /// The block ids, in position order.
    pub fn block_ids(&self) -> &[u32] {
        &self.blocks
    }
    /// The pool row of position `p`.
    fn row(&self, p: usize) -> u32 {
        self.blocks[p / BLOCK_TOKENS] * BLOCK_TOKENS as u32 + (p % BLOCK_TOKENS) as u32
    }
}

/// A decode step's view of the pool for a batch of sequences that each add one token, as u32
/// tensors on the model's device (the CUDA batched decode step reads them in its kernels).
pub struct DecodeTables {
    /// `[batch, width]`: row `b` holds the pool rows of sequence b's positions, the new one
    /// included (`width` is the longest sequence's length after the step; the rest is padding).
    pub table: Tensor,
    /// `[batch]`: each sequence's length after the step.
    pub lens: Tensor,
    /// `[batch]`: the pool row of each sequence's new token.
    pub new_rows: Tensor,
    /// `[batch]`: the position of each sequence's new token.
    pub pos: Tensor,
}

/// The padded batch of `b` sequences in a captured decode step (`batch_graph`): exact up to 4, then multiples of 4 up to 32, then of 8
/// (a padding row costs a few columns of the GEMVs; a bucket costs a capture and its memory).
pub fn batch_bucket(b: usize) -> usize {
    match b {
        0..=4 => b.max(1),
        5..=32 => b.div_ceil(4) * 4,
        _ => b.div_ceil(8) * 8,
    }
}

/// The row table's width for a longest length of `len` positions: a power of two from 256 (the
/// attention's chunk), so a sequence crosses a bucket only when its length doubles.
pub fn width_bucket(len: usize) -> usize {
    len.next_power_of_two().max(256)
}

impl DecodeTables {
    /// The token ids `[1, batch]` and tables of a step as views of one u32 buffer laid out as
    /// [`KvPool::decode_inputs`] writes it.
    pub fn views(inputs: &Tensor, batch: usize, width: usize) -> Result<(Tensor, DecodeTables)> {
        let part = |i: usize| inputs.narrow(0, i * batch, batch);
        let tokens = part(0)?.unsqueeze(0)?;
        let tables = DecodeTables { pos: part(1)?, new_rows: part(2)?, lens: part(3)?, table: inputs.narrow(0, 4 * batch, batch * width)?.reshape((batch, width))? };
        Ok((tokens, tables))
    }
}

/// The shared pool.
pub struct KvPool {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    blocks: Blocks,
    /// The CUDA graphs of batched decode steps over this pool's buffers.
    #[cfg(feature = "cuda")]
    pub(crate) graphs: super::batch_graph::BatchGraphs,
}

impl KvPool {
    /// Bytes one block takes over all layers (keys and values).
    pub fn block_bytes(cfg: &Config, dtype: DType) -> usize {
        cfg.num_hidden_layers * 2 * BLOCK_TOKENS * cfg.num_kv_heads() * cfg.head_dim() * dtype.size_in_bytes()
    }

    /// A pool of `blocks` blocks for `cfg`'s layers, in `dtype` on `device`; one more block
    /// past them is scratch (see [`KvPool::scratch_row`]). No prefix cache: see
    /// [`KvPool::with_prefix_cache`].
    pub fn new(cfg: &Config, blocks: usize, dtype: DType, device: &Device) -> Result<Self> {
        if blocks == 0 {
            candle_core::bail!("the KV cache needs at least one block of {BLOCK_TOKENS} tokens");
        }
        let rows = (blocks + 1) * BLOCK_TOKENS;
        let shape = (rows, cfg.num_kv_heads(), cfg.head_dim());
        let layer = || Tensor::zeros(shape, dtype, device);
        let k = (0..cfg.num_hidden_layers).map(|_| layer()).collect::<Result<Vec<_>>>()?;
        let v = (0..cfg.num_hidden_layers).map(|_| layer()).collect::<Result<Vec<_>>>()?;
        Ok(Self {
            k,
            v,
            blocks: Blocks::new(blocks, false),
            #[cfg(feature = "cuda")]
            graphs: Default::default(),
        })
    }

    /// The pool with finished sequences' whole blocks kept for later prompts that start with the
    /// same tokens (`on`), or not; only while no block is held.
    pub fn with_prefix_cache(mut self, on: bool) -> Self {
        assert_eq!(self.used_blocks(), 0, "the prefix cache is chosen before any block is handed out");
        self.blocks = Blocks::new(self.blocks.total(), on);
        self
    }

    /// Whether finished and written whole blocks are kept for later prompts (see
    /// [`KvPool::with_prefix_cache`]).
    pub fn prefix_caching(&self) -> bool {
        self.blocks.caching()
    }

    /// The dtype the keys and values are kept in.
    pub fn dtype(&self) -> DType {
        self.k.first().map_or(DType::F32, Tensor::dtype)
    }

    /// The cache dtype for a model computing in `act` on `device`, asked for as `kv`: the
    /// activation dtype itself, or f16 under f32 activations on the CPU (half the bytes a decode
    /// step's attention reads and half the memory a token holds; the host step and the general
    /// path convert to f32 as they read). None picks f16 there, as llama.cpp's default cache
    /// type: an 8-sequence SmolLM2 step at 69–133 positions takes 9.7–10.0 ms against
    /// 10.6–10.7 over f32, for +0.05 % perplexity (22.468 against 22.458, teacher-forced
    /// through the cache over 1152 tokens of three texts, `examples/kv_cache_ppl.rs`); elsewhere
    /// the activation dtype. The CUDA kernels read the cache in the activation dtype, so
    /// anything else is refused there.
    pub fn resolve_dtype(kv: Option<DType>, act: DType, device: &Device) -> Result<DType> {
        let kv = kv.unwrap_or(if device.is_cpu() && act == DType::F32 { DType::F16 } else { act });
        if kv == act || (device.is_cpu() && act == DType::F32 && kv == DType::F16) {
            return Ok(kv);
        }
        let on = if device.is_cpu() { "the CPU" } else { "this device" };
        candle_core::bail!("--kv-cache-dtype {} with {} activations on {on}: the KV cache takes the activation dtype, or f16 under f32 activations on the CPU", kv.as_str(), act.as_str())
    }

    /// A row no sequence ever owns: the padding sequences of a captured decode step (a batch
    /// rounded up to the graph's size) write their keys there.
    pub fn scratch_row(&self) -> u32 {
        (self.total_blocks() * BLOCK_TOKENS) as u32
    }

    pub fn total_blocks(&self) -> usize {
        self.blocks.total()
    }
    /// Blocks a sequence can be given: free ones and cached ones that no sequence holds.
    pub fn free_blocks(&self) -> usize {
        self.blocks.available()
    }
    /// Blocks held by sequences.
    pub fn used_blocks(&self) -> usize {
        self.total_blocks() - self.blocks.available()
    }
    /// Cached prefix blocks that no sequence holds (given out again when the pool runs short).
    pub fn cached_blocks(&self) -> usize {
        self.blocks.idle()
    }
    /// Positions the whole pool holds.
    pub fn capacity_tokens(&self) -> usize {
        self.total_blocks() * BLOCK_TOKENS
    }

    /// Blocks a sequence of `len` positions needs.
    pub fn blocks_for(len: usize) -> usize {
        len.div_ceil(BLOCK_TOKENS)
    }

    /// More blocks `seq` needs to hold `len` positions.
    pub fn shortfall(&self, seq: &SeqKv, len: usize) -> usize {
        Self::blocks_for(len).saturating_sub(seq.blocks.len())
    }

    /// Grows `seq` to hold `len` positions; on [`PoolFull`] nothing changes.
    pub fn reserve(&mut self, seq: &mut SeqKv, len: usize) -> std::result::Result<(), PoolFull> {
        let needed = self.shortfall(seq, len);
        let free = self.blocks.available();
        if needed > free {
            return Err(PoolFull { needed, free, total: self.total_blocks() });
        }
        for _ in 0..needed {
            seq.blocks.push(self.blocks.take().expect("checked above"));
        }
        Ok(())
    }

    /// Gives every block of `seq` back (those of a known prefix stay cached).
    pub fn release(&mut self, seq: &mut SeqKv) {
        // Last block first: a prompt's tail is evicted before its head, which more prompts share.
        for b in seq.blocks.drain(..).rev() {
            self.blocks.release(b);
        }
        seq.chain.clear();
        seq.len = 0;
    }

    /// Gives empty `seq` the cached blocks that hold the longest whole-block prefix of
    /// `tokens` and returns how many positions they hold (`seq`'s length now). At least the last
    /// token is left to compute, so that the step that feeds it predicts the next one. A `seq`
    /// that already holds blocks adopts nothing (its length is returned).
    pub fn adopt_prefix(&mut self, seq: &mut SeqKv, tokens: &[u32]) -> usize {
        if !seq.blocks.is_empty() {
            return seq.len;
        }
        let found = self.blocks.adopt(tokens, tokens.len().saturating_sub(1) / BLOCK_TOKENS);
        for (b, id) in found {
            seq.blocks.push(b);
            seq.chain.push(id);
        }
        seq.len = seq.blocks.len() * BLOCK_TOKENS;
        seq.len
    }

    /// Registers the whole blocks of `seq` written since the last call, `tokens` being the
    /// tokens at `seq`'s positions (at least `seq.len()` of them), so that later prompts that
    /// start the same way can adopt them. Nothing without a prefix cache.
    pub fn commit(&mut self, seq: &mut SeqKv, tokens: &[u32]) {
        if !self.blocks.caching() {
            return;
        }
        let whole = seq.len.min(tokens.len()) / BLOCK_TOKENS;
        for i in seq.chain.len()..whole {
            let parent = seq.chain.last().copied().unwrap_or(0);
            let id = self.blocks.register(seq.blocks[i], parent, &tokens[i * BLOCK_TOKENS..(i + 1) * BLOCK_TOKENS]);
            seq.chain.push(id);
        }
    }

    /// Writes layer `layer`'s keys and values of `seq`'s next `k.dim(0)` positions (`k`, `v`:
    /// `[tokens, kv_heads, head_dim]`); the blocks must be reserved. Does not advance `seq`
    /// (see [`KvPool::advance`], once every layer is written).
    pub fn write(&self, layer: usize, seq: &SeqKv, k: &Tensor, v: &Tensor) -> Result<()> {
        let n = k.dim(0)?;
        if Self::blocks_for(seq.len + n) > seq.blocks.len() {
            candle_core::bail!("KV write of {n} positions after {} with {} blocks reserved", seq.len, seq.blocks.len());
        }
        let dt = self.dtype();
        let (k, v) = (k.to_dtype(dt)?.contiguous()?, v.to_dtype(dt)?.contiguous()?);
        // One copy per run of positions that stays inside one block.
        let mut p = 0;
        while p < n {
            let pos = seq.len + p;
            let run = (BLOCK_TOKENS - pos % BLOCK_TOKENS).min(n - p);
            let row = seq.row(pos) as usize;
            self.k[layer].slice_set(&k.narrow(0, p, run)?, 0, row)?;
            self.v[layer].slice_set(&v.narrow(0, p, run)?, 0, row)?;
            p += run;
        }
        Ok(())
    }

    /// Layer `layer`'s K and V storage, `[rows, kv_heads, head_dim]` each.
    pub fn layer(&self, layer: usize) -> Result<(Tensor, Tensor)> {
        match (self.k.get(layer), self.v.get(layer)) {
            (Some(k), Some(v)) => Ok((k.clone(), v.clone())),
            _ => candle_core::bail!("the KV pool has no layer {layer}"),
        }
    }

    /// Counts `n` positions written to every layer.
    pub fn advance(&self, seq: &mut SeqKv, n: usize) {
        seq.len = (seq.len + n).min(seq.blocks.len() * BLOCK_TOKENS);
    }

    /// The device-side token ids `[1, seqs]` and tables of a decode step in which every
    /// sequence of `seqs` adds one token, `ids` (its blocks reserved for it): see
    /// [`DecodeTables`]; the table is as wide as the longest sequence after the step.
    pub fn decode_tables(&self, seqs: &[&SeqKv], ids: &[u32], device: &Device) -> Result<(Tensor, DecodeTables)> {
        let width = seqs.iter().map(|s| s.len + 1).max().unwrap_or(1);
        let inputs = Tensor::new(self.decode_inputs(seqs, ids, seqs.len(), width)?, device)?;
        DecodeTables::views(&inputs, seqs.len(), width)
    }

    /// The inputs of a decode step for a batch padded to `batch` sequences, as one host buffer:
    /// token ids, positions, new rows and lengths (`batch` each), then the `[batch, width]` row
    /// table (see [`DecodeTables`]; `width` at least the longest length after the step). Padding
    /// sequences feed token 0 at position 0 into the scratch row.
    pub fn decode_inputs(&self, seqs: &[&SeqKv], ids: &[u32], batch: usize, width: usize) -> Result<Vec<u32>> {
        if ids.len() != seqs.len() || seqs.len() > batch || seqs.iter().any(|s| s.len + 1 > width) {
            candle_core::bail!("decode step: {} sequences, {} tokens, padded to {batch} x {width}", seqs.len(), ids.len());
        }
        let mut buf = vec![0u32; batch * (4 + width)];
        let (head, table) = buf.split_at_mut(4 * batch);
        let scratch = self.scratch_row();
        for b in 0..batch {
            let row = &mut table[b * width..(b + 1) * width];
            match seqs.get(b) {
                Some(s) => {
                    if Self::blocks_for(s.len + 1) > s.blocks.len() {
                        candle_core::bail!("decode step: sequence {b} at position {} has {} blocks reserved", s.len, s.blocks.len());
                    }
                    for (p, slot) in row[..=s.len].iter_mut().enumerate() {
                        *slot = s.row(p);
                    }
                    head[b] = ids[b];
                    head[batch + b] = s.len as u32;
                    head[2 * batch + b] = s.row(s.len);
                    head[3 * batch + b] = (s.len + 1) as u32;
                }
                None => {
                    row[0] = scratch;
                    head[2 * batch + b] = scratch;
                    head[3 * batch + b] = 1;
                }
            }
        }
        Ok(buf)
    }

    /// The pool rows of `seq`'s first `len` positions, as a u32 index tensor for [`KvPool::gather`].
    pub fn rows(&self, seq: &SeqKv, len: usize, device: &Device) -> Result<Tensor> {
        let rows: Vec<u32> = (0..len).map(|p| seq.row(p)).collect();
        Tensor::from_vec(rows, len, device)
    }

    /// Layer `layer`'s keys and values at `rows` (see [`KvPool::rows`]), as
    /// `[1, kv_heads, len, head_dim]` views.
    pub fn gather(&self, layer: usize, rows: &Tensor) -> Result<(Tensor, Tensor)> {
        let view = |t: &Tensor| -> Result<Tensor> { t.index_select(rows, 0)?.transpose(0, 1)?.unsqueeze(0) };
        Ok((view(&self.k[layer])?, view(&self.v[layer])?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        serde_json::from_value(serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "hidden_size": 16, "intermediate_size": 32,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 10,
        }))
        .unwrap()
    }

    #[test]
    fn decode_tables_list_each_sequences_rows_and_its_new_one() {
        let mut pool = KvPool::new(&cfg(), 6, DType::F32, &Device::Cpu).unwrap();
        let (mut a, mut b) = (SeqKv::default(), SeqKv::default());
        pool.reserve(&mut a, 17).unwrap(); // blocks 5, 4 (the free list pops from its end)
        pool.reserve(&mut b, 3).unwrap(); // block 3
        pool.advance(&mut a, 16);
        pool.advance(&mut b, 2);
        let (tokens, t) = pool.decode_tables(&[&a, &b], &[7, 8], &Device::Cpu).unwrap();
        assert_eq!(tokens.to_vec2::<u32>().unwrap(), vec![vec![7, 8]]);
        let table = t.table.to_vec2::<u32>().unwrap();
        assert_eq!(table.len(), 2);
        assert_eq!(table[0].len(), 17);
        let (ra, rb): (Vec<u32>, Vec<u32>) = ((0..17).map(|p| a.row(p)).collect(), (0..3).map(|p| b.row(p)).collect());
        assert_eq!(table[0], ra);
        assert_eq!(&table[1][..3], &rb[..]);
        assert_eq!(t.lens.to_vec1::<u32>().unwrap(), vec![17, 3]);
        assert_eq!(t.pos.to_vec1::<u32>().unwrap(), vec![16, 2]);
        assert_eq!(t.new_rows.to_vec1::<u32>().unwrap(), vec![a.row(16), b.row(2)]);
        // A sequence whose next position has no block reserved is refused, not read out of bounds.
        let mut c = SeqKv::default();
        pool.reserve(&mut c, 16).unwrap();
        pool.advance(&mut c, 16);
        assert!(pool.decode_tables(&[&c], &[1], &Device::Cpu).is_err());
    }

    #[test]
    fn buckets_round_up_and_stay_few() {
        let b: Vec<usize> = [1, 2, 3, 4, 5, 8, 9, 16, 17, 32, 33, 64, 65].iter().map(|&b| batch_bucket(b)).collect();
        assert_eq!(b, vec![1, 2, 3, 4, 8, 8, 12, 16, 20, 32, 40, 64, 72]);
        assert_eq!((1..=64).map(batch_bucket).collect::<std::collections::BTreeSet<_>>().len(), 15);
        assert_eq!([1, 256, 257, 600, 4096].map(width_bucket), [256, 256, 512, 1024, 4096]);
    }

    #[test]
    fn padded_decode_inputs_send_the_padding_to_the_scratch_row() {
        let mut pool = KvPool::new(&cfg(), 6, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(pool.scratch_row(), 96);
        let (mut a, mut b) = (SeqKv::default(), SeqKv::default());
        pool.reserve(&mut a, 17).unwrap();
        pool.reserve(&mut b, 3).unwrap();
        pool.advance(&mut a, 16);
        pool.advance(&mut b, 2);
        let buf = pool.decode_inputs(&[&a, &b], &[7, 8], 3, 32).unwrap();
        assert_eq!(buf.len(), 3 * (4 + 32));
        assert_eq!(&buf[..12], &[7, 8, 0, 16, 2, 0, a.row(16), b.row(2), 96, 17, 3, 1]);
        let table = &buf[12..];
        assert_eq!(&table[..17], &(0..17).map(|p| a.row(p)).collect::<Vec<_>>()[..]);
        assert_eq!(&table[32..35], &(0..3).map(|p| b.row(p)).collect::<Vec<_>>()[..]);
        assert_eq!(table[64], 96);
        // The table must hold every length; a sequence without its next block is refused.
        assert!(pool.decode_inputs(&[&a], &[7], 1, 16).is_err());
        assert!(pool.decode_inputs(&[&a, &b], &[7, 8], 1, 32).is_err());
        let mut c = SeqKv::default();
        pool.reserve(&mut c, 16).unwrap();
        pool.advance(&mut c, 16);
        assert!(pool.decode_inputs(&[&c], &[1], 1, 32).is_err());
    }

    #[test]
    fn a_prompt_adopts_the_cached_whole_blocks_of_an_earlier_one() {
        let mut pool = KvPool::new(&cfg(), 8, DType::F32, &Device::Cpu).unwrap().with_prefix_cache(true);
        let prompt: Vec<u32> = (0..40).collect();
        let mut a = SeqKv::default();
        assert_eq!(pool.adopt_prefix(&mut a, &prompt), 0, "nothing cached yet");
        pool.reserve(&mut a, 41).unwrap();
        pool.advance(&mut a, 40);
        pool.commit(&mut a, &prompt);
        assert_eq!(a.chain.len(), 2, "two whole blocks registered, the partial third not");
        // While a runs, b shares its two whole blocks and computes from position 32.
        let mut b = SeqKv::default();
        assert_eq!(pool.adopt_prefix(&mut b, &prompt), 32);
        assert_eq!(&b.block_ids()[..2], &a.block_ids()[..2]);
        pool.reserve(&mut b, 41).unwrap();
        assert_eq!(pool.adopt_prefix(&mut b, &prompt), 32, "a sequence that holds blocks adopts no more");
        assert_eq!(pool.used_blocks(), 4, "a: 3 blocks, b: 2 shared + 1 of its own");
        // A prompt of exactly 32 tokens leaves its last block to compute.
        let mut c = SeqKv::default();
        assert_eq!(pool.adopt_prefix(&mut c, &prompt[..32]), 16);
        pool.release(&mut c);
        pool.release(&mut a);
        pool.release(&mut b);
        assert_eq!((pool.used_blocks(), pool.cached_blocks(), pool.free_blocks()), (0, 2, 8));
        // The cached blocks are handed out last, and forgotten then.
        let mut d = SeqKv::default();
        pool.reserve(&mut d, 6 * BLOCK_TOKENS).unwrap();
        assert_eq!(pool.cached_blocks(), 2);
        pool.reserve(&mut d, 7 * BLOCK_TOKENS).unwrap();
        assert_eq!(pool.cached_blocks(), 1);
        let mut e = SeqKv::default();
        assert_eq!(pool.adopt_prefix(&mut e, &prompt), 16, "the tail went first, the head is still there");
        pool.release(&mut e);
        pool.release(&mut d);
        // Without a prefix cache nothing is kept.
        let mut plain = KvPool::new(&cfg(), 4, DType::F32, &Device::Cpu).unwrap();
        let mut f = SeqKv::default();
        plain.reserve(&mut f, 33).unwrap();
        plain.advance(&mut f, 33);
        plain.commit(&mut f, &prompt);
        plain.release(&mut f);
        assert_eq!((plain.cached_blocks(), plain.adopt_prefix(&mut f, &prompt)), (0, 0));
    }

    #[test]
    fn blocks_are_reserved_written_gathered_and_given_back() {
        let c = cfg();
        let mut pool = KvPool::new(&c, 4, DType::F32, &Device::Cpu).unwrap();
        let (mut a, mut b) = (SeqKv::default(), SeqKv::default());
        pool.reserve(&mut a, 20).unwrap(); // 2 blocks
        pool.reserve(&mut b, 16).unwrap(); // 1 block
        assert_eq!(pool.free_blocks(), 1);
        let full = pool.reserve(&mut b, 40).unwrap_err();
        assert_eq!((full.needed, full.free, full.total), (2, 1, 4));
        assert_eq!(b.blocks(), 1, "a refused reserve changes nothing");
        // 20 positions of a, written in two calls that cross a block boundary.
        let kv = |n: usize, base: f32| Tensor::arange(0f32, (n * 2 * 4) as f32, &Device::Cpu).unwrap().affine(1.0, base as f64).unwrap().reshape((n, 2, 4)).unwrap();
        let (k1, k2) = (kv(13, 0.0), kv(7, 1000.0));
        for layer in 0..2 {
            pool.write(layer, &a, &k1, &(&k1 * 2.0).unwrap()).unwrap();
        }
        pool.advance(&mut a, 13);
        for layer in 0..2 {
            pool.write(layer, &a, &k2, &(&k2 * 2.0).unwrap()).unwrap();
        }
        pool.advance(&mut a, 7);
        let rows = pool.rows(&a, 20, &Device::Cpu).unwrap();
        let (k, v) = pool.gather(1, &rows).unwrap();
        let want = Tensor::cat(&[&k1, &k2], 0).unwrap().transpose(0, 1).unwrap().unsqueeze(0).unwrap();
        assert_eq!(k.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        assert_eq!(v.flatten_all().unwrap().to_vec1::<f32>().unwrap(), (want * 2.0).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap());
        // Writing past the reserved blocks is refused.
        assert!(pool.write(0, &a, &kv(13, 0.0), &kv(13, 0.0)).is_err());
        pool.release(&mut a);
        pool.release(&mut b);
        assert_eq!((pool.free_blocks(), a.len(), a.blocks()), (4, 0, 0));
        assert_eq!(KvPool::block_bytes(&c, DType::F32), 2 * 2 * 16 * 2 * 4 * 4);
    }
}
