//! Thin wrappers around the CUDA kernels of `w4a16.cu` and `w4a16_sm90.cu` (compiled to PTX by
//! build.rs): the GEMVs (batch-1 and few-token; one to three weights sharing an input per launch),
//! the tensor-core GEMMs for f16 prefill, and the dequantizer that feeds cuBLAS where the GEMM
//! does not apply. Weights live on the device in the tiled layout of
//! [`crate::quant::format::tiled`], one copy per layer.
use super::launch;
use crate::cuda::{device_limits, device_ptr, poison, resident_blocks, suffix_for, DeviceLimits, L2Prefetch};
use crate::quant::format::packed::PackedQ4;
use crate::quant::format::tiled::TiledQ4;
use crate::quant::format::WeightShape;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute_enum;
use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaDevice, CudaStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use half::f16;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/w4a16.ptx"));
const MODULE: &str = "awq_w4a16";
/// The Hopper (sm_90a) GEMM; empty unless built for compute capability 9.0.
const PTX_SM90: &str = include_str!(concat!(env!("OUT_DIR"), "/w4a16_sm90.ptx"));
const MODULE_SM90: &str = "awq_w4a16_sm90";
/// Shared memory of the sm_90 GEMM with `tokens` a block (Sm90Smem in w4a16_sm90.cu): 4 stages of
/// activations, weights and scales, 8 mbarriers, 1024 for alignment.
fn sm90_smem(tokens: usize) -> usize {
    4 * (tokens * 64 * 2 + 8 * 512 + 128 * 4) + 2 * 4 * 8 + 1024
}
/// Most tokens the GEMV kernel takes on CUDA cores (bf16, f32, or f16 when asked).
pub const GEMV_MAX_TOKENS: usize = 8;
/// Most tokens the tensor-core GEMV takes (f16: 8, 16, 32 or 64 token slots).
pub const MMA_GEMV_MAX_TOKENS: usize = 64;

/// Most tokens [`gemv_many`] takes for activations of `dt`.
pub fn gemv_max_tokens(dt: DType) -> usize {
    if dt == DType::F16 {
        MMA_GEMV_MAX_TOKENS
    } else {
        GEMV_MAX_TOKENS
    }
}
/// Most weights one GEMV launch takes (`W4Sets` in w4a16.cu).
pub const GEMV_MAX_SETS: usize = 3;
/// Warps (of 32 threads) per GEMV block (GEMV_WARPS in w4a16.cu).
const GEMV_WARPS: usize = 4;
/// Most warps per block of the batch-1 GEMV (GEMV1_MAX_WARPS in w4a16.cu).
const GEMV1_MAX_WARPS: usize = 8;
/// Slots of each warp's cp.async ring (GEMV_SLOTS in w4a16.cu).
const GEMV_SLOTS: usize = 3;
/// Room for the static shared memory of a few-token GEMV block: the split-k flag.
const GEMV1_STATIC_SMEM: usize = 1024;

/// Dynamic shared memory of a GEMV block (gemv_slot_bytes in w4a16.cu): each warp's ring of
/// GEMV_SLOTS slots, each holding 4 weight units, the (scale, zero) pairs of the groups a 64-wide
/// k window touches and `m` tokens' padded activations of `elem` bytes. The cross-warp sums
/// reuse the rings' memory at the end (`mt` token slots of 64 rows per warp, rows padded to
/// `launch::GEMV_RED_STRIDE`): at least that much.
fn gemv_smem(g: usize, m: usize, mt: usize, elem: usize) -> usize {
    let sz_groups = 48usize.div_ceil(g) + 1;
    let rings = GEMV_WARPS * GEMV_SLOTS * (4 * 512 + sz_groups * 64 * 4 + m * 72 * elem);
    rings.max(GEMV_WARPS * mt * launch::GEMV_RED_STRIDE * 4)
}

/// Token slots of the ring kernel for `m` tokens: the CUDA-core kernels' 1, 2, 4 or 8, the
/// tensor-core kernels' 8, 16, 32 or 64.
fn gemv_slots(m: usize, mma: bool) -> usize {
    match (mma, m) {
        (false, 0..=1) => 1,
        (false, 2) => 2,
        (false, 3..=4) => 4,
        (_, 0..=8) => 8,
        (true, 9..=16) => 16,
        (true, 17..=32) => 32,
        _ => 64,
    }
}

/// The device copy of a packed 4-bit weight.
#[derive(Debug, Clone)]
pub struct CudaQ4 {
    /// Tiled codes, `[units * 512]` u8.
    pub q: Tensor,
    /// `[groups, np, 2]` f16 (scale, zero).
    pub sz: Tensor,
    pub shape: WeightShape,
    /// `shape.n` rounded up to a multiple of 64.
    pub np: usize,
}

/// Mirrors `W4Sets` in w4_sets.cuh (passed by value).
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(super) struct W4Sets {
    q: [u64; 3],
    sz: [u64; 3],
    n: [i32; 3],
    np: [i32; 3],
    block_start: [i32; 4],
}
// SAFETY: plain old data with the C layout of the kernel's struct.
unsafe impl DeviceRepr for W4Sets {}

impl W4Sets {
    /// The launch's weights (at most [`GEMV_MAX_SETS`], checked by the callers) for a kernel whose
    /// blocks each take `rows` output rows; returns the sets, the grid's blocks and the launch's
    /// output rows (Σ n).
    pub(super) fn new(ws: &[&CudaQ4], rows: usize, stream: &std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>) -> Result<(Self, usize, usize)> {
        let mut sets = W4Sets::default();
        let mut blocks = 0usize;
        for (i, w) in ws.iter().enumerate() {
            sets.q[i] = device_ptr(&w.q, stream)?;
            sets.sz[i] = device_ptr(&w.sz, stream)?;
            sets.n[i] = w.shape.n as i32;
            sets.np[i] = w.np as i32;
            sets.block_start[i] = blocks as i32;
            blocks += w.np.div_ceil(rows);
        }
        for i in ws.len()..4 {
            sets.block_start[i] = blocks as i32;
        }
        Ok((sets, blocks, ws.iter().map(|w| w.shape.n).sum()))
    }
}

impl CudaQ4 {
    pub fn new(w: &PackedQ4, device: &candle_core::Device) -> Result<Self> {
        let t = TiledQ4::from_packed(w);
        Ok(Self {
            q: Tensor::from_slice(&t.units, t.units.len(), device)?,
            sz: Tensor::from_slice(&t.sz, (t.groups(), t.np, 2), device)?,
            shape: t.shape,
            np: t.np,
        })
    }

    /// The device copy downloaded, in the host-side tiled form (see [`TiledQ4::to_packed`]).
    pub fn to_tiled(&self) -> Result<TiledQ4> {
        Ok(TiledQ4 {
            shape: self.shape,
            np: self.np,
            units: self.q.to_vec1::<u8>()?,
            sz: self.sz.flatten_all()?.to_vec1::<f16>()?,
        })
    }

    /// Whether the tensor-core GEMM takes this weight (one group per 64-wide k step).
    pub fn gemm_supported(&self) -> bool {
        self.shape.k.is_multiple_of(64) && self.shape.group_size.is_multiple_of(64) && self.shape.n.is_multiple_of(2)
    }

    /// `x · Wᵀ` for `x` `[..., k]` (f16, bf16 or f32): the GEMV for up to 64 tokens in f16 (8
    /// otherwise; in f16 the skinny GEMM from 9 tokens, to 128 where it runs on wgmma, see
    /// [`gemv_many_with`]); beyond, the tensor-core GEMM for f16, else dequantization to `x`'s
    /// dtype and a cuBLAS matmul.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_prefetch(x, &L2Prefetch::none())
    }

    /// [`CudaQ4::forward`]; the GEMV also pulls `next` (the next layer's weights) into L2 as its
    /// blocks finish (the GEMMs are compute-bound and take no hint).
    pub fn forward_prefetch(&self, x: &Tensor, next: &L2Prefetch) -> Result<Tensor> {
        let m = x.elem_count() / self.shape.k;
        if m <= gemv_max_tokens(x.dtype()) || super::skinny_supported(&[self], m, x.dtype()) {
            gemv_many_with(&[self], x, GemvOptions { prefetch: *next, ..Default::default() })
        } else if x.dtype() == DType::F16 && self.gemm_supported() {
            self.gemm(x)
        } else {
            let w = self.dequantize(x.dtype())?;
            x.broadcast_matmul(&w.t()?)
        }
    }

    /// The GEMV kernel alone.
    pub fn gemv(&self, x: &Tensor) -> Result<Tensor> {
        gemv_many(&[self], x)
    }

    /// The tensor-core GEMM alone (f16 activations, [`CudaQ4::gemm_supported`] weights): the
    /// Hopper wgmma kernel where the device has it and `m` is above 64 tokens,
    /// else the mma.sync kernel.
    pub fn gemm(&self, x: &Tensor) -> Result<Tensor> {
        let m = x.elem_count() / self.shape.k.max(1);
        let kernel = if m > SM90_MIN_TOKENS && sm90_available(x.device()) { GemmKernel::Sm90 } else { GemmKernel::Sm80 };
        self.gemm_with(x, kernel)
    }

    /// The GEMM with a chosen kernel (self-test and benchmarks run both).
    pub fn gemm_with(&self, x: &Tensor, kernel: GemmKernel) -> Result<Tensor> {
        let x = x.contiguous()?;
        // cp.async (sm_80) and the tensor map (sm_90) read 16-byte pieces: the start must be 16-byte aligned.
        let x = if x.layout().start_offset() % 8 != 0 { x.copy()? } else { x };
        x.apply_op1_no_bwd(&Gemm { w: self, kernel })
    }

    /// The dequantized weight `[n, k]` in `dtype`.
    pub fn dequantize(&self, dtype: DType) -> Result<Tensor> {
        // The op runs on the codes tensor; it only uses it to find the device and stream.
        self.q.apply_op1_no_bwd(&Dequant { w: self, dtype })
    }
}

/// `x · Wᵢᵀ` for up to three weights with the same input width and group size in one launch;
/// the outputs are concatenated along the last dimension (`[..., Σ nᵢ]`).
pub fn gemv_many(ws: &[&CudaQ4], x: &Tensor) -> Result<Tensor> {
    gemv_many_with(ws, x, GemvOptions::default())
}

/// How a GEMV launch is made, for the self-test and benchmarks; the default is what inference uses.
#[derive(Debug, Clone, Copy, Default)]
pub struct GemvOptions {
    /// k slices (None: see [`launch::gemv1_launch`] and [`launch::gemv_splits`]).
    pub splits: Option<usize>,
    /// Which kernel runs.
    pub kernel: GemvKernel,
    /// Ranges (the next GEMV's weights) each block pulls into L2 once its own reads are done.
    pub prefetch: L2Prefetch,
}

/// The GEMV kernels of w4a16.cu.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum GemvKernel {
    /// The few-token kernel where it applies (up to 64 tokens, f16, group size 32, 64 or 128, the
    /// activations within shared memory), else the ring.
    #[default]
    Auto,
    /// The cp.async-ring kernel (any group size; up to 64 tokens on tensor cores for f16, 8 on CUDA
    /// cores).
    Ring,
    /// The ring kernel on CUDA cores where the tensor-core one would run (f16).
    CudaCores,
}

/// As [`gemv_many`] with the launch chosen by the caller. The default kernel hands f16 launches
/// of 9–64 tokens to the skinny GEMM ([`super::skinny_many`]) where it takes the weights.
pub fn gemv_many_with(ws: &[&CudaQ4], x: &Tensor, opts: GemvOptions) -> Result<Tensor> {
    if ws.is_empty() || ws.len() > GEMV_MAX_SETS {
        candle_core::bail!("W4A16 GEMV takes 1 to {GEMV_MAX_SETS} weights, not {}", ws.len());
    }
    let (k, g) = (ws[0].shape.k, ws[0].shape.group_size);
    if let Some(w) = ws.iter().find(|w| w.shape.k != k || w.shape.group_size != g) {
        candle_core::bail!("W4A16 GEMV: weights of one launch must share k and group size ({k}/{g} vs {}/{})", w.shape.k, w.shape.group_size);
    }
    let m = x.elem_count() / k.max(1);
    if opts.kernel == GemvKernel::Auto && m >= super::skinny::skinny_from() && super::skinny_supported(ws, m, x.dtype()) {
        return super::skinny_many(ws, x, opts.splits);
    }
    // Activations are staged with 16-byte copies: the start must be 16-byte aligned.
    let x = x.contiguous()?;
    let x = if (x.layout().start_offset() * x.dtype().size_in_bytes()) % 16 != 0 { x.copy()? } else { x };
    x.apply_op1_no_bwd(&Gemv { ws, opts })
}

struct Gemv<'a> {
    ws: &'a [&'a CudaQ4],
    opts: GemvOptions,
}

/// At most this many tokens go to the sm_80 kernel (64-token tiles); above, the sm_90 kernel's
/// 256-token tiles win (on an H100 they are level at 16 tokens and ahead from 64).
const SM90_MIN_TOKENS: usize = 64;

/// The two tensor-core GEMMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemmKernel {
    /// mma.sync (sm_80 and newer).
    Sm80,
    /// wgmma (sm_90a, Hopper), its tiles and k splits chosen by [`sm90_plan`].
    Sm90,
    /// wgmma with the tiles and splits given (self-test and benchmarks).
    Sm90With(Sm90Plan),
}

pub use launch::{Sm90Plan, SM90_MAX_SPLITS};

/// The sm_90 GEMM's plan for `m` tokens of a weight of `np` (padded) rows and `k` columns on a
/// device of `sms` SMs ([`launch::sm90_plan`]); `AWQ_RUN_SM90_PLAN=tokens/splits` overrides it
/// (measurements).
pub fn sm90_plan(m: usize, np: usize, k: usize, sms: usize) -> Sm90Plan {
    let fits = |tokens: usize| np.div_ceil(128) * m.div_ceil(tokens) <= MAX_GEMV_BLOCKS;
    if let Some(plan) = sm90_plan_override() {
        return Sm90Plan { tokens: plan.tokens, splits: if fits(plan.tokens) { plan.splits.min((k / 64).max(1)) } else { 1 } };
    }
    launch::sm90_plan(m, np, k, sms, MAX_GEMV_BLOCKS)
}

fn sm90_plan_override() -> Option<Sm90Plan> {
    static PLAN: std::sync::OnceLock<Option<Sm90Plan>> = std::sync::OnceLock::new();
    *PLAN.get_or_init(|| {
        let v = std::env::var("AWQ_RUN_SM90_PLAN").ok()?;
        let plan = v.split_once('/').and_then(|(t, s)| Some(Sm90Plan { tokens: t.trim().parse().ok()?, splits: s.trim().parse().ok()? }));
        match plan {
            Some(p) if matches!(p.tokens, 128 | 256) && (1..=SM90_MAX_SPLITS).contains(&p.splits) => Some(p),
            _ => {
                eprintln!("warning: AWQ_RUN_SM90_PLAN={v} ignored: expected TOKENS/SPLITS, tokens 128 or 256, splits 1 to {SM90_MAX_SPLITS}");
                None
            }
        }
    })
}

/// Loads (the driver JIT-compiles) every 4-bit kernel module on `dev`: about 4.7 MB of our 5.3 MB
/// of PTX (the whole `Model::warm_up` took 23.6 s on a fresh H100), which a server
/// otherwise pays inside its first requests at each new batch size (measured on an H100: a
/// serving run started on a fresh machine decoded 16 streams at 4.4x one stream, against
/// 9.6-10.2x where the kernels had been loaded before).
pub fn preload_kernels(dev: &CudaDevice) -> Result<()> {
    dev.get_or_load_custom_func("w4_dequant_f16", MODULE, PTX)?;
    if sm90_available(&candle_core::Device::Cuda(dev.clone())) {
        dev.get_or_load_custom_func("w4_gemm_f16_sm90_t256", MODULE_SM90, PTX_SM90)?;
    }
    super::skinny::preload(dev)
}

/// Whether the Hopper kernel can run on `device` (built for compute 9.0, and the device is 9.0).
pub fn sm90_available(device: &candle_core::Device) -> bool {
    let candle_core::Device::Cuda(d) = device else { return false };
    !PTX_SM90.is_empty() && matches!(device_limits(d), Ok(DeviceLimits { compute: (9, 0), .. }))
}

struct Gemm<'a> {
    w: &'a CudaQ4,
    kernel: GemmKernel,
}

struct Dequant<'a> {
    w: &'a CudaQ4,
    dtype: DType,
}

/// Fills `len` elements of `buf` with NaN while the self-test's [`poison`] hook is on.
pub(super) fn poison_buffer<T: DeviceRepr>(dev: &CudaDevice, sfx: &str, buf: &candle_core::cuda_backend::cudarc::driver::CudaSlice<T>, len: usize) -> Result<()> {
    if !poison::enabled() {
        return Ok(());
    }
    let pf = dev.get_or_load_custom_func(&format!("poison_{sfx}"), MODULE, PTX)?;
    let len64 = len as u64;
    let mut b = pf.builder();
    b.arg(buf);
    b.arg(&len64);
    // SAFETY: the kernel writes only indices below len, which the buffer holds.
    unsafe { b.launch(LaunchConfig::for_num_elems(len as u32)) }.w()?;
    Ok(())
}

pub(super) fn input_check(name: &str, l: &Layout, k: usize) -> Result<(usize, usize)> {
    let dims = l.dims();
    let kk = *dims.last().unwrap_or(&0);
    if kk != k {
        candle_core::bail!("{name}: input has {kk} features, the layer {k}");
    }
    let Some((xo, _)) = l.contiguous_offsets() else { candle_core::bail!("{name}: input must be contiguous") };
    Ok((l.shape().elem_count() / k.max(1), xo))
}

pub(super) fn out_shape(l: &Layout, n: usize) -> Shape {
    let mut shape = l.dims().to_vec();
    *shape.last_mut().unwrap() = n;
    Shape::from(shape)
}

impl CustomOp1 for Gemv<'_> {
    fn name(&self) -> &'static str {
        "awq-w4a16-gemv-cuda"
    }
    fn cpu_fwd(&self, _: &candle_core::CpuStorage, _: &Layout) -> Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("{} runs on CUDA only", self.name())
    }
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let w0 = self.ws[0];
        let (m, xo) = input_check(self.name(), l, w0.shape.k)?;
        let most = if self.opts.kernel == GemvKernel::CudaCores { GEMV_MAX_TOKENS } else { gemv_max_tokens(s.dtype()) };
        if m > most {
            candle_core::bail!("{}: {m} tokens of {:?}, at most {most}", self.name(), s.dtype());
        }
        let dev = s.device().clone();
        let stream = dev.cuda_stream();
        let dt = s.dtype();
        let sfx = suffix_for(self.name(), dt)?;
        let (sets, blocks, n_total) = W4Sets::new(self.ws, 64, &stream)?;
        let batch1 = self.batch1_launch(&dev, m, dt, blocks)?;
        let is_batch1 = batch1.is_some();
        let (func, cfg) = match batch1 {
            Some(launch) => launch,
            None => self.ring_launch(&dev, m, dt, blocks)?,
        };
        let splits = cfg.grid_dim.1 as usize;
        // Split k: per-slice sums, and the per-row-range arrival counters (left zeroed by the kernel).
        // SAFETY: the kernel writes every element of the workspace it reads.
        let part = if splits > 1 { Some(unsafe { dev.alloc::<f32>(splits * m * blocks * 64)? }) } else { None };
        let (k, g, m_, nt) = (w0.shape.k as i32, w0.shape.group_size as i32, m as i32, n_total as i32);
        let counters = device_ptr(&split_counters(&dev, blocks)?, &stream)?;
        let out = crate::with_float_type!(dt, T => {
            let x = s.as_cuda_slice::<T>()?.slice(xo..);
            // SAFETY: every element is written by the kernel (or poisoned first).
            let y = unsafe { dev.alloc::<T>(m * n_total)? };
            poison_buffer(&dev, sfx, &y, m * n_total)?;
            let mut b = stream.launch_builder(&func);
            b.arg(&sets);
            b.arg(&x);
            b.arg(&y);
            b.arg(&k);
            if !is_batch1 {
                // The few-token kernel has its group size built in.
                b.arg(&g);
            }
            b.arg(&m_);
            b.arg(&nt);
            // Unsplit launches never touch the workspace: a null pointer.
            let null = 0u64;
            match &part {
                Some(p) => b.arg(p),
                None => b.arg(&null),
            };
            b.arg(&counters);
            b.arg(&self.opts.prefetch);
            // SAFETY: the weights' buffers match n, np, k and g; x holds m * k elements; the
            // workspace and counters are sized for the grid.
            unsafe { b.launch(cfg) }.w()?;
            CudaStorage::wrap_cuda_slice(y, dev.clone())
        });
        Ok((out, out_shape(l, n_total)))
    }
}

/// A kernel and its launch configuration.
type Launch = (candle_core::cuda_backend::cudarc::driver::CudaFunction, LaunchConfig);

impl Gemv<'_> {
    /// The few-token kernel's launch where it applies: f16, the default kernel, up to 8 tokens at
    /// group size 32, 64 or 128 or up to 16 at 64 or 128, every weight under 2^32 words (it uses
    /// 32-bit offsets) and the warps' activations within half an SM's shared memory (two blocks
    /// per SM). It stages every token's share of x at once, so more tokens take more k slices (or
    /// 4-warp blocks) to fit. Above 16 tokens the ring kernel was faster on the 11008-row shapes
    /// (BENCHMARKS.md).
    fn batch1_launch(&self, dev: &CudaDevice, m: usize, dt: DType, blocks: usize) -> Result<Option<Launch>> {
        let (k, g) = (self.ws[0].shape.k, self.ws[0].shape.group_size);
        let applies = dt == DType::F16
            && self.opts.kernel == GemvKernel::Auto
            && (m <= 8 && matches!(g, 32 | 64 | 128) || m <= 16 && matches!(g, 64 | 128))
            && self.ws.iter().all(|w| (w.shape.k as u64 * w.np as u64 / 8) < (1u64 << 32));
        if !applies {
            return Ok(None);
        }
        let slots = if m <= 8 { "" } else { "_t16" };
        let name = format!("w4_gemv1_f16_g{g}{slots}");
        let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
        // The dynamic shared memory (x) varies with the launch: the limit is what the device
        // leaves beside the static part.
        let max_smem = device_limits(dev)?.smem_optin - GEMV1_STATIC_SMEM;
        let resident_warps = resident_blocks(dev, &func, &name, 32 * GEMV1_MAX_WARPS, 0, max_smem)? * GEMV1_MAX_WARPS;
        // Two blocks per SM: the staged activations within half of it.
        let (warps, splits) = match self.opts.splits {
            Some(s) => (launch::gemv1_launch(blocks, k / g, resident_warps).0, s.clamp(1, (k / 16).max(1))),
            None => match launch::gemv1_fit(k, g, m, blocks, resident_warps, max_smem / 2) {
                Some(ws) => ws,
                None => return Ok(None),
            },
        };
        let smem = launch::gemv1_smem(k, g, m, warps, splits);
        // Beyond the device's shared memory the ring kernel runs.
        let cfg = LaunchConfig { grid_dim: (blocks as u32, splits as u32, 1), block_dim: (32 * warps as u32, 1, 1), shared_mem_bytes: smem as u32 };
        Ok((smem <= max_smem).then(|| (func.into_cuda_function(), cfg)))
    }

    /// The ring kernel's launch (any launch the GEMV takes): tensor cores for f16 (8 token
    /// slots) unless CUDA cores are asked for, else CUDA cores sized to the tokens.
    fn ring_launch(&self, dev: &CudaDevice, m: usize, dt: DType, blocks: usize) -> Result<Launch> {
        let (k, g) = (self.ws[0].shape.k, self.ws[0].shape.group_size);
        let mma = dt == DType::F16 && self.opts.kernel != GemvKernel::CudaCores;
        let mt = gemv_slots(m, mma);
        let name = match (mma, mt) {
            (true, 8) => "w4_gemv_f16_mma".to_string(),
            (true, _) => format!("w4_gemv_f16_mma{mt}"),
            (false, _) => format!("w4_gemv_{}_{mt}", suffix_for("W4A16 GEMV", dt)?),
        };
        let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
        let elem = dt.size_in_bytes();
        let smem = gemv_smem(g, m, mt, elem);
        // The limit covers every launch of the kernel: the most tokens, the smallest groups.
        let resident = resident_blocks(dev, &func, &name, 32 * GEMV_WARPS, smem, gemv_smem(32, mt, mt, elem))?;
        let splits = match self.opts.splits {
            Some(s) => s.clamp(1, (k / 16).max(1)),
            None => launch::gemv_splits(blocks, k / 16, resident),
        };
        let cfg = LaunchConfig { grid_dim: (blocks as u32, splits as u32, 1), block_dim: (32 * GEMV_WARPS as u32, 1, 1), shared_mem_bytes: smem as u32 };
        Ok((func.into_cuda_function(), cfg))
    }
}

/// Most row ranges (64 rows each) one GEMV launch may have: 4M output rows.
const MAX_GEMV_BLOCKS: usize = 1 << 16;

/// The device's zeroed arrival counters for split-k GEMVs. Launches on the device's one stream
/// never overlap, and each leaves the counters it used at zero, so one buffer serves them all.
pub(super) fn split_counters(dev: &CudaDevice, blocks: usize) -> Result<Tensor> {
    use std::sync::{Mutex, OnceLock};
    static COUNTERS: OnceLock<Mutex<Vec<Tensor>>> = OnceLock::new();
    if blocks > MAX_GEMV_BLOCKS {
        candle_core::bail!("W4A16 GEMV: {blocks} row ranges of 64, at most {MAX_GEMV_BLOCKS}");
    }
    let mut all = COUNTERS.get_or_init(|| Mutex::new(Vec::new())).lock().unwrap_or_else(|e| e.into_inner());
    let device = candle_core::Device::Cuda(dev.clone());
    let t = match all.iter().find(|t| t.device().same_device(&device)) {
        Some(t) => t.clone(),
        None => {
            let t = Tensor::zeros(MAX_GEMV_BLOCKS, DType::U32, &device)?;
            all.push(t.clone());
            t
        }
    };
    Ok(t)
}

/// A TMA tensor map (the sm_90 GEMM's view of its activations), passed to the kernel by value.
#[repr(transparent)]
struct TensorMap(candle_core::cuda_backend::cudarc::driver::sys::CUtensorMap);
// SAFETY: the driver's opaque, aligned 128-byte descriptor, copied into the kernel's parameters.
unsafe impl DeviceRepr for TensorMap {}

impl TensorMap {
    /// `x` as `m` rows of `k` f16 (k a multiple of 64, x 16-byte aligned), read in 64 x `tokens`
    /// boxes with the 128-byte swizzle the kernel's wgmma descriptors expect; rows past `m` read as
    /// zeros.
    fn activations(x: u64, m: usize, k: usize, tokens: usize) -> Result<Self> {
        use candle_core::cuda_backend::cudarc::driver::sys;
        let dims: [u64; 2] = [k as u64, m as u64];
        let strides: [u64; 1] = [(k * 2) as u64];
        let boxes: [u32; 2] = [64, tokens as u32];
        let steps: [u32; 2] = [1, 1];
        let mut map = std::mem::MaybeUninit::<sys::CUtensorMap>::zeroed();
        // SAFETY: every pointer is to a live local array of the rank's length; the driver fills `map`.
        unsafe {
            sys::cuTensorMapEncodeTiled(
                map.as_mut_ptr(),
                sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
                2,
                x as *mut std::ffi::c_void,
                dims.as_ptr(),
                strides.as_ptr(),
                boxes.as_ptr(),
                steps.as_ptr(),
                sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
                sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
                sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
            )
        }
        .result()
        .w()?;
        // SAFETY: initialized by the successful call above.
        Ok(Self(unsafe { map.assume_init() }))
    }
}

/// m16 tiles per warp of the GEMM (block rows = 64 × this) for `m` tokens.
fn gemm_wm(m: usize) -> usize {
    match m {
        0..=64 => 1,
        65..=1024 => 2,
        _ => 4,
    }
}

/// Shared memory of the GEMM (GemmSmem<WM>::TOTAL in w4a16.cu).
fn gemm_smem(wm: usize) -> usize {
    let stage = 64 * wm * 64 * 2 + 8 * 512 + 128 * 4;
    stage * 4
}

impl CustomOp1 for Gemm<'_> {
    fn name(&self) -> &'static str {
        "awq-w4a16-gemm-cuda"
    }
    fn cpu_fwd(&self, _: &candle_core::CpuStorage, _: &Layout) -> Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("{} runs on CUDA only", self.name())
    }
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let w = self.w;
        if s.dtype() != DType::F16 || !w.gemm_supported() {
            candle_core::bail!("{}: f16 activations and k, group size multiples of 64 (got {:?}, k {}, g {})", self.name(), s.dtype(), w.shape.k, w.shape.group_size);
        }
        let (m, xo) = input_check(self.name(), l, w.shape.k)?;
        let dev = s.device().clone();
        let stream = dev.cuda_stream();
        let plan = match self.kernel {
            GemmKernel::Sm80 => None,
            GemmKernel::Sm90 => Some(sm90_plan(m, w.np, w.shape.k, device_limits(&dev)?.sms)),
            GemmKernel::Sm90With(p) => Some(p),
        };
        let (m_, n_, np_, k_, g_) = (m as i32, w.shape.n as i32, w.np as i32, w.shape.k as i32, w.shape.group_size as i32);
        let x = s.as_cuda_slice::<f16>()?.slice(xo..);
        // SAFETY: every element is written by the kernel (or poisoned first).
        let y = unsafe { dev.alloc::<f16>(m * w.shape.n)? };
        poison_buffer(&dev, "f16", &y, m * w.shape.n)?;
        let q = device_ptr(&w.q, &stream)?;
        let sz = device_ptr(&w.sz, &stream)?;
        match plan {
            None => {
                let wm = gemm_wm(m);
                let func = dev.get_or_load_custom_func(&format!("w4_gemm_f16_wm{wm}"), MODULE, PTX)?;
                let smem = gemm_smem(wm);
                func.set_attribute(CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32).w()?;
                let cfg = LaunchConfig { grid_dim: (w.np.div_ceil(128) as u32, m.div_ceil(64 * wm) as u32, 1), block_dim: (256, 1, 1), shared_mem_bytes: smem as u32 };
                let mut b = func.builder();
                b.arg(&x);
                b.arg(&q);
                b.arg(&sz);
                b.arg(&y);
                b.arg(&m_);
                b.arg(&n_);
                b.arg(&np_);
                b.arg(&k_);
                b.arg(&g_);
                // SAFETY: buffer sizes match m, n, np, k and g; the shared memory limit was raised above.
                unsafe { b.launch(cfg) }.w()?;
            }
            Some(plan) => {
                if PTX_SM90.is_empty() {
                    candle_core::bail!("{}: this build has no sm_90 kernels (CUDA_COMPUTE_CAP=90)", self.name());
                }
                let ktiles = w.shape.k / 64;
                let (row_tiles, token_tiles) = (w.np.div_ceil(128), m.div_ceil(plan.tokens.max(1)));
                let tiles = row_tiles * token_tiles;
                if !matches!(plan.tokens, 128 | 256) || plan.splits == 0 || plan.splits > SM90_MAX_SPLITS.min(ktiles) || (plan.splits > 1 && tiles > MAX_GEMV_BLOCKS) {
                    candle_core::bail!("{}: plan {plan}: 128 or 256 tokens, 1 to {} splits (k {}), split only up to {MAX_GEMV_BLOCKS} tiles", self.name(), SM90_MAX_SPLITS.min(ktiles), w.shape.k);
                }
                let func = dev.get_or_load_custom_func(&format!("w4_gemm_f16_sm90_t{}", plan.tokens), MODULE_SM90, PTX_SM90)?;
                let smem = sm90_smem(plan.tokens);
                func.set_attribute(CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32).w()?;
                let cfg = LaunchConfig { grid_dim: (row_tiles as u32, token_tiles as u32, plan.splits as u32), block_dim: (256, 1, 1), shared_mem_bytes: smem as u32 };
                // Split k: each block's sums, and the per-tile arrival counters (left zeroed by the kernel).
                // SAFETY: the kernel writes every element of the workspace it reads.
                let part = if plan.splits > 1 { Some(unsafe { dev.alloc::<f32>(tiles * plan.splits * 128 * plan.tokens)? }) } else { None };
                let counters = device_ptr(&split_counters(&dev, if plan.splits > 1 { tiles } else { 0 })?, &stream)?;
                // The kernel reads X through a TMA tensor map (its first parameter) instead of a pointer.
                let xmap = TensorMap::activations(x.device_ptr(&stream).0, m, w.shape.k, plan.tokens)?;
                let mut b = func.builder();
                b.arg(&xmap);
                b.arg(&q);
                b.arg(&sz);
                b.arg(&y);
                // Unsplit launches never touch the workspace: a null pointer.
                let null = 0u64;
                match &part {
                    Some(p) => b.arg(p),
                    None => b.arg(&null),
                };
                b.arg(&counters);
                b.arg(&m_);
                b.arg(&n_);
                b.arg(&np_);
                b.arg(&k_);
                b.arg(&g_);
                // SAFETY: buffer sizes match m, n, np, k and g; the shared memory limit was raised
                // above; the tensor map describes x (m rows of k f16, 16-byte aligned: gemm_with
                // copies otherwise); the workspace and counters are sized for the grid.
                unsafe { b.launch(cfg) }.w()?;
            }
        }
        Ok((CudaStorage::wrap_cuda_slice(y, dev.clone()), out_shape(l, w.shape.n)))
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
        let stream = dev.cuda_stream();
        let sfx = suffix_for(self.name(), self.dtype)?;
        let (n, np, k, g) = (w.shape.n as i32, w.np as i32, w.shape.k as i32, w.shape.group_size as i32);
        let q = device_ptr(&w.q, &stream)?;
        let sz = device_ptr(&w.sz, &stream)?;
        let func = dev.get_or_load_custom_func(&format!("w4_dequant_{sfx}"), MODULE, PTX)?;
        let cfg = LaunchConfig::for_num_elems(((w.shape.k / 16) * (w.np / 64) * 32) as u32);
        let out = crate::with_float_type!(self.dtype, T => {
            // SAFETY: the kernel writes all n * k elements.
            let out = unsafe { dev.alloc::<T>(w.shape.n * w.shape.k)? };
            poison_buffer(&dev, sfx, &out, w.shape.n * w.shape.k)?;
            let mut b = func.builder();
            b.arg(&q);
            b.arg(&sz);
            b.arg(&out);
            b.arg(&n);
            b.arg(&np);
            b.arg(&k);
            b.arg(&g);
            // SAFETY: sizes as above.
            unsafe { b.launch(cfg) }.w()?;
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        });
        Ok((out, Shape::from((w.shape.n, w.shape.k))))
    }
}

