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
    /// The integer kernels' table of scales and zeros, built on their first use.
    pub table_cache: OnceLock<ScaleTable>,
    /// The decode kernels' copy in panels of eight rows, built on their first use.
    pub panel_cache: OnceLock<super::panel::PanelQ4>,
}

/// A weight's (scale, zero) per group as one 4-byte word, the f16 scale in the low half and the
/// zero (a small integer, exact in f16) in the high one, so a kernel gets both with one broadcast
/// load and one conversion: `[n][groups + 1]`, the extra entry a copy of the row's last one, so a
/// kernel reading whole pairs of 32-chunks never leaves the row. Half the bytes of an f32 scale
/// and an f32 `scale · zero`, which at 4 bits and group size 64 were an eighth of a decode
/// step's reads.
#[derive(Debug, Clone)]
pub struct ScaleTable {
    pub sz: Vec<u32>,
}

impl ScaleTable {
    /// The word of one (scale, zero) pair.
    pub fn word(scale: f16, zero: u8) -> u32 {
        u32::from(scale.to_bits()) | u32::from(f16::from_f32(f32::from(zero)).to_bits()) << 16
    }
    /// (scale, zero) of a word as f32.
    #[inline(always)]
    pub fn unpack(w: u32) -> (f32, f32) {
        (f16::from_bits(w as u16).to_f32(), f16::from_bits((w >> 16) as u16).to_f32())
    }
}

impl PackedQ4 {
    pub fn new(shape: WeightShape, codes: Vec<u8>, scales: Vec<f16>, zeros: Vec<u8>) -> Self {
        Self { shape, codes, scales, zeros, table_cache: OnceLock::new(), panel_cache: OnceLock::new() }
    }

    /// The code (0..15) of row `o`, input `i`: 32-weight chunks of 16 bytes, byte j holding
    /// weight j in its low nibble and weight j + 16 in its high one.
    #[inline]
    pub fn code(&self, o: usize, i: usize) -> u8 {
        let b = self.codes[o * self.shape.k / 2 + i / 32 * 16 + i % 16];
        if i % 32 < 16 {
            b & 0xF
        } else {
            b >> 4
        }
    }

    /// [`PackedQ4::panel_cache`], built now if it was not yet; the weight must
    /// [`fit`](super::panel::PanelQ4::fits).
    pub fn panels(&self) -> &super::panel::PanelQ4 {
        self.panel_cache.get_or_init(|| super::panel::PanelQ4::from_packed(self))
    }

    /// [`PackedQ4::table_cache`], built now if it was not yet; the row stride is `groups + 1`.
    pub fn scale_table(&self) -> &ScaleTable {
        self.table_cache.get_or_init(|| {
            let g = self.groups();
            let mut sz = vec![0u32; self.shape.n * (g + 1)];
            for (o, dst) in sz.chunks_exact_mut(g + 1).enumerate() {
                for (d, (s, z)) in dst.iter_mut().zip(self.scales[o * g..(o + 1) * g].iter().zip(&self.zeros[o * g..(o + 1) * g])) {
                    *d = ScaleTable::word(*s, *z);
                }
                dst[g] = dst[g - 1];
            }
            ScaleTable { sz }
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
        // Rows in parallel: a 7B model repacks 6.5 billion codes.
        use rayon::prelude::*;
        codes.par_chunks_mut((k / 2).max(1)).zip(q.codes.par_chunks(k.max(1))).for_each(|(dst, row)| {
            for c in 0..k / 32 {
                for j in 0..16 {
                    dst[c * 16 + j] = (row[c * 32 + j] & 0xF) | ((row[c * 32 + j + 16] & 0xF) << 4);
                }
            }
        });
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
