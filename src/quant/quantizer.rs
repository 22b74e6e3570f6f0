//! The asymmetric group quantizer of AWQ (../shared/AWQ.md section 5), on f32 data.
//!
//! `scale = clamp(max - min, 1e-5) / (2^bits - 1)`, `zero = clamp(-round(min / scale), 0, 2^bits - 1)`,
//! `q = clamp(round(w / scale) + zero, 0, 2^bits - 1)`, `dequant = (q - zero) * scale`.
use crate::error::{Error, Result};
use candle_core::{DType, Tensor, D};

/// Bits and group size of a quantization. `group_size == 0` means one group per output row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantParams {
    pub bits: u32,
    pub group_size: usize,
}

impl QuantParams {
    pub fn new(bits: u32, group_size: usize) -> Result<Self> {
        if !(2..=8).contains(&bits) {
            return Err(Error::msg(format!("--bits {bits}: supported widths are 2 to 8")));
        }
        Ok(Self { bits, group_size })
    }
    pub fn max_code(&self) -> f32 {
        ((1u32 << self.bits) - 1) as f32
    }
    /// The group size for a row of `in_features` (per-channel when 0).
    pub fn group_for(&self, in_features: usize) -> usize {
        if self.group_size == 0 { in_features } else { self.group_size }
    }
    /// Checks that `in_features` of layer `name` splits into whole groups.
    pub fn check_layer(&self, name: &str, in_features: usize) -> Result<()> {
        let g = self.group_for(in_features);
        if in_features % g != 0 {
            let fits: Vec<String> = [32usize, 64, 128]
                .iter()
                .filter(|&&s| in_features % s == 0)
                .map(|s| s.to_string())
                .collect();
            let hint = if fits.is_empty() {
                "only per-channel quantization (--group-size 0) fits".to_string()
            } else {
                format!("group sizes that divide it: {}", fits.join(", "))
            };
            return Err(Error::msg(format!(
                "layer {name}: input dimension {in_features} is not divisible by the group size {g}; {hint}"
            )));
        }
        Ok(())
    }
}

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
pub fn fake_quantize(w: &Tensor, p: QuantParams) -> Result<Tensor> {
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
pub fn quantize_codes(w: &[f32], out: usize, inp: usize, p: QuantParams) -> super::pack::QuantizedWeight {
    let g = p.group_for(inp);
    let groups = inp / g;
    let mc = p.max_code();
    let mut codes = vec![0u8; out * inp];
    let mut zeros = vec![0u8; out * groups];
    let mut scales = vec![0f32; out * groups];
    for o in 0..out {
        for gi in 0..groups {
            let row = &w[o * inp + gi * g..o * inp + (gi + 1) * g];
            let (mn, mx) = row.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &x| (a.min(x), b.max(x)));
            let (scale, zero) = group_scale_zero(mn, mx, mc);
            zeros[o * groups + gi] = zero as u8;
            scales[o * groups + gi] = scale;
            for (k, &x) in row.iter().enumerate() {
                codes[o * inp + gi * g + k] = quantize_value(x, scale, zero, mc) as u8;
            }
        }
    }
    super::pack::QuantizedWeight { bits: p.bits, out_features: out, in_features: inp, group_size: g, codes, zeros, scales }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn fake_quant_matches_codes_path() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (5, 128), &dev).unwrap();
        let p = QuantParams::new(4, 32).unwrap();
        let a = fake_quantize(&w, p).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let q = quantize_codes(&w.flatten_all().unwrap().to_vec1::<f32>().unwrap(), 5, 128, p);
        let b = q.dequantize();
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 1e-6 * x.abs().max(1.0), "{x} vs {y}");
        }
    }

    #[test]
    fn group_error_suggests_divisors() {
        let p = QuantParams::new(4, 128).unwrap();
        let e = p.check_layer("model.layers.0.mlp.up_proj", 576).unwrap_err().to_string();
        assert!(e.contains("model.layers.0.mlp.up_proj") && e.contains("32, 64"), "{e}");
    }

    #[test]
    fn bits_out_of_range_refused() {
        assert!(QuantParams::new(9, 64).is_err());
        assert!(QuantParams::new(1, 64).is_err());
    }
}
