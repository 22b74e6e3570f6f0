//! The CUDA kernels' weight layout (see the top of `cuda/w4a16.cu`), built on the host at load
//! time so it can be tested without a GPU. One layout serves the GEMV, the tensor-core GEMM and
//! the dequantizer, so a layer keeps a single copy on the device.
//!
//! Units of 16 (k) x 64 (n) weights, 512 bytes each, stored k-unit-major. A unit is four rows of
//! 32 words, word-major: lane `l` owns word `l` of each row (bytes `128 i + 4 l`), so a warp reads
//! one row of a unit with one coalesced 4-byte load per lane, and every shared-memory read of it
//! is conflict-free. Word `i` of lane `l` holds the `mma.m16n8k16` B fragments of n8 tiles `2i`
//! and `2i + 1`. Rows are padded to a multiple of 64 with zero codes and scales.
use super::packed::PackedQ4;
use super::WeightShape;
use half::f16;

#[derive(Debug, Clone)]
pub struct TiledQ4 {
    pub shape: WeightShape,
    /// `n` rounded up to a multiple of 64.
    pub np: usize,
    /// `(k / 16) * (np / 64)` units of 512 bytes.
    pub units: Vec<u8>,
    /// `[groups][np]` pairs (scale, zero) as f16: what the kernels read as one `half2`.
    pub sz: Vec<f16>,
}

/// Where weight `(row, col)` of a unit lives: (lane, word, nibble). Rows and columns are relative
/// to the unit (row < 64, col < 16).
pub fn position(row: usize, col: usize) -> (usize, usize, usize) {
    let word = row / 16;
    let second_tile = (row % 16) / 8; // tile 2i or 2i + 1
    let g = row % 8;
    let t = (col % 8) / 2;
    let upper_k = col / 8; // k 2t+8, 2t+9
    let odd = col % 2; // k 2t+1 (or 2t+9): the upper half of the half2
    // Nibbles 0/4: tile 2i, k 2t/2t+1; 1/5: tile 2i, k+8; 2/6: tile 2i+1; 3/7: tile 2i+1, k+8.
    let nibble = second_tile * 2 + upper_k + 4 * odd;
    (g * 4 + t, word, nibble)
}

impl TiledQ4 {
    pub fn groups(&self) -> usize {
        self.shape.groups()
    }

    pub fn from_packed(w: &PackedQ4) -> Self {
        use rayon::prelude::*;
        let WeightShape { n, k, group_size: g } = w.shape;
        let np = n.div_ceil(64) * 64;
        let nunits = np / 64;
        // Rows past `n` pad the last unit with code 0.
        let code = |row: usize, col: usize| -> u8 { if row < n { w.code(row, col) } else { 0 } };
        let mut units = vec![0u8; (k / 16) * nunits * 512];
        // Units are independent: fill them in parallel (a 7B model has 6.5 billion weights).
        units.par_chunks_mut(512).enumerate().for_each(|(u, unit)| {
            let (kb, nb) = (u / nunits, u % nunits);
            for r in 0..64 {
                for c in 0..16 {
                    let (lane, word, nibble) = position(r, c);
                    unit[word * 128 + lane * 4 + nibble / 2] |= code(nb * 64 + r, kb * 16 + c) << (4 * (nibble % 2));
                }
            }
        });
        let groups = k / g;
        let mut sz = vec![f16::ZERO; groups * np * 2];
        for o in 0..n {
            for gi in 0..groups {
                sz[(gi * np + o) * 2] = w.scales[o * groups + gi];
                sz[(gi * np + o) * 2 + 1] = f16::from_f32(f32::from(w.zeros[o * groups + gi]));
            }
        }
        Self { shape: w.shape, np, units, sz }
    }

    /// The CPU layout back ([`TiledQ4::from_packed`] reversed): a layer whose weights live only
    /// on the GPU rebuilds its host copy from a download when one is asked for (a checkpoint).
    pub fn to_packed(&self) -> PackedQ4 {
        use rayon::prelude::*;
        let WeightShape { n, k, group_size: g } = self.shape;
        let mut codes = vec![0u8; n * k / 2];
        codes.par_chunks_mut((k / 2).max(1)).enumerate().for_each(|(row, dst)| {
            for c in 0..k / 32 {
                for j in 0..16 {
                    dst[c * 16 + j] = self.code(row, c * 32 + j) | (self.code(row, c * 32 + j + 16) << 4);
                }
            }
        });
        let groups = k / g;
        let mut scales = vec![f16::ZERO; n * groups];
        let mut zeros = vec![0u8; n * groups];
        for o in 0..n {
            for gi in 0..groups {
                scales[o * groups + gi] = self.sz[(gi * self.np + o) * 2];
                // Zeros are stored as f16 of a u8: exact.
                zeros[o * groups + gi] = self.sz[(gi * self.np + o) * 2 + 1].to_f32() as u8;
            }
        }
        PackedQ4::new(self.shape, codes, scales, zeros)
    }

    /// The code of weight `(row, col)`, read back through [`position`] (tests, and the statement
    /// of the layout the kernels rely on).
    pub fn code(&self, row: usize, col: usize) -> u8 {
        let nunits = self.np / 64;
        let (lane, word, nibble) = position(row % 64, col % 16);
        let byte = ((col / 16) * nunits + row / 64) * 512 + word * 128 + lane * 4 + nibble / 2;
        (self.units[byte] >> (4 * (nibble % 2))) & 0xF
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::format::QuantizedWeight;

    fn random_q(n: usize, k: usize, g: usize, seed: u64) -> QuantizedWeight {
        QuantizedWeight::random_q4(WeightShape::new(n, k, g), &mut crate::rng::Rng::new(seed))
    }

    #[test]
    fn every_code_lands_where_the_kernels_read_it() {
        for &(n, k, g) in &[(64, 32, 32), (136, 576, 64), (200, 224, 32), (8, 384, 128)] {
            let q = random_q(n, k, g, (n * k) as u64);
            let t = TiledQ4::from_packed(&PackedQ4::from_quantized(&q));
            assert_eq!(t.np % 64, 0);
            for o in 0..n {
                for c in 0..k {
                    assert_eq!(t.code(o, c), q.codes[o * k + c], "n={n} k={k} row {o} col {c}");
                }
            }
            for gi in 0..k / g {
                for o in 0..t.np {
                    let (s, z) = (t.sz[(gi * t.np + o) * 2].to_f32(), t.sz[(gi * t.np + o) * 2 + 1].to_f32());
                    if o < n {
                        assert_eq!(s, f16::from_f32(q.scales[o * (k / g) + gi]).to_f32());
                        assert_eq!(z, f32::from(q.zeros[o * (k / g) + gi]));
                    } else {
                        assert_eq!((s, z), (0.0, 0.0), "padding rows are zero");
                    }
                }
            }
        }
    }

    #[test]
    fn positions_are_a_bijection_on_a_unit() {
        let mut seen = std::collections::HashSet::new();
        for r in 0..64 {
            for c in 0..16 {
                let (lane, word, nibble) = position(r, c);
                assert!(lane < 32 && word < 4 && nibble < 8);
                assert!(seen.insert((lane, word, nibble)));
            }
        }
        // The mma B fragment of lane l = 4g + t: rows g (tile 2i) and g + 8 (tile 2i + 1).
        assert_eq!(position(0, 0), (0, 0, 0));
        assert_eq!(position(0, 1), (0, 0, 4));
        assert_eq!(position(0, 8), (0, 0, 1));
        assert_eq!(position(8, 9), (0, 0, 7));
        assert_eq!(position(17, 2), (5, 1, 0));
    }

    #[test]
    fn untiling_restores_the_packed_weight() {
        // Rows not a multiple of 64 (padding), several groups, odd multiples of 32.
        for (n, k, g) in [(130, 320, 64), (64, 96, 32), (7, 1536, 1536)] {
            let w = PackedQ4::from_quantized(&random_q(n, k, g, (n * k) as u64));
            let back = TiledQ4::from_packed(&w).to_packed();
            assert_eq!(back.shape, WeightShape::new(n, k, g));
            assert_eq!(back.codes, w.codes, "codes {n}x{k}");
            assert_eq!(back.scales, w.scales, "scales {n}x{k}");
            assert_eq!(back.zeros, w.zeros, "zeros {n}x{k}");
        }
    }
}
