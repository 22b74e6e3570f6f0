//! Building blocks of the LLaMA-family decoder: RMS norm, rotary embedding, KV cache.
use super::config::Config;
use crate::cuda::L2Prefetch;
use candle_core::{DType, Device, Result, Tensor};

/// RMS norm with a public weight, so the AWQ pass can fold scales into it.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
}

impl RmsNorm {
    pub fn load(vb: candle_nn::VarBuilder, size: usize, eps: f64) -> Result<Self> {
        Ok(Self { weight: vb.get(size, "weight")?, eps })
    }
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        candle_nn::ops::rms_norm(x, &self.weight, self.eps as f32)
    }
    /// `(x + delta, norm(x + delta))` (`(x, norm(x))` without `delta`): the residual add and the
    /// norm after it, one kernel on CUDA that also pulls `prefetch` (the next GEMV's weights) into L2.
    pub fn forward_residual(&self, x: &Tensor, delta: Option<&Tensor>, prefetch: &L2Prefetch) -> Result<(Tensor, Tensor)> {
        #[cfg(feature = "cuda")]
        if super::cuda::add_rms_norm_applies(x, delta, &self.weight) {
            return super::cuda::add_rms_norm(x, delta, &self.weight, self.eps as f32, prefetch);
        }
        let _ = prefetch;
        let sum = match delta {
            Some(d) => (x + d)?,
            None => x.clone(),
        };
        let normed = self.forward(&sum)?;
        Ok((sum, normed))
    }
}

/// cos / sin tables of the (rotate-half, HF layout) rotary embedding for every position.
#[derive(Debug, Clone)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// Inverse frequencies, with llama3-style scaling when the config asks for it.
    pub fn inv_freqs(cfg: &Config) -> Vec<f64> {
        let hd = cfg.head_dim();
        let base: Vec<f64> = (0..hd / 2).map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f64 / hd as f64)).collect();
        let Some(rs) = cfg.rope_scaling.as_ref().filter(|r| r.rope_type == "llama3") else {
            return base;
        };
        let factor = rs.factor.unwrap_or(8.0);
        let low = rs.low_freq_factor.unwrap_or(1.0);
        let high = rs.high_freq_factor.unwrap_or(4.0);
        let orig = rs.original_max_position_embeddings.unwrap_or(8192) as f64;
        let (low_wavelen, high_wavelen) = (orig / low, orig / high);
        base.into_iter()
            .map(|f| {
                let wavelen = 2.0 * std::f64::consts::PI / f;
                if wavelen < high_wavelen {
                    f
                } else if wavelen > low_wavelen {
                    f / factor
                } else {
                    let smooth = (orig / wavelen - low) / (high - low);
                    (1.0 - smooth) * f / factor + smooth * f
                }
            })
            .collect()
    }

    pub fn new(cfg: &Config, max_len: usize, dtype: DType, dev: &Device) -> Result<Self> {
        let inv = Self::inv_freqs(cfg);
        let half = inv.len();
        let mut cos = Vec::with_capacity(max_len * half);
        let mut sin = Vec::with_capacity(max_len * half);
        for p in 0..max_len {
            for f in &inv {
                let a = p as f64 * f;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (max_len, half), dev)?.to_dtype(dtype)?,
            sin: Tensor::from_vec(sin, (max_len, half), dev)?.to_dtype(dtype)?,
        })
    }

    pub fn max_len(&self) -> usize {
        self.cos.dim(0).unwrap_or(0)
    }
    /// `[positions, head_dim / 2]` tables, in the model dtype.
    pub fn cos(&self) -> &Tensor {
        &self.cos
    }
    pub fn sin(&self) -> &Tensor {
        &self.sin
    }

    /// `x` is `[b, heads, seq, head_dim]`, starting at position `offset`.
    pub fn apply(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
        let seq = x.dim(2)?;
        if offset + seq > self.max_len() {
            candle_core::bail!(
                "position {} is beyond the model's context of {} tokens",
                offset + seq,
                self.max_len()
            );
        }
        let cos = self.cos.narrow(0, offset, seq)?;
        let sin = self.sin.narrow(0, offset, seq)?;
        candle_nn::rotary_emb::rope(&x.contiguous()?, &cos, &sin)
    }
}

/// A per-layer KV cache, `[b, kv_heads, allocated, head_dim]`, written in place. The buffer grows
/// in steps (doubling, up to the capacity) so memory follows the tokens actually cached, not the
/// model's whole context. Unlike candle-nn's it can be truncated, so a chat keeps the prefix it
/// shares with the next turn. It may store another dtype than the keys and values it is given
/// (f16 under f32 activations on the CPU: see [`Cache::with_dtype`]); [`KvCache::append`] then
/// converts on the way in and out, and the host step reads the stored rows as they are.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    k: Option<Tensor>,
    v: Option<Tensor>,
    len: usize,
    /// The buffers' dtype; None: the dtype of the first keys written.
    store: Option<DType>,
}

/// The first allocation, in tokens.
const KV_MIN_ALLOC: usize = 256;

impl KvCache {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }
    /// Positions the buffers hold (cached or not).
    pub fn allocated(&self) -> usize {
        self.k.as_ref().and_then(|k| k.dim(2).ok()).unwrap_or(0)
    }
    /// Makes room for `need` tokens in buffers of `[b, heads, _, head_dim]` (for writers that
    /// have no tensors to take the shape from: the host decode step), keeping what is cached;
    /// the buffers are in the cache's storage dtype, or `dtype` where it has none.
    pub fn reserve_shape(&mut self, (b, heads, head_dim): (usize, usize, usize), dtype: DType, dev: &Device, need: usize, capacity: usize) -> Result<()> {
        if need > capacity {
            candle_core::bail!("the KV cache holds {capacity} tokens and {need} were asked for");
        }
        let like = Tensor::zeros((b, heads, 1, head_dim), self.store.unwrap_or(dtype), dev)?;
        self.reserve(&like, &like, need, capacity)
    }
    /// Makes room for `need` tokens, keeping what is cached.
    fn reserve(&mut self, like_k: &Tensor, like_v: &Tensor, need: usize, capacity: usize) -> Result<()> {
        let same_batch = self.k.as_ref().is_some_and(|c| c.dim(0).ok() == like_k.dim(0).ok());
        if same_batch && need <= self.allocated() {
            return Ok(());
        }
        let alloc = need.max(2 * self.allocated()).max(KV_MIN_ALLOC).min(capacity);
        let fresh = |t: &Tensor| -> Result<Tensor> {
            let (b, h, _, d) = t.dims4()?;
            Tensor::zeros((b, h, alloc, d), t.dtype(), t.device())
        };
        let (nk, nv) = (fresh(like_k)?, fresh(like_v)?);
        if same_batch && self.len > 0 {
            let (ok, ov) = (self.k.as_ref().unwrap(), self.v.as_ref().unwrap());
            nk.slice_set(&ok.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
            nv.slice_set(&ov.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
        } else {
            self.len = 0;
        }
        self.k = Some(nk);
        self.v = Some(nv);
        Ok(())
    }
    /// Allocates the buffers to `capacity` tokens (keeping what is cached); they need to exist
    /// already (after a first forward pass), since their shape comes from the model.
    pub fn reserve_capacity(&mut self, capacity: usize) -> Result<()> {
        let (Some(k), Some(v)) = (self.k.clone(), self.v.clone()) else {
            candle_core::bail!("the KV cache has no buffers yet")
        };
        self.reserve(&k, &v, capacity, capacity)
    }
    /// The whole K and V buffers `[b, kv_heads, allocated, head_dim]`.
    pub fn buffers(&self) -> Option<(&Tensor, &Tensor)> {
        Some((self.k.as_ref()?, self.v.as_ref()?))
    }
    /// Counts `n` tokens written into the buffers by someone else (a CUDA graph's kernels).
    pub fn advance(&mut self, n: usize) {
        self.len = (self.len + n).min(self.allocated());
    }
    /// Appends `k`, `v` (`[b, kv_heads, seq, head_dim]`) and returns everything cached: views of
    /// the buffers, or copies in `k`'s dtype where the cache stores another.
    pub fn append(&mut self, k: &Tensor, v: &Tensor, capacity: usize) -> Result<(Tensor, Tensor)> {
        let seq = k.dim(2)?;
        if self.len + seq > capacity {
            candle_core::bail!(
                "the KV cache holds {capacity} tokens and {} were asked for",
                self.len + seq
            );
        }
        let (act, store) = (k.dtype(), self.store.unwrap_or(k.dtype()));
        let (k, v) = (k.to_dtype(store)?, v.to_dtype(store)?);
        self.reserve(&k, &v, self.len + seq, capacity)?;
        let (kc, vc) = (self.k.as_ref().unwrap(), self.v.as_ref().unwrap());
        kc.slice_set(&k.contiguous()?, 2, self.len)?;
        vc.slice_set(&v.contiguous()?, 2, self.len)?;
        self.len += seq;
        let (kc, vc) = (kc.narrow(2, 0, self.len)?, vc.narrow(2, 0, self.len)?);
        if store == act {
            return Ok((kc, vc));
        }
        Ok((kc.to_dtype(act)?, vc.to_dtype(act)?))
    }
}

/// The KV caches of all layers, with the capacity they were made for.
#[derive(Debug, Clone)]
pub struct Cache {
    pub layers: Vec<KvCache>,
    pub capacity: usize,
    /// The captured decode step replayed for this cache's buffers (CUDA).
    #[cfg(feature = "cuda")]
    pub(crate) graph: super::graph::GraphState,
}

impl Cache {
    /// Caches that store keys and values in the dtype they are given.
    pub fn new(n_layers: usize, capacity: usize) -> Self {
        Self::with_dtype(n_layers, capacity, None)
    }
    /// Caches that store keys and values in `store` (None: the dtype they are given). The CPU
    /// model's caches store f16 under f32 activations by default, as the server's paged cache
    /// does (`Model::new_cache`).
    pub fn with_dtype(n_layers: usize, capacity: usize, store: Option<DType>) -> Self {
        Self {
            layers: vec![KvCache { store, ..KvCache::default() }; n_layers],
            capacity,
            #[cfg(feature = "cuda")]
            graph: Default::default(),
        }
    }
    /// The dtype the caches store, where one was set.
    pub fn store_dtype(&self) -> Option<DType> {
        self.layers.first().and_then(|l| l.store)
    }
    /// Tokens already in the cache (the position of the next token).
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, |l| l.len())
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn truncate(&mut self, len: usize) {
        self.layers.iter_mut().for_each(|l| l.truncate(len));
    }
    pub fn reset(&mut self) {
        self.truncate(0);
    }
}

/// Additive causal mask `[seq, offset + seq]` (0 or -inf), or `None` for a single query token.
pub fn causal_mask(seq: usize, offset: usize, sliding_window: Option<usize>, dtype: DType, dev: &Device) -> Result<Option<Tensor>> {
    if seq == 1 && sliding_window.is_none_or(|w| offset < w) {
        return Ok(None);
    }
    let m = candle_transformers::utils::build_additive_causal_mask(seq, offset, sliding_window, dev, dtype)?;
    Ok(Some(m.squeeze(0)?.squeeze(0)?))
}

/// Softmax over the last dim in f32, whatever the input dtype (f16 scores overflow easily).
pub fn softmax_f32(x: &Tensor) -> Result<Tensor> {
    let dt = x.dtype();
    let y = candle_nn::ops::softmax_last_dim(&x.to_dtype(DType::F32)?)?;
    y.to_dtype(dt)
}

/// silu(gate) * up: one fused kernel on CUDA (which also pulls `prefetch`, down_proj's weights,
/// into L2) and on the CPU in f32 ([`super::cpu_math`]), tensor ops elsewhere.
pub fn silu_mul(gate: &Tensor, up: &Tensor, prefetch: &L2Prefetch) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if super::cuda::silu_mul_applies(gate, up) {
        return super::cuda::silu_mul(gate, up, prefetch);
    }
    let _ = prefetch;
    if super::cpu_math::silu_mul_applies(gate, up) {
        return super::cpu_math::silu_mul(gate, up);
    }
    gate.silu()? * up
}
