//! The LLaMA-family decoder (llama, mistral, qwen2, qwen3) with interchangeable linear layers.
//!
//! Decoder blocks are public and can be run one at a time, with the inputs of each linear layer
//! captured: the AWQ pass is built on that.
use super::config::Config;
use super::layers::{causal_mask, softmax_f32, Cache, KvCache, RmsNorm, Rope};
use super::linear::{DenseLinear, Linear};
use crate::quant::L2Prefetch;
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

/// Builds one linear layer from `vb` (which points at e.g. `model.layers.0.self_attn.q_proj`):
/// `(vb, in_features, out_features, has_bias)`. Dense and quantized checkpoints differ only here.
pub type LinearLoader<'a> = &'a dyn Fn(VarBuilder, usize, usize, bool) -> Result<Linear>;

/// The loader for full-precision checkpoints (`weight` `[out, in]`, optional `bias`).
pub fn load_dense(vb: VarBuilder, in_f: usize, out_f: usize, bias: bool) -> Result<Linear> {
    let w = vb.get((out_f, in_f), "weight")?;
    let b = if bias { Some(vb.get(out_f, "bias")?) } else { None };
    Ok(DenseLinear::new(w, b).into_linear())
}

/// The inputs of each linear layer of one block, in the order the AWQ scale groups need them.
#[derive(Debug, Default, Clone)]
pub struct LinearInputs {
    /// Input of q_proj, k_proj and v_proj (the output of input_layernorm).
    pub qkv: Option<Tensor>,
    /// Input of o_proj (the attention output before projection).
    pub o_proj: Option<Tensor>,
    /// Input of gate_proj and up_proj (the output of post_attention_layernorm).
    pub gate_up: Option<Tensor>,
    /// Input of down_proj.
    pub down_proj: Option<Tensor>,
}

#[derive(Debug, Clone)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub q_norm: Option<RmsNorm>,
    pub k_norm: Option<RmsNorm>,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub sliding_window: Option<usize>,
}

impl Attention {
    pub fn load(vb: VarBuilder, cfg: &Config, lin: LinearLoader) -> Result<Self> {
        let (h, hd, kvh) = (cfg.hidden_size, cfg.head_dim(), cfg.num_kv_heads());
        let qkv_bias = cfg.qkv_bias();
        let (q_norm, k_norm) = if cfg.qk_norm() {
            (
                Some(RmsNorm::load(vb.pp("q_norm"), hd, cfg.rms_norm_eps)?),
                Some(RmsNorm::load(vb.pp("k_norm"), hd, cfg.rms_norm_eps)?),
            )
        } else {
            (None, None)
        };
        Ok(Self {
            q_proj: lin(vb.pp("q_proj"), h, cfg.num_attention_heads * hd, qkv_bias)?,
            k_proj: lin(vb.pp("k_proj"), h, kvh * hd, qkv_bias)?,
            v_proj: lin(vb.pp("v_proj"), h, kvh * hd, qkv_bias)?,
            o_proj: lin(vb.pp("o_proj"), cfg.num_attention_heads * hd, h, cfg.o_bias())?,
            q_norm,
            k_norm,
            n_heads: cfg.num_attention_heads,
            n_kv_heads: kvh,
            head_dim: hd,
            sliding_window: cfg.sliding_window,
        })
    }

    /// The attention output before o_proj, `[b, seq, heads * head_dim]`. `o_hint`: o_proj's
    /// weights, pulled into L2 by the q/k/v GEMV where it can.
    pub fn attend(&self, x: &Tensor, ctx: &BlockContext, cache: Option<(&mut KvCache, usize)>, o_hint: &L2Prefetch) -> Result<Tensor> {
        let (rope, offset, mask) = (ctx.rope, ctx.offset, ctx.mask);
        #[cfg(feature = "cuda")]
        if let (Some(pos), Some((kv, _))) = (ctx.step, cache.as_ref()) {
            return self.attend_at(x, rope, pos, kv, o_hint);
        }
        let (b, seq, _) = x.dims3()?;
        let (h, kvh, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let qkv = super::linear::forward_shared_prefetch(&[&self.q_proj, &self.k_proj, &self.v_proj], x, o_hint)?;
        let q = qkv[0].reshape((b, seq, h, hd))?;
        let k = qkv[1].reshape((b, seq, kvh, hd))?;
        let v = qkv[2].reshape((b, seq, kvh, hd))?;
        let (q, k) = match (&self.q_norm, &self.k_norm) {
            (Some(qn), Some(kn)) => (qn.forward(&q)?, kn.forward(&k)?),
            _ => (q, k),
        };
        let q = rope.apply(&q.transpose(1, 2)?, offset)?;
        let k = rope.apply(&k.transpose(1, 2)?, offset)?;
        let v = v.transpose(1, 2)?.contiguous()?;
        let (k, v) = match cache {
            Some((c, cap)) => c.append(&k, &v, cap)?,
            None => (k, v),
        };
        if mask.is_none() && super::attention_cpu::applies(&q, &k, &v) {
            let out = super::attention_cpu::attend_one(&q, &k, &v, 1.0 / (hd as f32).sqrt())?;
            return out.reshape((b, h * hd))?.reshape((b, seq, h * hd));
        }
        #[cfg(feature = "cuda")]
        if mask.is_none() && super::cuda::attention_applies(&q, &k, &v) {
            let out = super::cuda::decode_attention(&q, &k, &v, 1.0 / (hd as f32).sqrt())?;
            return out.reshape((b, seq, h * hd));
        }
        let kv_len = k.dim(2)?;
        // Grouped-query attention without copying K/V: the n_rep query heads that share a KV head
        // are stacked along the sequence axis (HF's repeat_kv puts them next to each other too).
        let n_rep = h / kvh;
        let q = (q * (1.0 / (hd as f64).sqrt()))?.reshape((b, kvh, n_rep * seq, hd))?;
        let scores = q.matmul(&k.t()?)?.reshape((b, kvh, n_rep, seq, kv_len))?;
        let scores = match mask {
            Some(m) => scores.broadcast_add(&m.to_dtype(scores.dtype())?)?,
            None => scores,
        };
        let probs = softmax_f32(&scores)?.reshape((b, kvh, n_rep * seq, kv_len))?;
        let out = probs.matmul(&v)?.reshape((b, h, seq, hd))?;
        out.transpose(1, 2)?.reshape((b, seq, h * hd))
    }
}

#[cfg(feature = "cuda")]
impl Attention {
    /// One token at the position held on the device by `pos` (u32), the cache's buffers allocated
    /// to capacity: what the CUDA-graph decode step captures (see `super::graph`). Nothing here
    /// depends on host-side position state, so the captured graph replays at any position.
    fn attend_at(&self, x: &Tensor, rope: &Rope, pos: &Tensor, kv: &KvCache, o_hint: &L2Prefetch) -> Result<Tensor> {
        let (h, kvh, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let qkv = super::linear::forward_shared_prefetch(&[&self.q_proj, &self.k_proj, &self.v_proj], x, o_hint)?;
        let (q, k) = match (&self.q_norm, &self.k_norm) {
            (Some(qn), Some(kn)) => (qn.forward(&qkv[0].reshape((1, 1, h, hd))?)?, kn.forward(&qkv[1].reshape((1, 1, kvh, hd))?)?),
            _ => (qkv[0].clone(), qkv[1].clone()),
        };
        let Some((kc, vc)) = kv.buffers() else { candle_core::bail!("graph decode: the KV cache has no buffers") };
        let q = super::cuda::rope_at(&q, rope.cos(), rope.sin(), pos, h, hd)?;
        super::cuda::kv_write_at(&k, &qkv[2], kc, vc, rope.cos(), rope.sin(), pos, kvh, hd)?;
        let out = super::cuda::decode_attention_at(&q, kc, vc, pos, 1.0 / (hd as f32).sqrt())?;
        out.reshape((1, 1, h * hd))
    }
}

impl Attention {
    /// The attention module alone, without a cache (input_layernorm output in, o_proj output
    /// out), as the AWQ loss for the q/k/v group measures it.
    pub fn forward(&self, normed: &Tensor, ctx: &BlockContext) -> Result<Tensor> {
        let attn = self.attend(normed, ctx, None, &L2Prefetch::none())?;
        self.o_proj.forward(&attn)
    }
}

#[derive(Debug, Clone)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

impl Mlp {
    pub fn load(vb: VarBuilder, cfg: &Config, lin: LinearLoader) -> Result<Self> {
        let (h, i, bias) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias.unwrap_or(false));
        Ok(Self {
            gate_proj: lin(vb.pp("gate_proj"), h, i, bias)?,
            up_proj: lin(vb.pp("up_proj"), h, i, bias)?,
            down_proj: lin(vb.pp("down_proj"), i, h, bias)?,
        })
    }
    /// The input of down_proj: silu(gate(x)) * up(x).
    pub fn hidden(&self, x: &Tensor) -> Result<Tensor> {
        self.hidden_prefetch(x, &L2Prefetch::none())
    }
    /// [`Mlp::hidden`], pulling `down_hint` (down_proj's weights) into L2 on the way.
    fn hidden_prefetch(&self, x: &Tensor, down_hint: &L2Prefetch) -> Result<Tensor> {
        let gu = super::linear::forward_shared_prefetch(&[&self.gate_proj, &self.up_proj], x, down_hint)?;
        super::layers::silu_mul(&gu[0], &gu[1], down_hint)
    }
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.down_proj.forward(&self.hidden(x)?)
    }
}

/// The L2 prefetch hints of one block: each names the weights of the GEMV that the kernels
/// holding the hint precede (all empty outside few-token CUDA forwards).
#[derive(Debug, Clone, Copy, Default)]
struct BlockHints {
    qkv: L2Prefetch,
    o: L2Prefetch,
    gate_up: L2Prefetch,
    down: L2Prefetch,
    next: L2Prefetch,
}

/// Whether `x` (`[..., hidden]`) is a decode-sized batch on a GPU, where L2 hints pay.
fn few_tokens_on_gpu(x: &Tensor) -> bool {
    let h = x.dims().last().copied().unwrap_or(1).max(1);
    x.device().is_cuda() && x.elem_count() / h <= crate::quant::prefetch::HINT_MAX_TOKENS && crate::quant::prefetch::budget() > 0
}

/// What every block of one forward pass shares.
pub struct BlockContext<'a> {
    pub rope: &'a Rope,
    pub offset: usize,
    pub mask: Option<&'a Tensor>,
    /// For the CUDA-graph decode step: the token's position as a u32 on the device (then
    /// `offset` is unused and the cache buffers are written at that position).
    pub step: Option<&'a Tensor>,
}

#[derive(Debug, Clone)]
pub struct Block {
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: Mlp,
}

impl Block {
    pub fn load(vb: VarBuilder, cfg: &Config, lin: LinearLoader) -> Result<Self> {
        Ok(Self {
            input_layernorm: RmsNorm::load(vb.pp("input_layernorm"), cfg.hidden_size, cfg.rms_norm_eps)?,
            self_attn: Attention::load(vb.pp("self_attn"), cfg, lin)?,
            post_attention_layernorm: RmsNorm::load(
                vb.pp("post_attention_layernorm"),
                cfg.hidden_size,
                cfg.rms_norm_eps,
            )?,
            mlp: Mlp::load(vb.pp("mlp"), cfg, lin)?,
        })
    }

    /// Runs the block. With `capture`, the input of every linear layer is recorded there.
    pub fn forward(&self, x: &Tensor, ctx: &BlockContext, cache: Option<(&mut KvCache, usize)>, capture: Option<&mut LinearInputs>) -> Result<Tensor> {
        let hints = if few_tokens_on_gpu(x) { self.prefetch_hints(self.qkv_hint(), L2Prefetch::none()) } else { BlockHints::default() };
        let (x, delta) = self.forward_split(x, None, ctx, cache, capture, &hints)?;
        x + delta
    }

    /// The block on the input `x + delta` (the previous block's residual and its unadded MLP
    /// output, so the add runs fused with this block's first norm), returning its own residual
    /// stream and MLP output unadded. `hints` (for a few tokens on CUDA, else empty): every kernel
    /// before a GEMV pulls that GEMV's weights into L2, and the last GEMV pulls in `next` (the
    /// next block's q/k/v or the lm_head), see [`crate::quant::prefetch`].
    fn forward_split(
        &self,
        x: &Tensor,
        delta: Option<&Tensor>,
        ctx: &BlockContext,
        cache: Option<(&mut KvCache, usize)>,
        mut capture: Option<&mut LinearInputs>,
        hints: &BlockHints,
    ) -> Result<(Tensor, Tensor)> {
        let (x, normed) = self.input_layernorm.forward_residual(x, delta, &hints.qkv)?;
        let attn = self.self_attn.attend(&normed, ctx, cache, &hints.o)?;
        let o = self.self_attn.o_proj.forward_prefetch(&attn, &hints.gate_up)?;
        let (x, normed2) = self.post_attention_layernorm.forward_residual(&x, Some(&o), &hints.gate_up)?;
        let hidden = self.mlp.hidden_prefetch(&normed2, &hints.down)?;
        let down = self.mlp.down_proj.forward_prefetch(&hidden, &hints.next)?;
        if let Some(c) = capture.as_deref_mut() {
            c.qkv = Some(normed);
            c.o_proj = Some(attn);
            c.gate_up = Some(normed2);
            c.down_proj = Some(hidden);
        }
        Ok((x, down))
    }

    /// The block's q/k/v weights as one L2 prefetch hint (what the previous block's last GEMV
    /// pulls in).
    pub fn qkv_hint(&self) -> L2Prefetch {
        let a = &self.self_attn;
        super::linear::prefetch_hint(&[&a.q_proj, &a.k_proj, &a.v_proj])
    }

    /// The block's hints, given its own q/k/v hint (built once, as the previous block's `next`)
    /// and `next`.
    fn prefetch_hints(&self, qkv: L2Prefetch, next: L2Prefetch) -> BlockHints {
        let (a, m) = (&self.self_attn, &self.mlp);
        BlockHints {
            qkv,
            o: super::linear::prefetch_hint(&[&a.o_proj]),
            gate_up: super::linear::prefetch_hint(&[&m.gate_proj, &m.up_proj]),
            down: super::linear::prefetch_hint(&[&m.down_proj]),
            next,
        }
    }


    /// Every linear layer of the block with its HF name relative to the block.
    pub fn linears(&self) -> [(&'static str, &Linear); 7] {
        let (a, m) = (&self.self_attn, &self.mlp);
        [
            ("self_attn.q_proj", &a.q_proj),
            ("self_attn.k_proj", &a.k_proj),
            ("self_attn.v_proj", &a.v_proj),
            ("self_attn.o_proj", &a.o_proj),
            ("mlp.gate_proj", &m.gate_proj),
            ("mlp.up_proj", &m.up_proj),
            ("mlp.down_proj", &m.down_proj),
        ]
    }
}

#[derive(Debug, Clone)]
pub struct Model {
    pub embed_tokens: Tensor,
    pub layers: Vec<Block>,
    pub norm: RmsNorm,
    pub lm_head: Linear,
    pub rope: Rope,
    pub cfg: Config,
    pub dtype: DType,
    pub device: Device,
}

impl Model {
    /// Loads the model from `vb` (root of the checkpoint names), building linears with `lin`.
    pub fn load(vb: VarBuilder, cfg: &Config, lin: LinearLoader) -> Result<Self> {
        Self::load_with(vb, cfg, lin, false)
    }

    /// As [`Model::load`]; with `half_tables` the embedding table and lm_head stay in f16 whatever
    /// the activation dtype (see [`crate::quant::HalfLinear`]).
    pub fn load_with(vb: VarBuilder, cfg: &Config, lin: LinearLoader, half_tables: bool) -> Result<Self> {
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Block::load(vb.pp(format!("model.layers.{i}")), cfg, lin))
            .collect::<Result<Vec<_>>>()?;
        Self::from_layers(vb, cfg, layers, half_tables)
    }

    /// Loads embeddings, final norm and lm_head from `vb` around decoder blocks built elsewhere
    /// (the quantization pass builds them one at a time).
    pub fn from_layers(vb: VarBuilder, cfg: &Config, layers: Vec<Block>, half_tables: bool) -> Result<Self> {
        let m = vb.pp("model");
        let table_dtype = if half_tables { DType::F16 } else { vb.dtype() };
        let table_shape = (cfg.vocab_size, cfg.hidden_size);
        let embed_tokens = m.get_with_hints_dtype(table_shape, "embed_tokens.weight", Default::default(), table_dtype)?;
        let norm = RmsNorm::load(m.pp("norm"), cfg.hidden_size, cfg.rms_norm_eps)?;
        // A tied lm_head shares the embedding; some checkpoints still carry a copy.
        let head_weight = if cfg.tie_word_embeddings && !vb.contains_tensor("lm_head.weight") {
            embed_tokens.clone()
        } else {
            vb.get_with_hints_dtype(table_shape, "lm_head.weight", Default::default(), table_dtype)?
        };
        let lm_head = if half_tables {
            crate::quant::HalfLinear::new(head_weight, None)?.into_linear()
        } else {
            DenseLinear::new(head_weight, None).into_linear()
        };
        let rope = Rope::new(cfg, cfg.max_position_embeddings, vb.dtype(), vb.device())?;
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope,
            cfg: cfg.clone(),
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    /// A KV cache for up to `capacity` tokens (capped at the model's context).
    pub fn new_cache(&self, capacity: usize) -> Cache {
        Cache::new(self.layers.len(), capacity.min(self.context_len()))
    }
    pub fn context_len(&self) -> usize {
        self.rope.max_len()
    }

    /// Checks host-side token ids against the vocabulary (callers holding ids on the host do
    /// this once, instead of a device reduction and sync in every forward pass).
    pub fn check_tokens(&self, tokens: &[u32]) -> Result<()> {
        let vocab = self.vocab_size();
        match tokens.iter().find(|&&t| t as usize >= vocab) {
            Some(t) => candle_core::bail!("token id {t} is out of range for the vocabulary of {vocab}"),
            None => Ok(()),
        }
    }

    /// Token ids `[b, seq]` to hidden states `[b, seq, hidden]`. Ids on the CPU are checked here;
    /// on a GPU that would cost a sync per step, so there the callers check ([`Model::check_tokens`]).
    pub fn embed(&self, tokens: &Tensor) -> Result<Tensor> {
        let (b, seq) = tokens.dims2()?;
        let flat = tokens.flatten_all()?;
        if flat.device().is_cpu() {
            self.check_tokens(&flat.to_dtype(DType::U32)?.to_vec1::<u32>()?)?;
        }
        self.embed_tokens.index_select(&flat, 0)?.to_dtype(self.dtype)?.reshape((b, seq, self.cfg.hidden_size))
    }

    pub fn mask(&self, seq: usize, offset: usize) -> Result<Option<Tensor>> {
        causal_mask(seq, offset, self.cfg.sliding_window, self.dtype, &self.device)
    }

    /// Final norm and lm_head; logits in f32.
    pub fn head(&self, hidden: &Tensor) -> Result<Tensor> {
        self.lm_head.forward(&self.norm.forward(hidden)?)?.to_dtype(DType::F32)
    }

    fn hidden_states(&self, tokens: &Tensor, cache: Option<&mut Cache>) -> Result<Tensor> {
        let seq = tokens.dim(1)?;
        let offset = cache.as_ref().map_or(0, |c| c.len());
        let mask = self.mask(seq, offset)?;
        let ctx = BlockContext { rope: &self.rope, offset, mask: mask.as_ref(), step: None };
        let (x, delta) = self.blocks(self.embed(tokens)?, &ctx, cache)?;
        match delta {
            Some(d) => x + d,
            None => Ok(x),
        }
    }

    /// Runs the blocks in order (appending to `cache` where given), each taking the previous one's
    /// unadded output (see [`Block::forward_split`]) and the prefetch hint of what follows it;
    /// returns the last residual stream and MLP output.
    fn blocks(&self, mut x: Tensor, ctx: &BlockContext, cache: Option<&mut Cache>) -> Result<(Tensor, Option<Tensor>)> {
        let hints = few_tokens_on_gpu(&x);
        let cap = cache.as_ref().map_or(0, |c| c.capacity);
        let mut kv = cache.map(|c| c.layers.iter_mut());
        let mut delta: Option<Tensor> = None;
        // Each block's q/k/v hint is the previous block's `next`.
        let mut qkv = match (hints, self.layers.first()) {
            (true, Some(b)) => b.qkv_hint(),
            _ => L2Prefetch::none(),
        };
        for (i, block) in self.layers.iter().enumerate() {
            let next = match (hints, self.layers.get(i + 1)) {
                (false, _) => L2Prefetch::none(),
                (true, Some(b)) => b.qkv_hint(),
                (true, None) => super::linear::prefetch_hint(&[&self.lm_head]),
            };
            let block_hints = if hints { block.prefetch_hints(qkv, next) } else { BlockHints::default() };
            let layer_cache = kv.as_mut().and_then(|layers| layers.next()).map(|c| (c, cap));
            let (nx, d) = block.forward_split(&x, delta.as_ref(), ctx, layer_cache, None, &block_hints)?;
            x = nx;
            delta = Some(d);
            qkv = next;
        }
        Ok((x, delta))
    }

    /// Runs `f` on the CPU thread pool. A forward pass issues hundreds of small parallel ops;
    /// started from a worker thread each one runs at once, while from outside the pool every op
    /// would wait for a sleeping worker to wake up (that doubled decode time on 2 cores).
    fn on_pool<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        if self.device.is_cpu() && rayon::current_thread_index().is_none() {
            rayon::scope(|_| f())
        } else {
            f()
        }
    }

    /// Logits `[1, 1, vocab]` (f32) of one token whose id and position are on the device
    /// (`token` `[1, 1]`, `pos` `[1]`, u32), the cache buffers at capacity: the body of the CUDA
    /// graph of a decode step. Does not advance the cache's host-side length.
    #[cfg(feature = "cuda")]
    pub(crate) fn logits_at(&self, token: &Tensor, pos: &Tensor, cache: &mut Cache) -> Result<Tensor> {
        let ctx = BlockContext { rope: &self.rope, offset: 0, mask: None, step: Some(pos) };
        let (x, delta) = self.blocks(self.embed(token)?, &ctx, Some(cache))?;
        let (_, normed) = self.norm.forward_residual(&x, delta.as_ref(), &L2Prefetch::none())?;
        self.lm_head.forward(&normed)?.to_dtype(DType::F32)
    }

    /// Logits of the last position, `[b, vocab]` f32; appends to `cache`. On CUDA, single-token
    /// steps replay a captured graph of the whole step (see `super::graph`).
    pub fn forward(&self, tokens: &Tensor, cache: &mut Cache) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Some(logits) = super::graph::forward(self, tokens, cache)? {
            return Ok(logits);
        }
        self.on_pool(|| {
            let x = self.hidden_states(tokens, Some(cache))?;
            let last = x.narrow(1, x.dim(1)? - 1, 1)?;
            self.head(&last)?.squeeze(1)
        })
    }

    /// Logits of every position, `[b, seq, vocab]` f32, without a cache (scoring, tests).
    pub fn forward_all(&self, tokens: &Tensor) -> Result<Tensor> {
        self.on_pool(|| self.head(&self.hidden_states(tokens, None)?))
    }

    /// Logits of every position, appending to `cache` (incremental scoring).
    pub fn forward_all_cached(&self, tokens: &Tensor, cache: &mut Cache) -> Result<Tensor> {
        self.on_pool(|| self.head(&self.hidden_states(tokens, Some(cache))?))
    }

    pub fn vocab_size(&self) -> usize {
        self.embed_tokens.dim(0).unwrap_or(0)
    }
}
