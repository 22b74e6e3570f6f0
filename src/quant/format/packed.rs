//! The CPU kernel's layout of a 4-bit weight (repacked from the checkpoint at load time): for
//! output row `o`, the `k` codes are stored in chunks of 32 as 16 bytes, byte `j` holding weight
//! `j` in its low nibble and weight `j + 16` in its high nibble, so one 16-byte load unpacks to 32
//! consecutive weights with two masks. Per (row, group): an f16 `scale` (the checkpoint's own
//! precision) and a u8 `zero`, 3 bytes a group; `w = (q - zero) * scale`. The kernels that read it
//! are in `crate::quant::cpu`.
use super::{QuantizedWeight, WeightShape};
use half::f16;
use std::sync::OnceLock;

/// A 4-bit group-quantized weight in the CPU kernel's layout.
#[derive(Debug, Clone)]
pub struct PackedQ4 {
    pub shape: WeightShape,
    /// `[n][k / 2]`, see the module docs.
    pub codes: Vec<u8>,
    /// `[n][groups]`
    pub scales: Vec<f16>,
    /// `[n][groups]`
    pub zeros: Vec<u8>,
    /// f32 copies for the integer kernels, built on their first use.
    pub f32_scales: OnceLock<F32Scales>,
}

/// A weight's scales and `scale · zero` in f32 (the integer kernels would otherwise convert a
/// row's scales on every call): each `[n][groups + 1]`, the extra entry a copy of the row's last
/// one, so a kernel reading whole pairs of 32-chunks never leaves the row.
#[derive(Debug, Clone)]
pub struct F32Scales {
    pub scales: Vec<f32>,
    pub scaled_zeros: Vec<f32>,
}

impl PackedQ4 {
    pub fn new(shape: WeightShape, codes: Vec<u8>, scales: Vec<f16>, zeros: Vec<u8>) -> Self {
        Self { shape, codes, scales, zeros, f32_scales: OnceLock::new() }
    }

    /// [`PackedQ4::f32_scales`], built now if it was not yet; the row stride is `groups + 1`.
    pub fn scales_f32(&self) -> &F32Scales {
        self.f32_scales.get_or_init(|| {
            let g = self.groups();
            let mut scales = vec![0f32; self.shape.n * (g + 1)];
            let mut scaled_zeros = vec![0f32; self.shape.n * (g + 1)];
            for (o, (dst, dz)) in scales.chunks_exact_mut(g + 1).zip(scaled_zeros.chunks_exact_mut(g + 1)).enumerate() {
                half::slice::HalfFloatSliceExt::convert_to_f32_slice(&self.scales[o * g..(o + 1) * g], &mut dst[..g]);
                dst[g] = dst[g - 1];
                for ((z, s), q) in dz.iter_mut().zip(dst.iter()).zip(&self.zeros[o * g..(o + 1) * g]) {
                    *z = s * f32::from(*q);
                }
                dz[g] = dz[g - 1];
            }
            F32Scales { scales, scaled_zeros }
        })
    }

    pub fn groups(&self) -> usize {
        self.shape.groups()
    }

    /// Whether `k` and the group size suit the packed layout (whole 32-weight chunks).
    pub fn supports(k: usize, group_size: usize) -> bool {
        k.is_multiple_of(32) && group_size.is_multiple_of(32) && group_size > 0 && k.is_multiple_of(group_size)
    }

    /// Repacks a 4-bit [`QuantizedWeight`]. Scales are kept as f16, as AWQ checkpoints store
    /// them (the quantization pass rounds them so too).
    pub fn from_quantized(q: &QuantizedWeight) -> Self {
        let WeightShape { n, k, group_size: g } = q.shape;
        debug_assert!(q.bits == 4 && Self::supports(k, g));
        let mut codes = vec![0u8; n * k / 2];
        for o in 0..n {
            let row = &q.codes[o * k..(o + 1) * k];
            let dst = &mut codes[o * k / 2..(o + 1) * k / 2];
            for c in 0..k / 32 {
                for j in 0..16 {
                    dst[c * 16 + j] = (row[c * 32 + j] & 0xF) | ((row[c * 32 + j + 16] & 0xF) << 4);
                }
            }
        }
        let scales = q.scales.iter().map(|&s| f16::from_f32(s)).collect();
        Self::new(q.shape, codes, scales, q.zeros.clone())
    }

    /// The integer codes back, as a [`QuantizedWeight`].
    pub fn to_quantized(&self) -> QuantizedWeight {
        let WeightShape { n, k, .. } = self.shape;
        let mut codes = vec![0u8; n * k];
        for o in 0..n {
            self.unpack_row(o, &mut codes[o * k..(o + 1) * k]);
        }
        QuantizedWeight {
            bits: 4,
            shape: self.shape,
            codes,
            zeros: self.zeros.clone(),
            scales: self.scales.iter().map(|s| s.to_f32()).collect(),
        }
    }

    fn unpack_row(&self, o: usize, out: &mut [u8]) {
        let k = self.shape.k;
        let src = &self.codes[o * k / 2..(o + 1) * k / 2];
        for c in 0..k / 32 {
            for j in 0..16 {
                let b = src[c * 16 + j];
                out[c * 32 + j] = b & 0xF;
                out[c * 32 + j + 16] = b >> 4;
            }
        }
    }

    /// Dequantizes row `o` into `out` (`k` values).
    pub fn dequantize_row(&self, o: usize, out: &mut [f32]) {
        let WeightShape { k, group_size: g, .. } = self.shape;
        let groups = self.groups();
        let src = &self.codes[o * k / 2..(o + 1) * k / 2];
        for c in 0..k / 32 {
            let gi = (c * 32) / g;
            let s = self.scales[o * groups + gi].to_f32();
            let m = -f32::from(self.zeros[o * groups + gi]) * s;
            for j in 0..16 {
                let b = src[c * 16 + j];
                out[c * 32 + j] = f32::from(b & 0xF) * s + m;
                out[c * 32 + j + 16] = f32::from(b >> 4) * s + m;
            }
        }
    }
}
