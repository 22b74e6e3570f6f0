//! Reading the linear layers of an AutoAWQ GEMM checkpoint (`qweight`, `qzeros`, `scales`) into
//! the crate's 4-bit layer.
use super::spec::QuantSpec;
use crate::linear::{DenseLinear, Linear, QuantLinear};
use crate::quant::format::awq_gemm::AwqGemmTensors;
use crate::quant::{QuantizedWeight, WeightShape};
use candle_core::DType;
use candle_nn::VarBuilder;

/// Reads one AWQ GEMM linear (`qweight`, `qzeros`, `scales`, optional `bias`) into a
/// [`QuantizedWeight`].
pub fn read_awq_weight(vb: &VarBuilder, in_f: usize, out_f: usize, q: &QuantSpec) -> candle_core::Result<QuantizedWeight> {
    let g = q.scheme.group_for(in_f);
    if in_f == 0 || out_f == 0 || g == 0 {
        candle_core::bail!("{}: a {out_f}x{in_f} layer with group size {g} has no weights", vb.prefix());
    }
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
    QuantizedWeight::from_awq_gemm(&AwqGemmTensors { qweight, qzeros, scales }, WeightShape::new(out_f, in_f, g))
        .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", vb.prefix())))
}

/// Loads one linear of an AWQ checkpoint. Modules in `modules_to_not_convert` load dense.
pub fn load_awq_linear(vb: VarBuilder, in_f: usize, out_f: usize, bias: bool, q: &QuantSpec) -> candle_core::Result<Linear> {
    let prefix = vb.prefix();
    if q.skip.iter().any(|s| prefix.contains(s.as_str())) || vb.contains_tensor("weight") {
        return Ok(DenseLinear::load(vb, in_f, out_f, bias)?.into_linear());
    }
    let w = read_awq_weight(&vb, in_f, out_f, q)?;
    let b = if bias { Some(vb.get(out_f, "bias")?) } else { None };
    Ok(QuantLinear::new(w, b, vb.dtype(), vb.device())?.into_linear())
}

