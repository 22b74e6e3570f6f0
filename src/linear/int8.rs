//! A linear layer with an 8-bit weight on the CPU ([`Q8Weight`]: per 32-block symmetric scales),
//! multiplied as W8A8. It stands in for the f16 lm_head of 4-bit models (`--cpu-head int8`): on
//! SmolLM2 the 49152 × 576 head is half of what a decode step reads, and 8 bits halve it again.
use super::{Linear, LinearLayer};
use crate::quant::cpu::q8::Q8Weight;
use crate::quant::cpu::A8Path;
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor};
use std::sync::Arc;

#[derive(Debug)]
pub struct Int8Linear {
    w: Arc<Q8Weight>,
    bias: Option<Tensor>,
}

impl Int8Linear {
    /// Quantizes a `[n, k]` weight (any float dtype) to 8 bits; `k` must be a multiple of 32.
    pub fn new(weight: &Tensor, bias: Option<Tensor>) -> Result<Self> {
        let (n, k) = weight.dims2()?;
        if k % 32 != 0 {
            candle_core::bail!("8-bit weight: {k} input features, not a multiple of 32");
        }
        let weight = weight.to_device(&Device::Cpu)?.flatten_all()?;
        // An f16 weight (the usual head) is converted row by row: a whole f32 copy of
        // SmolLM2's head would add 113 MB to the peak memory for a moment.
        let q = if weight.dtype() == DType::F16 {
            let w = weight.to_vec1::<half::f16>()?;
            Q8Weight::quantize(n, k, |o, buf| half::slice::HalfFloatSliceExt::convert_to_f32_slice(&w[o * k..(o + 1) * k], buf))
        } else {
            let w = weight.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            Q8Weight::quantize(n, k, |o, buf| buf.copy_from_slice(&w[o * k..(o + 1) * k]))
        };
        Ok(Self { w: Arc::new(q), bias })
    }
    pub fn into_linear(self) -> Linear {
        Arc::new(self)
    }
}

struct Q8Op(Arc<Q8Weight>);

impl CustomOp1 for Q8Op {
    fn name(&self) -> &'static str {
        "awq-w8a8-matmul"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = s else { candle_core::bail!("{}: expects f32 activations", self.name()) };
        let Some((a, b)) = l.contiguous_offsets() else { candle_core::bail!("{}: expects contiguous activations", self.name()) };
        let k = self.0.k;
        let dims = l.dims();
        if dims.last() != Some(&k) {
            candle_core::bail!("{}: input {dims:?}, the layer takes {k} features", self.name());
        }
        let m = l.shape().elem_count() / k;
        let y = self.0.matmul(&data[a..b], m, A8Path::detect());
        let mut out = dims.to_vec();
        *out.last_mut().unwrap() = self.0.n;
        Ok((CpuStorage::F32(y), Shape::from(out)))
    }
}

impl LinearLayer for Int8Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if !x.device().is_cpu() || x.dtype() != DType::F32 {
            candle_core::bail!("the 8-bit linear runs on the CPU in f32 (got {:?} on {:?})", x.dtype(), x.device());
        }
        let y = x.contiguous()?.apply_op1_no_bwd(&Q8Op(self.w.clone()))?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
    fn in_features(&self) -> usize {
        self.w.k
    }
    fn out_features(&self) -> usize {
        self.w.n
    }
    fn dense_weight(&self) -> Result<Tensor> {
        let (n, k) = (self.w.n, self.w.k);
        let mut d = vec![0f32; n * k];
        for (o, row) in d.chunks_exact_mut(k).enumerate() {
            self.w.dequantize_row(o, row);
        }
        Tensor::from_vec(d, (n, k), &Device::Cpu)
    }
    fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
    fn kind(&self) -> &'static str {
        "int8-weight"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_width_that_is_not_a_multiple_of_32_is_refused() {
        let w = Tensor::zeros((4, 40), DType::F32, &Device::Cpu).unwrap();
        let e = Int8Linear::new(&w, None).unwrap_err().to_string();
        assert!(e.contains("40 input features") && e.contains("multiple of 32"), "{e}");
    }
}
