//! A dense linear layer whose weight stays in f16 while activations are f32 (the CPU default):
//! AWQ checkpoints keep embeddings and lm_head in f16, and reading half the bytes matters, since
//! SmolLM2's tied 49152 × 576 lm_head is the largest single read of a decode step.
//!
//! CPU forward: a GEMV that converts f16 to f32 in registers (F16C + FMA on x86_64, chosen at run
//! time; scalar elsewhere) for a few tokens, and row blocks converted to f32 and multiplied with
//! an f32 GEMM for many. Other devices multiply with candle ops in the activation dtype.
use super::{Capability, Linear, LinearLayer};
use crate::quant::cpu::{blocked_gemm, rows_parallel, GEMM_MIN_TOKENS};
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use half::f16;
use std::sync::Arc;

#[derive(Debug)]
pub struct HalfLinear {
    /// `[n, k]` f16.
    weight: Tensor,
    bias: Option<Tensor>,
}

impl HalfLinear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        Ok(Self { weight: weight.to_dtype(DType::F16)?, bias })
    }
    pub fn into_linear(self) -> Linear {
        Arc::new(self)
    }
}

struct HalfMatMul<'a> {
    w: &'a [f16],
    n: usize,
    k: usize,
}

impl HalfMatMul<'_> {
    fn gemv_row(&self, o: usize, x: &[f32]) -> f32 {
        let row = &self.w[o * self.k..(o + 1) * self.k];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c") {
                // SAFETY: the features were just checked; both slices have k elements.
                return unsafe { dot_f16c(row, x) };
            }
        }
        row.iter().zip(x).map(|(w, x)| w.to_f32() * x).sum()
    }

    fn run(&self, x: &[f32], m: usize) -> Vec<f32> {
        let (n, k) = (self.n, self.k);
        if m < GEMM_MIN_TOKENS {
            return rows_parallel(n, m, |o, t| self.gemv_row(o, &x[t * k..(t + 1) * k]));
        }
        blocked_gemm(x, m, n, k, |o, buf| {
            for (d, s) in buf.iter_mut().zip(&self.w[o * k..(o + 1) * k]) {
                *d = s.to_f32();
            }
        })
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_f16c(w: &[f16], x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let k = w.len();
    let (wp, xp) = (w.as_ptr() as *const __m128i, x.as_ptr());
    let mut a0 = _mm256_setzero_ps();
    let mut a1 = _mm256_setzero_ps();
    let mut i = 0;
    while i + 16 <= k {
        let w0 = _mm256_cvtph_ps(_mm_loadu_si128(wp.add(i / 8)));
        let w1 = _mm256_cvtph_ps(_mm_loadu_si128(wp.add(i / 8 + 1)));
        a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xp.add(i)), a0);
        a1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xp.add(i + 8)), a1);
        i += 16;
    }
    let s = _mm256_add_ps(a0, a1);
    let lo = _mm256_castps256_ps128(s);
    let hi = _mm256_extractf128_ps(s, 1);
    let s = _mm_add_ps(lo, hi);
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    let mut total = _mm_cvtss_f32(s);
    while i < k {
        total += w[i].to_f32() * x[i];
        i += 1;
    }
    total
}

struct HalfOp(Tensor);

impl CustomOp1 for HalfOp {
    fn name(&self) -> &'static str {
        "awq-f16-weight-matmul"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = s else { candle_core::bail!("{}: expects f32 activations", self.name()) };
        let Some((a, b)) = l.contiguous_offsets() else { candle_core::bail!("{}: expects contiguous activations", self.name()) };
        let (n, k) = self.0.dims2()?;
        let (ws, wl) = self.0.storage_and_layout();
        let candle_core::Storage::Cpu(CpuStorage::F16(w)) = &*ws else { candle_core::bail!("{}: weight must be f16 on the CPU", self.name()) };
        let Some((wa, wb)) = wl.contiguous_offsets() else { candle_core::bail!("{}: weight must be contiguous", self.name()) };
        let dims = l.dims();
        let m = l.shape().elem_count() / k;
        let y = HalfMatMul { w: &w[wa..wb], n, k }.run(&data[a..b], m);
        let mut out = dims.to_vec();
        *out.last_mut().unwrap() = n;
        Ok((CpuStorage::F32(y), Shape::from(out)))
    }
}

impl LinearLayer for HalfLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = if x.device().is_cpu() && x.dtype() == DType::F32 {
            x.contiguous()?.apply_op1_no_bwd(&HalfOp(self.weight.clone()))?
        } else {
            x.broadcast_matmul(&self.weight.to_dtype(x.dtype())?.t()?)?
        };
        match &self.bias {
            Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?),
            None => Ok(y),
        }
    }
    fn in_features(&self) -> usize {
        self.weight.dim(1).unwrap_or(0)
    }
    fn out_features(&self) -> usize {
        self.weight.dim(0).unwrap_or(0)
    }
    fn dense_weight(&self) -> Result<Tensor> {
        self.weight.to_dtype(DType::F32)
    }
    fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
    fn kind(&self) -> &'static str {
        "f16-weight"
    }
    fn capability(&self) -> Capability<'_> {
        Capability::StreamedWeight(&self.weight)
    }
}
