//! The quantization config of a 4-bit checkpoint, AutoAWQ GEMM or GPTQ: what config.json's
//! `quantization_config` (or a legacy `quant_config.json` / `quantize_config.json`) says, parsed
//! with every refusal naming the file and the field at fault.
use crate::error::{Error, Result};
use crate::quant::format::gptq::ZeroStorage;
use crate::quant::{GroupSize, QuantScheme};
use serde_json::Value;

/// How the checkpoint lays its quantized linears out.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum QuantFormat {
    /// AutoAWQ's GEMM layout (`qweight` `[in, out/8]`, always with zero points).
    AwqGemm,
    /// The GPTQ layout (`qweight` `[in/8, out]`, `qzeros`, `scales`, `g_idx`).
    Gptq(GptqFormat),
}

/// What a GPTQ checkpoint's config says beyond bits and group size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GptqFormat {
    /// `checkpoint_format`: "gptq" stores zero - 1, "gptq_v2" the zero itself.
    pub zeros: ZeroStorage,
    pub sym: bool,
    /// `desc_act`: columns were quantized in activation order (a `g_idx` may permute groups).
    pub desc_act: bool,
    /// How it was made (written to the config; not needed to read it).
    pub static_groups: bool,
    pub true_sequential: bool,
    pub damp_percent: f64,
}

/// The quantization of a 4-bit checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantSpec {
    pub scheme: QuantScheme,
    pub format: QuantFormat,
    /// Module names left in full precision (`modules_to_not_convert`).
    pub skip: Vec<String>,
}

impl QuantSpec {
    /// An AutoAWQ GEMM checkpoint of `scheme`.
    pub fn awq(scheme: QuantScheme) -> Self {
        Self { scheme, format: QuantFormat::AwqGemm, skip: vec![] }
    }

    /// The config written into config.json: AutoAWQ's, or the GPTQ one transformers and vLLM read.
    pub fn to_json(&self) -> Value {
        match self.format {
            QuantFormat::AwqGemm => serde_json::json!({
                "quant_method": "awq",
                "bits": self.scheme.bits,
                "group_size": self.scheme.group.columns(),
                "zero_point": true,
                "version": "gemm",
                "modules_to_not_convert": null,
            }),
            QuantFormat::Gptq(g) => serde_json::json!({
                "quant_method": "gptq",
                "bits": self.scheme.bits,
                "group_size": match self.scheme.group { GroupSize::PerChannel => -1, GroupSize::Columns(n) => n as i64 },
                "desc_act": g.desc_act,
                "sym": g.sym,
                "static_groups": g.static_groups,
                "true_sequential": g.true_sequential,
                "damp_percent": g.damp_percent,
                "checkpoint_format": match g.zeros { ZeroStorage::MinusOne => "gptq", ZeroStorage::Plain => "gptq_v2" },
            }),
        }
    }

    /// Parses a quantization config object (config.json's `quantization_config`, or a legacy
    /// quant_config.json / quantize_config.json); `origin` names it in errors.
    pub fn parse(v: &Value, origin: &str) -> Result<Self> {
        // Legacy GPTQ quantize_config.json files carry no quant_method; their desc_act says what they are.
        let default_method = if v.get("desc_act").is_some() { "gptq" } else { "awq" };
        let method = v.get("quant_method").and_then(Value::as_str).unwrap_or(default_method).to_lowercase();
        if method != "awq" && method != "gptq" {
            return Err(Error::Config(format!(
                "{origin}: quantization method {method:?} is not supported; awq-run reads AWQ (quant_method \"awq\", GEMM layout) and GPTQ (quant_method \"gptq\") checkpoints"
            )));
        }
        let num = |keys: &[&str]| keys.iter().find_map(|k| v.get(*k).and_then(Value::as_i64));
        let bits = num(&["bits", "w_bit"]).ok_or_else(|| Error::Config(format!("{origin}: no bits / w_bit")))?;
        let group = num(&["group_size", "q_group_size"])
            .ok_or_else(|| Error::Config(format!("{origin}: no group_size / q_group_size")))?;
        let group = if group <= 0 { GroupSize::PerChannel } else { GroupSize::Columns(group as usize) };
        let skip = v
            .get("modules_to_not_convert")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_string)).collect())
            .unwrap_or_default();
        let format = match method.as_str() {
            "awq" => {
                let version = v.get("version").and_then(Value::as_str).unwrap_or("gemm").to_lowercase();
                if version != "gemm" {
                    return Err(Error::Config(format!(
                        "{origin}: AWQ layout {version:?} is not supported; only the GEMM layout (version \"gemm\") is read"
                    )));
                }
                if bits != 4 {
                    return Err(Error::Config(format!("{origin}: {bits}-bit AWQ checkpoints are not supported (only 4-bit)")));
                }
                if !v.get("zero_point").and_then(Value::as_bool).unwrap_or(true) {
                    return Err(Error::Config(format!("{origin}: AWQ without zero points is not supported")));
                }
                QuantFormat::AwqGemm
            }
            "gptq" => {
                if bits != 4 {
                    return Err(Error::Config(format!("{origin}: bits {bits}: {bits}-bit GPTQ checkpoints are not supported (only 4-bit)")));
                }
                let zeros = match v.get("checkpoint_format").and_then(Value::as_str).unwrap_or("gptq") {
                    "gptq" => ZeroStorage::MinusOne,
                    "gptq_v2" => ZeroStorage::Plain,
                    other => {
                        return Err(Error::Config(format!(
                            "{origin}: checkpoint_format {other:?} is not supported; GPTQ checkpoints are read in the \"gptq\" and \"gptq_v2\" layouts"
                        )))
                    }
                };
                let flag = |k: &str, d: bool| v.get(k).and_then(Value::as_bool).unwrap_or(d);
                QuantFormat::Gptq(GptqFormat {
                    zeros,
                    sym: flag("sym", true),
                    desc_act: flag("desc_act", false),
                    static_groups: flag("static_groups", false),
                    true_sequential: flag("true_sequential", true),
                    damp_percent: v.get("damp_percent").and_then(Value::as_f64).unwrap_or(0.01),
                })
            }
            other => return Err(Error::Config(format!("{origin}: quantization method {other:?} is not supported"))),
        };
        Ok(Self { scheme: QuantScheme { bits: bits as u32, group }, format, skip })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gptq_config_round_trips_and_legacy_files_are_recognized() {
        let spec = QuantSpec {
            scheme: QuantScheme::new(4, 128).unwrap(),
            format: QuantFormat::Gptq(GptqFormat { zeros: ZeroStorage::MinusOne, sym: false, desc_act: true, static_groups: true, true_sequential: true, damp_percent: 0.01 }),
            skip: vec![],
        };
        assert_eq!(QuantSpec::parse(&spec.to_json(), "t").unwrap(), spec);
        // AutoGPTQ's quantize_config.json: no quant_method.
        let legacy = serde_json::json!({"bits": 4, "group_size": -1, "desc_act": false, "sym": true});
        let s = QuantSpec::parse(&legacy, "quantize_config.json").unwrap();
        assert_eq!(s.scheme.group, GroupSize::PerChannel);
        assert!(matches!(s.format, QuantFormat::Gptq(GptqFormat { sym: true, zeros: ZeroStorage::MinusOne, .. })));
    }

    #[test]
    fn unsupported_gptq_configs_name_the_field() {
        let e = QuantSpec::parse(&serde_json::json!({"quant_method": "gptq", "bits": 3, "group_size": 128}), "cfg.json").unwrap_err().to_string();
        assert!(e.contains("cfg.json") && e.contains("bits 3"), "{e}");
        let e = QuantSpec::parse(&serde_json::json!({"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "marlin"}), "cfg.json")
            .unwrap_err()
            .to_string();
        assert!(e.contains("checkpoint_format") && e.contains("marlin"), "{e}");
        let e = QuantSpec::parse(&serde_json::json!({"quant_method": "bitsandbytes", "bits": 4, "group_size": 64}), "cfg.json").unwrap_err().to_string();
        assert!(e.contains("bitsandbytes"), "{e}");
    }
}
