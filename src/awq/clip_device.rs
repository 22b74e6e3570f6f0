//! The clip search on the weight's device, for GPUs: the candidates, the group quantizer and the
//! Gram-matrix error of the host search in `clip.rs`, each candidate evaluated for every row and
//! group of the layer at once. On Llama-2-7B the host loop spent about 2 · 10¹² multiply-adds a
//! block (100 candidates × `g` per weight), most of a GPU calibration pass. On CUDA one kernel
//! (`clip.cu`) does the whole layer for groups of 32, 64 and 128; elsewhere (and for other group
//! sizes) tensor operations do it, the error `dᵀ G d` as one batched matmul over the groups.
//!
//! The arithmetic is the host loop's, operation for operation and in f32 (each tensor step is its
//! own kernel and the CUDA kernel uses non-fusing intrinsics, so nothing is contracted into a fused
//! multiply-add); only the error's sums run in another order, so the searches agree except between
//! candidates whose errors tie to f32 rounding (a unit test for the tensor path, the self-test for
//! the kernel). Keep TF32 off while this runs: the error differences that pick a candidate are far
//! below TF32's rounding.
use super::clip::{search_clip, ClipBounds, ClipMode, ClipOptions};
use crate::error::Result;
use crate::quant::QuantScheme;
use crate::rng::Rng;
use candle_core::{DType, Device, Tensor};

/// The grid of one layer's search.
pub struct Grid {
    pub mode: ClipMode,
    /// Shrink steps per bound.
    pub steps: usize,
    pub n_grid: f32,
    /// The largest code (`2^bits − 1`).
    pub max_code: f32,
}

/// Best bounds per (row, group) of `w` (`[out, in]`, groups of `g`) with `gram` (`[groups, g, g]`,
/// f32, on `w`'s device) the groups' input Gram matrices divided by the token count: on CUDA one
/// kernel (`clip.cu`) for groups of 32, 64 and 128, otherwise tensor operations.
pub fn search_gram(w: &Tensor, gram: &Tensor, g: usize, grid: &Grid) -> Result<ClipBounds> {
    #[cfg(feature = "cuda")]
    if w.device().is_cuda() && [32, 64, 128].contains(&g) {
        return cuda::search_gram(w, gram, g, grid);
    }
    search_gram_tensors(w, gram, g, grid)
}

/// [`search_gram`] as candle tensor operations: each candidate a dozen passes over the layer.
/// 115 s of a Llama-2-7B pass on an H100 (the kernel takes the usual group sizes).
pub fn search_gram_tensors(w: &Tensor, gram: &Tensor, g: usize, grid: &Grid) -> Result<ClipBounds> {
    let (out, inp) = w.dims2()?;
    let groups = inp / g;
    let dev = w.device();
    // f32 scalars as one-element tensors: `broadcast_*` with them computes exactly what the host
    // loop's f32 literals do (a scalar argument would pass through f64).
    let scalar = |v: f32| Tensor::new(&[v], dev);
    let wg = w.to_dtype(DType::F32)?.reshape((out, groups, g))?;
    let mn = wg.min_keepdim(2)?;
    let mx = wg.max_keepdim(2)?;
    let amax = mn.abs()?.maximum(&mx.abs()?)?;
    let (zero_code, max_code, eps) = (scalar(0.0)?, scalar(grid.max_code)?, scalar(1e-5)?);
    let clamp_codes = |t: &Tensor| t.broadcast_maximum(&zero_code)?.broadcast_minimum(&max_code);
    let mut best_e = Tensor::full(f32::INFINITY, (out, groups, 1), dev)?;
    let (mut best_lo, mut best_hi) = (mn.clone(), mx.clone());
    let inner = if grid.mode == ClipMode::Asymmetric { grid.steps } else { 1 };
    for i in 0..grid.steps {
        let f_hi = 1.0 - i as f32 / grid.n_grid;
        for j in 0..inner {
            let (lo, hi) = match grid.mode {
                ClipMode::Symmetric => (amax.broadcast_mul(&scalar(-f_hi)?)?, amax.broadcast_mul(&scalar(f_hi)?)?),
                ClipMode::Asymmetric => (mn.broadcast_mul(&scalar(1.0 - j as f32 / grid.n_grid)?)?, mx.broadcast_mul(&scalar(f_hi)?)?),
            };
            // The clamped group's minimum and maximum are the clamped extremes.
            let cmn = mn.maximum(&lo)?.minimum(&hi)?;
            let cmx = mx.maximum(&lo)?.minimum(&hi)?;
            let c = wg.broadcast_maximum(&lo)?.broadcast_minimum(&hi)?;
            let scale = (cmx - &cmn)?.broadcast_maximum(&eps)?.broadcast_div(&max_code)?;
            let zero = clamp_codes(&cmn.div(&scale)?.round()?.neg()?)?;
            let q = clamp_codes(&c.broadcast_div(&scale)?.round()?.broadcast_add(&zero)?)?;
            let d = (q.broadcast_sub(&zero)?.broadcast_mul(&scale)? - &wg)?;
            // dᵀ G d per (row, group), the groups as the batch of one matmul.
            let dg = d.transpose(0, 1)?.contiguous()?;
            let e = (dg.matmul(gram)? * &dg)?.sum_keepdim(2)?.transpose(0, 1)?;
            // Strictly better only: on ties the earlier (less shrunk) candidate stays.
            let better = e.lt(&best_e)?;
            best_e = better.where_cond(&e, &best_e)?;
            best_lo = better.where_cond(&lo, &best_lo)?;
            best_hi = better.where_cond(&hi, &best_hi)?;
        }
    }
    Ok(ClipBounds { out, groups, lo: best_lo.flatten_all()?.to_vec1()?, hi: best_hi.flatten_all()?.to_vec1()? })
}

/// The self-test of the device search: the bounds `device` chooses against the host loop's (see
/// [`check_against_host`]).
pub fn self_test(device: &Device, seed: u64) -> Result<(usize, usize)> {
    check_against_host(seed, &|w, x, p, o| search_clip(&w.to_device(device)?, &x.to_device(device)?, p, o))
}

/// A clip search (`search(w, x, p, o)`, `w` and `x` given on the CPU) against the host loop on
/// random layers: awkward row counts, groups of 32 to 256, 3 and 4 bits, both candidate
/// families. Each differing choice must be a near-tie: its error, measured in f64 over the
/// tokens, within 1e-5 of the host choice's; at least 90 % must be equal. Returns (passed,
/// failed), printing each failure.
pub fn check_against_host(seed: u64, search: &dyn Fn(&Tensor, &Tensor, QuantScheme, &ClipOptions) -> Result<ClipBounds>) -> Result<(usize, usize)> {
    let mut r = Rng::new(seed);
    let (mut pass, mut fail) = (0, 0);
    for (out, inp, g, bits, tokens) in [(300usize, 512usize, 128usize, 4u32, 700usize), (77, 384, 64, 3, 500), (130, 160, 32, 4, 333), (45, 512, 256, 4, 300)] {
        let wv: Vec<f32> = (0..out * inp).map(|_| r.normal() * 0.05 + 0.01).collect();
        let xv: Vec<f32> = (0..tokens * inp).map(|_| r.normal()).collect();
        let p = QuantScheme::new(bits, g)?;
        for mode in [ClipMode::Symmetric, ClipMode::Asymmetric] {
            let o = ClipOptions::new(mode);
            let (w, x) = (Tensor::from_slice(&wv, (out, inp), &Device::Cpu)?, Tensor::from_slice(&xv, (tokens, inp), &Device::Cpu)?);
            let (host, dev) = (search_clip(&w, &x, p, &o)?, search(&w, &x, p, &o)?);
            let groups = inp / g;
            // mean_t (x_t · d)² in f64 for (row, group) k clamped to [lo, hi].
            let err = |k: usize, lo: f32, hi: f32| -> Result<f64> {
                let (row, gi) = (k / groups, k % groups);
                let wg = &wv[row * inp + gi * g..][..g];
                let c: Vec<f32> = wg.iter().map(|v| v.max(lo).min(hi)).collect();
                let q = crate::quant::fake_quantize(&Tensor::from_vec(c, (1, g), &Device::Cpu)?, p)?.flatten_all()?.to_vec1::<f32>()?;
                let e: f64 = (0..tokens)
                    .map(|t| {
                        let y: f64 = (0..g).map(|i| f64::from(xv[t * inp + gi * g + i]) * (f64::from(q[i]) - f64::from(wg[i]))).sum();
                        y * y
                    })
                    .sum();
                Ok(e / tokens as f64)
            };
            let (mut same, mut worst) = (0, 0f64);
            for k in 0..out * groups {
                if (host.lo[k], host.hi[k]) == (dev.lo[k], dev.hi[k]) {
                    same += 1;
                    continue;
                }
                let (eh, ed) = (err(k, host.lo[k], host.hi[k])?, err(k, dev.lo[k], dev.hi[k])?);
                worst = worst.max((ed - eh).abs() / eh.max(ed).max(f64::MIN_POSITIVE));
            }
            let what = format!("clip search {mode:?} out={out} in={inp} g={g} w{bits}");
            if worst <= 1e-5 && same * 10 >= out * groups * 9 {
                pass += 1;
            } else {
                fail += 1;
                println!("FAIL {what}: {same} of {} choices equal, worst error difference {worst:e}", out * groups);
            }
        }
    }
    Ok((pass, fail))
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::{ClipBounds, ClipMode, Grid};
    use crate::cuda::{cuda_device, device_ptr};
    use crate::error::Result;
    use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute_enum;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{DType, Tensor};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/clip.ptx"));
    const MODULE: &str = "awq_clip";
    /// CLIP_WARPS, CLIP_WR and CLIP_ITERS in clip.cu.
    const WARPS: usize = 8;
    const WR: usize = 4;
    const ROWS_PER_BLOCK: usize = WARPS * WR * 4;

    pub fn search_gram(w: &Tensor, gram: &Tensor, g: usize, grid: &Grid) -> Result<ClipBounds> {
        let (out, inp) = w.dims2()?;
        let groups = inp / g;
        if gram.dims() != [groups, g, g] {
            return Err(crate::error::Error::msg(format!("clip search: Gram matrices {:?} for {groups} groups of {g}", gram.dims())));
        }
        let w = w.to_dtype(DType::F32)?.contiguous()?;
        let gram = gram.to_dtype(DType::F32)?.contiguous()?;
        let dev = cuda_device(&w)?;
        let stream = dev.cuda_stream();
        let lo = Tensor::zeros(out * groups, DType::F32, w.device())?;
        let hi = Tensor::zeros(out * groups, DType::F32, w.device())?;
        let (wp, gp, lp, hp) = (device_ptr(&w, &stream)?, device_ptr(&gram, &stream)?, device_ptr(&lo, &stream)?, device_ptr(&hi, &stream)?);
        let func = dev.get_or_load_custom_func(&format!("clip_search_g{g}"), MODULE, PTX)?;
        // The group's Gram matrix and each warp's candidate d's; 80 KiB at g = 128, over the
        // 48 KiB a launch gets without asking.
        let smem = (g * g + WARPS * WR * g) * 4;
        func.set_attribute(CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32).w()?;
        let (out_, inp_, steps, asym) = (out as i32, inp as i32, grid.steps as i32, i32::from(grid.mode == ClipMode::Asymmetric));
        let mut b = func.builder();
        b.arg(&wp);
        b.arg(&gp);
        b.arg(&out_);
        b.arg(&inp_);
        b.arg(&steps);
        b.arg(&asym);
        b.arg(&grid.n_grid);
        b.arg(&grid.max_code);
        b.arg(&lp);
        b.arg(&hp);
        let cfg = LaunchConfig { grid_dim: (out.div_ceil(ROWS_PER_BLOCK) as u32, groups as u32, 1), block_dim: ((WARPS * 32) as u32, 1, 1), shared_mem_bytes: smem as u32 };
        // SAFETY: w holds out × inp f32 values, gram groups × g × g, lo and hi out × groups; the
        // kernel reads rows below `out` only and writes each (row, group) once.
        unsafe { b.launch(cfg) }.w()?;
        Ok(ClipBounds { out, groups, lo: lo.to_vec1()?, hi: hi.to_vec1()? })
    }
}

#[cfg(test)]
mod tests {
    /// The tensor search (a GPU's for groups the kernel does not take) run on the CPU against the
    /// host loop.
    #[test]
    fn the_tensor_search_chooses_what_the_host_search_chooses() {
        let tensors = |w: &candle_core::Tensor, x: &candle_core::Tensor, p: crate::quant::QuantScheme, o: &super::ClipOptions| {
            let g = p.group_for(x.dim(1)?);
            super::search_gram_tensors(w, &super::super::clip::gram_matrices(x, g)?, g, &o.grid(p))
        };
        let (_, failed) = super::check_against_host(31, &tensors).unwrap();
        assert_eq!(failed, 0);
    }
}
