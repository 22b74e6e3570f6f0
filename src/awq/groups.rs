//! The AWQ scale groups of a LLaMA-family block, as one table: which layers share an input
//! (and so one scale vector), where the inverse scale is folded, and which module's output the
//! search measures. The pass in `super` runs one loop over it.
use super::scale::SharedHeads;
use crate::model::Proj;

/// Where a group's `1/s` goes once its scales are chosen: the op that produces the group's input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fold {
    /// Into `input_layernorm`'s weight.
    InputNorm,
    /// Into `post_attention_layernorm`'s weight.
    PostAttentionNorm,
    /// Into the output rows (and bias) of this linear layer.
    Rows(Proj),
}

impl Fold {
    /// The HF name of the op (reports).
    pub fn name(self) -> &'static str {
        match self {
            Fold::InputNorm => "input_layernorm",
            Fold::PostAttentionNorm => "post_attention_layernorm",
            Fold::Rows(p) => p.name(),
        }
    }
}

/// The module whose output the search compares with full precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Measured {
    /// The whole attention (q/k/v through o_proj), so errors in the scores count.
    Attention,
    /// The whole MLP (gate/up through down_proj).
    Mlp,
    /// The group's single layer.
    Layer,
}

/// When a group is searched at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition {
    Always,
    /// o_proj reads v_proj's output: channel for channel without grouped-query attention; with
    /// it each value head is repeated for the query heads that share it, so a scale folded into
    /// v_proj's rows must be shared by those repeats ([`super::scale::SharedHeads`]). AutoAWQ
    /// searches the group only in the first case (equal weight shapes), as awq-run does by
    /// default; `--gqa-o-proj true` searches it in both.
    ValueIntoOutput,
}

#[derive(Debug, Clone, Copy)]
pub struct ScaleGroup {
    pub fold: Fold,
    /// The layers sharing the input; the first one's captured input is the group's.
    pub layers: &'static [Proj],
    pub measured: Measured,
    pub condition: Condition,
}

impl ScaleGroup {
    /// Whether the group is searched, given the attention's heads and whether o_proj's scales
    /// may be shared over the query heads of a value head (`gqa`).
    pub fn applies(&self, heads: SharedHeads, gqa: bool) -> bool {
        match self.condition {
            Condition::Always => true,
            Condition::ValueIntoOutput => heads.rep == 1 || gqa,
        }
    }

    /// How the group's scales are shared over its layers' input channels (o_proj under
    /// grouped-query attention), if they are.
    pub fn sharing(&self, heads: SharedHeads) -> Option<SharedHeads> {
        (self.condition == Condition::ValueIntoOutput && heads.rep > 1).then_some(heads)
    }

    /// A short label for messages (`q/k/v`, `o_proj`).
    pub fn label(&self) -> String {
        match self.layers {
            [one] => one.name().to_string(),
            many => many.iter().map(|p| p.name().trim_end_matches("_proj")).collect::<Vec<_>>().join("/"),
        }
    }
}

/// The groups in the order they are searched (and folded).
pub const SCALE_GROUPS: [ScaleGroup; 4] = [
    ScaleGroup { fold: Fold::InputNorm, layers: &[Proj::Q, Proj::K, Proj::V], measured: Measured::Attention, condition: Condition::Always },
    ScaleGroup { fold: Fold::Rows(Proj::V), layers: &[Proj::O], measured: Measured::Layer, condition: Condition::ValueIntoOutput },
    ScaleGroup { fold: Fold::PostAttentionNorm, layers: &[Proj::Gate, Proj::Up], measured: Measured::Mlp, condition: Condition::Always },
    ScaleGroup { fold: Fold::Rows(Proj::Up), layers: &[Proj::Down], measured: Measured::Layer, condition: Condition::Always },
];

/// The layers whose clipping is searched: all but q and k, whose errors the attention scores
/// amplify.
pub const CLIPPED: [Proj; 5] = [Proj::V, Proj::O, Proj::Gate, Proj::Up, Proj::Down];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_layer_is_in_exactly_one_group() {
        let mut seen: Vec<Proj> = SCALE_GROUPS.iter().flat_map(|g| g.layers.iter().copied()).collect();
        seen.sort_by_key(|p| p.index());
        assert_eq!(seen, Proj::ALL.to_vec());
    }

    #[test]
    fn labels_and_fold_names() {
        assert_eq!(SCALE_GROUPS[0].label(), "q/k/v");
        assert_eq!(SCALE_GROUPS[1].label(), "o_proj");
        assert_eq!(SCALE_GROUPS[2].label(), "gate/up");
        assert_eq!(SCALE_GROUPS[3].fold.name(), "up_proj");
    }

    #[test]
    fn the_o_proj_group_under_grouped_query_attention_shares_its_scales_or_is_skipped() {
        let mha = SharedHeads { kv_heads: 4, rep: 1, head_dim: 16 };
        let gqa = SharedHeads { kv_heads: 1, rep: 4, head_dim: 16 };
        assert!(SCALE_GROUPS[1].applies(mha, false) && SCALE_GROUPS[1].sharing(mha).is_none());
        assert!(!SCALE_GROUPS[1].applies(gqa, false), "AutoAWQ's rule: skipped");
        assert!(SCALE_GROUPS[1].applies(gqa, true));
        assert_eq!(SCALE_GROUPS[1].sharing(gqa), Some(gqa));
        assert!(SCALE_GROUPS[0].applies(gqa, false) && SCALE_GROUPS[0].sharing(gqa).is_none());
    }
}
