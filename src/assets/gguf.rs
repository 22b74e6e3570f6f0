//! Reading llama.cpp GGUF files: the config, the tensors under their HF names (q/k rows
//! un-permuted back to the rotate-half layout), the tokenizer and the chat template.
use crate::error::{Error, Result};
use crate::model::{Arch, Config};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// Everything an HF-layout directory holds, taken from one GGUF file.
pub struct GgufModel {
    pub config: Config,
    /// f32 tensors on the CPU under HF names (`model.layers.0.self_attn.q_proj.weight`, ...).
    pub tensors: HashMap<String, Tensor>,
    pub tokenizer_json: serde_json::Value,
    pub tokenizer_config: serde_json::Value,
    pub generation_config: serde_json::Value,
}

/// GGUF metadata keys of recommended sampling settings and the generation_config.json fields
/// they become.
const SAMPLING_KEYS: &[(&str, &str)] = &[
    ("general.sampling.temp", "temperature"),
    ("general.sampling.top_k", "top_k"),
    ("general.sampling.top_p", "top_p"),
    ("general.sampling.min_p", "min_p"),
    ("general.sampling.penalty_repeat", "repetition_penalty"),
];

struct Meta<'a> {
    path: &'a Path,
    md: &'a HashMap<String, Value>,
}

impl Meta<'_> {
    fn get(&self, key: &str) -> Result<&Value> {
        self.md
            .get(key)
            .ok_or_else(|| Error::msg(format!("{}: GGUF metadata key {key} is missing", self.path.display())))
    }
    fn usize(&self, key: &str) -> Result<usize> {
        let v = self.get(key)?;
        v.to_u64()
            .or_else(|_| v.to_u32().map(u64::from))
            .or_else(|_| v.to_i32().map(|x| x as u64))
            .map(|x| x as usize)
            .map_err(|e| Error::msg(format!("{}: GGUF key {key}: {e}", self.path.display())))
    }
    fn f64(&self, key: &str) -> Result<f64> {
        let v = self.get(key)?;
        v.to_f32()
            .map(f64::from)
            .or_else(|_| v.to_f64())
            .map_err(|e| Error::msg(format!("{}: GGUF key {key}: {e}", self.path.display())))
    }
    /// A number of any GGUF width, or `None` where the key is missing or not a number.
    fn number(&self, key: &str) -> Option<f64> {
        let v = self.md.get(key)?;
        v.to_f32()
            .map(f64::from)
            .or_else(|_| v.to_f64())
            .or_else(|_| v.to_u32().map(f64::from))
            .or_else(|_| v.to_i32().map(f64::from))
            .or_else(|_| v.to_u64().map(|x| x as f64))
            .or_else(|_| v.to_i64().map(|x| x as f64))
            .ok()
    }
    fn string(&self, key: &str) -> Option<String> {
        self.md.get(key).and_then(|v| v.to_string().ok().cloned())
    }
    fn strings(&self, key: &str) -> Result<Vec<String>> {
        let v = self.get(key)?.to_vec().map_err(|e| Error::msg(format!("{}: {key}: {e}", self.path.display())))?;
        v.iter()
            .map(|x| x.to_string().cloned())
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| Error::msg(format!("{}: {key}: {e}", self.path.display())))
    }
    fn ints(&self, key: &str) -> Result<Vec<i64>> {
        let v = self.get(key)?.to_vec().map_err(|e| Error::msg(format!("{}: {key}: {e}", self.path.display())))?;
        v.iter()
            .map(|x| x.to_i32().map(i64::from).or_else(|_| x.to_u32().map(i64::from)).or_else(|_| x.to_i64()))
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| Error::msg(format!("{}: {key}: {e}", self.path.display())))
    }
    fn opt_u32(&self, key: &str) -> Option<u32> {
        self.md.get(key).and_then(|v| v.to_u32().ok())
    }
}

/// Maps a GGUF tensor name to its HF name.
fn hf_name(gguf: &str) -> Option<String> {
    let direct = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(d) = direct {
        return Some(d.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (idx, rest) = rest.split_once('.')?;
    let (module, suffix) = rest.rsplit_once('.')?;
    let hf = match module {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{idx}.{hf}.{suffix}"))
}

/// Undoes llama.cpp's interleaved-rope row permutation of q/k weights (or biases): per head, the
/// rows are viewed as `[head_dim/2, 2]` and transposed back to `[2, head_dim/2]`.
pub fn unpermute_rows(t: &Tensor, n_heads: usize) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    let hd = rows / n_heads;
    let rest: usize = dims[1..].iter().product();
    let r = t.reshape((n_heads, hd / 2, 2, rest))?.transpose(1, 2)?.contiguous()?;
    Ok(r.reshape(dims)?)
}

/// The inverse of [`unpermute_rows`] (HF layout to llama.cpp's), used by tests that write GGUFs.
pub fn permute_rows(t: &Tensor, n_heads: usize) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let hd = dims[0] / n_heads;
    let rest: usize = dims[1..].iter().product();
    let r = t.reshape((n_heads, 2, hd / 2, rest))?.transpose(1, 2)?.contiguous()?;
    Ok(r.reshape(dims)?)
}

fn arch_of(name: &str, path: &Path) -> Result<Arch> {
    match name {
        "llama" => Ok(Arch::Llama),
        "mistral" => Ok(Arch::Mistral),
        "qwen2" => Ok(Arch::Qwen2),
        "qwen3" => Ok(Arch::Qwen3),
        other => Err(Error::Config(format!(
            "{}: unsupported GGUF architecture {other:?}; supported: llama, mistral, qwen2, qwen3",
            path.display()
        ))),
    }
}

/// Reads a GGUF file completely (tensors dequantized to f32).
pub fn read(path: &Path) -> Result<GgufModel> {
    let mut f = std::io::BufReader::new(std::fs::File::open(path).map_err(|e| Error::io(path, e))?);
    read_from(&mut f, path)
}

/// [`read`] from any reader (`path` names it in errors): the fuzz targets feed bytes.
pub fn read_from<R: std::io::Read + std::io::Seek>(f: &mut R, path: &Path) -> Result<GgufModel> {
    let content = Content::read(f).map_err(|e| Error::msg(format!("{}: not a readable GGUF file: {e}", path.display())))?;
    let meta = Meta { path, md: &content.metadata };
    let arch_name = meta.string("general.architecture").unwrap_or_default();
    let arch = arch_of(&arch_name, path)?;
    let p = |k: &str| format!("{arch_name}.{k}");
    let tokens = meta.strings("tokenizer.ggml.tokens")?;
    let n_heads = meta.usize(&p("attention.head_count"))?;
    let n_kv = meta.usize(&p("attention.head_count_kv")).unwrap_or(n_heads);
    let hidden = meta.usize(&p("embedding_length"))?;
    let head_dim = meta.usize(&p("attention.key_length")).ok();
    let has_output = content.tensor_infos.contains_key("output.weight");
    let bos = meta.opt_u32("tokenizer.ggml.bos_token_id");
    let eos = meta.opt_u32("tokenizer.ggml.eos_token_id");
    let config = Config {
        architectures: vec![arch.hf_class().to_string()],
        model_type: Some(arch.model_type().to_string()),
        hidden_size: hidden,
        intermediate_size: meta.usize(&p("feed_forward_length"))?,
        num_hidden_layers: meta.usize(&p("block_count"))?,
        num_attention_heads: n_heads,
        num_key_value_heads: Some(n_kv),
        head_dim: head_dim.filter(|&d| d != hidden / n_heads),
        vocab_size: meta.usize(&p("vocab_size")).unwrap_or(tokens.len()),
        rms_norm_eps: meta.f64(&p("attention.layer_norm_rms_epsilon")).unwrap_or(1e-6),
        rope_theta: meta.f64(&p("rope.freq_base")).unwrap_or(10_000.0),
        rope_scaling: None,
        max_position_embeddings: meta.usize(&p("context_length")).unwrap_or(4096),
        tie_word_embeddings: !has_output,
        attention_bias: None,
        mlp_bias: None,
        sliding_window: None,
        bos_token_id: bos.map(crate::model::config::TokenIds::One),
        eos_token_id: eos.map(crate::model::config::TokenIds::One),
        hidden_act: Some("silu".into()),
        torch_dtype: Some("float32".into()),
        quantization_config: None,
    };
    config.validate().map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
    if content.tensor_infos.contains_key("rope_freqs.weight") {
        return Err(Error::Config(format!(
            "{}: carries a rope_freqs tensor (llama3-style rope scaling), which GGUF import does not map yet; \
             load the HF checkpoint instead",
            path.display()
        )));
    }

    let mut tensors = HashMap::new();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    for name in names {
        let Some(hf) = hf_name(name) else {
            return Err(Error::msg(format!("{}: unexpected tensor {name}", path.display())));
        };
        // candle multiplies the dims unchecked, and reads an empty tensor through a misaligned
        // pointer (undefined behaviour): both found by the gguf fuzz target.
        let dims = content.tensor_infos[name].shape.dims();
        if dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d)).is_none_or(|n| n == 0 || n > isize::MAX as usize / 4) {
            return Err(Error::msg(format!("{}: tensor {name} has an impossible shape {dims:?}", path.display())));
        }
        let q = content
            .tensor(f, name, &Device::Cpu)
            .map_err(|e| Error::msg(format!("{}: tensor {name}: {e}", path.display())))?;
        let mut t = q.dequantize(&Device::Cpu)?;
        // llama.cpp's converter permutes q/k only for the llama architecture (mistral GGUFs are
        // "llama" too); qwen2/qwen3 use NEOX rope and keep the HF layout.
        if arch_name == "llama" {
            if name.contains(".attn_q.") {
                t = unpermute_rows(&t, n_heads)?;
            } else if name.contains(".attn_k.") {
                t = unpermute_rows(&t, n_kv)?;
            }
        }
        tensors.insert(hf, t);
    }

    let tokenizer_json = super::tokenizer::from_gguf_vocab(
        &meta.string("tokenizer.ggml.model").unwrap_or_default(),
        &meta.string("tokenizer.ggml.pre").unwrap_or_else(|| "default".into()),
        &tokens,
        &meta.ints("tokenizer.ggml.token_type").unwrap_or_default(),
        &meta.strings("tokenizer.ggml.merges").unwrap_or_default(),
    )
    .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
    let tok = |id: Option<u32>| id.and_then(|i| tokens.get(i as usize).cloned());
    let mut tokenizer_config = serde_json::json!({
        "add_bos_token": content.metadata.get("tokenizer.ggml.add_bos_token").and_then(|v| v.to_bool().ok()).unwrap_or(false),
        "add_eos_token": false,
        "bos_token": tok(bos),
        "eos_token": tok(eos),
        "unk_token": tok(meta.opt_u32("tokenizer.ggml.unknown_token_id")),
        "pad_token": tok(meta.opt_u32("tokenizer.ggml.padding_token_id")),
        "model_max_length": config.max_position_embeddings,
        "clean_up_tokenization_spaces": false,
        "tokenizer_class": "PreTrainedTokenizerFast",
    });
    if let Some(t) = meta.string("tokenizer.chat_template") {
        tokenizer_config["chat_template"] = t.into();
    }
    let mut generation_config = serde_json::json!({});
    if let Some(b) = bos {
        generation_config["bos_token_id"] = b.into();
    }
    if let Some(e) = eos {
        generation_config["eos_token_id"] = e.into();
    }
    if let Some(p) = meta.opt_u32("tokenizer.ggml.padding_token_id") {
        generation_config["pad_token_id"] = p.into();
    }
    // The authors' recommended sampling settings, where the file carries them (llama.cpp's keys).
    for (key, field) in SAMPLING_KEYS {
        if let Some(v) = meta.number(key) {
            // f32 in the file: 0.95 would read back as 0.949999988.
            generation_config[*field] = if *field == "top_k" { serde_json::json!(v as u64) } else { serde_json::json!((v * 1e6).round() / 1e6) };
        }
    }
    Ok(GgufModel { config, tensors, tokenizer_json, tokenizer_config, generation_config })
}
