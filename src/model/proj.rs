//! The seven linear projections of a decoder block, named once: loading, the AWQ scale groups,
//! checkpoint export and re-quantization all iterate over [`Proj::ALL`].
use super::config::Config;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proj {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Proj {
    /// In the order HF checkpoints list them.
    pub const ALL: [Proj; 7] = [Proj::Q, Proj::K, Proj::V, Proj::O, Proj::Gate, Proj::Up, Proj::Down];

    /// The position in [`Proj::ALL`], for per-layer arrays.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The module's own name (`q_proj`).
    pub fn name(self) -> &'static str {
        match self {
            Proj::Q => "q_proj",
            Proj::K => "k_proj",
            Proj::V => "v_proj",
            Proj::O => "o_proj",
            Proj::Gate => "gate_proj",
            Proj::Up => "up_proj",
            Proj::Down => "down_proj",
        }
    }

    /// The module that holds it inside a block (`self_attn` or `mlp`).
    pub fn parent(self) -> &'static str {
        match self {
            Proj::Q | Proj::K | Proj::V | Proj::O => "self_attn",
            Proj::Gate | Proj::Up | Proj::Down => "mlp",
        }
    }

    /// Its HF name relative to the block (`self_attn.q_proj`).
    pub fn hf_name(self) -> &'static str {
        match self {
            Proj::Q => "self_attn.q_proj",
            Proj::K => "self_attn.k_proj",
            Proj::V => "self_attn.v_proj",
            Proj::O => "self_attn.o_proj",
            Proj::Gate => "mlp.gate_proj",
            Proj::Up => "mlp.up_proj",
            Proj::Down => "mlp.down_proj",
        }
    }

    /// `(in_features, out_features)` in a model of `cfg`.
    pub fn features(self, cfg: &Config) -> (usize, usize) {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let (q, kv) = (cfg.num_attention_heads * cfg.head_dim(), cfg.num_kv_heads() * cfg.head_dim());
        match self {
            Proj::Q => (h, q),
            Proj::K | Proj::V => (h, kv),
            Proj::O => (q, h),
            Proj::Gate | Proj::Up => (h, i),
            Proj::Down => (i, h),
        }
    }

    /// Whether the layer has a bias in a model of `cfg`.
    pub fn has_bias(self, cfg: &Config) -> bool {
        match self {
            Proj::Q | Proj::K | Proj::V => cfg.qkv_bias(),
            Proj::O => cfg.o_bias(),
            Proj::Gate | Proj::Up | Proj::Down => cfg.mlp_bias.unwrap_or(false),
        }
    }
}

/// The HF name relative to the block.
impl std::fmt::Display for Proj {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.hf_name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_agree() {
        for p in Proj::ALL {
            assert_eq!(p.hf_name(), format!("{}.{}", p.parent(), p.name()));
        }
    }
}
