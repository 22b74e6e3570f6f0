//! Writing the result of the pass as an AutoAWQ GEMM checkpoint that vLLM and transformers load:
//! embeddings, quantized blocks, norms and lm_head in shards, config.json with its
//! `quantization_config`, the tokenizer files and the pass's report.
use super::{quantize_blocks, AwqOptions, Report};
use crate::assets::ModelAssets;
use crate::checkpoint::{block_tensors, check_out_dir, AtomicDir, QuantSpec, ShardWriter};
use crate::error::{Error, Result};
use candle_core::{DType, Tensor};
use serde_json::Value;

/// Quantizes `assets` with `opts` and writes an AutoAWQ GEMM checkpoint to `out` (atomically),
/// with the pass's report as `awq_report.json`. Math runs in f32 on `device`.
pub fn write_quantized(
    assets: &ModelAssets,
    out: &std::path::Path,
    opts: &AwqOptions,
    calib: Option<&[Vec<u32>]>,
    device: &candle_core::Device,
    force: bool,
) -> Result<Report> {
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
    let report = quantize_blocks(&vb, cfg, calib, opts, |i, block| {
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
    let spec = QuantSpec { scheme: opts.params, skip: vec![] };
    config["quantization_config"] = spec.to_json();
    config["torch_dtype"] = "float16".into();
    dir.write_json("config.json", &config)?;
    assets.write_tokenizer_files(&dir)?;
    dir.write_json("awq_report.json", &serde_json::to_value(&report).map_err(|e| Error::msg(e.to_string()))?)?;
    dir.commit()?;
    Ok(report)
}
