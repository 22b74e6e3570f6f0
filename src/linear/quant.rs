//! The quantized linear layer: group-quantized integer codes with scales and zero points.
//!
//! 4-bit weights whose rows split into 32-wide chunks are kept packed ([`PackedQ4`]) and run
//! through the fused CPU kernel as a candle custom op; on CUDA through the kernels of
//! [`crate::quant::cuda`] (a device copy in the tiled layout of [`crate::quant::format::tiled`]); on other devices
//! (Metal) they are dequantized with candle tensor ops right before the matmul, one layer at a
//! time, so no dequantized copy of the model is ever kept. Other widths (2–8 bits, for
//! evaluation) keep their dequantized weight.
use super::{Capability, DenseLinear, Linear, LinearLayer};
use crate::cuda::L2Prefetch;
use crate::quant::cpu::{Kernel, PackedQ4};
use crate::quant::format::{QuantizedWeight, WeightShape};
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor};
use std::sync::Arc;

/// The weight's copy on a non-CPU device.
#[derive(Debug)]
enum DeviceWeights {
    /// For the tensor-op path (Metal): codes `[n, k/2]` u8, scales and mins (`-zero * scale`)
    /// `[n, groups]` f32.
    TensorOps(Tensor, Tensor, Tensor),
    /// For the CUDA kernels.
    #[cfg(feature = "cuda")]
    Cuda(crate::quant::cuda::CudaQ4),
}

#[derive(Debug)]
enum Repr {
    /// `host` is the CPU layout; on CUDA it is not kept (the device copy is the only one, a 7B
    /// model's 3.5 GB stay off the host) and is rebuilt from a download when asked for.
    Packed {
        host: Option<Arc<PackedQ4>>,
        shape: WeightShape,
        dev: Option<DeviceWeights>,
    },
    Dequantized {
        q: QuantizedWeight,
        dense: DenseLinear,
    },
}

#[derive(Debug)]
pub struct QuantLinear {
    repr: Repr,
    bias: Option<Tensor>,
    device: Device,
    /// Where the weight's columns are stored out of the layer's input order (a GPTQ checkpoint
    /// with act-order groups, whose `g_idx` is not `i / group_size`): stored column `j` is input
    /// `perm[j]`, and the input is gathered into that order before the kernel. The tensor is
    /// the same indices on the layer's device.
    input_perm: Option<(Vec<u32>, Tensor)>,
}

/// The candle custom op around the CPU kernel.
struct Q4MatMul {
    w: Arc<PackedQ4>,
    kernel: Kernel,
}

impl CustomOp1 for Q4MatMul {
    fn name(&self) -> &'static str {
        "awq-w4a16-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = s else {
            candle_core::bail!("{}: expects f32 activations", self.name());
        };
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("{}: expects contiguous activations", self.name());
        };
        let dims = l.dims();
        let k = *dims.last().unwrap_or(&0);
        if k != self.w.shape.k {
            candle_core::bail!("{}: input has {k} features, the layer {}", self.name(), self.w.shape.k);
        }
        let m = l.shape().elem_count() / k.max(1);
        let y = self.w.matmul(&data[a..b], m, self.kernel);
        let mut out = dims.to_vec();
        *out.last_mut().unwrap() = self.w.shape.n;
        Ok((CpuStorage::F32(y), Shape::from(out)))
    }
}

impl QuantLinear {
    pub fn new(q: QuantizedWeight, bias: Option<Tensor>, dtype: DType, device: &Device) -> Result<Self> {
        let bias = bias.map(|b| b.to_dtype(DType::F32)?.to_device(device)).transpose()?;
        let repr = if q.bits == 4 && PackedQ4::supports(q.shape.k, q.shape.group_size) {
            let w = Arc::new(PackedQ4::from_quantized(&q));
            let shape = w.shape;
            let (host, dev) = match device {
                Device::Cpu => (Some(w), None),
                #[cfg(feature = "cuda")]
                Device::Cuda(_) => (None, Some(DeviceWeights::Cuda(crate::quant::cuda::CudaQ4::new(&w, device)?))),
                _ => {
                    let (c, s, m) = Self::device_tensors(&w, device)?;
                    (Some(w), Some(DeviceWeights::TensorOps(c, s, m)))
                }
            };
            Repr::Packed { host, shape, dev }
        } else {
            let d = Tensor::from_vec(q.dequantize(), (q.shape.n, q.shape.k), device)?.to_dtype(dtype)?;
            let b = bias.as_ref().map(|b| b.to_dtype(dtype)).transpose()?;
            Repr::Dequantized { q, dense: DenseLinear::new(d, b) }
        };
        Ok(Self { repr, bias, device: device.clone(), input_perm: None })
    }

    /// The layer with its stored columns in the order `perm` (stored column `j` multiplies input
    /// `perm[j]`); `perm` must be a permutation of the input width.
    pub fn with_input_perm(mut self, perm: Vec<u32>) -> Result<Self> {
        let k = self.shape().k;
        let mut seen = vec![false; k];
        for &c in &perm {
            match seen.get_mut(c as usize) {
                Some(s) if !*s => *s = true,
                _ => candle_core::bail!("input permutation of a {k}-input layer: index {c} is out of range or repeated"),
            }
        }
        if perm.len() != k {
            candle_core::bail!("input permutation of a {k}-input layer has {} entries", perm.len());
        }
        let t = Tensor::from_slice(&perm, k, &self.device)?;
        self.input_perm = Some((perm, t));
        Ok(self)
    }

    /// The stored order of the input columns, where it is not the natural one.
    pub fn input_perm(&self) -> Option<&[u32]> {
        self.input_perm.as_ref().map(|(p, _)| p.as_slice())
    }

    /// `x` gathered into the stored column order.
    fn permute_input(&self, x: &Tensor) -> Result<Tensor> {
        match &self.input_perm {
            Some((_, t)) => x.index_select(t, x.rank() - 1)?.contiguous(),
            None => Ok(x.clone()),
        }
    }

    pub fn into_linear(self) -> Linear {
        Arc::new(self)
    }

    fn device_tensors(w: &PackedQ4, device: &Device) -> Result<(Tensor, Tensor, Tensor)> {
        let g = w.groups();
        let scales: Vec<f32> = w.scales.iter().map(|s| s.to_f32()).collect();
        let mins: Vec<f32> = scales.iter().zip(&w.zeros).map(|(s, z)| -f32::from(*z) * s).collect();
        let n = w.shape.n;
        Ok((
            Tensor::from_slice(&w.codes, (n, w.shape.k / 2), device)?,
            Tensor::from_vec(scales, (n, g), device)?,
            Tensor::from_vec(mins, (n, g), device)?,
        ))
    }

    /// Dequantizes with tensor ops: codes `[n, k/2]` u8, scales/mins `[n, groups]` -> `[n, k]`.
    fn dequantize_tensors(codes: &Tensor, scales: &Tensor, mins: &Tensor, k: usize) -> Result<Tensor> {
        let (n, groups) = scales.dims2()?;
        let v = codes.to_dtype(DType::F32)?.reshape((n, k / 32, 16))?;
        let hi = (&v / 16.0)?.floor()?;
        let lo = (&v - (&hi * 16.0)?)?;
        let w = Tensor::cat(&[lo, hi], 2)?.reshape((n, groups, k / groups))?;
        let w = w.broadcast_mul(&scales.unsqueeze(2)?)?.broadcast_add(&mins.unsqueeze(2)?)?;
        w.reshape((n, k))
    }

    /// The device path (dequantize with tensor ops, then matmul); public so CPU tests cover it.
    /// Like [`Self::forward_cpu`] it takes the input in the stored column order.
    pub fn forward_dequant(&self, x: &Tensor) -> Result<Tensor> {
        let w = match &self.repr {
            Repr::Packed { shape, dev: Some(DeviceWeights::TensorOps(c, s, m)), .. } => Self::dequantize_tensors(c, s, m, shape.k)?,
            Repr::Packed { shape, .. } => {
                let w = self.host_packed()?;
                let (c, s, m) = Self::device_tensors(&w, x.device())?;
                Self::dequantize_tensors(&c, &s, &m, shape.k)?
            }
            Repr::Dequantized { dense, .. } => return dense.forward(x),
        };
        self.add_bias(x.broadcast_matmul(&w.to_dtype(x.dtype())?.t()?)?)
    }

    /// The CPU kernel with a chosen inner loop (tests run every one the machine has).
    pub fn forward_cpu(&self, x: &Tensor, kernel: Kernel) -> Result<Tensor> {
        let Repr::Packed { .. } = &self.repr else {
            return self.forward_dequant(x);
        };
        let op = Q4MatMul { w: self.host_packed()?, kernel };
        let y = x.to_dtype(DType::F32)?.contiguous()?.apply_op1_no_bwd(&op)?;
        self.add_bias(y)?.to_dtype(x.dtype())
    }

    /// The forward pass on an input already in the stored column order (see `input_perm`).
    fn forward_stored(&self, x: &Tensor) -> Result<Tensor> {
        match &self.repr {
            Repr::Packed { .. } if x.device().is_cpu() => self.forward_cpu(x, Kernel::Auto),
            #[cfg(feature = "cuda")]
            Repr::Packed { dev: Some(DeviceWeights::Cuda(c)), .. } => self.add_bias(c.forward(x)?),
            Repr::Packed { .. } => self.forward_dequant(x),
            Repr::Dequantized { dense, .. } => dense.forward(x),
        }
    }

    fn add_bias(&self, y: Tensor) -> Result<Tensor> {
        match &self.bias {
            Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?),
            None => Ok(y),
        }
    }

    /// The CUDA copy of the weight, on a CUDA device.
    #[cfg(feature = "cuda")]
    pub fn cuda(&self) -> Option<&crate::quant::cuda::CudaQ4> {
        match &self.repr {
            Repr::Packed { dev: Some(DeviceWeights::Cuda(c)), .. } => Some(c),
            _ => None,
        }
    }

    /// The host copy of a packed layer, where it is kept (not on CUDA, see [`Repr`]).
    pub fn packed(&self) -> Option<&PackedQ4> {
        match &self.repr {
            Repr::Packed { host: Some(w), .. } => Some(w),
            _ => None,
        }
    }

    /// The packed weight in the CPU layout: the host copy, or on CUDA the device copy downloaded
    /// and untiled (checkpoint writing, CPU inputs; never on the inference path).
    pub fn host_packed(&self) -> Result<Arc<PackedQ4>> {
        match &self.repr {
            Repr::Packed { host: Some(w), .. } => Ok(w.clone()),
            #[cfg(feature = "cuda")]
            Repr::Packed { dev: Some(DeviceWeights::Cuda(c)), .. } => Ok(Arc::new(c.to_tiled()?.to_packed())),
            Repr::Packed { .. } => candle_core::bail!("a packed 4-bit layer has neither a host nor a device copy"),
            Repr::Dequantized { .. } => candle_core::bail!("the layer is not packed 4-bit (it keeps a dequantized weight)"),
        }
    }
}

impl LinearLayer for QuantLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.input_perm.is_some() {
            return self.forward_stored(&self.permute_input(x)?);
        }
        self.forward_stored(x)
    }
    fn in_features(&self) -> usize {
        self.shape().k
    }
    fn out_features(&self) -> usize {
        self.shape().n
    }
    fn dense_weight(&self) -> Result<Tensor> {
        let stored = self.stored_dense_weight()?;
        match &self.input_perm {
            Some((p, _)) => {
                // Input c sits in stored column pos[c].
                let mut pos = vec![0u32; p.len()];
                for (j, &c) in p.iter().enumerate() {
                    pos[c as usize] = j as u32;
                }
                stored.index_select(&Tensor::from_vec(pos, p.len(), stored.device())?, 1)
            }
            None => Ok(stored),
        }
    }
    fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
    fn kind(&self) -> &'static str {
        match &self.repr {
            Repr::Packed { .. } => "w4a16",
            Repr::Dequantized { .. } => "fake-quant",
        }
    }
    fn capability(&self) -> Capability<'_> {
        Capability::Quantized(self)
    }
}

impl QuantLinear {
    /// The dequantized weight in the stored column order.
    fn stored_dense_weight(&self) -> Result<Tensor> {
        match &self.repr {
            Repr::Packed { .. } => {
                let w = self.host_packed()?;
                let WeightShape { n, k, .. } = w.shape;
                let mut d = vec![0f32; n * k];
                for (o, row) in d.chunks_mut(k).enumerate() {
                    w.dequantize_row(o, row);
                }
                Tensor::from_vec(d, (n, k), &self.device)
            }
            Repr::Dequantized { dense, .. } => dense.dense_weight(),
        }
    }

    /// The weight's shape (the dequantized form's for other widths than 4 bits).
    pub fn shape(&self) -> WeightShape {
        match &self.repr {
            Repr::Packed { shape, .. } => *shape,
            Repr::Dequantized { q, .. } => q.shape,
        }
    }

    /// The integer codes, zeros and scales in the stored column order (see [`Self::input_perm`];
    /// downloaded from the device where the layer lives there; an error where they cannot be
    /// read back, e.g. from a failing device).
    pub fn quantized(&self) -> Result<QuantizedWeight> {
        match &self.repr {
            Repr::Packed { .. } => Ok(self.host_packed()?.to_quantized()),
            Repr::Dequantized { q, .. } => Ok(q.clone()),
        }
    }

    /// The device buffers a forward pass streams (the weights), for L2 prefetch hints; empty
    /// where hints do not apply.
    pub fn device_buffers(&self) -> Vec<Tensor> {
        match &self.repr {
            #[cfg(feature = "cuda")]
            Repr::Packed { dev: Some(DeviceWeights::Cuda(c)), .. } => vec![c.q.clone(), c.sz.clone()],
            Repr::Dequantized { dense, .. } if dense.weight().device().is_cuda() => vec![dense.weight().clone()],
            _ => Vec::new(),
        }
    }

    /// [`LinearLayer::forward`]; the 4-bit GEMV on CUDA also pulls `next` (the next layer's
    /// weights) into L2 as it finishes.
    pub fn forward_prefetch(&self, x: &Tensor, next: &L2Prefetch) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let (Repr::Packed { dev: Some(DeviceWeights::Cuda(c)), .. }, true, None) = (&self.repr, x.device().is_cuda(), &self.input_perm) {
            return self.add_bias(c.forward_prefetch(x, next)?);
        }
        let _ = next;
        self.forward(x)
    }
}

impl QuantLinear {
    /// Several 4-bit layers sharing the input `x` in one call: on the CPU one pass of the kernel
    /// threads over the rows of all of them (the activations quantized once), on CUDA one GEMV
    /// launch (up to three, few tokens); same input width and group size. `None` where that
    /// does not apply.
    pub fn forward_fused(layers: &[&QuantLinear], x: &Tensor, next: &L2Prefetch) -> Result<Option<Vec<Tensor>>> {
        if x.device().is_cpu() {
            return Self::forward_fused_cpu(layers, x);
        }
        Self::forward_fused_cuda(layers, x, next)
    }

    fn forward_fused_cpu(layers: &[&QuantLinear], x: &Tensor) -> Result<Option<Vec<Tensor>>> {
        let packed: Option<Vec<&PackedQ4>> = layers.iter().map(|q| q.packed().filter(|_| q.input_perm.is_none())).collect();
        let Some(packed) = packed else { return Ok(None) };
        let k = x.dim(candle_core::D::Minus1)?;
        if layers.len() < 2 || x.dtype() != DType::F32 || packed.iter().any(|w| w.shape.k != k || w.shape.group_size != packed[0].shape.group_size) {
            return Ok(None);
        }
        let x = x.contiguous()?;
        let m = x.elem_count() / k.max(1);
        let outs = {
            let (storage, layout) = x.storage_and_layout();
            let candle_core::Storage::Cpu(candle_core::CpuStorage::F32(data)) = &*storage else { return Ok(None) };
            let Some((a, b)) = layout.contiguous_offsets() else { return Ok(None) };
            PackedQ4::matmul_many_split(&packed, &data[a..b], m, Kernel::Auto)
        };
        let mut dims = x.dims().to_vec();
        let mut result = Vec::with_capacity(layers.len());
        for ((q, w), o) in layers.iter().zip(&packed).zip(outs) {
            *dims.last_mut().unwrap() = w.shape.n;
            result.push(q.add_bias(Tensor::from_vec(o, dims.as_slice(), &Device::Cpu)?)?);
        }
        Ok(Some(result))
    }

    #[cfg(feature = "cuda")]
    fn forward_fused_cuda(layers: &[&QuantLinear], x: &Tensor, next: &L2Prefetch) -> Result<Option<Vec<Tensor>>> {
        use crate::quant::cuda::{gemv_max_tokens, skinny_supported, CudaQ4, GemvOptions, GEMV_MAX_SETS};
        if !x.device().is_cuda() || layers.len() < 2 || layers.len() > GEMV_MAX_SETS {
            return Ok(None);
        }
        let k = x.dim(candle_core::D::Minus1)?;
        if layers.iter().any(|q| q.input_perm.is_some()) {
            return Ok(None);
        }
        let cuda: Option<Vec<&CudaQ4>> = layers.iter().map(|q| q.cuda()).collect();
        let Some(cuda) = cuda else { return Ok(None) };
        if cuda.iter().any(|c| c.shape.k != k || c.shape.group_size != cuda[0].shape.group_size) {
            return Ok(None);
        }
        // One launch: the GEMVs' token counts, or the skinny GEMM's (to 128 on wgmma).
        let m = x.elem_count() / k.max(1);
        if m > gemv_max_tokens(x.dtype()) && !skinny_supported(&cuda, m, x.dtype()) {
            return Ok(None);
        }
        let y = crate::quant::cuda::gemv_many_with(&cuda, x, GemvOptions { prefetch: *next, ..Default::default() })?;
        let mut start = 0;
        let mut out = Vec::with_capacity(layers.len());
        for (q, c) in layers.iter().zip(&cuda) {
            out.push(q.add_bias(y.narrow(candle_core::D::Minus1, start, c.shape.n)?)?);
            start += c.shape.n;
        }
        Ok(Some(out))
    }

    /// Without CUDA there is no fused launch.
    #[cfg(not(feature = "cuda"))]
    fn forward_fused_cuda(_: &[&QuantLinear], _: &Tensor, _: &L2Prefetch) -> Result<Option<Vec<Tensor>>> {
        Ok(None)
    }
}
