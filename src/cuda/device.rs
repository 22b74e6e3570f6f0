//! Device-side plumbing (built with the `cuda` feature): pointers, limits, occupancy.
use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute_enum;
use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaStream, DevicePtr};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaDevice, DType, Device, Result, Storage, Tensor};
use half::{bf16, f16};
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

/// The CUDA device of a tensor, or an error.
pub fn cuda_device(t: &Tensor) -> Result<CudaDevice> {
    match t.device() {
        Device::Cuda(d) => Ok(d.clone()),
        _ => candle_core::bail!("expected a CUDA tensor"),
    }
}

/// The device address of a contiguous tensor's first element (for kernels that take raw
/// pointers: several weights per launch, or buffers written in place).
pub fn device_ptr(t: &Tensor, stream: &CudaStream) -> Result<u64> {
    if !t.is_contiguous() {
        candle_core::bail!("CUDA kernel: a raw-pointer argument must be contiguous");
    }
    storage_ptr(t, stream)
}

/// Whether `t` can be read in place as rows of `row` values at a fixed distance: contiguous, or a
/// view of some columns of wider rows (the q, k or v part of a fused q/k/v output) whose other
/// dimensions fold into one row index.
pub fn is_row_view(t: &Tensor, row: usize) -> bool {
    if t.is_contiguous() {
        return true;
    }
    let (dims, strides) = (t.dims(), t.stride());
    dims.last() == Some(&row) && strides.last() == Some(&1) && dims[..dims.len() - 1].iter().filter(|&&d| d > 1).count() <= 1
}

/// The device address of `t`'s first element and the distance in elements between its rows of
/// `row` values (see [`is_row_view`]), for kernels that read such views in place.
pub fn device_rows(t: &Tensor, row: usize, stream: &CudaStream) -> Result<(u64, usize)> {
    if !is_row_view(t, row) {
        candle_core::bail!("CUDA kernel: a tensor of shape {:?} and strides {:?} is not rows of {row} contiguous values", t.dims(), t.stride());
    }
    if t.is_contiguous() {
        return Ok((storage_ptr(t, stream)?, row));
    }
    let lead = t.dims().iter().zip(t.stride()).rev().skip(1).find(|(&d, _)| d > 1).map(|(_, &s)| s);
    Ok((storage_ptr(t, stream)?, lead.unwrap_or(row)))
}

/// The address of a tensor's first element in its storage (its layout's start offset applied).
fn storage_ptr(t: &Tensor, stream: &CudaStream) -> Result<u64> {
    let (s, l) = t.storage_and_layout();
    let Storage::Cuda(cs) = &*s else { candle_core::bail!("CUDA kernel: a tensor is not on a CUDA device") };
    let size = t.dtype().size_in_bytes() as u64;
    let base = match t.dtype() {
        DType::U8 => cs.as_cuda_slice::<u8>()?.device_ptr(stream).0,
        DType::U32 => cs.as_cuda_slice::<u32>()?.device_ptr(stream).0,
        DType::F16 => cs.as_cuda_slice::<f16>()?.device_ptr(stream).0,
        DType::BF16 => cs.as_cuda_slice::<bf16>()?.device_ptr(stream).0,
        DType::F32 => cs.as_cuda_slice::<f32>()?.device_ptr(stream).0,
        dt => candle_core::bail!("CUDA kernel: unexpected dtype {dt:?}"),
    };
    Ok(base + l.start_offset() as u64 * size)
}

/// What the launches need to know of a device, read from the driver once per device: the
/// GEMVs and the kernels carrying L2 hints launch on every decode step.
#[derive(Debug, Clone, Copy)]
pub struct DeviceLimits {
    /// Streaming multiprocessors (at least 1).
    pub sms: usize,
    /// The most shared memory a block may use (opted in).
    pub smem_optin: usize,
    /// Compute capability (major, minor).
    pub compute: (i32, i32),
}

pub fn device_limits(dev: &CudaDevice) -> Result<DeviceLimits> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute as A;
    static CACHE: OnceLock<Mutex<HashMap<candle_core::cuda_backend::DeviceId, DeviceLimits>>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    if let Some(&l) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(&dev.id()) {
        return Ok(l);
    }
    let ctx = dev.cuda_stream().context().clone();
    let limits = DeviceLimits {
        sms: ctx.attribute(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT).w()?.max(1) as usize,
        smem_optin: ctx.attribute(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN).w()?.max(48 << 10) as usize,
        compute: (ctx.attribute(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR).w()?, ctx.attribute(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR).w()?),
    };
    cache.lock().unwrap_or_else(|e| e.into_inner()).insert(dev.id(), limits);
    Ok(limits)
}

/// Bytes of memory on the device.
pub fn total_memory(dev: &CudaDevice) -> Result<usize> {
    dev.cuda_stream().context().total_mem().w()
}

/// Blocks of `func` the whole GPU holds at once (SMs x blocks per SM of `threads` threads with
/// `smem` bytes of dynamic shared memory), cached per kernel name and size: the answer never
/// changes for a process. Also raises the kernel's dynamic shared-memory limit to `max_smem`, its
/// largest launch (once).
pub fn resident_blocks(dev: &CudaDevice, func: &CudaFunction, name: &str, threads: usize, smem: usize, max_smem: usize) -> Result<usize> {
    static CACHE: OnceLock<Mutex<HashMap<(String, usize), usize>>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    let key = (name.to_string(), smem);
    if let Some(&n) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return Ok(n);
    }
    func.set_attribute(CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, max_smem.max(smem) as i32).w()?;
    let sms = device_limits(dev)?.sms;
    let per_sm = func.occupancy_max_active_blocks_per_multiprocessor(threads as u32, smem, None).w()? as usize;
    let n = (sms * per_sm).max(1);
    cache.lock().unwrap_or_else(|e| e.into_inner()).insert(key, n);
    Ok(n)
}

/// Lets `func` (named `name`) take `smem` bytes of dynamic shared memory, once per name and
/// size: what [`resident_blocks`] does before its occupancy query, for kernels (thread block
/// clusters) whose launches are planned on another entry's occupancy.
pub fn allow_dynamic_smem(func: &CudaFunction, name: &str, smem: usize) -> Result<()> {
    static DONE: OnceLock<Mutex<std::collections::HashSet<(String, usize)>>> = OnceLock::new();
    let done = DONE.get_or_init(|| Mutex::new(std::collections::HashSet::new()));
    let key = (name.to_string(), smem);
    if done.lock().unwrap_or_else(|e| e.into_inner()).contains(&key) {
        return Ok(());
    }
    func.set_attribute(CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32).w()?;
    done.lock().unwrap_or_else(|e| e.into_inner()).insert(key);
    Ok(())
}

/// Extra blocks a small kernel launches to issue an L2 hint (none for an empty hint): one per SM,
/// so the prefetches spread over every SM's TMA unit (see `l2_prefetch` in common.cuh).
pub fn prefetch_blocks(dev: &CudaDevice, hint: &super::L2Prefetch) -> Result<u32> {
    if hint.is_empty() {
        return Ok(0);
    }
    Ok(device_limits(dev)?.sms as u32)
}

/// A CUDA profiler range for `ncu --profile-from-start off` (or `nsys -c cudaProfilerApi`):
/// collection is on from this call until the value is dropped. `None` unless the environment
/// variable `AWQ_RUN_PROFILE_RANGE` is set, so that a run without a profiler pays nothing.
pub fn profiler_range() -> Option<candle_core::cuda_backend::cudarc::driver::Profiler> {
    std::env::var_os("AWQ_RUN_PROFILE_RANGE")?;
    candle_core::cuda_backend::cudarc::driver::Profiler::new().ok()
}
