//! The asymmetric group quantizer of AWQ (docs/AWQ.md, "The quantizer"), on f32 data.
//!
//! `scale = clamp(max - min, 1e-5) / (2^bits - 1)`, `zero = clamp(-round(min / scale), 0, 2^bits - 1)`,
//! `q = clamp(round(w / scale) + zero, 0, 2^bits - 1)`, `dequant = (q - zero) * scale`.
use super::format::{QuantizedWeight, WeightShape};
use super::scheme::QuantScheme;
use crate::error::Result;
use candle_core::{DType, Tensor, D};

/// Scale and zero of one group from its min and max.
#[inline]
pub fn group_scale_zero(min: f32, max: f32, max_code: f32) -> (f32, f32) {
    let scale = (max - min).max(1e-5) / max_code;
    let zero = (-(min / scale).round()).clamp(0.0, max_code);
    (scale, zero)
}

#[inline]
pub fn quantize_value(w: f32, scale: f32, zero: f32, max_code: f32) -> f32 {
    ((w / scale).round() + zero).clamp(0.0, max_code)
}

/// Quantize-dequantize of a `[out, in]` tensor, group-wise along `in` (tensor ops, any device).
/// Computed in f32; returns f32.
pub fn fake_quantize(w: &Tensor, p: QuantScheme) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let g = p.group_for(inp);
    let w = w.to_dtype(DType::F32)?.reshape((out * inp / g, g))?;
    let max = w.max_keepdim(D::Minus1)?;
    let min = w.min_keepdim(D::Minus1)?;
    let mc = f64::from(p.max_code());
    let scale = ((&max - &min)?.clamp(1e-5, f64::INFINITY)? / mc)?;
    let zero = (min.broadcast_div(&scale)?.round()?.neg()?).clamp(0.0, mc)?;
    let q = (w.broadcast_div(&scale)?.round()?.broadcast_add(&zero)?).clamp(0.0, mc)?;
    let dq = q.broadcast_sub(&zero)?.broadcast_mul(&scale)?;
    Ok(dq.reshape((out, inp))?)
}

/// Quantizes a `[out, in]` f32 row-major matrix to integer codes, zeros and scales.
pub fn quantize_codes(w: &[f32], out: usize, inp: usize, p: QuantScheme) -> QuantizedWeight {
    let g = p.group_for(inp);
    let groups = inp / g;
    let mc = p.max_code();
    let mut codes = vec![0u8; out * inp];
    let mut zeros = vec![0u8; out * groups];
    let mut scales = vec![0f32; out * groups];
    // Rows in parallel (each independent, so the result is the same): one thread took about a
    // second per Llama-2-7B block, most of a GPU calibration pass's rounding phase.
    use rayon::prelude::*;
    codes.par_chunks_mut(inp.max(1)).zip(zeros.par_chunks_mut(groups.max(1))).zip(scales.par_chunks_mut(groups.max(1))).enumerate().for_each(|(o, ((cr, zr), sr))| {
        for gi in 0..groups {
            let row = &w[o * inp + gi * g..o * inp + (gi + 1) * g];
            let (mn, mx) = row.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &x| (a.min(x), b.max(x)));
            let (scale, zero) = group_scale_zero(mn, mx, mc);
            zr[gi] = zero as u8;
            sr[gi] = scale;
            for (c, &x) in cr[gi * g..(gi + 1) * g].iter_mut().zip(row) {
                *c = quantize_value(x, scale, zero, mc) as u8;
            }
        }
    });
    QuantizedWeight { bits: p.bits, shape: WeightShape::new(out, inp, g), codes, zeros, scales }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn fake_quant_matches_codes_path() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (5, 128), &dev).unwrap();
        let p = QuantScheme::new(4, 32).unwrap();
        let a = fake_quantize(&w, p).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let q = quantize_codes(&w.flatten_all().unwrap().to_vec1::<f32>().unwrap(), 5, 128, p);
        let b = q.dequantize();
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 1e-6 * x.abs().max(1.0), "{x} vs {y}");
        }
    }
}
