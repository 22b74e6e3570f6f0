//! What a quantization is: its bit width and how many input columns share one scale and zero
//! point. One type for the whole crate: the AWQ/RTN pass, checkpoints and the fake-quantized
//! evaluation all speak it.
use crate::error::{Error, Result};

/// How many consecutive input columns of a row share one (scale, zero) pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupSize {
    /// One group per output row (the whole input width).
    PerChannel,
    /// Groups of this many columns (never 0).
    Columns(usize),
}

impl GroupSize {
    /// `0` means per-channel, as `--group-size 0` and the checkpoints' `group_size <= 0` do.
    pub fn from_columns(n: usize) -> Self {
        if n == 0 { GroupSize::PerChannel } else { GroupSize::Columns(n) }
    }

    /// The group width for a row of `in_features` columns.
    pub fn for_row(self, in_features: usize) -> usize {
        match self {
            GroupSize::PerChannel => in_features,
            GroupSize::Columns(n) => n,
        }
    }

    /// The number written to configs and reports: the width, or 0 for per-channel.
    pub fn columns(self) -> usize {
        match self {
            GroupSize::PerChannel => 0,
            GroupSize::Columns(n) => n,
        }
    }
}

/// Bits and group size of an asymmetric (zero-point) group quantization.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantScheme {
    pub bits: u32,
    pub group: GroupSize,
}

impl QuantScheme {
    /// `group_size` 0 means per-channel. Widths outside 2–8 bits are refused.
    pub fn new(bits: u32, group_size: usize) -> Result<Self> {
        if !(2..=8).contains(&bits) {
            return Err(Error::msg(format!("--bits {bits}: supported widths are 2 to 8")));
        }
        Ok(Self { bits, group: GroupSize::from_columns(group_size) })
    }

    /// The largest integer code, `2^bits - 1`.
    pub fn max_code(&self) -> f32 {
        ((1u32 << self.bits) - 1) as f32
    }

    /// The group width for a row of `in_features` columns.
    pub fn group_for(&self, in_features: usize) -> usize {
        self.group.for_row(in_features)
    }

    /// The same width with a per-row group of `g` columns (the clip search works group by group).
    pub fn with_group(&self, g: usize) -> Self {
        Self { bits: self.bits, group: GroupSize::from_columns(g) }
    }

    /// Checks that `in_features` of layer `name` splits into whole groups.
    pub fn check_layer(&self, name: &str, in_features: usize) -> Result<()> {
        let g = self.group_for(in_features);
        if !in_features.is_multiple_of(g) {
            let fits: Vec<String> = [32usize, 64, 128]
                .iter()
                .filter(|&&s| in_features.is_multiple_of(s))
                .map(|s| s.to_string())
                .collect();
            let hint = if fits.is_empty() {
                "only per-channel quantization (--group-size 0) fits".to_string()
            } else {
                format!("group sizes that divide it: {}", fits.join(", "))
            };
            return Err(Error::msg(format!(
                "layer {name}: input dimension {in_features} is not divisible by the group size {g}; {hint}"
            )));
        }
        Ok(())
    }
}

/// `w4g64` (`w4g0` for per-channel), as reports and messages name a scheme.
impl std::fmt::Display for QuantScheme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "w{}g{}", self.bits, self.group.columns())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_error_suggests_divisors() {
        let p = QuantScheme::new(4, 128).unwrap();
        let e = p.check_layer("model.layers.0.mlp.up_proj", 576).unwrap_err().to_string();
        assert!(e.contains("model.layers.0.mlp.up_proj") && e.contains("32, 64"), "{e}");
    }

    #[test]
    fn bits_out_of_range_refused() {
        assert!(QuantScheme::new(9, 64).is_err());
        assert!(QuantScheme::new(1, 64).is_err());
    }

    #[test]
    fn zero_means_per_channel() {
        let p = QuantScheme::new(4, 0).unwrap();
        assert_eq!(p.group, GroupSize::PerChannel);
        assert_eq!(p.group_for(576), 576);
        assert_eq!(p.group.columns(), 0);
        assert_eq!(QuantScheme::new(4, 64).unwrap().group_for(576), 64);
        assert_eq!(QuantScheme::new(3, 64).unwrap().to_string(), "w3g64");
    }
}
