//! The AutoAWQ "GEMM" packing of 4-bit codes (docs/AWQ.md, "The AutoAWQ GEMM checkpoint").
//!
//! Codes are transposed to `[in, out]`; packed column `c` of an int32 holds output channels
//! `8c .. 8c+7`, nibble `i` holding channel `8c + ORDER[i]`. Zero points use the same packing.
use super::{QuantizedWeight, WeightShape};
use crate::error::{Error, Result};

pub const ORDER: [usize; 8] = [0, 2, 4, 6, 1, 3, 5, 7];

/// Packs codes given as `[rows][out]` (row-major, `rows * out` values, each < 16) into
/// `[rows][out / 8]` int32 words.
pub fn pack_rows(codes: &[u8], rows: usize, out: usize) -> Result<Vec<i32>> {
    if !out.is_multiple_of(8) {
        return Err(Error::msg(format!("AWQ packing needs out_features divisible by 8, got {out}")));
    }
    if codes.len() != rows * out {
        return Err(Error::msg(format!("pack: {} codes for a {rows}x{out} matrix", codes.len())));
    }
    let mut packed = vec![0i32; rows * out / 8];
    for r in 0..rows {
        for c in 0..out / 8 {
            let mut word = 0u32;
            for (i, &o) in ORDER.iter().enumerate() {
                let q = codes[r * out + 8 * c + o];
                debug_assert!(q < 16);
                word |= u32::from(q & 0xF) << (4 * i);
            }
            packed[r * out / 8 + c] = word as i32;
        }
    }
    Ok(packed)
}

/// The inverse of [`pack_rows`]: `[rows][out / 8]` words to `[rows][out]` codes.
pub fn unpack_rows(packed: &[i32], rows: usize, out: usize) -> Vec<u8> {
    let mut codes = vec![0u8; rows * out];
    for r in 0..rows {
        for c in 0..out / 8 {
            let word = packed[r * out / 8 + c] as u32;
            for (i, &o) in ORDER.iter().enumerate() {
                codes[r * out + 8 * c + o] = ((word >> (4 * i)) & 0xF) as u8;
            }
        }
    }
    codes
}

/// The three AWQ GEMM tensors' data: qweight `[in, out/8]`, qzeros `[in/g, out/8]`,
/// scales `[in/g, out]` (f32 here; stored as f16).
pub struct AwqGemmTensors {
    pub qweight: Vec<i32>,
    pub qzeros: Vec<i32>,
    pub scales: Vec<f32>,
}

impl QuantizedWeight {
    /// Transposes to `[in, out]` and packs in the AutoAWQ GEMM layout.
    pub fn to_awq_gemm(&self) -> Result<AwqGemmTensors> {
        if self.bits != 4 {
            return Err(Error::msg(format!(
                "the AWQ GEMM checkpoint format packs 4-bit codes only; {}-bit quantization can be \
                 evaluated fake-quantized (awq-run eval --fake-quant) but not written",
                self.bits
            )));
        }
        let (o_n, i_n) = (self.shape.n, self.shape.k);
        let groups = self.groups();
        let mut t_codes = vec![0u8; o_n * i_n];
        for o in 0..o_n {
            for i in 0..i_n {
                t_codes[i * o_n + o] = self.codes[o * i_n + i];
            }
        }
        let mut t_zeros = vec![0u8; groups * o_n];
        let mut t_scales = vec![0f32; groups * o_n];
        for o in 0..o_n {
            for g in 0..groups {
                t_zeros[g * o_n + o] = self.zeros[o * groups + g];
                t_scales[g * o_n + o] = self.scales[o * groups + g];
            }
        }
        Ok(AwqGemmTensors {
            qweight: pack_rows(&t_codes, i_n, o_n)?,
            qzeros: pack_rows(&t_zeros, groups, o_n)?,
            scales: t_scales,
        })
    }

    /// Reads the AutoAWQ GEMM tensors back (scales already converted to f32).
    pub fn from_awq_gemm(t: &AwqGemmTensors, shape: WeightShape) -> Result<Self> {
        let (in_features, out_features) = (shape.k, shape.n);
        let groups = shape.groups();
        if t.qweight.len() != in_features * out_features / 8
            || t.qzeros.len() != groups * out_features / 8
            || t.scales.len() != groups * out_features
        {
            return Err(Error::msg(format!(
                "AWQ tensors have inconsistent sizes for a {shape} weight: qweight {} words, qzeros {}, scales {}",
                t.qweight.len(),
                t.qzeros.len(),
                t.scales.len()
            )));
        }
        let t_codes = unpack_rows(&t.qweight, in_features, out_features);
        let t_zeros = unpack_rows(&t.qzeros, groups, out_features);
        let mut codes = vec![0u8; out_features * in_features];
        for i in 0..in_features {
            for o in 0..out_features {
                codes[o * in_features + i] = t_codes[i * out_features + o];
            }
        }
        let mut zeros = vec![0u8; out_features * groups];
        let mut scales = vec![0f32; out_features * groups];
        for g in 0..groups {
            for o in 0..out_features {
                zeros[o * groups + g] = t_zeros[g * out_features + o];
                scales[o * groups + g] = t.scales[g * out_features + o];
            }
        }
        Ok(Self { bits: 4, shape, codes, zeros, scales })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_unpack_roundtrip_and_nibble_order() {
        let codes: Vec<u8> = (0..3 * 16).map(|i| (i * 7 % 16) as u8).collect();
        let packed = pack_rows(&codes, 3, 16).unwrap();
        assert_eq!(unpack_rows(&packed, 3, 16), codes);
        // Channel 1 sits in nibble 4 (ORDER[4] = 1).
        let mut one = vec![0u8; 8];
        one[1] = 0xA;
        assert_eq!(pack_rows(&one, 1, 8).unwrap()[0] as u32, 0xA << 16);
    }

    #[test]
    fn pack_refuses_bad_width() {
        assert!(pack_rows(&[0; 6], 1, 6).unwrap_err().to_string().contains("divisible by 8"));
    }
}
