//! The model configuration: a serde mirror of the HF `config.json` fields that the LLaMA family
//! (llama, mistral, qwen2, qwen3) uses.
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The architectures this crate runs. They share one block structure and differ in details.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
}

impl Arch {
    pub const SUPPORTED: &'static [(&'static str, &'static str, Arch)] = &[
        ("LlamaForCausalLM", "llama", Arch::Llama),
        ("MistralForCausalLM", "mistral", Arch::Mistral),
        ("Qwen2ForCausalLM", "qwen2", Arch::Qwen2),
        ("Qwen3ForCausalLM", "qwen3", Arch::Qwen3),
    ];

    pub fn supported_list() -> String {
        Self::SUPPORTED.iter().map(|(a, _, _)| *a).collect::<Vec<_>>().join(", ")
    }
    pub fn hf_class(self) -> &'static str {
        Self::SUPPORTED.iter().find(|(_, _, a)| *a == self).map(|(c, _, _)| *c).unwrap_or("?")
    }
    pub fn model_type(self) -> &'static str {
        Self::SUPPORTED.iter().find(|(_, _, a)| *a == self).map(|(_, t, _)| *t).unwrap_or("?")
    }
}

/// Token ids in HF configs are either one id or a list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(i) => vec![*i],
            TokenIds::Many(v) => v.clone(),
        }
    }
}

/// `rope_scaling` as llama 3.1+ uses it (`rope_type: "llama3"`). Other types are refused at load.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    #[serde(alias = "type")]
    pub rope_type: String,
    #[serde(default)]
    pub factor: Option<f64>,
    #[serde(default)]
    pub low_freq_factor: Option<f64>,
    #[serde(default)]
    pub high_freq_factor: Option<f64>,
    #[serde(default)]
    pub original_max_position_embeddings: Option<usize>,
}

fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_rms_eps() -> f64 {
    1e-6
}
fn default_max_pos() -> usize {
    4096
}

/// The largest head dimension accepted (real models use 64–256).
pub const MAX_HEAD_DIM: usize = 1024;
/// The longest context accepted: the rotary cos/sin tables hold every position (2M positions of
/// head_dim 128 take 1 GiB in f32), so a config.json asking for more is refused, not allocated.
pub const MAX_POSITIONS: usize = 1 << 21;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Config {
    #[serde(default)]
    pub architectures: Vec<String>,
    #[serde(default)]
    pub model_type: Option<String>,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub vocab_size: usize,
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: Option<bool>,
    #[serde(default)]
    pub mlp_bias: Option<bool>,
    #[serde(default)]
    pub sliding_window: Option<usize>,
    #[serde(default)]
    pub bos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub hidden_act: Option<String>,
    #[serde(default)]
    pub torch_dtype: Option<String>,
    /// Kept as raw JSON: `crate::checkpoint` interprets it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization_config: Option<serde_json::Value>,
}

impl Config {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let cfg: Config = crate::error::read_json(path)?;
        cfg.validate().map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        Ok(cfg)
    }

    pub fn arch(&self) -> Result<Arch> {
        for a in &self.architectures {
            if let Some((_, _, arch)) = Arch::SUPPORTED.iter().find(|(c, _, _)| c == a) {
                return Ok(*arch);
            }
        }
        if self.architectures.is_empty() {
            if let Some(mt) = &self.model_type {
                if let Some((_, _, arch)) = Arch::SUPPORTED.iter().find(|(_, t, _)| t == mt) {
                    return Ok(*arch);
                }
            }
        }
        let found = if self.architectures.is_empty() {
            format!("model_type {:?}", self.model_type.as_deref().unwrap_or("(none)"))
        } else {
            format!("architectures {:?}", self.architectures)
        };
        Err(Error::Config(format!(
            "unsupported architecture: {found}; supported: {}",
            Arch::supported_list()
        )))
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        self.arch().map_err(|e| e.to_string())?;
        let nonzero = [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("vocab_size", self.vocab_size),
        ];
        for (k, v) in nonzero {
            if v == 0 {
                return Err(format!("{k} must be positive"));
            }
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.num_kv_heads() == 0 {
            return Err("num_key_value_heads must be positive".into());
        }
        if !self.num_attention_heads.is_multiple_of(self.num_kv_heads()) {
            return Err(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads,
                self.num_kv_heads()
            ));
        }
        if self.head_dim() == 0 || self.head_dim() > MAX_HEAD_DIM {
            return Err(format!("head_dim {} is outside 2..={MAX_HEAD_DIM}", self.head_dim()));
        }
        if self.max_position_embeddings == 0 || self.max_position_embeddings > MAX_POSITIONS {
            return Err(format!(
                "max_position_embeddings {} is outside 1..={MAX_POSITIONS} (the rotary tables are built for every position)",
                self.max_position_embeddings
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(format!("rope_theta {} must be a positive number", self.rope_theta));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0) {
            return Err(format!("rms_norm_eps {} must be a non-negative number", self.rms_norm_eps));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(format!("head_dim {} must be even for rotary embeddings", self.head_dim()));
        }
        if let Some(rs) = &self.rope_scaling {
            if !matches!(rs.rope_type.as_str(), "llama3" | "default") {
                return Err(format!(
                    "rope_scaling type {:?} is not supported (supported: llama3, default)",
                    rs.rope_type
                ));
            }
        }
        if let Some(act) = &self.hidden_act {
            if act != "silu" {
                return Err(format!("hidden_act {act:?} is not supported (only silu)"));
            }
        }
        Ok(())
    }

    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads)
    }
    /// q/k/v carry a bias: always for qwen2, by `attention_bias` for the others.
    pub fn qkv_bias(&self) -> bool {
        self.attention_bias.unwrap_or(matches!(self.arch(), Ok(Arch::Qwen2)))
    }
    /// o_proj carries a bias only where `attention_bias` says so on llama (qwen2 has none).
    pub fn o_bias(&self) -> bool {
        matches!(self.arch(), Ok(Arch::Llama)) && self.attention_bias.unwrap_or(false)
    }
    pub fn qk_norm(&self) -> bool {
        matches!(self.arch(), Ok(Arch::Qwen3))
    }
    pub fn eos_ids(&self) -> Vec<u32> {
        self.eos_token_id.as_ref().map(|t| t.to_vec()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama(extra: serde_json::Value) -> std::result::Result<(), String> {
        let mut v = serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100,
        });
        v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        serde_json::from_value::<Config>(v).map_err(|e| e.to_string())?.validate()
    }

    #[test]
    fn hostile_sizes_are_refused_by_name() {
        assert!(llama(serde_json::json!({})).is_ok());
        // num_key_value_heads 0 divided by zero before its check (found writing the fuzz targets).
        let cases = [
            (serde_json::json!({"num_key_value_heads": 0}), "num_key_value_heads"),
            (serde_json::json!({"max_position_embeddings": 1u64 << 40}), "max_position_embeddings"),
            (serde_json::json!({"max_position_embeddings": 0}), "max_position_embeddings"),
            (serde_json::json!({"head_dim": 0}), "head_dim"),
            (serde_json::json!({"head_dim": 1 << 20}), "head_dim"),
            (serde_json::json!({"rope_theta": -1.0}), "rope_theta"),
            (serde_json::json!({"num_attention_heads": 0}), "num_attention_heads"),
        ];
        for (extra, field) in cases {
            let e = llama(extra.clone()).unwrap_err();
            assert!(e.contains(field), "{extra}: {e}");
        }
    }
}
