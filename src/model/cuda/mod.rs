//! Wrappers around the fused decode-step kernels of `decode.cu` (compiled to PTX by build.rs):
//! single-query attention over the KV cache in place, silu(gate) * up, and the position-reading
//! rotary embedding and KV-cache write of the CUDA-graph decode step (`super::graph`).
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DevicePtr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use crate::cuda::{cuda_device as cuda_dev, device_ptr, device_rows, is_row_view, kernel_suffix as suffix, prefetch_blocks, suffix_for, L2Prefetch};
use candle_core::{CudaStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

pub mod topk;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/decode.ptx"));
const MODULE: &str = "awq_decode";
const ATT_THREADS: usize = 256;
/// Positions one attention block takes at most (ATT_CHUNK_MAX in decode.cu).
const ATT_CHUNK_MAX: usize = 256;

/// Loads (JIT-compiles) the decode-step, top-k and 4-bit kernel modules on `dev`, so that a
/// server's first requests do not wait for the driver (see
/// [`crate::quant::cuda::preload_kernels`]).
pub fn preload_kernels(dev: &candle_core::CudaDevice) -> Result<()> {
    dev.get_or_load_custom_func("silu_mul_f16", MODULE, PTX)?;
    topk::preload(dev)?;
    crate::quant::cuda::preload_kernels(dev)
}

/// The split attention's chunk length for a cache view of `len` positions (the capacity in a
/// CUDA-graph step, where the length is on the device): 64 up to 1024 positions, 128 beyond.
/// A decode step reads each head's cache once, so the chunks set how many blocks share that
/// read: in chunks of 256 a 32-head model at 512 positions ran 64 blocks on 132 SMs. Measured on
/// an H100 (session 23, dummy Llama-2-7B W4, batch-1 decode, two rounds): at 512 + 128 positions
/// 352.0 / 356.7 tok/s with chunks of 256 and the old score loop, 375.5 / 374.3 with 64,
/// 370.1 / 364.7 with 128; at 3584 + 256, 291.9 / 289.3 before, 274.8 / 274.1 with 64 (the
/// combine's chunk statistics outgrow the gain), 298.0 / 293.1 with 128, 297.9 / 296.3 with 256.
/// `AWQ_RUN_ATT_CHUNK` (1 ..= 256) fixes the length, for measurements; another value is
/// reported and ignored.
fn att_chunk(len: usize) -> usize {
    static FIXED: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    let fixed = *FIXED.get_or_init(|| {
        let v = std::env::var("AWQ_RUN_ATT_CHUNK").ok()?;
        match v.trim().parse::<usize>() {
            Ok(c) if (1..=ATT_CHUNK_MAX).contains(&c) => Some(c),
            _ => {
                eprintln!("warning: AWQ_RUN_ATT_CHUNK={v:?} is not a position count in 1..={ATT_CHUNK_MAX}; ignored");
                None
            }
        }
    });
    fixed.unwrap_or(if len <= 1024 { 64 } else { 128 })
}

/// Whether [`decode_attention`] takes these: CUDA, one query token, q `[b, heads, 1, d]`, k/v
/// `[b, kv_heads, len, d]` of q's dtype with unit stride on `d`, `d` / 8 dividing 256.
pub fn attention_applies(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    let (Ok((_, h, s, d)), Ok((_, kvh, _, _))) = (q.dims4(), k.dims4()) else { return false };
    let unit = |t: &Tensor| t.layout().stride().last() == Some(&1);
    q.device().is_cuda()
        && suffix(q.dtype()).is_some()
        && k.dtype() == q.dtype()
        && v.dtype() == q.dtype()
        && s == 1
        && kvh > 0
        && h % kvh == 0
        && unit(k)
        && unit(v)
        && attention_fits(d)
}

/// Whether the attention kernels take heads of `d` (any number of cached positions: beyond
/// one chunk the split-sequence kernels run).
pub fn attention_fits(d: usize) -> bool {
    d.is_multiple_of(8) && d > 0 && d <= 256 && ATT_THREADS.is_multiple_of(d / 8)
}

/// Whether the server's batched decode step can run its kernels ([`rope_tokens`],
/// [`kv_write_rows`], [`paged_attention`]) for a model of this device, dtype and head size.
pub fn paged_decode_applies(device: &candle_core::Device, dtype: candle_core::DType, head_dim: usize) -> bool {
    device.is_cuda() && suffix(dtype).is_some() && attention_fits(head_dim) && head_dim.is_multiple_of(2)
}

/// A kernel's output tensor, every element of which the kernel writes: left uninitialized (a
/// zeroed one was a memset node before each of these kernels in the decode graphs), or NaN under
/// the self-test's poisoning, so that an element left unwritten fails its check.
fn kernel_output(shape: impl Into<Shape>, dtype: candle_core::DType, device: &candle_core::Device) -> Result<Tensor> {
    let shape = shape.into();
    if crate::cuda::poison::enabled() {
        return Tensor::full(f32::NAN, shape, device)?.to_dtype(dtype);
    }
    // SAFETY: each caller launches a kernel that writes every element before anything reads it.
    unsafe { Tensor::empty(shape, dtype, device) }
}

/// softmax(q kᵀ · scale) v for one query token: q `[b, heads, 1, d]`, k and v views of the cache.
pub fn decode_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> Result<Tensor> {
    q.contiguous()?.apply_op3_no_bwd(k, v, &DecodeAttention { scale, pos: 0 })
}

/// As [`decode_attention`] over the first `pos[0] + 1` cached positions, `pos` a u32 on the device
/// (k and v are the whole cache buffers).
pub fn decode_attention_at(q: &Tensor, k: &Tensor, v: &Tensor, pos: &Tensor, scale: f32) -> Result<Tensor> {
    let dev = cuda_dev(q)?;
    let pos = device_ptr(pos, &dev.cuda_stream())?;
    q.contiguous()?.apply_op3_no_bwd(k, v, &DecodeAttention { scale, pos })
}

/// The rotary embedding of one token's queries and the KV-cache write of its key (rotated) and
/// value, at the position `pos[0]` (u32 on the device), in one launch: `q` `heads * d`, `k` and
/// `v` `kv_heads * d` contiguous values (batch 1), `kc`, `vc` the caches `[1, kv_heads, capacity,
/// d]` written in place, `cos`/`sin` the `[positions, d / 2]` tables in q's dtype. Returns the
/// rotated queries, `[1, heads, 1, d]`.
#[allow(clippy::too_many_arguments)]
pub fn rope_kv_write_at(q: &Tensor, k: &Tensor, v: &Tensor, kc: &Tensor, vc: &Tensor, cos: &Tensor, sin: &Tensor, pos: &Tensor, heads: usize, kv_heads: usize, d: usize) -> Result<Tensor> {
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let dev = cuda_dev(&q)?;
    let stream = dev.cuda_stream();
    let sfx = suffix_for("rope and kv write", q.dtype())?;
    let (_, h, cap, dd) = kc.dims4()?;
    let dtypes_agree = [k.dtype(), v.dtype(), kc.dtype(), vc.dtype(), cos.dtype(), sin.dtype()].iter().all(|&t| t == q.dtype());
    if q.elem_count() != heads * d || h != kv_heads || dd != d || vc.dims() != kc.dims() || k.elem_count() != kv_heads * d || v.elem_count() != kv_heads * d || !dtypes_agree || !d.is_multiple_of(2) || d > 2048 {
        candle_core::bail!("rope and kv write: queries of {heads} x {d}, key/value of {kv_heads} x {d} into caches {:?} ({:?})", kc.dims(), q.dtype());
    }
    let q_out = kernel_output((1, heads, 1, d), q.dtype(), q.device())?;
    let ptr = |t: &Tensor| device_ptr(t, &stream);
    let (qp, op, kp, vp, kcp, vcp, cp, sp, pp) = (ptr(&q)?, ptr(&q_out)?, ptr(&k)?, ptr(&v)?, ptr(kc)?, ptr(vc)?, ptr(cos)?, ptr(sin)?, ptr(pos)?);
    let func = dev.get_or_load_custom_func(&format!("rope_kv_write_{sfx}"), MODULE, PTX)?;
    let (d_, kvh_, hs, ps) = (d as i32, kv_heads as i32, (cap * d) as i64, d as i64);
    let mut b = func.builder();
    for p in [&qp, &op, &kp, &vp, &kcp, &vcp, &cp, &sp, &pp] {
        b.arg(p);
    }
    b.arg(&d_);
    b.arg(&kvh_);
    b.arg(&hs);
    b.arg(&ps);
    let cfg = LaunchConfig { grid_dim: ((kv_heads + heads) as u32, 1, 1), block_dim: ((d / 2) as u32, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: q_out holds heads * d elements; the caches are contiguous [1, kv_heads, cap, d]; the
    // caller keeps pos[0] < cap and within the tables.
    unsafe { b.launch(cfg) }.w()?;
    Ok(q_out)
}

/// `x` as rows of `row` values, itself where a kernel can read it in place ([`is_row_view`]),
/// else a contiguous copy.
fn rows_or_copy(x: &Tensor, row: usize) -> Result<Tensor> {
    if is_row_view(x, row) {
        Ok(x.clone())
    } else {
        x.contiguous()
    }
}

/// [`rope_kv_write_at`] for one token per sequence of a batch, each at its own position, into the
/// paged KV pool: the queries rotated at `pos[b]` and returned as `[batch, heads, d]`, the key
/// (rotated) and value written at pool row `rows[b]`, in one launch. `q`, `k`, `v` hold `batch ×
/// heads × d` and `batch × kv_heads × d` values, contiguous or views of some columns of wider rows
/// (the parts of a fused q/k/v output, read in place: no copy); `pos`, `rows` `batch` u32 on the
/// device; `kp`, `vp` are one layer's pool storage, contiguous `[rows, kv_heads, d]`.
#[allow(clippy::too_many_arguments)]
pub fn rope_kv_write_rows(q: &Tensor, k: &Tensor, v: &Tensor, kp: &Tensor, vp: &Tensor, cos: &Tensor, sin: &Tensor, pos: &Tensor, rows: &Tensor, heads: usize, kv_heads: usize, d: usize) -> Result<Tensor> {
    let (q, k, v) = (rows_or_copy(q, heads * d)?, rows_or_copy(k, kv_heads * d)?, rows_or_copy(v, kv_heads * d)?);
    let batch = pos.elem_count();
    let dev = cuda_dev(&q)?;
    let stream = dev.cuda_stream();
    let sfx = suffix_for("rope and paged kv write", q.dtype())?;
    let (_, h, dd) = kp.dims3()?;
    let kv_want = batch * kv_heads * d;
    let dtypes_agree = [k.dtype(), v.dtype(), kp.dtype(), vp.dtype(), cos.dtype(), sin.dtype()].iter().all(|&t| t == q.dtype());
    let u32s = pos.dtype() == candle_core::DType::U32 && rows.dtype() == candle_core::DType::U32;
    if q.elem_count() != batch * heads * d || h != kv_heads || dd != d || vp.dims() != kp.dims() || k.elem_count() != kv_want || v.elem_count() != kv_want || !dtypes_agree || !u32s || rows.elem_count() != batch || !d.is_multiple_of(2) || d > 2048 {
        candle_core::bail!("rope and paged kv write: {batch} tokens of {heads} x {d} queries, {kv_heads} x {d} keys into a pool of {:?} ({:?})", kp.dims(), q.dtype());
    }
    let q_out = kernel_output((batch, heads, d), q.dtype(), q.device())?;
    let ptr = |t: &Tensor| device_ptr(t, &stream);
    let (qr, kr, vr) = (device_rows(&q, heads * d, &stream)?, device_rows(&k, kv_heads * d, &stream)?, device_rows(&v, kv_heads * d, &stream)?);
    let (op, kpp, vpp, cp, sp, pp, rp) = (ptr(&q_out)?, ptr(kp)?, ptr(vp)?, ptr(cos)?, ptr(sin)?, ptr(pos)?, ptr(rows)?);
    let func = dev.get_or_load_custom_func(&format!("rope_kv_write_rows_{sfx}"), MODULE, PTX)?;
    let (qs, ks, vs) = (qr.1 as i64, kr.1 as i64, vr.1 as i64);
    let (d_, h_, kvh_) = (d as i32, heads as i32, kv_heads as i32);
    let mut b = func.builder();
    b.arg(&qr.0);
    b.arg(&qs);
    b.arg(&op);
    b.arg(&kr.0);
    b.arg(&ks);
    b.arg(&vr.0);
    b.arg(&vs);
    for p in [&kpp, &vpp, &cp, &sp, &pp, &rp] {
        b.arg(p);
    }
    b.arg(&d_);
    b.arg(&h_);
    b.arg(&kvh_);
    let cfg = LaunchConfig { grid_dim: ((kv_heads + heads) as u32, batch as u32, 1), block_dim: ((d / 2) as u32, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: q_out holds batch * heads * d elements; the pool is contiguous [rows, kv_heads, d];
    // the caller's rows are rows of it (blocks reserved for these positions) and its positions
    // lie within the tables.
    unsafe { b.launch(cfg) }.w()?;
    Ok(q_out)
}

/// Decode attention for one query token per sequence over the paged KV pool: `q` `[batch, heads,
/// d]`; `kp`, `vp` one layer's pool, contiguous `[rows, kv_heads, d]`; `table` u32 `[batch, width]`,
/// row `b` holding the pool rows of sequence b's positions (`lens[b]` of them, ≤ width, the token
/// of this step included). Returns `[batch, heads, d]`. Split into [`att_chunk`]-position chunks and
/// combined, as [`decode_attention`] does for long caches.
pub fn paged_attention(q: &Tensor, kp: &Tensor, vp: &Tensor, table: &Tensor, lens: &Tensor, scale: f32) -> Result<Tensor> {
    let q = q.contiguous()?;
    let (batch, heads, d) = q.dims3()?;
    let (_, kvh, dd) = kp.dims3()?;
    let (tb, width) = table.dims2()?;
    if dd != d || vp.dims() != kp.dims() || kp.dtype() != q.dtype() || vp.dtype() != q.dtype() || kvh == 0 || heads % kvh != 0 || tb != batch || lens.elem_count() != batch || !attention_fits(d) {
        candle_core::bail!("paged attention: q {:?} over a pool of {:?}, table {:?}, {} lengths", q.dims(), kp.dims(), table.dims(), lens.elem_count());
    }
    let dev = cuda_dev(&q)?;
    let stream = dev.cuda_stream();
    let sfx = suffix_for("paged attention", q.dtype())?;
    let chunk = att_chunk(width);
    let chunks = width.div_ceil(chunk).max(1);
    let out = kernel_output((batch, heads, d), q.dtype(), q.device())?;
    let part = kernel_output(batch * heads * chunks * (d + 2), candle_core::DType::F32, q.device())?;
    let ptr = |t: &Tensor| device_ptr(t, &stream);
    let (qp, kpp, vpp, pp, tp, lp, op) = (ptr(&q)?, ptr(kp)?, ptr(vp)?, ptr(&part)?, ptr(table)?, ptr(lens)?, ptr(&out)?);
    let func = dev.get_or_load_custom_func(&format!("paged_attention_chunk_{sfx}"), MODULE, PTX)?;
    let (w_, d_, h_, rep, chunks_) = (width as i32, d as i32, heads as i32, (heads / kvh) as i32, chunks as i32);
    let mut b = func.builder();
    for p in [&qp, &kpp, &vpp, &pp, &tp, &lp] {
        b.arg(p);
    }
    b.arg(&w_);
    b.arg(&d_);
    b.arg(&h_);
    b.arg(&rep);
    b.arg(&scale);
    let chunk_ = chunk as i32;
    b.arg(&chunk_);
    let cfg = LaunchConfig { grid_dim: (heads as u32, batch as u32, chunks as u32), block_dim: (ATT_THREADS as u32, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: the table holds batch * width rows of the pool, of which each sequence reads lens[b]
    // (≤ width, the caller's invariant); part holds every chunk's statistics and sums.
    unsafe { b.launch(cfg) }.w()?;
    let combine = dev.get_or_load_custom_func(&format!("attention_combine_{sfx}"), MODULE, PTX)?;
    let mut c = combine.builder();
    c.arg(&pp);
    c.arg(&op);
    c.arg(&chunks_);
    c.arg(&d_);
    c.arg(&h_);
    let ccfg = LaunchConfig { grid_dim: (heads as u32, batch as u32, 1), block_dim: (d as u32, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: part holds batch * heads * chunks * (d + 2) floats, all written above.
    unsafe { c.launch(ccfg) }.w()?;
    Ok(out)
}

/// silu(a) · b; `a` and `b` `[..., cols]` with unit stride on the last dimension and one row stride
/// each (the halves of a fused gate/up output qualify). Other devices use tensor ops. `prefetch`:
/// ranges (down_proj's weights) pulled into L2 meanwhile.
pub fn silu_mul(a: &Tensor, b: &Tensor, prefetch: &L2Prefetch) -> Result<Tensor> {
    a.apply_op2_no_bwd(b, &SiluMul { prefetch: *prefetch })
}

/// Threads of an add_rms_norm block and row elements each keeps in registers (NORM_THREADS,
/// NORM_PER_THREAD in decode.cu).
const NORM_THREADS: usize = 512;
const NORM_PER_THREAD: usize = 16;

/// Whether [`add_rms_norm`] takes these: CUDA, a supported dtype shared by all, `x` (and `delta`)
/// contiguous `[..., h]` of the same shape, `w` `[h]`.
pub fn add_rms_norm_applies(x: &Tensor, delta: Option<&Tensor>, w: &Tensor) -> bool {
    let h = x.dims().last().copied().unwrap_or(0);
    x.device().is_cuda()
        && suffix(x.dtype()).is_some()
        && x.is_contiguous()
        && h > 0
        && w.dims() == [h]
        && w.dtype() == x.dtype()
        && delta.is_none_or(|d| d.dims() == x.dims() && d.dtype() == x.dtype() && d.is_contiguous())
}

/// `(x + delta, rms_norm(x + delta) · w)` in one launch (`x` itself and its norm without `delta`),
/// the sum rounded to the dtype before the norm as the separate ops do; the norm in f32 with
/// candle's formula. `prefetch`: ranges (the next GEMV's weights) pulled into L2 meanwhile.
pub fn add_rms_norm(x: &Tensor, delta: Option<&Tensor>, w: &Tensor, eps: f32, prefetch: &L2Prefetch) -> Result<(Tensor, Tensor)> {
    if !add_rms_norm_applies(x, delta, w) {
        candle_core::bail!("add_rms_norm: x {:?} {:?}, delta {:?}, weight {:?}: unsupported", x.dims(), x.dtype(), delta.map(|d| d.dims()), w.dims());
    }
    // One buffer [outputs, ...x]: the sum (with delta) then the norm; the results are views of it.
    let out = x.apply_op1_no_bwd(&AddRmsNorm { delta, w, eps, prefetch: *prefetch })?;
    match delta {
        Some(_) => Ok((out.get(0)?, out.get(1)?)),
        None => Ok((x.clone(), out.get(0)?)),
    }
}

struct AddRmsNorm<'a> {
    delta: Option<&'a Tensor>,
    w: &'a Tensor,
    eps: f32,
    prefetch: L2Prefetch,
}

impl CustomOp1 for AddRmsNorm<'_> {
    fn name(&self) -> &'static str {
        "add-rms-norm-cuda"
    }
    fn cpu_fwd(&self, _: &candle_core::CpuStorage, _: &Layout) -> Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("{} runs on CUDA only", self.name())
    }
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = s.device().clone();
        let stream = dev.cuda_stream();
        let dt = s.dtype();
        let sfx = suffix_for(self.name(), dt)?;
        let Some((xo, _)) = l.contiguous_offsets() else { candle_core::bail!("{}: x must be contiguous", self.name()) };
        let h = self.w.dim(0)?;
        let n = l.shape().elem_count();
        let rows = n / h.max(1);
        let outputs = if self.delta.is_some() { 2 } else { 1 };
        let dp = match self.delta {
            Some(d) => device_ptr(d, &stream)?,
            None => 0u64,
        };
        let wp = device_ptr(self.w, &stream)?;
        let func = dev.get_or_load_custom_func(&format!("add_rms_norm_{sfx}"), MODULE, PTX)?;
        let (rows_, h_) = (rows as i32, h as i32);
        let grid = rows as u32 + prefetch_blocks(&dev, &self.prefetch)?;
        let cfg = LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (NORM_THREADS as u32, 1, 1), shared_mem_bytes: 0 };
        let out = crate::with_float_type!(dt, T => {
            let x = s.as_cuda_slice::<T>()?.slice(xo..);
            // SAFETY: the kernel writes every element of both outputs (or of the norm alone).
            let out = unsafe { dev.alloc::<T>(outputs * n)? };
            let base = out.device_ptr(&stream).0;
            let size = std::mem::size_of::<T>() as u64;
            let (sum_p, norm_p) = if outputs == 2 { (base, base + n as u64 * size) } else { (0u64, base) };
            let xp = x.device_ptr(&stream).0;
            // The 16-byte path: whole rows of 8-element pieces in registers, every row aligned.
            let row_bytes = h as u64 * size;
            let aligned = [xp, dp, sum_p, norm_p, wp].iter().all(|p| p % 16 == 0) && row_bytes.is_multiple_of(16);
            let vec = i32::from(h % 8 == 0 && h <= NORM_THREADS * NORM_PER_THREAD && aligned);
            let mut b = func.builder();
            b.arg(&x);
            for p in [&dp, &sum_p, &norm_p, &wp] {
                b.arg(p);
            }
            b.arg(&rows_);
            b.arg(&h_);
            b.arg(&self.eps);
            b.arg(&vec);
            b.arg(&self.prefetch);
            if rows > 0 {
                // SAFETY: x, delta and each output hold rows * h contiguous elements, w holds h.
                unsafe { b.launch(cfg) }.w()?;
            }
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        });
        let mut dims = vec![outputs];
        dims.extend_from_slice(l.dims());
        Ok((out, Shape::from(dims)))
    }
}

/// The row stride of a tensor seen as `[rows, cols]` with unit column stride.
fn rows_of(l: &Layout) -> Option<(usize, usize, usize)> {
    let dims = l.dims();
    let stride = l.stride();
    let cols = *dims.last()?;
    if dims.len() < 2 {
        return Some((1, cols, cols));
    }
    if *stride.last()? != 1 && cols > 1 {
        return None;
    }
    // Leading dimensions must collapse into one run of rows.
    let n = dims.len();
    let row_stride = stride[n - 2];
    let mut expect = row_stride * dims[n - 2];
    for i in (0..n - 2).rev() {
        if dims[i] > 1 && stride[i] != expect {
            return None;
        }
        expect *= dims[i];
    }
    let rows = dims[..n - 1].iter().product();
    Some((rows, cols, if dims[n - 2] > 1 { row_stride } else { cols }))
}

pub fn silu_mul_applies(a: &Tensor, b: &Tensor) -> bool {
    a.device().is_cuda()
        && suffix(a.dtype()).is_some()
        && a.dtype() == b.dtype()
        && a.dims() == b.dims()
        && rows_of(a.layout()).is_some()
        && rows_of(b.layout()).is_some()
}

struct DecodeAttention {
    scale: f32,
    /// Device address of the u32 position (0: use the length of the k/v views).
    pos: u64,
}

impl CustomOp3 for DecodeAttention {
    fn name(&self) -> &'static str {
        "decode-attention-cuda"
    }
    fn cpu_fwd(&self, _: &candle_core::CpuStorage, _: &Layout, _: &candle_core::CpuStorage, _: &Layout, _: &candle_core::CpuStorage, _: &Layout) -> Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("{} runs on CUDA only", self.name())
    }
    fn cuda_fwd(&self, qs: &CudaStorage, ql: &Layout, ks: &CudaStorage, kl: &Layout, vs: &CudaStorage, vl: &Layout) -> Result<(CudaStorage, Shape)> {
        let (b, h, _, d) = ql.shape().dims4()?;
        let (_, kvh, len, _) = kl.shape().dims4()?;
        let Some((qo, _)) = ql.contiguous_offsets() else { candle_core::bail!("{}: q must be contiguous", self.name()) };
        let (kst, vst) = (kl.stride(), vl.stride());
        let dev = qs.device().clone();
        let dt = qs.dtype();
        let sfx = suffix_for(self.name(), dt)?;
        // Over one chunk of positions (of the view: the capacity when the length is on the
        // device), the split-sequence kernels; else one block per head.
        let chunk = att_chunk(len);
        let chunks = len.div_ceil(chunk);
        let split = chunks > 1;
        let kernel = if split { "attention_chunk" } else { "decode_attention" };
        let func = dev.get_or_load_custom_func(&format!("{kernel}_{sfx}"), MODULE, PTX)?;
        let grid_z = if split { chunks as u32 } else { 1 };
        let cfg = LaunchConfig { grid_dim: (h as u32, b as u32, grid_z), block_dim: (ATT_THREADS as u32, 1, 1), shared_mem_bytes: 0 };
        let (len_, d_, h_, rep, chunks_, chunk_) = (len as i32, d as i32, h as i32, (h / kvh) as i32, chunks as i32, chunk as i32);
        let st = |s: &[usize], i: usize| s[i] as i64;
        let (ksb, ksh, ksl, vsb, vsh, vsl) = (st(kst, 0), st(kst, 1), st(kst, 2), st(vst, 0), st(vst, 1), st(vst, 2));
        let out = crate::with_float_type!(dt, T => {
            let q = qs.as_cuda_slice::<T>()?.slice(qo..);
            let k = ks.as_cuda_slice::<T>()?.slice(kl.start_offset()..);
            let v = vs.as_cuda_slice::<T>()?.slice(vl.start_offset()..);
            // SAFETY: the kernels write all b * h * d outputs (and every chunk's statistics).
            let out = unsafe { dev.alloc::<T>(b * h * d)? };
            let part = if split { Some(unsafe { dev.alloc::<f32>(b * h * chunks * (d + 2))? }) } else { None };
            let mut bld = func.builder();
            bld.arg(&q);
            bld.arg(&k);
            bld.arg(&v);
            match &part {
                Some(p) => bld.arg(p),
                None => bld.arg(&out),
            };
            bld.arg(&len_);
            bld.arg(&self.pos);
            bld.arg(&d_);
            bld.arg(&h_);
            bld.arg(&rep);
            bld.arg(&ksb);
            bld.arg(&ksh);
            bld.arg(&ksl);
            bld.arg(&vsb);
            bld.arg(&vsh);
            bld.arg(&vsl);
            bld.arg(&self.scale);
            if split {
                bld.arg(&chunk_);
            }
            // SAFETY: strides and sizes come from the layouts checked in attention_applies.
            unsafe { bld.launch(cfg) }.w()?;
            if let Some(part) = &part {
                let combine = dev.get_or_load_custom_func(&format!("attention_combine_{sfx}"), MODULE, PTX)?;
                let mut c = combine.builder();
                c.arg(part);
                c.arg(&out);
                c.arg(&chunks_);
                c.arg(&d_);
                c.arg(&h_);
                let ccfg = LaunchConfig { grid_dim: (h as u32, b as u32, 1), block_dim: (d as u32, 1, 1), shared_mem_bytes: 0 };
                // SAFETY: part holds b * h * chunks * (d + 2) floats, all written above.
                unsafe { c.launch(ccfg) }.w()?;
            }
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        });
        Ok((out, Shape::from((b, h, 1, d))))
    }
}

struct SiluMul {
    prefetch: L2Prefetch,
}

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul-cuda"
    }
    fn cpu_fwd(&self, _: &candle_core::CpuStorage, _: &Layout, _: &candle_core::CpuStorage, _: &Layout) -> Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("{} runs on CUDA only", self.name())
    }
    fn cuda_fwd(&self, a: &CudaStorage, al: &Layout, b: &CudaStorage, bl: &Layout) -> Result<(CudaStorage, Shape)> {
        let (Some((rows, cols, sa)), Some((_, _, sb))) = (rows_of(al), rows_of(bl)) else {
            candle_core::bail!("{}: inputs must be rows with unit column stride", self.name())
        };
        let dev = a.device().clone();
        let dt = a.dtype();
        let sfx = suffix_for(self.name(), dt)?;
        let func = dev.get_or_load_custom_func(&format!("silu_mul_{sfx}"), MODULE, PTX)?;
        let mut cfg = LaunchConfig::for_num_elems((rows * cols) as u32);
        cfg.grid_dim.0 += prefetch_blocks(&dev, &self.prefetch)?;
        let (r_, c_, sa_, sb_) = (rows as i32, cols as i32, sa as i64, sb as i64);
        let out = crate::with_float_type!(dt, T => {
            let x = a.as_cuda_slice::<T>()?.slice(al.start_offset()..);
            let y = b.as_cuda_slice::<T>()?.slice(bl.start_offset()..);
            // SAFETY: the kernel writes all rows * cols outputs.
            let out = unsafe { dev.alloc::<T>(rows * cols)? };
            let mut bld = func.builder();
            bld.arg(&x);
            bld.arg(&y);
            bld.arg(&out);
            bld.arg(&r_);
            bld.arg(&c_);
            bld.arg(&sa_);
            bld.arg(&sb_);
            bld.arg(&self.prefetch);
            // SAFETY: rows, cols and strides come from the layouts.
            unsafe { bld.launch(cfg) }.w()?;
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        });
        Ok((out, al.shape().clone()))
    }
}
