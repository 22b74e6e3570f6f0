//! The 4-bit CPU kernels over the packed layout of [`crate::quant::format::packed`], none of
//! which materializes the whole dequantized weight.
//!
//! * Exact (W4A16, here in f32): a fused unpack–dequantize–multiply. With
//!   `min = -zero * scale`, `w = q * scale + min` and
//!   `y[o] = Σ_g scale·(Σ_{k∈g} q·x) + min·(Σ_{k∈g} x)`. GEMV for few tokens (rows in parallel,
//!   SIMD dot products: AVX2/FMA chosen at run time on x86_64, NEON on aarch64, scalar
//!   elsewhere) and a blocked GEMM for prefill (row blocks dequantized into a small buffer, then
//!   an f32 GEMM, blocks in parallel).
//! * W4A8 ([`w4a8`]): activations quantized to int8 per 32-block ([`acts`]), integer dot
//!   products, one pass over the weights for up to four tokens.
//!
//! Which one a layer uses by default is a process-wide choice ([`set_default_numerics`]): the
//! CLI's `--cpu-kernel` sets it, tests and benchmarks name a [`Kernel`] directly.
/// Runs `$body` with `$t` a constant equal to `$tile`, for kernels that take their token count
/// as a const generic: `1 ..= 8`, or `1 ..= 4` with `up to 4` (a larger `$tile` runs as the
/// largest; the callers' tiles never are).
macro_rules! const_tokens {
    ($tile:expr, $t:ident => $body:expr) => {
        match $tile {
            1 => { const $t: usize = 1; $body }
            2 => { const $t: usize = 2; $body }
            3 => { const $t: usize = 3; $body }
            4 => { const $t: usize = 4; $body }
            5 => { const $t: usize = 5; $body }
            6 => { const $t: usize = 6; $body }
            7 => { const $t: usize = 7; $body }
            _ => { const $t: usize = 8; $body }
        }
    };
    ($tile:expr, $t:ident up to 4 => $body:expr) => {
        match $tile {
            1 => { const $t: usize = 1; $body }
            2 => { const $t: usize = 2; $body }
            3 => { const $t: usize = 3; $body }
            _ => { const $t: usize = 4; $body }
        }
    };
}

pub mod acts;
pub mod gemm_a8;
pub mod pool;
pub mod q8;
pub mod w4_panel;
pub mod w4a8;

pub use super::format::packed::PackedQ4;
pub use w4a8::A8Path;
use half::f16;
use pool::SendPtr;
use std::sync::atomic::{AtomicU8, Ordering};

/// Which inner loop to use; `Auto` picks the process default numerics ([`default_numerics`])
/// on the best path the CPU supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    Auto,
    Scalar,
    Avx2,
    Neon,
    /// The W4A8 kernel on the given path (the scalar one where the CPU lacks it).
    A8(A8Path),
}

/// The arithmetic of the CPU 4-bit kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Numerics {
    /// f32 activations times the dequantized weights.
    #[default]
    Exact,
    /// int8 activations per 32-block, integer dot products.
    W4A8,
}

static DEFAULT_NUMERICS: AtomicU8 = AtomicU8::new(0);

/// Sets what [`Kernel::Auto`] runs, for every 4-bit layer of the process.
pub fn set_default_numerics(n: Numerics) {
    DEFAULT_NUMERICS.store(n as u8, Ordering::Relaxed);
}

/// What [`Kernel::Auto`] runs.
pub fn default_numerics() -> Numerics {
    match DEFAULT_NUMERICS.load(Ordering::Relaxed) {
        1 => Numerics::W4A8,
        _ => Numerics::Exact,
    }
}

/// The lm_head of 4-bit models on the CPU (their embedding table stays f16: a lookup reads one
/// row).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HeadFormat {
    /// The checkpoint's f16 weight, f32 arithmetic.
    #[default]
    F16,
    /// 8 bits per weight, per 32-block scales, W8A8 ([`q8`]).
    Int8,
}

static DEFAULT_HEAD: AtomicU8 = AtomicU8::new(0);

/// Sets the lm_head format of the 4-bit models the process loads from now on.
pub fn set_default_head(h: HeadFormat) {
    DEFAULT_HEAD.store(h as u8, Ordering::Relaxed);
}

pub fn default_head() -> HeadFormat {
    match DEFAULT_HEAD.load(Ordering::Relaxed) {
        1 => HeadFormat::Int8,
        _ => HeadFormat::F16,
    }
}

impl Kernel {
    /// The exact kernel `Auto` resolves to on this machine.
    pub fn detect() -> Kernel {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return Kernel::Avx2;
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            if std::arch::is_aarch64_feature_detected!("neon") {
                return Kernel::Neon;
            }
        }
        Kernel::Scalar
    }
    /// The kernel that runs: `Auto` made concrete, a path the CPU lacks replaced by scalar.
    pub fn resolve(self) -> Kernel {
        match self {
            Kernel::Auto => match default_numerics() {
                Numerics::Exact => Kernel::detect(),
                Numerics::W4A8 => Kernel::A8(A8Path::detect()),
            },
            Kernel::A8(p) => Kernel::A8(p.or_scalar()),
            k if k == Kernel::detect() || k == Kernel::Scalar => k,
            _ => Kernel::Scalar,
        }
    }
}

/// Tokens at or above which the blocked GEMM path is used.
pub const GEMM_MIN_TOKENS: usize = 8;

/// Tokens at or above which W4A8 calls on AVX512-VNNI take the GEMM of [`gemm_a8`] (rows across
/// the vector, a panel of weights unpacked once for every token) instead of the GEMV. Measured on
/// the 2-core EPYC VM at SmolLM2's shapes with the weights read from memory, as in a model
/// (`cargo run --release --example a8_crossover`), since the GEMV prefetches its next rows
/// (session 14). With the GEMM's codes held in registers across its tokens (session 23), two runs:
/// the GEMM is 0.63–0.94× the GEMV at 16 tokens, 0.79–1.26× at 24 (ahead on three shapes of
/// four) and 0.88–1.30× at 32; with fewer tokens its unpacking of every panel, once per call,
/// costs more than the GEMV's passes of eight tokens.
pub const A8_GEMM_MIN_TOKENS: usize = 24;

/// Tokens at or above which a W4A8 call goes to the exact blocked GEMM instead (where the W4A8
/// GEMM does not run): on the 2-core
/// Xeon VM (AVX512-VNNI) W4A8 is 2–4× the exact kernel at 1–16 tokens, even at 128 (0.87–1.19×
/// by shape), and a 512-token SmolLM2 prefill ran at 331 tok/s through W4A8 against 407 through
/// the GEMM. Decode and batched decode stay W4A8; long prompts get the faster, exact path.
pub const A8_MAX_TOKENS: usize = 64;

impl PackedQ4 {
    /// `y[t][o] = Σ_i x[t][i] · W[o][i]` for `m` tokens; `x` is `[m][k]`, `y` `[m][n]`.
    pub fn matmul(&self, x: &[f32], m: usize, kernel: Kernel) -> Vec<f32> {
        Self::matmul_many(&[self], x, m, kernel)
    }

    /// [`PackedQ4::matmul_many`] with each weight's output `[m][n_i]` in its own buffer.
    pub fn matmul_many_split(ws: &[&PackedQ4], x: &[f32], m: usize, kernel: Kernel) -> Vec<Vec<f32>> {
        let y = Self::matmul_many(ws, x, m, kernel);
        let total: usize = ws.iter().map(|w| w.shape.n).sum();
        let mut outs: Vec<Vec<f32>> = ws.iter().map(|w| Vec::with_capacity(m * w.shape.n)).collect();
        for row in y.chunks_exact(total) {
            let mut start = 0;
            for (o, w) in outs.iter_mut().zip(ws) {
                o.extend_from_slice(&row[start..start + w.shape.n]);
                start += w.shape.n;
            }
        }
        outs
    }

    /// Several weights of the same input width and group size on one input (q/k/v, gate/up):
    /// one call over the rows of all of them (and for W4A8 one quantization of the
    /// activations); `y` is `[m][Σ n]`, the weights' outputs side by side in the order given.
    pub fn matmul_many(ws: &[&PackedQ4], x: &[f32], m: usize, kernel: Kernel) -> Vec<f32> {
        let (k, g) = (ws[0].shape.k, ws[0].shape.group_size);
        assert!(ws.iter().all(|w| w.shape.k == k && w.shape.group_size == g), "fused 4-bit weights of different shapes");
        assert_eq!(x.len(), m * k, "input length");
        match kernel.resolve() {
            Kernel::A8(A8Path::Avx512Vnni) if m >= A8_GEMM_MIN_TOKENS && gemm_a8::available() => gemm_a8::matmul_many(ws, &acts::QuantizedActs::new(x, m, k, true)),
            Kernel::A8(path) if m < A8_MAX_TOKENS => w4a8::matmul_many(ws, x, m, path),
            _ if m >= GEMM_MIN_TOKENS => {
                let rows = RowMap::new(ws);
                blocked_gemm(x, m, rows.n, k, |o, row| {
                    let (w, lo) = rows.locate(o);
                    w.dequantize_row(lo, row)
                })
            }
            k => Self::gemv_many(ws, x, m, k),
        }
    }

    fn gemv_many(ws: &[&PackedQ4], x: &[f32], m: usize, kernel: Kernel) -> Vec<f32> {
        let (k, g) = (ws[0].shape.k, ws[0].shape.group_size);
        let groups = k / g;
        // Per token and group: Σ x, for the `min` term.
        let xsum: Vec<f32> = x.chunks(g).map(|c| c.iter().sum()).collect();
        let rows = RowMap::new(ws);
        rows_parallel(rows.n, m, |o, t| {
            let (w, o) = rows.locate(o);
            let codes = &w.codes[o * k / 2..(o + 1) * k / 2];
            let scales = &w.scales[o * groups..(o + 1) * groups];
            let zeros = &w.zeros[o * groups..(o + 1) * groups];
            let xt = &x[t * k..(t + 1) * k];
            let xs = &xsum[t * groups..(t + 1) * groups];
            row_dot(kernel, codes, xt, scales, zeros, xs, g)
        })
    }

}

/// The rows of several weights numbered one after another.
struct RowMap<'a> {
    ws: &'a [&'a PackedQ4],
    /// First global row of each weight.
    starts: Vec<usize>,
    n: usize,
}

impl<'a> RowMap<'a> {
    fn new(ws: &'a [&'a PackedQ4]) -> Self {
        let mut starts = Vec::with_capacity(ws.len());
        let mut n = 0;
        for w in ws {
            starts.push(n);
            n += w.shape.n;
        }
        Self { ws, starts, n }
    }
    /// Global row `o` as (its weight, the row within it).
    #[inline]
    fn locate(&self, o: usize) -> (&'a PackedQ4, usize) {
        let i = self.starts.partition_point(|&s| s <= o) - 1;
        (self.ws[i], o - self.starts[i])
    }
}

/// `y[t][o] = dot(o, t)` for `n` rows and `m` tokens, `[m][n]` row-major, each row's tokens
/// together so its weights are read once.
pub fn rows_parallel(n: usize, m: usize, dot: impl Fn(usize, usize) -> f32 + Sync) -> Vec<f32> {
    par_output_rows(
        m,
        n,
        || (),
        |_, o, out| {
            for t in 0..m {
                out.put(t, dot(o, t));
            }
        },
    )
}

/// `y = x · Wᵀ` for `x` `[m, k]` and a weight `[n, k]` that `fill_row(o, buf)` writes out row by
/// row in f32: blocks of 64 rows are expanded into a per-thread buffer and multiplied with an f32
/// GEMM, blocks in parallel; the whole weight is never expanded.
pub fn blocked_gemm(x: &[f32], m: usize, n: usize, k: usize, fill_row: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    let block = 64;
    let mut y = vec![0f32; m * n];
    let y_ptr = SendPtr(y.as_mut_ptr());
    pool::for_ranges(n.div_ceil(block), 1, |blocks| {
        let mut buf = vec![0f32; block * k];
        for b in blocks {
            let o0 = b * block;
            let nb = block.min(n - o0);
            for r in 0..nb {
                fill_row(o0 + r, &mut buf[r * k..(r + 1) * k]);
            }
            // y[:, o0..o0+nb] = x [m, k] · buf[nb, k]^T; blocks write disjoint columns.
            // SAFETY: all pointers stay inside x, buf and y; strides describe row-major
            // matrices of the stated shapes; no two tasks touch the same y columns.
            unsafe {
                let y = y_ptr;
                gemm_f32(m, nb, k, y.0.add(o0), n, x.as_ptr(), k, buf.as_ptr(), 1, k, 1.0);
            }
        }
    });
    y
}

/// `dst = beta · lhs · rhs` in f32 on the calling thread, by the `gemm` crate's microkernels:
/// `dst` is `m × n` with row stride `dst_rs`, `lhs` `m × k` with row stride `lhs_rs` (both with
/// unit column stride), and `rhs` `k × n` with element `(i, j)` at `rhs[i · rhs_rs + j · rhs_cs]`
/// (`rhs_rs = 1, rhs_cs = k` reads a row-major `n × k` matrix as its transpose).
///
/// # Safety
/// Every element those shapes and strides reach lies inside its buffer, and `dst` overlaps
/// neither input.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_f32(m: usize, n: usize, k: usize, dst: *mut f32, dst_rs: usize, lhs: *const f32, lhs_rs: usize, rhs: *const f32, rhs_rs: usize, rhs_cs: usize, beta: f32) {
    gemm::gemm(m, n, k, dst, 1, dst_rs as isize, false, lhs, 1, lhs_rs as isize, rhs, rhs_cs as isize, rhs_rs as isize, 0.0, beta, false, false, false, gemm::Parallelism::None);
}

/// Where one task of [`par_output_blocks`] stores its results: `y[t][o]` of the `[m][n]`
/// output, for the columns of the block it was handed only. A plain value the kernels' loops
/// inline (a `dyn` callback per element cost more than SmolLM2's short rows).
#[derive(Clone, Copy)]
pub(crate) struct BlockOut {
    ptr: SendPtr,
    m: usize,
    n: usize,
    first: usize,
    end: usize,
}

impl BlockOut {
    #[inline(always)]
    pub(crate) fn put(self, t: usize, o: usize, v: f32) {
        assert!(t < self.m && o >= self.first && o < self.end, "token {t} of {}, row {o} outside {}..{}", self.m, self.first, self.end);
        // SAFETY: t < m and o < n index inside y; the block's columns belong to this task only.
        unsafe { self.ptr.write(t * self.n + o, v) }
    }

    /// Stores `y[t][o0 .. o0 + vals.len()]` (columns of this block) from `vals`.
    #[inline(always)]
    pub(crate) fn put_run(self, t: usize, o0: usize, vals: &[f32]) {
        assert!(t < self.m && o0 >= self.first && o0 + vals.len() <= self.end, "token {t} of {}, rows {o0}..{} outside {}..{}", self.m, o0 + vals.len(), self.first, self.end);
        // SAFETY: inside y (checked above); the block's columns belong to this task only.
        unsafe { std::ptr::copy_nonoverlapping(vals.as_ptr(), self.ptr.0.add(t * self.n + o0), vals.len()) }
    }
}

/// [`BlockOut`] for one column `o`.
#[derive(Clone, Copy)]
pub(crate) struct RowOut {
    out: BlockOut,
    o: usize,
}

impl RowOut {
    /// Stores `y[t][o]`.
    #[inline(always)]
    pub(crate) fn put(self, t: usize, v: f32) {
        self.out.put(t, self.o, v)
    }
}

/// `y` (`[m][n]`, row-major) filled by `fill(o, out)` for every output column `o`, the columns
/// split into contiguous ranges over the kernel threads ([`pool`]; a row of the weight is read
/// by one task); `out.put(t, v)` stores `y[t][o]`; `init` makes each task's scratch space.
fn par_output_rows<S>(m: usize, n: usize, init: impl Fn() -> S + Sync, fill: impl Fn(&mut S, usize, RowOut) + Sync) -> Vec<f32> {
    par_output_blocks(m, n, 1, init, |scratch, rows, out| {
        for o in rows {
            fill(scratch, o, RowOut { out, o });
        }
    })
}

/// [`par_output_rows`] for kernels that take `block` rows at a time: `fill(rows, out)` gets
/// `block` consecutive columns (fewer at the end) and stores `y[t][o]` with `out.put(t, o, v)`.
///
/// `fill` must store every `y[t][o]` of its block (all `t < m`): see [`Unstored`].
fn par_output_blocks<S>(m: usize, n: usize, block: usize, init: impl Fn() -> S + Sync, fill: impl Fn(&mut S, std::ops::Range<usize>, BlockOut) + Sync) -> Vec<f32> {
    let mut y = Unstored::new(m, n);
    let ptr = y.ptr();
    let blocks = n.div_ceil(block);
    // At least 16 rows a task: below that the hand-out costs more than the rows. Two ranges a
    // thread, not four: a range's first rows wait for memory with nothing prefetched, and a
    // decode call is short (SmolLM2's 576 x 576 is 7 us), so each start shows; two still let a
    // thread that is running behind hand a range over (BENCHMARKS.md, session 17: SmolLM2
    // tg128 at two threads, two ranges against four faster in 11 of 14 alternated pairs).
    pool::for_ranges_per_thread(blocks, 16usize.div_ceil(block), 2, |range| {
        let mut scratch = init();
        for b in range {
            let rows = b * block..((b + 1) * block).min(n);
            let out = BlockOut { ptr, m, n, first: rows.start, end: rows.end };
            fill(&mut scratch, rows, out);
        }
    });
    // SAFETY: `fill` stored every element (its contract).
    unsafe { y.all_stored() }
}

/// A kernel's `[m][n]` output, not zeroed: the kernel stores every element. Zeroing cost 5 % of
/// an 8-sequence SmolLM2 decode step, on the calling thread while the others waited, for values
/// every kernel overwrites. Test and debug builds fill it with a marker instead and check that
/// none is left, so a kernel that skips an element fails its tests.
pub(crate) struct Unstored {
    y: Vec<f32>,
    m: usize,
    n: usize,
}

impl Unstored {
    /// Whether the buffer is checked (see the type).
    const CHECK: bool = cfg!(any(test, debug_assertions));
    /// A NaN no kernel computes, marking elements not yet stored.
    const MARK: u32 = 0x7fa5_5a5a;

    pub(crate) fn new(m: usize, n: usize) -> Self {
        let mut y = Vec::with_capacity(m * n);
        if Self::CHECK {
            y.resize(m * n, f32::from_bits(Self::MARK));
        }
        Self { y, m, n }
    }

    /// Where the kernel's tasks store (each its own elements).
    pub(crate) fn ptr(&mut self) -> SendPtr {
        SendPtr(self.y.as_mut_ptr())
    }

    /// The output, once stored.
    ///
    /// # Safety
    /// Every one of the `m · n` elements was stored through [`Self::ptr`]. (A kernel that
    /// panics never gets here: the buffer is then dropped unread.)
    pub(crate) unsafe fn all_stored(mut self) -> Vec<f32> {
        let (m, n) = (self.m, self.n);
        self.y.set_len(m * n);
        if Self::CHECK {
            if let Some(i) = self.y.iter().position(|v| v.to_bits() == Self::MARK) {
                panic!("a kernel left y[{}][{}] of its [{m}][{n}] output unstored", i / n, i % n);
            }
        }
        self.y
    }
}

/// One row's dot product with one token.
#[inline]
fn row_dot(kernel: Kernel, codes: &[u8], x: &[f32], scales: &[f16], zeros: &[u8], xsum: &[f32], g: usize) -> f32 {
    match kernel {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: Kernel::Avx2 is only resolved when the CPU has AVX2 and FMA.
        Kernel::Avx2 => unsafe { x86::row_dot_avx2(codes, x, scales, zeros, xsum, g) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: Kernel::Neon is only resolved when the CPU has NEON.
        Kernel::Neon => unsafe { arm::row_dot_neon(codes, x, scales, zeros, xsum, g) },
        _ => row_dot_scalar(codes, x, scales, zeros, xsum, g),
    }
}

/// The scale and `min = -zero * scale` of one group.
#[inline(always)]
fn scale_min(s: f16, z: u8) -> (f32, f32) {
    let s = s.to_f32();
    (s, -f32::from(z) * s)
}

fn row_dot_scalar(codes: &[u8], x: &[f32], scales: &[f16], zeros: &[u8], xsum: &[f32], g: usize) -> f32 {
    let mut total = 0f32;
    for gi in 0..scales.len() {
        let (s, m) = scale_min(scales[gi], zeros[gi]);
        let mut d = 0f32;
        for c in 0..g / 32 {
            let base = gi * g + c * 32;
            let bytes = &codes[base / 2..base / 2 + 16];
            let xs = &x[base..base + 32];
            for j in 0..16 {
                d += f32::from(bytes[j] & 0xF) * xs[j] + f32::from(bytes[j] >> 4) * xs[j + 16];
            }
        }
        total += s * d + m * xsum[gi];
    }
    total
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use half::f16;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// 32 weights from 16 bytes (see the layout), times 32 activations, accumulated into d0/d1.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn chunk(codes: *const u8, x: *const f32, d0: &mut __m256, d1: &mut __m256) {
        let mask = _mm_set1_epi8(0x0F);
        let v = _mm_loadu_si128(codes as *const __m128i);
        let lo = _mm_and_si128(v, mask);
        let hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
        let w0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
        let w1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
        let w2 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
        let w3 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
        *d0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x), *d0);
        *d1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x.add(8)), *d1);
        *d0 = _mm256_fmadd_ps(w2, _mm256_loadu_ps(x.add(16)), *d0);
        *d1 = _mm256_fmadd_ps(w3, _mm256_loadu_ps(x.add(24)), *d1);
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA; slices as in `row_dot_scalar`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn row_dot_avx2(codes: &[u8], x: &[f32], scales: &[f16], zeros: &[u8], xsum: &[f32], g: usize) -> f32 {
        debug_assert!(codes.len() * 2 == x.len() && x.len() == scales.len() * g);
        let mut tot = _mm256_setzero_ps();
        let mut min_term = 0f32;
        let (cp, xp) = (codes.as_ptr(), x.as_ptr());
        for gi in 0..scales.len() {
            let mut d0 = _mm256_setzero_ps();
            let mut d1 = _mm256_setzero_ps();
            for c in 0..g / 32 {
                let base = gi * g + c * 32;
                chunk(cp.add(base / 2), xp.add(base), &mut d0, &mut d1);
            }
            let (s, m) = super::scale_min(*scales.get_unchecked(gi), *zeros.get_unchecked(gi));
            tot = _mm256_fmadd_ps(_mm256_add_ps(d0, d1), _mm256_set1_ps(s), tot);
            min_term += m * xsum.get_unchecked(gi);
        }
        hsum(tot) + min_term
    }
}

#[cfg(target_arch = "aarch64")]
mod arm {
    use half::f16;
    use std::arch::aarch64::*;

    /// # Safety
    /// The CPU must support NEON; slices as in `row_dot_scalar`.
    #[target_feature(enable = "neon")]
    pub unsafe fn row_dot_neon(codes: &[u8], x: &[f32], scales: &[f16], zeros: &[u8], xsum: &[f32], g: usize) -> f32 {
        let mut tot = vdupq_n_f32(0.0);
        let mut min_term = 0f32;
        let (cp, xp) = (codes.as_ptr(), x.as_ptr());
        let mask = vdupq_n_u8(0x0F);
        for gi in 0..scales.len() {
            let mut d0 = vdupq_n_f32(0.0);
            let mut d1 = vdupq_n_f32(0.0);
            for c in 0..g / 32 {
                let base = gi * g + c * 32;
                let v = vld1q_u8(cp.add(base / 2));
                let lo = vandq_u8(v, mask); // weights 0..16
                let hi = vshrq_n_u8(v, 4); // weights 16..32
                for (half, off) in [(lo, 0usize), (hi, 16usize)] {
                    let w16a = vmovl_u8(vget_low_u8(half));
                    let w16b = vmovl_u8(vget_high_u8(half));
                    let w0 = vcvtq_f32_u32(vmovl_u16(vget_low_u16(w16a)));
                    let w1 = vcvtq_f32_u32(vmovl_u16(vget_high_u16(w16a)));
                    let w2 = vcvtq_f32_u32(vmovl_u16(vget_low_u16(w16b)));
                    let w3 = vcvtq_f32_u32(vmovl_u16(vget_high_u16(w16b)));
                    let xb = xp.add(base + off);
                    d0 = vfmaq_f32(d0, w0, vld1q_f32(xb));
                    d1 = vfmaq_f32(d1, w1, vld1q_f32(xb.add(4)));
                    d0 = vfmaq_f32(d0, w2, vld1q_f32(xb.add(8)));
                    d1 = vfmaq_f32(d1, w3, vld1q_f32(xb.add(12)));
                }
            }
            let (s, m) = super::scale_min(*scales.get_unchecked(gi), *zeros.get_unchecked(gi));
            tot = vfmaq_n_f32(tot, vaddq_f32(d0, d1), s);
            min_term += m * xsum.get_unchecked(gi);
        }
        vaddvq_f32(tot) + min_term
    }
}
