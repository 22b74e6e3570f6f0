//! The GPTQ checkpoint packing of 4-bit codes, as AutoGPTQ, GPTQModel, transformers and vLLM
//! read it (docs/GPTQ.md, "Checkpoints").
//!
//! `qweight` `[in / 8, out]`: word `[r, o]` holds inputs `8r .. 8r+7` of output `o`, input `8r+k`
//! in bits `4k .. 4k+3` (plain order, packed along the input dimension, unlike AWQ's).
//! `qzeros` `[groups, out / 8]`: packed along the output dimension, plain order; the "gptq" (v1)
//! format stores `zero - 1`, "gptq_v2" the zero itself. `scales` `[groups, out]`. `g_idx` `[in]`:
//! the group of every input.
use super::{QuantizedWeight, WeightShape};
use crate::error::{Error, Result};

/// Codes per int32 word.
const PER_WORD: usize = 8;

/// How the zero points are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZeroStorage {
    /// `checkpoint_format: "gptq"`: `zero - 1` (what AutoGPTQ v1 wrote and vLLM reads).
    MinusOne,
    /// `checkpoint_format: "gptq_v2"` (GPTQModel): the zero itself.
    Plain,
}

impl ZeroStorage {
    fn offset(self) -> i32 {
        match self {
            ZeroStorage::MinusOne => 1,
            ZeroStorage::Plain => 0,
        }
    }
}

/// The four GPTQ tensors' data (scales f32 here; stored as f16).
#[derive(Debug, Clone, PartialEq)]
pub struct GptqTensors {
    pub qweight: Vec<i32>,
    pub qzeros: Vec<i32>,
    pub scales: Vec<f32>,
    pub g_idx: Vec<i32>,
}

fn check_bits(bits: u32) -> Result<()> {
    if bits != 4 {
        return Err(Error::msg(format!("{bits}-bit GPTQ weights are not supported (only 4-bit)")));
    }
    Ok(())
}

impl QuantizedWeight {
    /// Packs in the GPTQ layout. `perm` is the stored column order (stored column `j` is input
    /// `perm[j]`, see `QuantLinear::input_perm`): the checkpoint keeps inputs in their natural
    /// order and records each one's group in `g_idx`.
    pub fn to_gptq(&self, perm: Option<&[u32]>, zeros: ZeroStorage) -> Result<GptqTensors> {
        check_bits(self.bits)?;
        let WeightShape { n, k, group_size: g } = self.shape;
        let groups = self.groups();
        if k % PER_WORD != 0 || n % PER_WORD != 0 {
            return Err(Error::msg(format!("the GPTQ layout packs 8 codes per word: a {n}x{k} weight does not divide")));
        }
        let input_of = |j: usize| perm.map_or(j, |p| p[j] as usize);
        let mut qweight = vec![0u32; k / PER_WORD * n];
        let mut g_idx = vec![0i32; k];
        for j in 0..k {
            let c = input_of(j);
            g_idx[c] = (j / g) as i32;
            for o in 0..n {
                qweight[(c / PER_WORD) * n + o] |= u32::from(self.codes[o * k + j] & 0xF) << (4 * (c % PER_WORD));
            }
        }
        let off = zeros.offset();
        let mut qzeros = vec![0u32; groups * n / PER_WORD];
        let mut scales = vec![0f32; groups * n];
        for gi in 0..groups {
            for o in 0..n {
                let z = i32::from(self.zeros[o * groups + gi]) - off;
                if !(0..16).contains(&z) {
                    return Err(Error::msg(format!(
                        "zero point {} of output {o}, group {gi} cannot be stored in the \"gptq\" format (it stores zero - 1 in 4 bits)",
                        self.zeros[o * groups + gi]
                    )));
                }
                qzeros[gi * n / PER_WORD + o / PER_WORD] |= (z as u32) << (4 * (o % PER_WORD));
                scales[gi * n + o] = self.scales[o * groups + gi];
            }
        }
        Ok(GptqTensors {
            qweight: qweight.into_iter().map(|w| w as i32).collect(),
            qzeros: qzeros.into_iter().map(|w| w as i32).collect(),
            scales,
            g_idx,
        })
    }

    /// Reads the GPTQ tensors of a `shape` weight. Returns the weight with contiguous groups and,
    /// where `g_idx` is not `i / group_size` (act-order), the stored column order: inputs sorted by
    /// group, stored column `j` being input `perm[j]`.
    pub fn from_gptq(t: &GptqTensors, shape: WeightShape, bits: u32, zeros: ZeroStorage) -> Result<(Self, Option<Vec<u32>>)> {
        check_bits(bits)?;
        let WeightShape { n, k, group_size: g } = shape;
        let groups = shape.groups();
        if k % PER_WORD != 0 || n % PER_WORD != 0 {
            return Err(Error::msg(format!("a {n}x{k} weight does not divide into the GPTQ layout's 8 codes per word")));
        }
        for (name, len, want) in [
            ("qweight", t.qweight.len(), k / PER_WORD * n),
            ("qzeros", t.qzeros.len(), groups * n / PER_WORD),
            ("scales", t.scales.len(), groups * n),
            ("g_idx", t.g_idx.len(), k),
        ] {
            if len != want {
                return Err(Error::msg(format!("{name} has {len} values; a {shape} weight needs {want}")));
            }
        }
        let mut count = vec![0usize; groups];
        for (i, &gi) in t.g_idx.iter().enumerate() {
            match usize::try_from(gi).ok().filter(|&gi| gi < groups) {
                Some(gi) => count[gi] += 1,
                None => return Err(Error::msg(format!("g_idx[{i}] = {gi} is not a group of {groups}"))),
            }
        }
        if let Some((gi, c)) = count.iter().enumerate().find(|(_, &c)| c != g) {
            return Err(Error::msg(format!("g_idx puts {c} inputs in group {gi}; every group must have {g}")));
        }
        let natural = t.g_idx.iter().enumerate().all(|(i, &gi)| gi as usize == i / g);
        let perm: Option<Vec<u32>> = (!natural).then(|| {
            let mut p: Vec<u32> = (0..k as u32).collect();
            p.sort_by_key(|&c| t.g_idx[c as usize]);
            p
        });
        let input_of = |j: usize| perm.as_ref().map_or(j, |p| p[j] as usize);
        let mut codes = vec![0u8; n * k];
        for j in 0..k {
            let c = input_of(j);
            for o in 0..n {
                codes[o * k + j] = ((t.qweight[(c / PER_WORD) * n + o] as u32 >> (4 * (c % PER_WORD))) & 0xF) as u8;
            }
        }
        let off = zeros.offset();
        let mut zs = vec![0u8; n * groups];
        let mut scales = vec![0f32; n * groups];
        for gi in 0..groups {
            for o in 0..n {
                let stored = ((t.qzeros[gi * n / PER_WORD + o / PER_WORD] as u32 >> (4 * (o % PER_WORD))) & 0xF) as i32;
                let z = stored + off;
                if z > 15 {
                    return Err(Error::msg(format!(
                        "qzeros of output {o}, group {gi}: stored {stored} means zero point {z} in the \"gptq\" format, outside the 4-bit range"
                    )));
                }
                zs[o * groups + gi] = z as u8;
                scales[o * groups + gi] = t.scales[gi * n + o];
            }
        }
        Ok((Self { bits, shape, codes, zeros: zs, scales }, perm))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn weight(n: usize, k: usize, g: usize, seed: u64) -> QuantizedWeight {
        let mut rng = Rng::new(seed);
        let mut q = QuantizedWeight::random_q4(WeightShape::new(n, k, g), &mut rng);
        for z in q.zeros.iter_mut() {
            *z = (*z).max(1);
        }
        q
    }

    #[test]
    fn round_trip_with_and_without_a_permutation() {
        let q = weight(16, 64, 16, 1);
        for zs in [ZeroStorage::MinusOne, ZeroStorage::Plain] {
            let t = q.to_gptq(None, zs).unwrap();
            assert!(t.g_idx.iter().enumerate().all(|(i, &g)| g as usize == i / 16));
            assert_eq!(QuantizedWeight::from_gptq(&t, q.shape, 4, zs).unwrap(), (q.clone(), None));
        }
        let perm: Vec<u32> = (0..64u32).map(|j| (j * 37) % 64).collect();
        let t = q.to_gptq(Some(&perm), ZeroStorage::MinusOne).unwrap();
        let (back, p) = QuantizedWeight::from_gptq(&t, q.shape, 4, ZeroStorage::MinusOne).unwrap();
        // The reader sorts inputs by group (stable); within a group the order may differ from
        // `perm`, so compare input by input.
        let p = p.unwrap();
        let pos = |perm: &[u32], c: u32| perm.iter().position(|&x| x == c).unwrap();
        for c in 0..64u32 {
            let (a, b) = (pos(&perm, c), pos(&p, c));
            assert_eq!(a / 16, b / 16, "input {c} stays in its group");
            for o in 0..16 {
                assert_eq!(q.codes[o * 64 + a], back.codes[o * 64 + b]);
            }
        }
        assert_eq!(back.zeros, q.zeros);
    }

    #[test]
    fn packing_is_plain_order_along_the_input() {
        let mut q = weight(8, 8, 8, 2);
        q.codes.fill(0);
        q.codes[3] = 0xA; // output 0, input 3
        q.zeros.fill(8);
        let t = q.to_gptq(None, ZeroStorage::MinusOne).unwrap();
        assert_eq!(t.qweight[0] as u32, 0xA << 12);
        assert_eq!(t.qzeros[0] as u32, 0x7777_7777, "zero 8 is stored as 7");
    }

    #[test]
    fn bad_tensors_are_refused_with_the_reason() {
        let q = weight(8, 32, 16, 3);
        let t = q.to_gptq(None, ZeroStorage::MinusOne).unwrap();
        let mut short = t.clone();
        short.g_idx.pop();
        let e = QuantizedWeight::from_gptq(&short, q.shape, 4, ZeroStorage::MinusOne).unwrap_err().to_string();
        assert!(e.contains("g_idx has 31 values") && e.contains("needs 32"), "{e}");
        let mut uneven = t.clone();
        uneven.g_idx[0] = 1;
        let e = QuantizedWeight::from_gptq(&uneven, q.shape, 4, ZeroStorage::MinusOne).unwrap_err().to_string();
        assert!(e.contains("group 0"), "{e}");
        let mut out_of_range = t.clone();
        out_of_range.g_idx[5] = 7;
        assert!(QuantizedWeight::from_gptq(&out_of_range, q.shape, 4, ZeroStorage::MinusOne).unwrap_err().to_string().contains("g_idx[5] = 7"));
        assert!(QuantizedWeight::from_gptq(&t, q.shape, 3, ZeroStorage::MinusOne).unwrap_err().to_string().contains("3-bit"));
        let mut zero0 = q.clone();
        zero0.zeros[0] = 0;
        assert!(zero0.to_gptq(None, ZeroStorage::MinusOne).unwrap_err().to_string().contains("zero point 0"));
        assert!(zero0.to_gptq(None, ZeroStorage::Plain).is_ok());
    }
}
