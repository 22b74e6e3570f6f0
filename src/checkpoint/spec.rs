//! The quantization config of an AutoAWQ GEMM checkpoint: what config.json's
//! `quantization_config` (or a legacy `quant_config.json` / `quantize_config.json`) says, parsed
//! with every refusal naming the file and the field at fault.
use crate::error::{Error, Result};
use crate::quant::{GroupSize, QuantScheme};
use serde_json::Value;

/// The quantization of an AWQ GEMM checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantSpec {
    /// Bits and group size (AWQ GEMM checkpoints always have zero points).
    pub scheme: QuantScheme,
    /// Module names left in full precision (`modules_to_not_convert`).
    pub skip: Vec<String>,
}

impl QuantSpec {
    /// The config AutoAWQ writes into config.json.
    pub fn to_json(&self) -> Value {
        serde_json::json!({
            "quant_method": "awq",
            "bits": self.scheme.bits,
            "group_size": self.scheme.group.columns(),
            "zero_point": true,
            "version": "gemm",
            "modules_to_not_convert": null,
        })
    }

    /// Parses a quantization config object (config.json's `quantization_config`, or a legacy
    /// quant_config.json / quantize_config.json); `origin` names it in errors.
    pub fn parse(v: &Value, origin: &str) -> Result<Self> {
        let method = v.get("quant_method").and_then(Value::as_str).unwrap_or("awq").to_lowercase();
        if method != "awq" {
            return Err(Error::Config(format!(
                "{origin}: quantization method {method:?} is not supported; awq-run reads AWQ (quant_method \"awq\", GEMM layout) checkpoints"
            )));
        }
        let version = v.get("version").and_then(Value::as_str).unwrap_or("gemm").to_lowercase();
        if version != "gemm" {
            return Err(Error::Config(format!(
                "{origin}: AWQ layout {version:?} is not supported; only the GEMM layout (version \"gemm\") is read"
            )));
        }
        let num = |keys: &[&str]| keys.iter().find_map(|k| v.get(*k).and_then(Value::as_i64));
        let bits = num(&["bits", "w_bit"])
            .ok_or_else(|| Error::Config(format!("{origin}: no bits / w_bit")))?;
        if bits != 4 {
            return Err(Error::Config(format!("{origin}: {bits}-bit AWQ checkpoints are not supported (only 4-bit)")));
        }
        let group = num(&["group_size", "q_group_size"])
            .ok_or_else(|| Error::Config(format!("{origin}: no group_size / q_group_size")))?;
        let zero_point = v.get("zero_point").and_then(Value::as_bool).unwrap_or(true);
        if !zero_point {
            return Err(Error::Config(format!("{origin}: AWQ without zero points is not supported")));
        }
        let skip = v
            .get("modules_to_not_convert")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_string)).collect())
            .unwrap_or_default();
        let group = if group <= 0 { GroupSize::PerChannel } else { GroupSize::Columns(group as usize) };
        Ok(Self { scheme: QuantScheme { bits: bits as u32, group }, skip })
    }
}
