//! Writing quantized checkpoints: safetensors shards named as transformers expects, and the
//! tensors of a quantized decoder block in the AutoAWQ GEMM or the GPTQ layout.
use super::spec::QuantFormat;
use crate::error::{Error, Result};
use crate::linear::{Capability, Linear};
use crate::model::Block;
use crate::quant::QuantizedWeight;
use candle_core::{DType, Tensor};

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

/// The codes of a quantized layer and its stored input order (see `QuantLinear::input_perm`).
fn quantized_parts(lin: &Linear) -> Result<Option<(QuantizedWeight, Option<Vec<u32>>)>> {
    match lin.capability() {
        Capability::Quantized(q) => Ok(Some((q.quantized()?, q.input_perm().map(<[u32]>::to_vec)))),
        _ => Ok(None),
    }
}

/// The checkpoint tensors of one quantized block, under `model.layers.{i}`, in `format`.
pub fn block_tensors(i: usize, block: &Block, format: QuantFormat) -> Result<Vec<(String, Tensor)>> {
    let p = format!("model.layers.{i}");
    let cpu = candle_core::Device::Cpu;
    let f16 = |t: &Tensor| t.to_dtype(DType::F16).and_then(|t| t.to_device(&cpu)).map_err(Error::from);
    let mut out = vec![
        (format!("{p}.input_layernorm.weight"), f16(&block.input_layernorm.weight)?),
        (format!("{p}.post_attention_layernorm.weight"), f16(&block.post_attention_layernorm.weight)?),
    ];
    if let (Some(qn), Some(kn)) = (&block.self_attn.q_norm, &block.self_attn.k_norm) {
        out.push((format!("{p}.self_attn.q_norm.weight"), f16(&qn.weight)?));
        out.push((format!("{p}.self_attn.k_norm.weight"), f16(&kn.weight)?));
    }
    for (name, lin) in block.linears() {
        let at = |e: &dyn std::fmt::Display| Error::msg(format!("{p}.{name}: {e}"));
        let (q, perm) = quantized_parts(lin)
            .map_err(|e| at(&e))?
            .ok_or_else(|| Error::msg(format!("{p}.{name} is not quantized ({} layer)", lin.kind())))?;
        let (i_n, o_n, groups) = (q.shape.k, q.shape.n, q.groups());
        let (qweight, qzeros, scales) = match format {
            QuantFormat::AwqGemm => {
                if perm.is_some() {
                    return Err(at(&"its inputs are permuted (act-order groups), which the AWQ GEMM layout cannot store"));
                }
                let t = q.to_awq_gemm().map_err(|e| at(&e))?;
                (Tensor::from_vec(t.qweight, (i_n, o_n / 8), &cpu)?, Tensor::from_vec(t.qzeros, (groups, o_n / 8), &cpu)?, Tensor::from_vec(t.scales, (groups, o_n), &cpu)?)
            }
            QuantFormat::Gptq(f) => {
                let t = q.to_gptq(perm.as_deref(), f.zeros).map_err(|e| at(&e))?;
                out.push((format!("{p}.{name}.g_idx"), Tensor::from_vec(t.g_idx, i_n, &cpu)?));
                (Tensor::from_vec(t.qweight, (i_n / 8, o_n), &cpu)?, Tensor::from_vec(t.qzeros, (groups, o_n / 8), &cpu)?, Tensor::from_vec(t.scales, (groups, o_n), &cpu)?)
            }
        };
        out.push((format!("{p}.{name}.qweight"), qweight));
        out.push((format!("{p}.{name}.qzeros"), qzeros));
        out.push((format!("{p}.{name}.scales"), scales.to_dtype(DType::F16)?));
        if let Some(b) = lin.bias() {
            out.push((format!("{p}.{name}.bias"), f16(b)?));
        }
    }
    Ok(out)
}
