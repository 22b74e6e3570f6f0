//! Writing the result of the pass as a checkpoint that vLLM and transformers load (AutoAWQ GEMM;
//! the GPTQ layout for `--method gptq`): embeddings, quantized blocks, norms and lm_head in
//! shards, config.json with its `quantization_config`, the tokenizer files and the pass's report.
use super::{quantize_blocks, AwqOptions, Report};
use crate::assets::ModelAssets;
use super::Method;
use crate::checkpoint::{block_tensors, check_out_dir, AtomicDir, GptqFormat, QuantFormat, QuantSpec, ShardWriter};
use crate::quant::format::gptq::ZeroStorage;
use crate::error::{Error, Result};
use candle_core::{DType, Tensor};
use serde_json::Value;

/// The checkpoint layout of a method: GPTQ's own for gptq, AutoAWQ GEMM for the others (AWQ+GPTQ
/// has its scales folded into the weights, so it is an ordinary AWQ checkpoint).
pub fn checkpoint_spec(opts: &AwqOptions) -> QuantSpec {
    let format = match opts.method {
        Method::Gptq => QuantFormat::Gptq(GptqFormat {
            zeros: ZeroStorage::MinusOne,
            sym: opts.gptq.sym,
            desc_act: opts.gptq.act_order,
            static_groups: opts.gptq.static_groups,
            true_sequential: opts.gptq.true_sequential,
            damp_percent: opts.gptq.damp,
        }),
        _ => QuantFormat::AwqGemm,
    };
    QuantSpec { scheme: opts.params, format, skip: vec![] }
}

/// Whether `opts` can be written as a checkpoint at all, checked before any work: 4 bits, and no
/// act-order permutation where the layout has no `g_idx`.
pub fn check_writable(opts: &AwqOptions) -> Result<()> {
    if opts.params.bits != 4 {
        return Err(Error::msg(format!(
            "--bits {}: the checkpoint formats pack 4-bit codes only; other widths can be \
             evaluated with `awq-run eval --fake-quant METHOD:BITS:GROUP`",
            opts.params.bits
        )));
    }
    if opts.method == Method::AwqGptq && opts.gptq.act_order && !opts.gptq.static_groups {
        return Err(Error::msg(
            "--static-groups false: awq+gptq writes the AWQ GEMM layout, which has no g_idx for act-order groups; keep static groups or use --method gptq",
        ));
    }
    Ok(())
}

/// Quantizes `assets` with `opts` and writes the checkpoint to `out` (atomically), with the
/// pass's report as `awq_report.json`. Math runs in f32 on `device`.
pub fn write_quantized(
    assets: &ModelAssets,
    out: &std::path::Path,
    opts: &AwqOptions,
    calib: Option<&[Vec<u32>]>,
    device: &candle_core::Device,
    force: bool,
) -> Result<Report> {
    check_out_dir(out, assets.dir.as_deref())?;
    check_writable(opts)?;
    let spec = checkpoint_spec(opts);
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
        for (name, t) in block_tensors(i, &block, spec.format)? {
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
    config["quantization_config"] = spec.to_json();
    config["torch_dtype"] = "float16".into();
    dir.write_json("config.json", &config)?;
    assets.write_tokenizer_files(&dir)?;
    dir.write_json("awq_report.json", &serde_json::to_value(&report).map_err(|e| Error::msg(e.to_string()))?)?;
    dir.commit()?;
    Ok(report)
}
