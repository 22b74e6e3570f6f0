//! `awq-run import`: a GGUF file to an HF-layout directory (config.json, model.safetensors,
//! tokenizer.json, tokenizer_config.json, generation_config.json).
use crate::checkpoint::AtomicDir;
use crate::error::{Error, Result};
use candle_core::DType;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        _ => "float32",
    }
}

/// Imports `gguf` into `out`, tensors stored as `dtype`. The directory appears only when complete.
pub fn import_gguf(gguf: &Path, out: &Path, dtype: DType, force: bool) -> Result<PathBuf> {
    let g = super::gguf::read(gguf)?;
    let dir = AtomicDir::new(out, force)?;
    let mut config = serde_json::to_value(&g.config).map_err(|e| Error::msg(e.to_string()))?;
    config["torch_dtype"] = dtype_name(dtype).into();
    dir.write_json("config.json", &config)?;
    let tensors: HashMap<String, candle_core::Tensor> = g
        .tensors
        .into_iter()
        .map(|(k, t)| Ok((k, t.to_dtype(dtype)?)))
        .collect::<Result<_>>()?;
    let st = dir.path().join("model.safetensors");
    candle_core::safetensors::save(&tensors, &st).map_err(|e| Error::msg(format!("{}: {e}", st.display())))?;
    dir.write_json("tokenizer.json", &g.tokenizer_json)?;
    dir.write_json("tokenizer_config.json", &g.tokenizer_config)?;
    dir.write_json("generation_config.json", &g.generation_config)?;
    dir.commit()
}
