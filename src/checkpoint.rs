//! Checkpoint I/O for AWQ models: reading the quantization config of AutoAWQ GEMM checkpoints
//! (ours and others'), loading their linear layers, and writing complete checkpoints atomically.
use crate::assets::ModelAssets;
use crate::error::{Error, Result};
use crate::model::{DenseLinear, Linear};
use crate::quant::pack::{AwqGemmTensors, QuantizedWeight};
use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use serde_json::Value;

/// The quantization of an AWQ GEMM checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantSpec {
    pub bits: u32,
    pub group_size: usize,
    pub zero_point: bool,
    /// Module names left in full precision (`modules_to_not_convert`).
    pub skip: Vec<String>,
}

impl QuantSpec {
    /// The config AutoAWQ writes into config.json.
    pub fn to_json(&self) -> Value {
        serde_json::json!({
            "quant_method": "awq",
            "bits": self.bits,
            "group_size": self.group_size,
            "zero_point": self.zero_point,
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
        Ok(Self { bits: bits as u32, group_size: if group <= 0 { 0 } else { group as usize }, zero_point, skip })
    }

    /// The checkpoint's quantization, or `None` for a full-precision model.
    pub fn from_assets(a: &ModelAssets) -> Result<Option<Self>> {
        if let Some(q) = &a.config.quantization_config {
            return Self::parse(q, &format!("{}: config.json quantization_config", a.name)).map(Some);
        }
        let Some(dir) = &a.dir else { return Ok(None) };
        for f in ["quant_config.json", "quantize_config.json"] {
            let p = dir.join(f);
            if p.exists() {
                let v: Value = crate::error::read_json(&p)?;
                return Self::parse(&v, &p.display().to_string()).map(Some);
            }
        }
        Ok(None)
    }
}

/// Reads one AWQ GEMM linear (`qweight`, `qzeros`, `scales`, optional `bias`) into a
/// [`QuantizedWeight`].
pub fn read_awq_weight(vb: &VarBuilder, in_f: usize, out_f: usize, q: &QuantSpec) -> candle_core::Result<QuantizedWeight> {
    let g = if q.group_size == 0 { in_f } else { q.group_size };
    if in_f % g != 0 || out_f % 8 != 0 {
        candle_core::bail!("{}: {out_f}x{in_f} does not fit group size {g} and 8-wide packing", vb.prefix());
    }
    let get_i32 = |name: &str, shape: (usize, usize)| -> candle_core::Result<Vec<i32>> {
        vb.get_with_hints_dtype(shape, name, Default::default(), DType::I32)?.flatten_all()?.to_vec1::<i32>()
    };
    let qweight = get_i32("qweight", (in_f, out_f / 8))?;
    let qzeros = get_i32("qzeros", (in_f / g, out_f / 8))?;
    let scales = vb
        .get_with_hints_dtype((in_f / g, out_f), "scales", Default::default(), DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    QuantizedWeight::from_awq_gemm(&AwqGemmTensors { qweight, qzeros, scales }, in_f, out_f, g)
        .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", vb.prefix())))
}

/// Loads one linear of an AWQ checkpoint. Modules in `modules_to_not_convert` load dense.
pub fn load_awq_linear(vb: VarBuilder, in_f: usize, out_f: usize, bias: bool, q: &QuantSpec) -> candle_core::Result<Linear> {
    let prefix = vb.prefix();
    if q.skip.iter().any(|s| prefix.contains(s.as_str())) || vb.contains_tensor("weight") {
        return crate::model::llama::load_dense(vb, in_f, out_f, bias);
    }
    let w = read_awq_weight(&vb, in_f, out_f, q)?;
    let b = if bias { Some(vb.get(out_f, "bias")?) } else { None };
    let dense = Tensor::from_vec(w.dequantize(), (out_f, in_f), vb.device())?.to_dtype(vb.dtype())?;
    Ok(DenseLinear::new(dense, b).into_linear())
}

/// An output directory that appears only when complete: files go to a hidden temporary directory
/// beside the target, which [`AtomicDir::commit`] renames into place. Dropped uncommitted, the
/// temporary directory is removed, so a failure never leaves a half-written checkpoint.
pub struct AtomicDir {
    target: std::path::PathBuf,
    tmp: Option<tempfile::TempDir>,
}

impl AtomicDir {
    /// Refuses an existing `target` unless `force`.
    pub fn new(target: &std::path::Path, force: bool) -> Result<Self> {
        if target.exists() && !force {
            return Err(Error::msg(format!("{} already exists (use --force to replace it)", target.display())));
        }
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => std::path::PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
        let name = target.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".{name}.tmp-"))
            .tempdir_in(&parent)
            .map_err(|e| Error::io(&parent, e))?;
        Ok(Self { target: target.to_path_buf(), tmp: Some(tmp) })
    }

    /// Where to write the files.
    pub fn path(&self) -> &std::path::Path {
        self.tmp.as_ref().map(|t| t.path()).expect("AtomicDir used after commit")
    }

    pub fn write_json(&self, name: &str, v: &Value) -> Result<()> {
        let p = self.path().join(name);
        let s = serde_json::to_string_pretty(v).map_err(|e| Error::msg(e.to_string()))?;
        std::fs::write(&p, s + "\n").map_err(|e| Error::io(&p, e))
    }

    /// Moves the finished directory into place (replacing an old one, with --force).
    pub fn commit(mut self) -> Result<std::path::PathBuf> {
        let tmp = self.tmp.take().expect("AtomicDir committed twice").keep();
        // Temporary directories are created private (0700); a checkpoint is an ordinary directory.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755));
        }
        if self.target.exists() {
            let old = tmp.with_extension("old");
            std::fs::rename(&self.target, &old).map_err(|e| Error::io(&self.target, e))?;
            std::fs::rename(&tmp, &self.target).map_err(|e| Error::io(&self.target, e))?;
            let _ = std::fs::remove_dir_all(&old);
        } else {
            std::fs::rename(&tmp, &self.target).map_err(|e| Error::io(&self.target, e))?;
        }
        Ok(self.target.clone())
    }
}
