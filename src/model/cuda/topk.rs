//! The wrapper of `topk.cu`: the k largest logits of every row on the device, so that a batched
//! step copies k pairs a sequence to the host instead of the vocabulary.
use crate::cuda::{cuda_device as cuda_dev, device_ptr};
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{DType, Result, Tensor};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/topk.ptx"));
const MODULE: &str = "awq_topk";
const KERNEL: &str = "logits_topk_f32";

const THREADS: u32 = 256;
/// The largest k one launch takes (TOPK_MAX in topk.cu).
const TOPK_MAX: usize = crate::model::logits::TOP_K_MAX;

/// Loads the module on `dev` (see [`super::preload_kernels`]).
pub(super) fn preload(dev: &candle_core::CudaDevice) -> Result<()> {
    dev.get_or_load_custom_func(KERNEL, MODULE, PTX).map(|_| ())
}

/// `(values [rows, k] f32, ids [rows, k] u32)`: the `k` largest of each row of `logits`
/// (`[rows, vocab]` f32 on a CUDA device), by falling value then rising id, NaN last;
/// `1 ≤ k ≤ min(vocab, TOPK_MAX)`.
pub fn logits_top_k(logits: &Tensor, k: usize) -> Result<(Tensor, Tensor)> {
    let (rows, vocab) = logits.dims2()?;
    if logits.dtype() != DType::F32 || k == 0 || k > vocab.min(TOPK_MAX) || vocab > i32::MAX as usize {
        candle_core::bail!("logits top-k: k = {k} of rows of {vocab} {:?} values (k from 1 to {TOPK_MAX}, f32)", logits.dtype());
    }
    let logits = logits.contiguous()?;
    // Under the self-test's poisoning, outputs start as values no kernel would write.
    let (values, ids) = if crate::cuda::poison::enabled() {
        (Tensor::full(f32::NAN, (rows, k), logits.device())?, Tensor::full(u32::MAX, (rows, k), logits.device())?)
    } else {
        (Tensor::zeros((rows, k), DType::F32, logits.device())?, Tensor::zeros((rows, k), DType::U32, logits.device())?)
    };
    if rows == 0 {
        return Ok((values, ids));
    }
    let dev = cuda_dev(&logits)?;
    let stream = dev.cuda_stream();
    let ptr = |t: &Tensor| device_ptr(t, &stream);
    let (lp, vp, ip) = (ptr(&logits)?, ptr(&values)?, ptr(&ids)?);
    let func = dev.get_or_load_custom_func(KERNEL, MODULE, PTX)?;
    let (vocab_, k_) = (vocab as i32, k as i32);
    let mut b = func.builder();
    for p in [&lp, &vp, &ip] {
        b.arg(p);
    }
    b.arg(&vocab_);
    b.arg(&k_);
    let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: logits is contiguous [rows, vocab]; values and ids hold rows * k elements; k is
    // within 1 ..= min(vocab, TOPK_MAX) (checked above).
    unsafe { b.launch(cfg) }.w()?;
    Ok((values, ids))
}
