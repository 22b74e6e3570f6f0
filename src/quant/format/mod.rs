//! Weight layouts, apart from the kernels that read them: the quantizer's plain codes
//! ([`QuantizedWeight`]), the AutoAWQ GEMM checkpoint packing ([`awq_gemm`]), the GPTQ checkpoint
//! packing ([`gptq`]), the CPU kernel's
//! packed rows ([`packed::PackedQ4`]) and the CUDA kernels' tiles ([`tiled::TiledQ4`]). Every one
//! of them describes its matrix with one [`WeightShape`].
pub mod awq_gemm;
pub mod gptq;
pub mod packed;
pub mod panel;
pub mod tiled;

/// The shape of a group-quantized weight in HF orientation: `n` output rows (out_features) of
/// `k` input columns (in_features), each row cut into groups of `group_size` columns with one
/// scale and zero point each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WeightShape {
    pub n: usize,
    pub k: usize,
    pub group_size: usize,
}

impl WeightShape {
    pub fn new(n: usize, k: usize, group_size: usize) -> Self {
        Self { n, k, group_size }
    }

    /// Groups per row.
    pub fn groups(&self) -> usize {
        self.k / self.group_size.max(1)
    }
}

impl std::fmt::Display for WeightShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{} (group size {})", self.n, self.k, self.group_size)
    }
}

/// A group-quantized weight of any width (2–8 bits): `codes[o * k + i]`, `zeros[o * groups + g]`,
/// `scales[o * groups + g]`.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedWeight {
    pub bits: u32,
    pub shape: WeightShape,
    pub codes: Vec<u8>,
    pub zeros: Vec<u8>,
    pub scales: Vec<f32>,
}

impl QuantizedWeight {
    pub fn groups(&self) -> usize {
        self.shape.groups()
    }

    /// Dequantized weight `[n, k]`, row-major: `(code - zero) * scale`.
    pub fn dequantize(&self) -> Vec<f32> {
        let WeightShape { n, k, group_size: g } = self.shape;
        let groups = self.groups();
        let mut w = vec![0f32; n * k];
        for o in 0..n {
            for i in 0..k {
                let gi = o * groups + i / g;
                w[o * k + i] = (f32::from(self.codes[o * k + i]) - f32::from(self.zeros[gi])) * self.scales[gi];
            }
        }
        w
    }

    /// A random 4-bit weight (codes and zeros uniform, scales 0.002–0.012), for tests, benchmarks
    /// and dummy models.
    pub fn random_q4(shape: WeightShape, rng: &mut crate::rng::Rng) -> Self {
        let groups = shape.groups();
        Self {
            bits: 4,
            shape,
            codes: (0..shape.n * shape.k).map(|_| rng.nibble()).collect(),
            zeros: (0..shape.n * groups).map(|_| rng.nibble()).collect(),
            scales: (0..shape.n * groups).map(|_| 0.002 + 0.01 * rng.next_f32()).collect(),
        }
    }
}
