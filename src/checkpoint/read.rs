//! Reading the linear layers of a 4-bit checkpoint into the crate's 4-bit layer: AutoAWQ GEMM
//! (`qweight`, `qzeros`, `scales`) or GPTQ (the same names in another layout, plus `g_idx`).
use super::spec::{GptqFormat, QuantFormat, QuantSpec};
use crate::linear::{DenseLinear, Linear, QuantLinear};
use crate::quant::format::awq_gemm::AwqGemmTensors;
use crate::quant::format::gptq::GptqTensors;
use crate::quant::{QuantizedWeight, WeightShape};
use candle_core::DType;
use candle_nn::VarBuilder;

fn check_shape(vb: &VarBuilder, in_f: usize, out_f: usize, g: usize) -> candle_core::Result<()> {
    if in_f == 0 || out_f == 0 || g == 0 {
        candle_core::bail!("{}: a {out_f}x{in_f} layer with group size {g} has no weights", vb.prefix());
    }
    if !in_f.is_multiple_of(g) || !out_f.is_multiple_of(8) {
        candle_core::bail!("{}: {out_f}x{in_f} does not fit group size {g} and 8-wide packing", vb.prefix());
    }
    Ok(())
}

fn get_i32(vb: &VarBuilder, name: &str, shape: &[usize]) -> candle_core::Result<Vec<i32>> {
    vb.get_with_hints_dtype(shape, name, Default::default(), DType::I32)?.flatten_all()?.to_vec1::<i32>()
}

fn get_f32(vb: &VarBuilder, name: &str, shape: &[usize]) -> candle_core::Result<Vec<f32>> {
    vb.get_with_hints_dtype(shape, name, Default::default(), DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

/// Reads one AWQ GEMM linear (`qweight`, `qzeros`, `scales`) into a [`QuantizedWeight`].
pub fn read_awq_weight(vb: &VarBuilder, in_f: usize, out_f: usize, q: &QuantSpec) -> candle_core::Result<QuantizedWeight> {
    let g = q.scheme.group_for(in_f);
    check_shape(vb, in_f, out_f, g)?;
    let qweight = get_i32(vb, "qweight", &[in_f, out_f / 8])?;
    let qzeros = get_i32(vb, "qzeros", &[in_f / g, out_f / 8])?;
    let scales = get_f32(vb, "scales", &[in_f / g, out_f])?;
    QuantizedWeight::from_awq_gemm(&AwqGemmTensors { qweight, qzeros, scales }, WeightShape::new(out_f, in_f, g))
        .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", vb.prefix())))
}

/// Reads one GPTQ linear (`qweight`, `qzeros`, `scales`, `g_idx`): the weight with contiguous
/// groups and, for act-order checkpoints whose `g_idx` permutes the inputs, the stored column
/// order. A checkpoint without `g_idx` has the natural one.
pub fn read_gptq_weight(vb: &VarBuilder, in_f: usize, out_f: usize, q: &QuantSpec, f: &GptqFormat) -> candle_core::Result<(QuantizedWeight, Option<Vec<u32>>)> {
    let g = q.scheme.group_for(in_f);
    check_shape(vb, in_f, out_f, g)?;
    let groups = in_f / g;
    let qweight = get_i32(vb, "qweight", &[in_f / 8, out_f])?;
    let qzeros = get_i32(vb, "qzeros", &[groups, out_f / 8])?;
    let scales = get_f32(vb, "scales", &[groups, out_f])?;
    let g_idx = if vb.contains_tensor("g_idx") {
        // Read at its stored length, so that a wrong one is reported as such.
        let t = vb.get_unchecked_dtype("g_idx", DType::I32)?;
        if t.rank() != 1 {
            candle_core::bail!("{}.g_idx: shape {:?}, expected [{in_f}]", vb.prefix(), t.dims());
        }
        t.to_vec1::<i32>()?
    } else {
        (0..in_f).map(|i| (i / g) as i32).collect()
    };
    QuantizedWeight::from_gptq(&GptqTensors { qweight, qzeros, scales, g_idx }, WeightShape::new(out_f, in_f, g), q.scheme.bits, f.zeros)
        .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", vb.prefix())))
}

/// Loads one linear of a 4-bit checkpoint. Modules in `modules_to_not_convert` (and any that
/// carry a plain `weight`) load dense.
pub fn load_quant_linear(vb: VarBuilder, in_f: usize, out_f: usize, bias: bool, q: &QuantSpec) -> candle_core::Result<Linear> {
    let prefix = vb.prefix();
    if q.skip.iter().any(|s| prefix.contains(s.as_str())) || vb.contains_tensor("weight") {
        return Ok(DenseLinear::load(vb, in_f, out_f, bias)?.into_linear());
    }
    let (w, perm) = match &q.format {
        QuantFormat::AwqGemm => (read_awq_weight(&vb, in_f, out_f, q)?, None),
        QuantFormat::Gptq(f) => read_gptq_weight(&vb, in_f, out_f, q, f)?,
    };
    let b = if bias { Some(vb.get(out_f, "bias")?) } else { None };
    let mut layer = QuantLinear::new(w, b, vb.dtype(), vb.device())?;
    if let Some(p) = perm {
        layer = layer.with_input_perm(p)?;
    }
    Ok(layer.into_linear())
}
