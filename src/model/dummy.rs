//! Random models of real shapes without any checkpoint (like vLLM's dummy load format), for
//! speed work: full precision, or 4-bit with random codes.
use super::config::{Config, RopeScaling};
use super::llama::{load_dense, Model};
use crate::error::{Error, Result};
use crate::linear::{Linear, QuantLinear};
use crate::quant::{QuantScheme, QuantizedWeight, WeightShape};
use crate::rng::Rng;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

pub const PRESETS: &[&str] = &["llama-2-7b", "llama-3-8b", "qwen2.5-7b", "smollm2-135m", "tinyllama-1.1b"];

/// The configuration of a known model shape.
pub fn preset(name: &str) -> Result<Config> {
    let (arch, h, i, l, heads, kv, vocab, theta, max_pos, tie) = match name {
        "llama-2-7b" => ("LlamaForCausalLM", 4096, 11008, 32, 32, 32, 32000, 10_000.0, 4096, false),
        "llama-3-8b" => ("LlamaForCausalLM", 4096, 14336, 32, 32, 8, 128_256, 500_000.0, 8192, false),
        "qwen2.5-7b" => ("Qwen2ForCausalLM", 3584, 18944, 28, 28, 4, 152_064, 1_000_000.0, 32768, false),
        "smollm2-135m" => ("LlamaForCausalLM", 576, 1536, 30, 9, 3, 49152, 100_000.0, 8192, true),
        // TinyLlama-1.1B: a CPU model too big for the caches, the memory-bound comparison point.
        "tinyllama-1.1b" => ("LlamaForCausalLM", 2048, 5632, 22, 32, 4, 32000, 10_000.0, 2048, false),
        other => return Err(Error::msg(format!("--config {other}: known shapes are {}", PRESETS.join(", ")))),
    };
    let rope_scaling = (name == "llama-3-8b").then(|| RopeScaling {
        rope_type: "llama3".into(),
        factor: Some(8.0),
        low_freq_factor: Some(1.0),
        high_freq_factor: Some(4.0),
        original_max_position_embeddings: Some(8192),
    });
    let v = serde_json::json!({
        "architectures": [arch], "hidden_size": h, "intermediate_size": i, "num_hidden_layers": l,
        "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab, "rope_theta": theta,
        "max_position_embeddings": max_pos, "tie_word_embeddings": tie, "rms_norm_eps": 1e-5,
    });
    let mut cfg: Config = serde_json::from_value(v).map_err(|e| Error::msg(e.to_string()))?;
    cfg.rope_scaling = rope_scaling;
    Ok(cfg)
}

/// Random tensors for every name: norms are ones, everything else small noise.
struct RandomBackend {
    tie: bool,
}

impl SimpleBackend for RandomBackend {
    fn get(&self, s: Shape, name: &str, _h: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        if name.ends_with("norm.weight") {
            return Tensor::ones(s, dtype, dev);
        }
        Tensor::randn(0f32, 0.02, s, dev)?.to_dtype(dtype)
    }
    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("dummy weights: {name} has no shape")
    }
    fn contains_tensor(&self, name: &str) -> bool {
        !(self.tie && name == "lm_head.weight")
    }
}

/// A var builder of random weights of `cfg`'s shape (what the AWQ pass reads a checkpoint through).
pub fn dummy_var_builder(cfg: &Config, dtype: DType, device: &Device) -> VarBuilder<'static> {
    VarBuilder::from_backend(Box::new(RandomBackend { tie: cfg.tie_word_embeddings }), dtype, device.clone())
}

/// A 4-bit linear with random codes (group size `g`), zero points 8 and scales 0.002: weights of
/// the size real checkpoints have, so activations stay finite through any number of layers.
fn random_q4(out_f: usize, in_f: usize, g: usize, bias: Option<Tensor>, dtype: DType, dev: &Device, seed: u64) -> candle_core::Result<Linear> {
    let shape = WeightShape::new(out_f, in_f, g);
    let mut rng = Rng::new(seed);
    // Sixteen codes per draw: a 7B model has 6.5 billion of them.
    let mut codes = vec![0u8; out_f * in_f];
    for chunk in codes.chunks_mut(16) {
        let r = rng.next_u64();
        for (j, c) in chunk.iter_mut().enumerate() {
            *c = ((r >> (4 * j)) & 0xF) as u8;
        }
    }
    let q = QuantizedWeight { bits: 4, shape, codes, zeros: vec![8; out_f * shape.groups()], scales: vec![0.002; out_f * shape.groups()] };
    Ok(QuantLinear::new(q, bias, dtype, dev)?.into_linear())
}

/// A random model of `cfg`'s shape; `w4` makes every decoder linear 4-bit with group size `g`.
pub fn dummy_model(cfg: &Config, w4: bool, g: usize, dtype: DType, device: &Device) -> Result<Model> {
    // Every decoder linear reads hidden_size or intermediate_size columns, in whole groups: the
    // quantizer's own check, for one layer of each width.
    if w4 {
        if g == 0 {
            return Err(Error::msg("--group-size 0: dummy 4-bit layers need groups (32, 64 or 128 columns)"));
        }
        let scheme = QuantScheme::new(4, g)?;
        for (name, width) in [("self_attn.q_proj", cfg.hidden_size), ("mlp.down_proj", cfg.intermediate_size)] {
            scheme.check_layer(name, width).map_err(|e| Error::msg(format!("--group-size {g}: {e}")))?;
        }
    }
    let vb = dummy_var_builder(cfg, dtype, device);
    let counter = std::sync::atomic::AtomicU64::new(1);
    let loader = |vb: VarBuilder, i: usize, o: usize, b: bool| -> candle_core::Result<Linear> {
        if !w4 {
            return load_dense(vb, i, o, b);
        }
        let bias = if b { Some(vb.get(o, "bias")?) } else { None };
        random_q4(o, i, g, bias, dtype, vb.device(), counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
    };
    // As for real AWQ checkpoints on the CPU: embeddings and lm_head stay f16 (see `ModelAssets::load_model`).
    let half_tables = w4 && device.is_cpu() && dtype == DType::F32;
    Ok(Model::load_with(vb, cfg, &loader, half_tables)?)
}
