//! The thin wrapper of the skinny GEMMs (`w4a16_skinny.cu` on mma.sync, `w4a16_skinny_sm90.cu`
//! on Hopper's wgmma): 9 to 64 f16 tokens (to 128 on wgmma) through up to three 4-bit weights that share an
//! input, in one launch, blocks of 256 rows split over k.
use super::kernels::{input_check, out_shape, poison_buffer, split_counters, CudaQ4, W4Sets, GEMV_MAX_SETS};
use super::launch;
use crate::cuda::{allow_dynamic_smem, device_limits, device_ptr, resident_blocks, DeviceLimits};
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use half::f16;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/w4a16_skinny.ptx"));
const MODULE: &str = "awq_w4a16_skinny";
const PTX_SM90: &str = include_str!(concat!(env!("OUT_DIR"), "/w4a16_skinny_sm90.ptx"));
const MODULE_SM90: &str = "awq_w4a16_skinny_sm90";

/// A count from the environment (the A/B overrides below), None if unset or not a number.
fn env_usize(name: &str) -> Option<usize> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// One of the skinny GEMM kernels and its build-time variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkinnyKernel {
    /// mma.sync (`w4a16_skinny.cu`), `k_warps` warps sharing each 64 rows' k steps (one of
    /// [`launch::skinny_k_warps_built`]).
    Mma { k_warps: usize },
    /// Hopper's wgmma (`w4a16_skinny_sm90.cu`) with `stages` pipeline stages, with `overlap` a
    /// tile's wgmmas left running while the next is dequantized, `blocks` of 512 threads an SM
    /// (one of [`launch::skinny_wgmma_built`]). With `cluster` the k slices of a row range are
    /// one thread block cluster whose blocks add their sums in each other's shared memory
    /// (`sk_finish_cluster` in w4_skinny.cuh), where [`launch::skinny_cluster_plan`] finds it
    /// pays; else the slices' sums go through global memory and the last block of each row
    /// range adds them.
    Wgmma { stages: usize, overlap: bool, blocks: usize, cluster: bool },
}

impl SkinnyKernel {
    /// Whether the k slices' sums may be added across a thread block cluster.
    pub fn cluster(self) -> bool {
        matches!(self, SkinnyKernel::Wgmma { cluster: true, .. })
    }

    /// The same kernel with the k slices' sums added across a cluster or not (the mma.sync
    /// kernel has no cluster end).
    pub fn with_cluster(self, on: bool) -> SkinnyKernel {
        match self {
            SkinnyKernel::Mma { .. } => self,
            SkinnyKernel::Wgmma { stages, overlap, blocks, .. } => SkinnyKernel::Wgmma { stages, overlap, blocks, cluster: on },
        }
    }
}

impl std::fmt::Display for SkinnyKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SkinnyKernel::Mma { k_warps } => write!(f, "mma k{k_warps}")?,
            SkinnyKernel::Wgmma { stages, overlap, blocks, .. } => write!(f, "wgmma s{stages}{}{}", if *overlap { " overlap" } else { "" }, if *blocks == 2 { " 2/SM" } else { "" })?,
        }
        if self.cluster() {
            write!(f, " cluster")?;
        }
        Ok(())
    }
}

/// Whether the wgmma skinny GEMM can run on `device` (built for compute 9.0, and the device is 9.0).
pub fn skinny_wgmma_available(device: &candle_core::Device) -> bool {
    let candle_core::Device::Cuda(d) = device else { return false };
    !PTX_SM90.is_empty() && matches!(device_limits(d), Ok(DeviceLimits { compute: (9, 0), .. }))
}

/// The f16 entry point of `kernel` for `mt` token slots and `splits` k slices (a cluster
/// kernel's entry names its cluster size; at one slice there is nothing to add and the plain
/// entry runs), and whether it is in the sm_90 module.
fn kernel_name(kernel: SkinnyKernel, mt: usize, splits: usize) -> (String, bool) {
    let base = match kernel {
        SkinnyKernel::Mma { k_warps } => format!("w4_skinny_f16_t{mt}_k{k_warps}"),
        SkinnyKernel::Wgmma { stages, overlap, blocks, .. } => {
            format!("w4_wgs_f16_t{mt}_s{stages}{}{}", if overlap { "_o" } else { "" }, if blocks == 2 { "_b2" } else { "" })
        }
    };
    let name = if kernel.cluster() && splits > 1 { format!("{base}_c{splits}") } else { base };
    (name, matches!(kernel, SkinnyKernel::Wgmma { .. }))
}

/// Loads the skinny GEMMs' modules on `dev` (see [`super::preload_kernels`]).
pub(super) fn preload(dev: &candle_core::CudaDevice) -> Result<()> {
    let device = candle_core::Device::Cuda(dev.clone());
    dev.get_or_load_custom_func(&kernel_name(SkinnyKernel::Mma { k_warps: 1 }, 16, 1).0, MODULE, PTX)?;
    if skinny_wgmma_available(&device) {
        let slots = launch::skinny_slots(64);
        dev.get_or_load_custom_func(&kernel_name(skinny_wgmma_variant(slots), slots, 1).0, MODULE_SM90, PTX_SM90)?;
    }
    Ok(())
}

/// Most tokens `forward` hands to the skinny GEMM on `device`: 128 where the wgmma kernel runs
/// (above 64 only it), else 64. `AWQ_RUN_WGMMA_MAX` moves it for A/B benchmarks against the
/// large-M GEMM: 64 hands 65–128 tokens back to it, more than 128 runs tiles of 128 tokens.
pub fn skinny_max_tokens(device: &candle_core::Device) -> usize {
    static MAX: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    if !skinny_wgmma_available(device) {
        return launch::SKINNY_MAX_TOKENS;
    }
    *MAX.get_or_init(|| env_usize("AWQ_RUN_WGMMA_MAX").unwrap_or(launch::SKINNY_WGMMA_MAX_TOKENS).max(launch::SKINNY_MAX_TOKENS))
}

/// Every skinny kernel variant built for `m` tokens on `device` (the self-test runs each).
pub fn skinny_kernels_built(m: usize, device: &candle_core::Device) -> Vec<SkinnyKernel> {
    let mt = launch::skinny_slots(m);
    let mut v: Vec<SkinnyKernel> = launch::skinny_k_warps_built(mt).iter().map(|&k_warps| SkinnyKernel::Mma { k_warps }).collect();
    if skinny_wgmma_available(device) {
        v.extend(launch::skinny_wgmma_built(mt).iter().map(|&(stages, overlap, blocks)| SkinnyKernel::Wgmma { stages, overlap, blocks, cluster: false }));
        v.extend(skinny_cluster_kernel(mt));
    }
    v
}

/// The kernel built with the cluster end at `mt` token slots (`CLUSTER_SIZES` in
/// w4a16_skinny_sm90.cu): the wgmma variant of [`launch::skinny_wgmma_default`] at 64 and 128
/// slots. Fewer tokens send fewer sums through L2, and on an H100 (BENCHMARKS.md, session 27)
/// a cluster end lost on two of three shapes at 16 tokens (on the mma.sync kernel), and at 32
/// tokens (two blocks an SM) on one, with the batched step of 32 sequences 4 % slower.
fn skinny_cluster_kernel(mt: usize) -> Option<SkinnyKernel> {
    match mt {
        64 | 128 => {
            let (stages, overlap, blocks) = launch::skinny_wgmma_default(mt);
            Some(SkinnyKernel::Wgmma { stages, overlap, blocks, cluster: true })
        }
        _ => None,
    }
}

/// Whether the default kernels add their k slices' sums across a cluster where one is built:
/// yes unless `AWQ_RUN_SKINNY_CLUSTER=0` (A/B benchmarks).
pub fn skinny_cluster_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("AWQ_RUN_SKINNY_CLUSTER").map(|v| v != "0").unwrap_or(true))
}

/// `kernel` with the cluster end where it is built for `mt` slots on a device that has it and
/// [`skinny_cluster_on`].
fn cluster_if_built(kernel: SkinnyKernel, mt: usize, device: &candle_core::Device) -> SkinnyKernel {
    let clustered = kernel.with_cluster(true);
    if skinny_cluster_on() && clustered.cluster() && skinny_wgmma_available(device) && skinny_cluster_kernel(mt) == Some(clustered) {
        clustered
    } else {
        kernel
    }
}

/// The token count from which the skinny GEMM runs on wgmma where the device has it: 9, all of
/// its range (17 until session 27). At 16 tokens the wgmma kernel, 6 stages and two blocks an
/// SM at up to 8 slices, beat the mma.sync kernel of two k-step warps on all three of the GPU
/// issue's shapes (H100: 4096 × 11008 17.3 against 17.9 µs, 11008 × 4096 19.0 against 19.1,
/// 4096² 10.9 against 12.7), and the batched step of 16 sequences took 3.81–3.85 against
/// 3.89–3.97 ms in four alternated rounds (12 sequences alike; BENCHMARKS.md, session 27). `AWQ_RUN_WGMMA_FROM` overrides it for
/// A/B benchmarks (65 turns it off).
pub fn skinny_wgmma_from() -> usize {
    static FROM: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *FROM.get_or_init(|| env_usize("AWQ_RUN_WGMMA_FROM").unwrap_or(9))
}

/// The wgmma skinny GEMM's variant at `mt` token slots ([`launch::skinny_wgmma_default`]);
/// `AWQ_RUN_WGMMA_VARIANT` ([`launch::parse_wgmma_variant`]: 4, 6, 6o, 4b, 6b) overrides it for
/// A/B benchmarks where that variant is built.
pub fn skinny_wgmma_variant(mt: usize) -> SkinnyKernel {
    static V: std::sync::OnceLock<Option<(usize, bool, usize)>> = std::sync::OnceLock::new();
    let forced = *V.get_or_init(|| launch::parse_wgmma_variant(&std::env::var("AWQ_RUN_WGMMA_VARIANT").ok()?));
    let (stages, overlap, blocks) = forced.filter(|f| launch::skinny_wgmma_built(mt).contains(f)).unwrap_or(launch::skinny_wgmma_default(mt));
    SkinnyKernel::Wgmma { stages, overlap, blocks, cluster: false }
}

/// The kernel the skinny GEMM runs for `m` tokens on `device` by default (with the cluster end
/// where it is built: [`skinny_cluster_on`]).
pub fn skinny_default_kernel(m: usize, device: &candle_core::Device) -> SkinnyKernel {
    let mt = launch::skinny_slots(m);
    let kernel = if (m >= skinny_wgmma_from() || m > launch::SKINNY_MAX_TOKENS) && skinny_wgmma_available(device) {
        skinny_wgmma_variant(mt)
    } else {
        SkinnyKernel::Mma { k_warps: skinny_k_warps(mt) }
    };
    cluster_if_built(kernel, mt, device)
}

/// The token count from which the default GEMV path hands over to the skinny GEMM (up to
/// [`launch::SKINNY_MAX_TOKENS`]): 9. With two warps sharing each 64 rows' k steps at 9–16
/// tokens ([`skinny_k_warps`]) the skinny GEMM beats the few-token GEMV at 16 tokens on
/// 4096 × 11008 (H100: 18.0 against 22.6 µs), ties it on 11008 × 4096 and at 12 tokens, and the
/// batched decode step of 16 sequences of dummy Llama-2-7B took 4.31 ms against 4.70
/// (BENCHMARKS.md, session 18); on Hopper the wgmma kernel runs it from 9 tokens too
/// ([`skinny_wgmma_from`]). `AWQ_RUN_SKINNY_FROM` overrides it for A/B benchmarks (65 turns
/// the skinny GEMM off).
pub fn skinny_from() -> usize {
    static FROM: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *FROM.get_or_init(|| env_usize("AWQ_RUN_SKINNY_FROM").unwrap_or(9))
}

/// How many warps share each 64 rows' k steps at `mt` token slots (one of
/// [`launch::skinny_k_warps_built`]): two at 16 slots, one at 32 and 64. Measured (H100,
/// session 18): at 16 tokens two groups run the blocks' k slices twice as long with twice the
/// warps (4096 × 11008: 18.0 against 21.8 µs; four groups 20.4); at 32 tokens two were faster
/// alone on two of three shapes but made the batched step of 32 sequences slower (7.20 against
/// 6.76 ms). `AWQ_RUN_SKINNY_KW` overrides it for A/B benchmarks where that count is built.
pub fn skinny_k_warps(mt: usize) -> usize {
    static KW: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    let forced = *KW.get_or_init(|| env_usize("AWQ_RUN_SKINNY_KW"));
    forced.filter(|kw| launch::skinny_k_warps_built(mt).contains(kw)).unwrap_or(if mt == 16 { 2 } else { 1 })
}

/// Whether `forward` hands these weights and `m` tokens of `dt` to the skinny GEMM: it can run
/// them ([`skinny_capable`]) and `m` is within [`skinny_max_tokens`].
pub fn skinny_supported(ws: &[&CudaQ4], m: usize, dt: DType) -> bool {
    m <= skinny_max_tokens(ws[0].q.device()) && skinny_capable(ws, m, dt)
}

/// Whether the skinny GEMM can run these weights and `m` tokens of `dt`: f16, one k (a multiple
/// of 64) and group size (32 or a multiple of 64), and up to 64 tokens, or any count where the
/// wgmma kernel runs (tiles of 128).
pub fn skinny_capable(ws: &[&CudaQ4], m: usize, dt: DType) -> bool {
    let (k, g) = (ws[0].shape.k, ws[0].shape.group_size);
    let tokens_ok = m >= 1 && (m <= launch::SKINNY_MAX_TOKENS || skinny_wgmma_available(ws[0].q.device()));
    dt == DType::F16 && tokens_ok && launch::skinny_shape_ok(k, g) && ws.iter().all(|w| w.shape.k == k && w.shape.group_size == g)
}

/// `x · Wᵢᵀ` for up to three weights (same k and group size) through the skinny GEMM; outputs
/// concatenated along the last dimension. `splits`: k slices (None: [`launch::skinny_splits`]).
pub fn skinny_many(ws: &[&CudaQ4], x: &Tensor, splits: Option<usize>) -> Result<Tensor> {
    skinny_many_with(ws, x, splits, None)
}

/// As [`skinny_many`] with the kernel chosen (None: [`skinny_default_kernel`]); one of
/// [`skinny_kernels_built`] for the launch's tokens and device.
pub fn skinny_many_with(ws: &[&CudaQ4], x: &Tensor, splits: Option<usize>, kernel: Option<SkinnyKernel>) -> Result<Tensor> {
    if ws.is_empty() || ws.len() > GEMV_MAX_SETS {
        candle_core::bail!("W4A16 skinny GEMM takes 1 to {GEMV_MAX_SETS} weights, not {}", ws.len());
    }
    let x = x.contiguous()?;
    let m = x.elem_count() / ws[0].shape.k.max(1);
    if !skinny_capable(ws, m, x.dtype()) {
        let most = if skinny_wgmma_available(x.device()) { "any number of".to_string() } else { format!("1 to {}", launch::SKINNY_MAX_TOKENS) };
        candle_core::bail!(
            "W4A16 skinny GEMM: f16, {most} tokens, k a multiple of 64, group size 32 or a multiple of 64, one k and group size (got {:?}, {m} tokens, k {}, g {})",
            x.dtype(),
            ws[0].shape.k,
            ws[0].shape.group_size
        );
    }
    // The default kernel with k slices a cluster cannot take runs its global end.
    let kernel = kernel.unwrap_or_else(|| {
        let default = skinny_default_kernel(m, x.device());
        default.with_cluster(default.cluster() && splits.is_none_or(launch::skinny_cluster_splits_ok))
    });
    let built = skinny_kernels_built(m, x.device());
    if !built.contains(&kernel) {
        let built: Vec<String> = built.iter().map(|k| k.to_string()).collect();
        candle_core::bail!("W4A16 skinny GEMM: kernel {kernel} is not built for {m} tokens on this device; built: {}", built.join(", "));
    }
    // Activations are staged with 16-byte copies: the start must be 16-byte aligned.
    let x = if x.layout().start_offset() % 8 != 0 { x.copy()? } else { x };
    x.apply_op1_no_bwd(&Skinny { ws, splits, kernel })
}

struct Skinny<'a> {
    ws: &'a [&'a CudaQ4],
    splits: Option<usize>,
    kernel: SkinnyKernel,
}

impl CustomOp1 for Skinny<'_> {
    fn name(&self) -> &'static str {
        "awq-w4a16-skinny-cuda"
    }
    fn cpu_fwd(&self, _: &candle_core::CpuStorage, _: &Layout) -> Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("{} runs on CUDA only", self.name())
    }
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let w0 = self.ws[0];
        let (k, g) = (w0.shape.k, w0.shape.group_size);
        let (m, xo) = input_check(self.name(), l, k)?;
        let dev = s.device().clone();
        let stream = dev.cuda_stream();
        let (sets, blocks, n_total) = W4Sets::new(self.ws, launch::SKINNY_ROWS, &stream)?;
        // Token slots a block; beyond 128 tokens (wgmma only) tiles of 128 over the grid's z.
        let mt = launch::skinny_slots(m);
        let tiles = m.div_ceil(mt);
        let load = |name: &str, sm90: bool| if sm90 { dev.get_or_load_custom_func(name, MODULE_SM90, PTX_SM90) } else { dev.get_or_load_custom_func(name, MODULE, PTX) };
        let (smem, threads) = match self.kernel {
            SkinnyKernel::Mma { k_warps } => (launch::skinny_smem(mt), 128 * (mt / 16) * k_warps),
            SkinnyKernel::Wgmma { stages, .. } => (launch::skinny_wgmma_smem(mt, stages), launch::SKINNY_WGMMA_THREADS),
        };
        let max_smem = device_limits(&dev)?.smem_optin.saturating_sub(1024);
        if smem > max_smem {
            candle_core::bail!("{}: {smem} bytes of shared memory, the device allows {max_smem}", self.name());
        }
        // The slices are planned on the plain entry's occupancy (a cluster entry holds the same
        // registers and shared memory; it only schedules its blocks together).
        let (plain, plain_sm90) = kernel_name(self.kernel, mt, 1);
        let plain_func = load(&plain, plain_sm90)?;
        let resident = resident_blocks(&dev, &plain_func, &plain, threads, smem, smem)?;
        let ktiles = k / 64;
        let most = ktiles.clamp(1, launch::SKINNY_MAX_SPLITS);
        // The k slices, and whether a cluster adds them (a cluster kernel runs its global end
        // where the plan finds no cluster that pays).
        let (splits, cluster) = match (self.splits, self.kernel.cluster()) {
            (Some(sp), false) => (sp.clamp(1, most), false),
            (Some(sp), true) => {
                if !launch::skinny_cluster_splits_ok(sp) {
                    candle_core::bail!("{}: kernel {} adds its k slices across a cluster of 2 or 4 blocks, not {sp} slices", self.name(), self.kernel);
                }
                let sp = sp.min(most);
                (sp, launch::skinny_cluster_splits_ok(sp))
            }
            (None, cluster) => {
                let sp = match self.kernel {
                    SkinnyKernel::Mma { .. } => launch::skinny_splits(blocks, ktiles, device_limits(&dev)?.sms, resident),
                    SkinnyKernel::Wgmma { .. } => launch::skinny_wgmma_splits(blocks * tiles, ktiles, resident),
                };
                match launch::skinny_cluster_plan(sp, ktiles).filter(|_| cluster) {
                    Some(size) => (size, true),
                    None => (sp, false),
                }
            }
        };
        let (name, sm90) = kernel_name(self.kernel.with_cluster(cluster), mt, splits);
        let func = load(&name, sm90)?;
        if name != plain {
            allow_dynamic_smem(&func, &name, smem)?;
        }
        let cfg = LaunchConfig { grid_dim: (blocks as u32, splits as u32, tiles as u32), block_dim: (threads as u32, 1, 1), shared_mem_bytes: smem as u32 };
        // SAFETY: the kernel writes every element of the workspace it reads.
        let part = if splits > 1 && !cluster { Some(unsafe { dev.alloc::<f32>(splits * tiles * mt * blocks * launch::SKINNY_ROWS)? }) } else { None };
        let counters = device_ptr(&split_counters(&dev, blocks * tiles)?, &stream)?;
        let x = s.as_cuda_slice::<f16>()?.slice(xo..);
        // SAFETY: every element is written by the kernel (or poisoned first).
        let y = unsafe { dev.alloc::<f16>(m * n_total)? };
        poison_buffer(&dev, "f16", &y, m * n_total)?;
        let (k_, g_, m_, nt_) = (k as i32, g as i32, m as i32, n_total as i32);
        let null = 0u64;
        let mut b = stream.launch_builder(&func);
        b.arg(&sets);
        b.arg(&x);
        b.arg(&y);
        b.arg(&k_);
        b.arg(&g_);
        b.arg(&m_);
        b.arg(&nt_);
        match &part {
            Some(p) => b.arg(p),
            None => b.arg(&null),
        };
        b.arg(&counters);
        // SAFETY: the weights' buffers match n, np, k and g; x holds m * k elements; the
        // workspace and counters are sized for the grid; the shared memory limit was raised by
        // resident_blocks.
        unsafe { b.launch(cfg) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(y, dev.clone()), out_shape(l, n_total)))
    }
}
