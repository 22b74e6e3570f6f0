//! Thin wrappers around the CUDA kernels of `w4a16.cu` (compiled to PTX by build.rs): the
//! few-token GEMV as a candle custom op, and the dequantization used before a cuBLAS GEMM for
//! prefill. Weights live on the device as candle tensors: codes `[n, k/2]` u8, scales
//! `[n, groups]` f16, zeros `[n, groups]` u8 (the CPU kernel's layout, see `quant::cpu`).
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaStorage, CustomOp1, DType, Layout, Result, Shape, Storage, Tensor};
use half::{bf16, f16};

pub mod selftest;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/w4a16.ptx"));
const MODULE: &str = "awq_w4a16";
/// Most tokens the GEMV kernel takes (MAX_TOKENS in w4a16.cu).
pub const GEMV_MAX_TOKENS: usize = 8;

/// The device copy of a packed 4-bit weight.
#[derive(Debug, Clone)]
pub struct CudaQ4 {
    pub codes: Tensor,
    pub scales: Tensor,
    pub zeros: Tensor,
    pub n: usize,
    pub k: usize,
    pub group_size: usize,
}

fn suffix(dt: DType) -> Result<&'static str> {
    match dt {
        DType::F16 => Ok("f16"),
        DType::BF16 => Ok("bf16"),
        DType::F32 => Ok("f32"),
        other => candle_core::bail!("W4A16 CUDA kernels take f16, bf16 or f32 activations, not {other:?}"),
    }
}

fn cuda_of(t: &Tensor) -> Result<(impl std::ops::Deref<Target = Storage> + '_, usize)> {
    let (s, l) = t.storage_and_layout();
    let Some((o, _)) = l.contiguous_offsets() else { candle_core::bail!("W4A16: weight tensors must be contiguous") };
    Ok((s, o))
}

impl CudaQ4 {
    pub fn new(w: &super::cpu::PackedQ4, device: &candle_core::Device) -> Result<Self> {
        let g = w.groups();
        Ok(Self {
            codes: Tensor::from_slice(&w.codes, (w.n, w.k / 2), device)?,
            scales: Tensor::from_slice(&w.scales, (w.n, g), device)?,
            zeros: Tensor::from_slice(&w.zeros, (w.n, g), device)?,
            n: w.n,
            k: w.k,
            group_size: w.group_size,
        })
    }

    /// `x · Wᵀ` for `x` `[..., k]` (f16, bf16 or f32): the GEMV kernel for up to 8 tokens, else
    /// dequantization to `x`'s dtype and a cuBLAS matmul.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let m = x.elem_count() / self.k;
        if m <= GEMV_MAX_TOKENS {
            self.gemv(x, false)
        } else {
            let w = self.dequantize(x.dtype())?;
            x.broadcast_matmul(&w.t()?)
        }
    }

    /// The GEMV kernel alone; with `poison` the output is filled with NaN first (self-test).
    pub fn gemv(&self, x: &Tensor, poison: bool) -> Result<Tensor> {
        x.contiguous()?.apply_op1_no_bwd(&Gemv { w: self, poison })
    }

    /// The dequantized weight `[n, k]` in `dtype`.
    pub fn dequantize(&self, dtype: DType) -> Result<Tensor> {
        self.dequantize_with(dtype, false)
    }

    /// As [`CudaQ4::dequantize`]; with `poison` the buffer is filled with NaN first (self-test).
    pub fn dequantize_with(&self, dtype: DType, poison: bool) -> Result<Tensor> {
        // The op runs on the codes tensor; it only uses it to find the device and stream.
        self.codes.apply_op1_no_bwd(&Dequant { w: self, dtype, poison })
    }
}

struct Gemv<'a> {
    w: &'a CudaQ4,
    poison: bool,
}

struct Dequant<'a> {
    w: &'a CudaQ4,
    dtype: DType,
    poison: bool,
}

/// Fills `len` elements of `buf` with NaN.
fn poison_buffer<T: candle_core::cuda_backend::cudarc::driver::DeviceRepr>(
    dev: &candle_core::CudaDevice,
    sfx: &str,
    buf: &candle_core::cuda_backend::cudarc::driver::CudaSlice<T>,
    len: usize,
) -> Result<()> {
    let pf = dev.get_or_load_custom_func(&format!("poison_{sfx}"), MODULE, PTX)?;
    let len64 = len as u64;
    let mut b = pf.builder();
    b.arg(buf);
    b.arg(&len64);
    // SAFETY: the kernel writes only indices below len, which the buffer holds.
    unsafe { b.launch(LaunchConfig::for_num_elems(len as u32)) }.w()?;
    Ok(())
}

macro_rules! weight_slices {
    ($w:expr, $codes:ident, $scales:ident, $zeros:ident) => {
        let (cs, co) = cuda_of(&$w.codes)?;
        let (ss, so) = cuda_of(&$w.scales)?;
        let (zs, zo) = cuda_of(&$w.zeros)?;
        let (Storage::Cuda(cs), Storage::Cuda(ss), Storage::Cuda(zs)) = (&*cs, &*ss, &*zs) else {
            candle_core::bail!("W4A16: weights are not on a CUDA device")
        };
        let $codes = cs.as_cuda_slice::<u8>()?.slice(co..);
        let $scales = ss.as_cuda_slice::<f16>()?.slice(so..);
        let $zeros = zs.as_cuda_slice::<u8>()?.slice(zo..);
    };
}

impl CustomOp1 for Gemv<'_> {
    fn name(&self) -> &'static str {
        "awq-w4a16-gemv-cuda"
    }
    fn cpu_fwd(&self, _: &candle_core::CpuStorage, _: &Layout) -> Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("{} runs on CUDA only", self.name())
    }
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let w = self.w;
        let dims = l.dims();
        let k = *dims.last().unwrap_or(&0);
        if k != w.k || k % 32 != 0 {
            candle_core::bail!("{}: input has {k} features, the layer {}", self.name(), w.k);
        }
        let m = l.shape().elem_count() / k;
        if m > GEMV_MAX_TOKENS {
            candle_core::bail!("{}: {m} tokens, at most {GEMV_MAX_TOKENS}", self.name());
        }
        let Some((xo, _)) = l.contiguous_offsets() else { candle_core::bail!("{}: input must be contiguous", self.name()) };
        let dev = s.device().clone();
        let dt = s.dtype();
        let sfx = suffix(dt)?;
        weight_slices!(w, codes, scales, zeros);
        let (n, k_, g, m_) = (w.n as i32, w.k as i32, w.group_size as i32, m as i32);
        // ROWS_PER_WARP (4) output rows per warp, 4 warps a block.
        let cfg = LaunchConfig { grid_dim: ((w.n as u32).div_ceil(16), 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
        let func = dev.get_or_load_custom_func(&format!("w4_gemv_{sfx}"), MODULE, PTX)?;
        macro_rules! launch {
            ($t:ty) => {{
                let x = s.as_cuda_slice::<$t>()?.slice(xo..);
                // SAFETY: every element is written by the kernel (or poisoned first).
                let y = unsafe { dev.alloc::<$t>(m * w.n)? };
                if self.poison {
                    poison_buffer(&dev, sfx, &y, m * w.n)?;
                }
                let mut b = func.builder();
                b.arg(&codes);
                b.arg(&scales);
                b.arg(&zeros);
                b.arg(&x);
                b.arg(&y);
                b.arg(&n);
                b.arg(&k_);
                b.arg(&g);
                b.arg(&m_);
                // SAFETY: buffer sizes match n, k, g and m as checked above.
                unsafe { b.launch(cfg) }.w()?;
                CudaStorage::wrap_cuda_slice(y, dev.clone())
            }};
        }
        let out = match dt {
            DType::F16 => launch!(f16),
            DType::BF16 => launch!(bf16),
            _ => launch!(f32),
        };
        let mut shape = dims.to_vec();
        *shape.last_mut().unwrap() = w.n;
        Ok((out, Shape::from(shape)))
    }
}

impl CustomOp1 for Dequant<'_> {
    fn name(&self) -> &'static str {
        "awq-w4-dequant-cuda"
    }
    fn cpu_fwd(&self, _: &candle_core::CpuStorage, _: &Layout) -> Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("{} runs on CUDA only", self.name())
    }
    fn cuda_fwd(&self, s: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        let w = self.w;
        let dev = s.device().clone();
        let sfx = suffix(self.dtype)?;
        weight_slices!(w, codes, scales, zeros);
        let (n, k, g) = (w.n as i32, w.k as i32, w.group_size as i32);
        let func = dev.get_or_load_custom_func(&format!("w4_dequant_{sfx}"), MODULE, PTX)?;
        let cfg = LaunchConfig::for_num_elems((w.n * w.k / 2) as u32);
        macro_rules! launch {
            ($t:ty) => {{
                // SAFETY: the kernel writes all n * k elements.
                let out = unsafe { dev.alloc::<$t>(w.n * w.k)? };
                if self.poison {
                    poison_buffer(&dev, sfx, &out, w.n * w.k)?;
                }
                let mut b = func.builder();
                b.arg(&codes);
                b.arg(&scales);
                b.arg(&zeros);
                b.arg(&out);
                b.arg(&n);
                b.arg(&k);
                b.arg(&g);
                // SAFETY: sizes as above.
                unsafe { b.launch(cfg) }.w()?;
                CudaStorage::wrap_cuda_slice(out, dev.clone())
            }};
        }
        let out = match self.dtype {
            DType::F16 => launch!(f16),
            DType::BF16 => launch!(bf16),
            _ => launch!(f32),
        };
        Ok((out, Shape::from((w.n, w.k))))
    }
}
