//! Checkpoint I/O for AWQ models: reading the quantization config of AutoAWQ GEMM checkpoints
//! (ours and others'), loading their linear layers, and writing complete checkpoints atomically.
use crate::assets::ModelAssets;
use crate::error::{Error, Result};
use crate::model::Linear;
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
    Ok(crate::quant::QuantLinear::new(w, b, vb.dtype(), vb.device())?.into_linear())
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
            for entry in std::fs::read_dir(&tmp).map_err(|e| Error::io(&tmp, e))?.flatten() {
                let _ = std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(0o644));
            }
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

/// Writes safetensors shards of at most `max_bytes`, named as transformers expects
/// (`model.safetensors`, or `model-0000i-of-0000n.safetensors` with an index) once all is known.
pub struct ShardWriter {
    dir: std::path::PathBuf,
    max_bytes: usize,
    pending: Vec<(String, Tensor)>,
    pending_bytes: usize,
    shards: Vec<(std::path::PathBuf, Vec<String>)>,
    total_bytes: usize,
}

impl ShardWriter {
    pub const DEFAULT_MAX_BYTES: usize = 5_000_000_000;

    pub fn new(dir: &std::path::Path, max_bytes: usize) -> Self {
        Self { dir: dir.to_path_buf(), max_bytes, pending: vec![], pending_bytes: 0, shards: vec![], total_bytes: 0 }
    }

    pub fn add(&mut self, name: impl Into<String>, t: Tensor) -> Result<()> {
        let bytes = t.elem_count() * t.dtype().size_in_bytes();
        if self.pending_bytes + bytes > self.max_bytes && !self.pending.is_empty() {
            self.flush()?;
        }
        self.pending_bytes += bytes;
        self.total_bytes += bytes;
        self.pending.push((name.into(), t));
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        let path = self.dir.join(format!("shard-{}.part", self.shards.len()));
        let names: Vec<String> = self.pending.iter().map(|(n, _)| n.clone()).collect();
        let map: std::collections::HashMap<String, Tensor> = self.pending.drain(..).collect();
        candle_core::safetensors::save(&map, &path).map_err(|e| Error::msg(format!("{}: {e}", path.display())))?;
        self.shards.push((path, names));
        self.pending_bytes = 0;
        Ok(())
    }

    /// Writes what is pending, names the shards and writes the index when there are several.
    pub fn finish(mut self) -> Result<()> {
        if !self.pending.is_empty() || self.shards.is_empty() {
            self.flush()?;
        }
        let n = self.shards.len();
        if n == 1 {
            let (p, _) = &self.shards[0];
            let dst = self.dir.join("model.safetensors");
            return std::fs::rename(p, &dst).map_err(|e| Error::io(&dst, e));
        }
        let mut weight_map = serde_json::Map::new();
        for (i, (p, names)) in self.shards.iter().enumerate() {
            let file = format!("model-{:05}-of-{n:05}.safetensors", i + 1);
            let dst = self.dir.join(&file);
            std::fs::rename(p, &dst).map_err(|e| Error::io(&dst, e))?;
            for name in names {
                weight_map.insert(name.clone(), file.clone().into());
            }
        }
        let index = serde_json::json!({"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map});
        let p = self.dir.join("model.safetensors.index.json");
        std::fs::write(&p, serde_json::to_string_pretty(&index).unwrap_or_default() + "\n").map_err(|e| Error::io(&p, e))
    }
}

/// Files copied next to a checkpoint from the source model directory when present.
pub const COPIED_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
];

/// Writes the tokenizer, its config and the generation config of `assets` into `dir`.
pub fn write_tokenizer_files(assets: &ModelAssets, dir: &AtomicDir) -> Result<()> {
    match &assets.dir {
        Some(src) => {
            for f in COPIED_FILES {
                let from = src.join(f);
                if from.exists() {
                    let to = dir.path().join(f);
                    std::fs::copy(&from, &to).map_err(|e| Error::io(&from, e))?;
                }
            }
        }
        None => {
            let p = dir.path().join("tokenizer.json");
            assets.tokenizer.save(&p, false).map_err(|e| Error::Tokenizer(format!("{}: {e}", p.display())))?;
            dir.write_json("tokenizer_config.json", &assets.tokenizer_config)?;
            dir.write_json("generation_config.json", &assets.generation_config)?;
        }
    }
    Ok(())
}

/// The checkpoint tensors of one quantized block, under `model.layers.{i}`.
pub fn block_tensors(i: usize, block: &crate::model::Block) -> Result<Vec<(String, Tensor)>> {
    let p = format!("model.layers.{i}");
    let f16 = |t: &Tensor| t.to_dtype(DType::F16).and_then(|t| t.to_device(&candle_core::Device::Cpu)).map_err(Error::from);
    let mut out = vec![
        (format!("{p}.input_layernorm.weight"), f16(&block.input_layernorm.weight)?),
        (format!("{p}.post_attention_layernorm.weight"), f16(&block.post_attention_layernorm.weight)?),
    ];
    if let (Some(qn), Some(kn)) = (&block.self_attn.q_norm, &block.self_attn.k_norm) {
        out.push((format!("{p}.self_attn.q_norm.weight"), f16(&qn.weight)?));
        out.push((format!("{p}.self_attn.k_norm.weight"), f16(&kn.weight)?));
    }
    for (name, lin) in block.linears() {
        let q = lin.quantized().map_err(|e| Error::msg(format!("{p}.{name}: {e}")))?.ok_or_else(|| Error::msg(format!("{p}.{name} is not quantized")))?;
        let t = q.to_awq_gemm().map_err(|e| Error::msg(format!("{p}.{name}: {e}")))?;
        let (i_n, o_n, groups) = (q.in_features, q.out_features, q.groups());
        let dev = candle_core::Device::Cpu;
        out.push((format!("{p}.{name}.qweight"), Tensor::from_vec(t.qweight, (i_n, o_n / 8), &dev)?));
        out.push((format!("{p}.{name}.qzeros"), Tensor::from_vec(t.qzeros, (groups, o_n / 8), &dev)?));
        out.push((format!("{p}.{name}.scales"), Tensor::from_vec(t.scales, (groups, o_n), &dev)?.to_dtype(DType::F16)?));
        if let Some(b) = lin.bias() {
            out.push((format!("{p}.{name}.bias"), f16(b)?));
        }
    }
    Ok(out)
}

/// Refuses an output directory inside the model directory (it would be read while written).
pub fn check_out_dir(out: &std::path::Path, model_dir: Option<&std::path::Path>) -> Result<()> {
    let Some(model_dir) = model_dir else { return Ok(()) };
    let abs = |p: &std::path::Path| -> std::path::PathBuf {
        // The output may not exist yet: resolve its nearest existing ancestor.
        let mut existing = p.to_path_buf();
        let mut tail = Vec::new();
        while !existing.exists() {
            match (existing.file_name().map(|n| n.to_os_string()), existing.parent()) {
                (Some(n), Some(parent)) => {
                    tail.push(n);
                    existing = if parent.as_os_str().is_empty() { ".".into() } else { parent.to_path_buf() };
                }
                _ => break,
            }
        }
        let mut r = existing.canonicalize().unwrap_or(existing);
        r.extend(tail.into_iter().rev());
        r
    };
    let (o, m) = (abs(out), abs(model_dir));
    if o.starts_with(&m) {
        return Err(Error::msg(format!(
            "--out {} is inside the model directory {}; choose a directory outside it",
            out.display(),
            model_dir.display()
        )));
    }
    Ok(())
}

/// Quantizes `assets` with `opts` and writes an AutoAWQ GEMM checkpoint to `out` (atomically),
/// with the pass's report as `awq_report.json`. Math runs in f32 on `device`.
pub fn write_quantized(
    assets: &ModelAssets,
    out: &std::path::Path,
    opts: &crate::awq::AwqOptions,
    calib: Option<&[Vec<u32>]>,
    device: &candle_core::Device,
    force: bool,
) -> Result<crate::awq::Report> {
    check_out_dir(out, assets.dir.as_deref())?;
    if opts.params.bits != 4 {
        return Err(Error::msg(format!(
            "--bits {}: the AWQ GEMM checkpoint format packs 4-bit codes only; other widths can be \
             evaluated with `awq-run eval --fake-quant METHOD:BITS:GROUP`",
            opts.params.bits
        )));
    }
    if assets.config.quantization_config.is_some() {
        return Err(Error::msg(format!("{}: the model is already quantized", assets.name)));
    }
    let dir = AtomicDir::new(out, force)?;
    let vb = assets.var_builder(DType::F32, device)?;
    let cfg = &assets.config;
    let mut shards = ShardWriter::new(dir.path(), ShardWriter::DEFAULT_MAX_BYTES);
    let cpu = candle_core::Device::Cpu;
    let get16 = |name: &str, shape: &[usize]| -> Result<Tensor> {
        Ok(vb.get(shape, name)?.to_dtype(DType::F16)?.to_device(&cpu)?)
    };
    shards.add("model.embed_tokens.weight", get16("model.embed_tokens.weight", &[cfg.vocab_size, cfg.hidden_size])?)?;
    let report = crate::awq::quantize_blocks(&vb, cfg, calib, opts, |i, block| {
        for (name, t) in block_tensors(i, &block)? {
            shards.add(name, t)?;
        }
        Ok(())
    })?;
    shards.add("model.norm.weight", get16("model.norm.weight", &[cfg.hidden_size])?)?;
    if !cfg.tie_word_embeddings || vb.contains_tensor("lm_head.weight") {
        shards.add("lm_head.weight", get16("lm_head.weight", &[cfg.vocab_size, cfg.hidden_size])?)?;
    }
    shards.finish()?;
    let mut config = match &assets.dir {
        Some(d) => crate::error::read_json::<Value>(&d.join("config.json"))?,
        None => serde_json::to_value(cfg).map_err(|e| Error::msg(e.to_string()))?,
    };
    let spec = QuantSpec { bits: opts.params.bits, group_size: opts.params.group_size, zero_point: true, skip: vec![] };
    config["quantization_config"] = spec.to_json();
    config["torch_dtype"] = "float16".into();
    dir.write_json("config.json", &config)?;
    write_tokenizer_files(assets, &dir)?;
    dir.write_json("awq_report.json", &serde_json::to_value(&report).map_err(|e| Error::msg(e.to_string()))?)?;
    dir.commit()?;
    Ok(report)
}
