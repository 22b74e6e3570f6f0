//! The LLaMA-family decoder (llama, mistral, qwen2, qwen3) with interchangeable linear layers.
//!
//! Decoder blocks are public and can be run one at a time, with the inputs of each linear layer
//! captured: the AWQ pass is built on that.
use super::config::Config;
use super::layers::{causal_mask, softmax_f32, Cache, KvCache, RmsNorm, Rope};
use super::paged::KvPool;
use super::proj::Proj;
use crate::cuda::{prefetch, L2Prefetch};
use crate::linear::{DenseLinear, HalfLinear, Linear};
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

/// Builds one linear layer from `vb` (which points at e.g. `model.layers.0.self_attn.q_proj`):
/// `(vb, in_features, out_features, has_bias)`. Dense and quantized checkpoints differ only here.
pub type LinearLoader<'a> = &'a dyn Fn(VarBuilder, usize, usize, bool) -> Result<Linear>;

/// The loader for full-precision checkpoints (`weight` `[out, in]`, optional `bias`).
pub fn load_dense(vb: VarBuilder, in_f: usize, out_f: usize, bias: bool) -> Result<Linear> {
    Ok(DenseLinear::load(vb, in_f, out_f, bias)?.into_linear())
}

/// Builds the linear layer `p` of a block from `vb` (the block's root) with `lin`.
fn load_proj(vb: &VarBuilder, cfg: &Config, lin: LinearLoader, p: Proj) -> Result<Linear> {
    let (i, o) = p.features(cfg);
    lin(vb.pp(p.name()), i, o, p.has_bias(cfg))
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

impl LinearInputs {
    /// One layer reading each captured input.
    pub const FIRST_READERS: [Proj; 4] = [Proj::Q, Proj::O, Proj::Gate, Proj::Down];

    /// The captured input of layer `p`.
    pub fn of(&self, p: Proj) -> Option<&Tensor> {
        match p {
            Proj::Q | Proj::K | Proj::V => self.qkv.as_ref(),
            Proj::O => self.o_proj.as_ref(),
            Proj::Gate | Proj::Up => self.gate_up.as_ref(),
            Proj::Down => self.down_proj.as_ref(),
        }
    }

    /// The captured input of layer `p`, to replace it.
    pub fn of_mut(&mut self, p: Proj) -> &mut Option<Tensor> {
        match p {
            Proj::Q | Proj::K | Proj::V => &mut self.qkv,
            Proj::O => &mut self.o_proj,
            Proj::Gate | Proj::Up => &mut self.gate_up,
            Proj::Down => &mut self.down_proj,
        }
    }
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
        let (hd, kvh) = (cfg.head_dim(), cfg.num_kv_heads());
        let (q_norm, k_norm) = if cfg.qk_norm() {
            (
                Some(RmsNorm::load(vb.pp("q_norm"), hd, cfg.rms_norm_eps)?),
                Some(RmsNorm::load(vb.pp("k_norm"), hd, cfg.rms_norm_eps)?),
            )
        } else {
            (None, None)
        };
        Ok(Self {
            q_proj: load_proj(&vb, cfg, lin, Proj::Q)?,
            k_proj: load_proj(&vb, cfg, lin, Proj::K)?,
            v_proj: load_proj(&vb, cfg, lin, Proj::V)?,
            o_proj: load_proj(&vb, cfg, lin, Proj::O)?,
            q_norm,
            k_norm,
            n_heads: cfg.num_attention_heads,
            n_kv_heads: kvh,
            head_dim: hd,
            sliding_window: cfg.sliding_window,
        })
    }

    /// The attention output before o_proj, `[b, seq, heads * head_dim]`; the q/k/v GEMV pulls
    /// o_proj's weights (`ctx.hints.o`) into L2 where it can.
    pub fn attend(&self, x: &Tensor, ctx: &BlockContext, cache: Option<(&mut KvCache, usize)>) -> Result<Tensor> {
        let (rope, offset, mask) = (ctx.rope, ctx.offset, ctx.mask);
        #[cfg(feature = "cuda")]
        if let (Some(pos), Some((kv, _))) = (ctx.step, cache.as_ref()) {
            return self.attend_at(x, ctx, pos, kv);
        }
        let (b, seq, _) = x.dims3()?;
        let (h, kvh, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let qkv = crate::linear::forward_shared(&[&self.q_proj, &self.k_proj, &self.v_proj], x, &ctx.hints.o)?;
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
        self.scaled_dot_product(&q, &k, &v, mask)
    }

    /// Attention of roped queries `q` `[b, heads, seq, head_dim]` over all cached keys and values
    /// `k`, `v` `[b, kv_heads, kv_len, head_dim]` (the last `seq` of them are the queries' own),
    /// with the additive `mask` for several queries; returns `[b, seq, heads * head_dim]`.
    pub(super) fn scaled_dot_product(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, _, seq, _) = q.dims4()?;
        let (h, kvh, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        if mask.is_none() && super::attention_cpu::applies(q, k, v) {
            let out = super::attention_cpu::attend_one(q, k, v, 1.0 / (hd as f32).sqrt())?;
            return out.reshape((b, h * hd))?.reshape((b, seq, h * hd));
        }
        // Every mask here is `causal_mask`'s for these queries (the last `seq` positions of the
        // keys) and this model's sliding window; the fused CPU kernel applies it by position.
        if mask.is_some() && super::causal_attention_cpu::causal_applies(q, k, v) {
            return super::causal_attention_cpu::attend_causal(q, k, v, 1.0 / (hd as f32).sqrt(), self.sliding_window);
        }
        #[cfg(feature = "cuda")]
        if mask.is_none() && super::cuda::attention_applies(q, k, v) {
            let out = super::cuda::decode_attention(q, k, v, 1.0 / (hd as f32).sqrt())?;
            return out.reshape((b, seq, h * hd));
        }
        let kv_len = k.dim(2)?;
        // Grouped-query attention without copying K/V: the n_rep query heads that share a KV head
        // are stacked along the sequence axis (HF's repeat_kv puts them next to each other too).
        let n_rep = h / kvh;
        let q = (q * (1.0 / (hd as f64).sqrt()))?.reshape((b, kvh, n_rep * seq, hd))?;
        // Keys gathered from the paged cache are a strided view ([len, kv_heads, d] storage seen as
        // [1, kv_heads, len, d]); the CPU matmul takes any strides, cuBLAS's batched matmul needs
        // each head's matrix dense, so on other devices they are copied first.
        let k = if k.device().is_cpu() { k.clone() } else { k.contiguous()? };
        let scores = q.matmul(&k.t()?)?.reshape((b, kvh, n_rep, seq, kv_len))?;
        let scores = match mask {
            Some(m) => scores.broadcast_add(&m.to_dtype(scores.dtype())?)?,
            None => scores,
        };
        let probs = softmax_f32(&scores)?.reshape((b, kvh, n_rep * seq, kv_len))?;
        let out = probs.matmul(&v.contiguous()?)?.reshape((b, h, seq, hd))?;
        out.transpose(1, 2)?.reshape((b, seq, h * hd))
    }
}

#[cfg(feature = "cuda")]
impl Attention {
    /// One token at the position held on the device by `pos` (u32), the cache's buffers allocated
    /// to capacity: what the CUDA-graph decode step captures (see `super::graph`). Nothing here
    /// depends on host-side position state, so the captured graph replays at any position.
    fn attend_at(&self, x: &Tensor, ctx: &BlockContext, pos: &Tensor, kv: &KvCache) -> Result<Tensor> {
        let (h, kvh, hd, rope) = (self.n_heads, self.n_kv_heads, self.head_dim, ctx.rope);
        let qkv = crate::linear::forward_shared(&[&self.q_proj, &self.k_proj, &self.v_proj], x, &ctx.hints.o)?;
        let (q, k) = match (&self.q_norm, &self.k_norm) {
            (Some(qn), Some(kn)) => (qn.forward(&qkv[0].reshape((1, 1, h, hd))?)?, kn.forward(&qkv[1].reshape((1, 1, kvh, hd))?)?),
            _ => (qkv[0].clone(), qkv[1].clone()),
        };
        let Some((kc, vc)) = kv.buffers() else { candle_core::bail!("graph decode: the KV cache has no buffers") };
        let q = super::cuda::rope_kv_write_at(&q, &k, &qkv[2], kc, vc, rope.cos(), rope.sin(), pos, h, kvh, hd)?;
        let out = super::cuda::decode_attention_at(&q, kc, vc, pos, 1.0 / (hd as f32).sqrt())?;
        out.reshape((1, 1, h * hd))
    }
}

impl Attention {
    /// The attention module alone, without a cache (input_layernorm output in, o_proj output
    /// out), as the AWQ loss for the q/k/v group measures it.
    pub fn forward(&self, normed: &Tensor, ctx: &BlockContext) -> Result<Tensor> {
        let attn = self.attend(normed, ctx, None)?;
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
        Ok(Self {
            gate_proj: load_proj(&vb, cfg, lin, Proj::Gate)?,
            up_proj: load_proj(&vb, cfg, lin, Proj::Up)?,
            down_proj: load_proj(&vb, cfg, lin, Proj::Down)?,
        })
    }
    /// The input of down_proj: silu(gate(x)) * up(x).
    pub fn hidden(&self, x: &Tensor) -> Result<Tensor> {
        self.hidden_prefetch(x, &L2Prefetch::none())
    }
    /// [`Mlp::hidden`], pulling `down_hint` (down_proj's weights) into L2 on the way.
    fn hidden_prefetch(&self, x: &Tensor, down_hint: &L2Prefetch) -> Result<Tensor> {
        let gu = crate::linear::forward_shared(&[&self.gate_proj, &self.up_proj], x, down_hint)?;
        super::layers::silu_mul(&gu[0], &gu[1], down_hint)
    }
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.down_proj.forward(&self.hidden(x)?)
    }
}

/// The L2 prefetch hints of one block: each names the weights of the GEMV that the kernels
/// holding the hint precede (all empty outside few-token CUDA forwards).
#[derive(Debug, Clone, Copy, Default)]
pub struct BlockHints {
    qkv: L2Prefetch,
    o: L2Prefetch,
    gate_up: L2Prefetch,
    down: L2Prefetch,
    next: L2Prefetch,
}

/// Whether `x` (`[..., hidden]`) is a decode-sized batch on a GPU, where L2 hints pay.
fn few_tokens_on_gpu(x: &Tensor) -> bool {
    let h = x.dims().last().copied().unwrap_or(1).max(1);
    x.device().is_cuda() && x.elem_count() / h <= prefetch::HINT_MAX_TOKENS && prefetch::budget() > 0
}

/// What a block's forward pass takes besides its input: what every block of the pass shares,
/// and the block's own L2 prefetch hints.
#[derive(Clone, Copy)]
pub struct BlockContext<'a> {
    pub rope: &'a Rope,
    pub offset: usize,
    pub mask: Option<&'a Tensor>,
    /// For the CUDA-graph decode step: the token's position as a u32 on the device (then
    /// `offset` is unused and the cache buffers are written at that position).
    pub step: Option<&'a Tensor>,
    /// The block's L2 prefetch hints (empty unless set for a few-token CUDA step).
    pub hints: BlockHints,
}

impl<'a> BlockContext<'a> {
    /// A context without hints.
    pub fn new(rope: &'a Rope, offset: usize, mask: Option<&'a Tensor>, step: Option<&'a Tensor>) -> Self {
        Self { rope, offset, mask, step, hints: BlockHints::default() }
    }

    /// The same context carrying `hints`.
    fn with_hints(&self, hints: BlockHints) -> Self {
        Self { hints, ..*self }
    }
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
        let ctx = if few_tokens_on_gpu(x) { ctx.with_hints(self.prefetch_hints(self.qkv_hint(), L2Prefetch::none())) } else { *ctx };
        let (x, delta) = self.forward_split(x, None, &ctx, cache, capture)?;
        x + delta
    }

    /// The block on the input `x + delta` (the previous block's residual and its unadded MLP
    /// output, so the add runs fused with this block's first norm), returning its own residual
    /// stream and MLP output unadded. `ctx.hints` (for a few tokens on CUDA, else empty): every
    /// kernel before a GEMV pulls that GEMV's weights into L2, and the last GEMV pulls in `next`
    /// (the next block's q/k/v or the lm_head), see [`crate::cuda::prefetch`].
    fn forward_split(
        &self,
        x: &Tensor,
        delta: Option<&Tensor>,
        ctx: &BlockContext,
        cache: Option<(&mut KvCache, usize)>,
        capture: Option<&mut LinearInputs>,
    ) -> Result<(Tensor, Tensor)> {
        self.forward_split_with(x, delta, &ctx.hints, |normed| self.self_attn.attend(normed, ctx, cache), capture)
    }

    /// [`Block::forward_split`] with the attention (input_layernorm's output in, the attention
    /// output before o_proj out) given by `attend`: the paged batch step brings its own.
    pub(super) fn forward_split_with(
        &self,
        x: &Tensor,
        delta: Option<&Tensor>,
        hints: &BlockHints,
        attend: impl FnOnce(&Tensor) -> Result<Tensor>,
        capture: Option<&mut LinearInputs>,
    ) -> Result<(Tensor, Tensor)> {
        let (x, normed) = self.input_layernorm.forward_residual(x, delta, &hints.qkv)?;
        let attn = attend(&normed)?;
        let o = crate::linear::forward_hinted(&self.self_attn.o_proj, &attn, &hints.gate_up)?;
        let (x, normed2) = self.post_attention_layernorm.forward_residual(&x, Some(&o), &hints.gate_up)?;
        let hidden = self.mlp.hidden_prefetch(&normed2, &hints.down)?;
        let down = crate::linear::forward_hinted(&self.mlp.down_proj, &hidden, &hints.next)?;
        if let Some(c) = capture {
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
        crate::linear::prefetch_hint(&[&a.q_proj, &a.k_proj, &a.v_proj])
    }

    /// The block's hints, given its own q/k/v hint (built once, as the previous block's `next`)
    /// and `next`.
    fn prefetch_hints(&self, qkv: L2Prefetch, next: L2Prefetch) -> BlockHints {
        let (a, m) = (&self.self_attn, &self.mlp);
        BlockHints {
            qkv,
            o: crate::linear::prefetch_hint(&[&a.o_proj]),
            gate_up: crate::linear::prefetch_hint(&[&m.gate_proj, &m.up_proj]),
            down: crate::linear::prefetch_hint(&[&m.down_proj]),
            next,
        }
    }

    /// Every linear layer of the block with its HF name relative to the block, in
    /// [`Proj::ALL`] order.
    pub fn linears(&self) -> [(&'static str, &Linear); 7] {
        Proj::ALL.map(|p| (p.hf_name(), self.linear(p)))
    }

    /// The linear layer `p`.
    pub fn linear(&self, p: Proj) -> &Linear {
        let (a, m) = (&self.self_attn, &self.mlp);
        match p {
            Proj::Q => &a.q_proj,
            Proj::K => &a.k_proj,
            Proj::V => &a.v_proj,
            Proj::O => &a.o_proj,
            Proj::Gate => &m.gate_proj,
            Proj::Up => &m.up_proj,
            Proj::Down => &m.down_proj,
        }
    }

    /// The linear layer `p`, to replace it.
    pub fn linear_mut(&mut self, p: Proj) -> &mut Linear {
        let (a, m) = (&mut self.self_attn, &mut self.mlp);
        match p {
            Proj::Q => &mut a.q_proj,
            Proj::K => &mut a.k_proj,
            Proj::V => &mut a.v_proj,
            Proj::O => &mut a.o_proj,
            Proj::Gate => &mut m.gate_proj,
            Proj::Up => &mut m.up_proj,
            Proj::Down => &mut m.down_proj,
        }
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

    /// As [`Model::load`]; with `half_tables` (4-bit models on the CPU) the embedding table stays
    /// in f16 whatever the activation dtype and the lm_head is f16 too (see
    /// [`crate::linear::HalfLinear`]) or 8-bit, as [`crate::quant::cpu::default_head`] says.
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
        let lm_head = if half_tables && crate::quant::cpu::default_head() == crate::quant::cpu::HeadFormat::Int8 {
            crate::linear::Int8Linear::new(&head_weight, None)?.into_linear()
        } else if half_tables {
            HalfLinear::new(head_weight, None)?.into_linear()
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

    /// A KV cache for up to `capacity` tokens (capped at the model's context), storing keys and
    /// values in the default dtype for this model ([`KvPool::resolve_dtype`]: f16 under f32
    /// activations on the CPU, else the activation dtype).
    pub fn new_cache(&self, capacity: usize) -> Cache {
        let store = KvPool::resolve_dtype(None, self.dtype, &self.device).unwrap_or(self.dtype);
        Cache::with_dtype(self.layers.len(), capacity.min(self.context_len()), Some(store))
    }
    /// As [`Model::new_cache`], storing `kv` (None: the default); the dtypes
    /// [`KvPool::resolve_dtype`] refuses are refused here too.
    pub fn new_cache_with(&self, capacity: usize, kv: Option<DType>) -> Result<Cache> {
        let store = KvPool::resolve_dtype(kv, self.dtype, &self.device)?;
        Ok(Cache::with_dtype(self.layers.len(), capacity.min(self.context_len()), Some(store)))
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
        let ctx = BlockContext::new(&self.rope, offset, mask.as_ref(), None);
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
                (true, None) => crate::linear::prefetch_hint(&[&self.lm_head]),
            };
            let block_ctx = if hints { ctx.with_hints(block.prefetch_hints(qkv, next)) } else { *ctx };
            let layer_cache = kv.as_mut().and_then(|layers| layers.next()).map(|c| (c, cap));
            let (nx, d) = block.forward_split(&x, delta.as_ref(), &block_ctx, layer_cache, None)?;
            x = nx;
            delta = Some(d);
            qkv = next;
        }
        Ok((x, delta))
    }

    /// Runs `f` on the CPU thread pool. A forward pass issues hundreds of small parallel ops;
    /// started from a worker thread each one runs at once, while from outside the pool every op
    /// would wait for a sleeping worker to wake up (that doubled decode time on 2 cores).
    pub(super) fn on_pool<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
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
        let ctx = BlockContext::new(&self.rope, 0, None, Some(pos));
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
        if let [1, n] = *tokens.dims() {
            if (1..=super::host_step::HOST_CHUNK_MAX).contains(&n) && super::host_step::applies(self) {
                let ids = tokens.flatten_all()?.to_dtype(DType::U32)?.to_vec1::<u32>()?;
                let pos = cache.len();
                let logits = self.on_pool(|| self.host_step(&ids, &[n], super::host_step::KvTarget::Contiguous { cache: &mut *cache, pos }))?;
                for layer in cache.layers.iter_mut() {
                    layer.advance(n);
                }
                return Ok(logits);
            }
        }
        self.on_pool(|| {
            let x = self.hidden_states(tokens, Some(cache))?;
            let last = x.narrow(1, x.dim(1)? - 1, 1)?;
            self.head(&last)?.squeeze(1)
        })
    }

    /// Readies a CUDA model for serving: loads (JIT-compiles) every kernel module its forward
    /// passes can use and runs an 8-token prompt and one decode step through a throwaway cache,
    /// so that the first requests wait for neither the driver nor cuBLAS's set-up. Returns how
    /// long that took; nothing to do (zero) on other devices.
    pub fn warm_up(&self) -> Result<std::time::Duration> {
        let start = std::time::Instant::now();
        #[cfg(feature = "cuda")]
        if let candle_core::Device::Cuda(dev) = &self.device {
            super::cuda::preload_kernels(dev)?;
            let mut cache = self.new_cache(16);
            self.forward(&Tensor::zeros((1, 8), DType::U32, &self.device)?, &mut cache)?;
            self.forward(&Tensor::zeros((1, 1), DType::U32, &self.device)?, &mut cache)?;
            self.device.synchronize()?;
        }
        Ok(start.elapsed())
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

    /// Replaces every decoder linear with `f(layer)` (e.g. re-quantized to another format).
    pub fn map_linears<E>(&mut self, mut f: impl FnMut(&Linear) -> std::result::Result<Linear, E>) -> std::result::Result<(), E> {
        for block in self.layers.iter_mut() {
            for p in Proj::ALL {
                let l = block.linear_mut(p);
                *l = f(l)?;
            }
        }
        Ok(())
    }
}
