//! The W4A8 CPU kernel: activations quantized to int8 per 32-block ([`QuantizedActs`]), integer
//! dot products against the 4-bit codes, float scales applied once per 32-block.
//!
//! With `x ≈ d·q` per 32-block `b` and `w = s·(c - z)` per group,
//! `y = Σ_b s·d·(Σ_{i∈b} c_i q_i) - Σ_g s·z·(Σ_{b∈g} d·Σ_{i∈b} q_i)`:
//! the inner sums are exact integers (`c` unsigned 0..15, `q` signed −127..127: exactly the
//! operand types of `vpdpbusd`), the zero point's share is one more fused multiply-add per
//! vector (`z` times the per-lane `d·Σq` that [`QuantizedActs`] precomputes), and the result is
//! exactly the dequantized weight times the quantized activation. Its distance from the exact
//! W4A16 result is therefore at most `Σ_i |w_i| · d_b(i) / 2` (see [`error_bound`]).
//!
//! Paths, chosen at run time: AVX512-VNNI (256-bit `vpdpbusd`), AVX-VNNI (the same instruction
//! in its VEX form), AVX2 (`vpmaddubsw` + `vpmaddwd`: two products of at most 15·127 fit i16
//! without saturation, four do too), NEON with the dot-product extension (`sdot`, on unsigned
//! codes below 128), and scalar. All read the same packed weights and activation order, and all
//! give the same integer sums; only the float sums differ in order.
//!
//! Several tokens share one pass over a row's codes: the codes are unpacked once per pair of
//! chunks and multiplied with up to [`TILE`] tokens' activations — this is the multi-token GEMV
//! of batched decode, and in tiles the prefill GEMM too. On x86, [`ROWS`] rows also share each
//! activation load ([`block_tile`]). Each group's scale and zero are one 4-byte word of a table
//! the weight builds on first use ([`PackedQ4::scale_table`]), turned into f32 by one conversion
//! per pair of chunks: converting a row's f16 scales into a buffer per call cost more than the
//! row's arithmetic at SmolLM2's sizes, and a table of f32 scale and f32 `scale·zero` read twice
//! the bytes.
use super::acts::{pair_slot, QuantizedActs};
use super::PackedQ4;

/// Tokens that share one pass over a row.
pub const TILE: usize = 4;

/// The inner loop of the W4A8 kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum A8Path {
    Scalar,
    Avx2,
    AvxVnni,
    Avx512Vnni,
    NeonDot,
}

impl A8Path {
    /// Every path this CPU can run, best first (the scalar path always).
    pub fn available() -> Vec<A8Path> {
        let mut v = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
            if avx2 && is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl") {
                v.push(A8Path::Avx512Vnni);
            }
            if avx2 && is_x86_feature_detected!("avxvnni") {
                v.push(A8Path::AvxVnni);
            }
            if avx2 {
                v.push(A8Path::Avx2);
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            if std::arch::is_aarch64_feature_detected!("dotprod") {
                v.push(A8Path::NeonDot);
            }
        }
        v.push(A8Path::Scalar);
        v
    }
    /// The best path on this CPU.
    pub fn detect() -> A8Path {
        Self::available()[0]
    }
    /// `self` if this CPU runs it, else the scalar path (a path the CPU lacks is never run).
    pub fn or_scalar(self) -> A8Path {
        if Self::available().contains(&self) {
            self
        } else {
            A8Path::Scalar
        }
    }
}

/// `y[t][o]` for `m` tokens through the W4A8 kernel; `x` is `[m][k]`, `y` `[m][n]`.
pub fn matmul(w: &PackedQ4, x: &[f32], m: usize, path: A8Path) -> Vec<f32> {
    matmul_many(&[w], x, m, path)
}

/// Several weights of the same input width (q/k/v, gate/up) on one input: the activations are
/// quantized once and the rows of all weights split over the threads in one call; `y` is
/// `[m][Σ n]`, the weights' outputs side by side in the order given.
pub fn matmul_many(ws: &[&PackedQ4], x: &[f32], m: usize, path: A8Path) -> Vec<f32> {
    let k = ws[0].shape.k;
    assert!(ws.iter().all(|w| w.shape.k == k), "fused 4-bit weights of different input widths");
    let acts = QuantizedActs::new(x, m, k, false);
    matmul_acts(ws, &acts, path)
}

/// A weight's row layout for the kernels: where a chunk's scale is found (see [`Row::shift`]).
struct Tables<'a> {
    w: &'a PackedQ4,
    table: &'a super::super::format::packed::ScaleTable,
    groups: usize,
    chunks_per_group: usize,
    pow2: bool,
    shift: u32,
}

impl<'a> Tables<'a> {
    /// Row `lo` of a weight whose chunks find their word by shift (power-of-two groups).
    #[inline(always)]
    fn pow2_row(&self, lo: usize, k: usize) -> Row<'a> {
        let g1 = self.groups + 1;
        Row { codes: &self.w.codes[lo * k / 2..(lo + 1) * k / 2], sz: &self.table.sz[lo * g1..(lo + 1) * g1], shift: self.shift, k }
    }
}

/// [`matmul_many`] on activations already quantized (in kernel order).
pub fn matmul_acts(ws: &[&PackedQ4], acts: &QuantizedActs, path: A8Path) -> Vec<f32> {
    let m = acts.m;
    let k = acts.k;
    let path = path.or_scalar();
    if super::w4_panel::applies(ws, path) {
        return super::w4_panel::matmul_acts(ws, acts, path);
    }
    let pairs = acts.pairs;
    let tables: Vec<Tables> = ws
        .iter()
        .map(|w| {
            let chunks_per_group = w.shape.group_size / 32;
            // Chunk c's scale is `scales[c >> shift]` where a group is a power of two of chunks
            // (32, 64, 128, ...); other group sizes get per-chunk copies of the row's tables
            // (shift 0).
            let pow2 = chunks_per_group.is_power_of_two();
            Tables { w, table: w.scale_table(), groups: w.groups(), chunks_per_group, pow2, shift: if pow2 { chunks_per_group.trailing_zeros() } else { 0 } }
        })
        .collect();
    // First global row of each weight, and the total.
    let mut starts = Vec::with_capacity(ws.len() + 1);
    starts.push(0);
    for w in ws {
        starts.push(starts.last().unwrap() + w.shape.n);
    }
    let n = *starts.last().unwrap();
    let any_chunked = tables.iter().any(|t| !t.pow2);
    let stride = pairs * 2;
    super::par_output_blocks(
        m,
        n,
        ROWS,
        || if any_chunked { vec![0u32; ROWS * stride] } else { Vec::new() },
        |chunk_tables, rows, out| {
            let o0 = rows.start;
            let r_n = rows.len();
            // Global row -> (its weight's tables, the row within the weight).
            let locate = |o: usize| {
                let i = starts.partition_point(|&s| s <= o) - 1;
                (&tables[i], o - starts[i])
            };
            let (t0w, lo0) = locate(o0);
            // The block's rows: usually all of one weight (shapes are multiples of ROWS), found
            // by one lookup; a block across two weights looks each row up.
            let one_weight = lo0 + r_n <= t0w.w.shape.n;
            let at = |r: usize| if one_weight { (t0w, lo0 + r) } else { locate(o0 + r) };
            for r in (0..r_n).filter(|_| any_chunked) {
                let (t, lo) = at(r);
                if t.pow2 {
                    continue;
                }
                let src = &t.table.sz[lo * (t.groups + 1)..(lo + 1) * (t.groups + 1)];
                let dst = &mut chunk_tables[r * stride..(r + 1) * stride];
                for (c, s) in dst.chunks_mut(t.chunks_per_group).zip(src) {
                    c.fill(*s);
                }
                // An odd chunk count: the padding chunk (zero activations) takes the last
                // group's values.
                dst[stride - 1] = src[t.groups - 1];
            }
            let row = |r: usize| {
                let (t, lo) = at(r);
                if t.pow2 {
                    t.pow2_row(lo, k)
                } else {
                    Row { codes: &t.w.codes[lo * k / 2..(lo + 1) * k / 2], sz: &chunk_tables[r * stride..(r + 1) * stride], shift: t.shift, k }
                }
            };
            let last = r_n - 1;
            // The usual block (one weight, power-of-two groups) without the general lookup: the
            // closure's calls were 9 % of a SmolLM2 decode step.
            let block: [Row; ROWS] = if one_weight && t0w.pow2 { block_rows(|r| t0w.pow2_row(lo0 + r, k), last) } else { block_rows(row, last) };
            let mut acc = [[0f32; TILE]; ROWS];
            let mut t0 = 0;
            while t0 < m {
                let tile = TILE.min(m - t0);
                block_tile(path, &block[..r_n], acts, t0, tile, &mut acc);
                for (r, acc_r) in acc[..r_n].iter().enumerate() {
                    for (i, v) in acc_r[..tile].iter().enumerate() {
                        out.put(t0 + i, o0 + r, *v);
                    }
                }
                t0 += tile;
            }
        },
    )
}

/// Rows that share one pass over the activations: a task's unit of work. Eight halve the
/// per-block set-up of four (a fifth of a SmolLM2 decode step was set-up and stores).
pub const ROWS: usize = 8;

/// `f(0) ..= f(last)` and copies of `f(last)` up to [`ROWS`] (a short block's rows past its end
/// are never read). Written out, not `array::from_fn`: its drop-guarded loop was 6 % of a decode
/// step.
#[inline(always)]
fn block_rows<'a>(f: impl Fn(usize) -> Row<'a>, last: usize) -> [Row<'a>; ROWS] {
    const _: () = assert!(ROWS == 8);
    [f(0), f(last.min(1)), f(last.min(2)), f(last.min(3)), f(last.min(4)), f(last.min(5)), f(last.min(6)), f(last.min(7))]
}

/// [`row_tile`] for up to [`ROWS`] rows: on x86 a full block runs in one kernel that loads each
/// activation vector once for all its rows.
pub fn block_tile(path: A8Path, rows: &[Row], acts: &QuantizedActs, t0: usize, tile: usize, out: &mut [[f32; TILE]; ROWS]) {
    #[cfg(target_arch = "x86_64")]
    if rows.len() == ROWS && path != A8Path::Scalar && path != A8Path::NeonDot {
        macro_rules! run {
            ($r:literal, $first:expr, $f:ident) => {{
                let rs: &[Row; $r] = rows[$first..$first + $r].try_into().unwrap();
                let o: &mut [[f32; TILE]; $r] = (&mut out[$first..$first + $r]).try_into().unwrap();
                // SAFETY: the path is only chosen when `A8Path::available` lists it.
                const_tokens!(tile, T up to 4 => unsafe { x86::$f::<$r, T>(rs, acts, t0, o) })
            }};
        }
        macro_rules! by_path {
            ($f:ident, $wide:expr) => {{
                // Eight rows × one token fit AVX-512's 32 vector registers, four rows × one or
                // two tokens AVX2's 16; more tokens go two rows at a time (the accumulators
                // would spill). Eight rows only for short rows, where a block's set-up weighs
                // most: on long ones (TinyLlama's 2048 and more) the first runs of eight streams
                // of codes decoded slower; later runs could not tell the two apart within this
                // VM's noise, so long rows keep two passes of four.
                if tile == 1 && $wide && rows[0].k < 2048 {
                    run!(8, 0, $f)
                } else if tile <= 2 {
                    run!(4, 0, $f);
                    run!(4, 4, $f);
                } else {
                    run!(2, 0, $f);
                    run!(2, 2, $f);
                    run!(2, 4, $f);
                    run!(2, 6, $f);
                }
            }};
        }
        match path {
            A8Path::Avx512Vnni => by_path!(rows_avx512vnni, true),
            A8Path::AvxVnni => by_path!(rows_avxvnni, false),
            _ => by_path!(rows_avx2, false),
        }
        return;
    }
    for (row, o) in rows.iter().zip(out.iter_mut()) {
        row_tile(path, row, acts, t0, tile, o);
    }
}

/// One row of the weight, with its scales in f32.
pub struct Row<'a> {
    /// `k / 2` packed bytes.
    pub codes: &'a [u8],
    /// Chunk `c`'s (scale, zero) word ([`ScaleTable`]) is `sz[c >> shift]`; valid for every
    /// chunk of every pair (an odd chunk count's padding chunk included).
    ///
    /// [`ScaleTable`]: super::super::format::packed::ScaleTable
    pub sz: &'a [u32],
    pub shift: u32,
    pub k: usize,
}

impl Row<'_> {
    /// Chunk `c`'s (scale, zero).
    #[inline(always)]
    fn chunk_sz(&self, c: usize) -> (f32, f32) {
        super::super::format::packed::ScaleTable::unpack(self.sz[c >> self.shift])
    }
}

/// `out[i] = Σ_b s·d·(Σ c·q) − s·z·d·(Σ q)` for tokens `t0 .. t0 + tile` (`tile` ≤ [`TILE`]).
pub fn row_tile(path: A8Path, row: &Row, acts: &QuantizedActs, t0: usize, tile: usize, out: &mut [f32; TILE]) {
    debug_assert!((1..=TILE).contains(&tile) && t0 + tile <= acts.m && acts.k == row.k);
    macro_rules! dispatch {
        ($($f:ident)::+) => {
            const_tokens!(tile, T up to 4 => $($f)::+::<T>(row, acts, t0, out))
        };
    }
    match path {
        // SAFETY (all three): the path is only chosen when `A8Path::available` lists it.
        #[cfg(target_arch = "x86_64")]
        A8Path::Avx512Vnni => unsafe { dispatch!(x86::tile_avx512vnni) },
        #[cfg(target_arch = "x86_64")]
        A8Path::AvxVnni => unsafe { dispatch!(x86::tile_avxvnni) },
        #[cfg(target_arch = "x86_64")]
        A8Path::Avx2 => unsafe { dispatch!(x86::tile_avx2) },
        #[cfg(target_arch = "aarch64")]
        A8Path::NeonDot => unsafe { dispatch!(arm::tile_neon_dot) },
        _ => dispatch!(tile_scalar),
    }
}

/// The reference inner loop: exact integer sums per 32-block.
pub fn tile_scalar<const T: usize>(row: &Row, acts: &QuantizedActs, t0: usize, out: &mut [f32; TILE]) {
    let pairs = acts.pairs;
    let mut acc = [0f32; T];
    for p in 0..pairs {
        for h in 0..2 {
            let c = 2 * p + h;
            if c * 32 >= row.k {
                break;
            }
            let bytes = &row.codes[c * 16..c * 16 + 16];
            for (t, a) in acc.iter_mut().enumerate() {
                let q = &acts.token(t0 + t)[p * 64..p * 64 + 64];
                let mut dot = 0i32;
                for (j, &byte) in bytes.iter().enumerate() {
                    dot += i32::from(byte & 0xF) * i32::from(q[pair_slot(h * 32 + j)]);
                    dot += i32::from(byte >> 4) * i32::from(q[pair_slot(h * 32 + j + 16)]);
                }
                let d = acts.block_scale(t0 + t, c);
                let (sc, z) = row.chunk_sz(c);
                *a += sc * d * dot as f32 - sc * z * acts.token_block_sums(t0 + t)[c];
            }
        }
    }
    out[..T].copy_from_slice(&acc);
}

/// The bound on `|W4A8 − W4A16|` for one output: `Σ_i |w_i| · d_b(i) / 2`, with `w` the
/// dequantized row and `d` the activation block scales of token `t`.
pub fn error_bound(w_row: &[f32], acts: &QuantizedActs, t: usize) -> f32 {
    w_row.iter().enumerate().map(|(i, w)| w.abs() * acts.block_scale(t, i / 32) * 0.5).sum()
}

#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    use super::{QuantizedActs, Row, TILE};
    use std::arch::x86_64::*;

    /// The one-row entry points of `row_tile`: the row-blocked loop with one row.
    macro_rules! tile_fn {
        ($name:ident, $rows:ident) => {
            /// # Safety
            /// As for the row-blocked function it calls.
            pub unsafe fn $name<const T: usize>(row: &Row, acts: &QuantizedActs, t0: usize, out: &mut [f32; TILE]) {
                $rows::<1, T>(std::array::from_ref(row), acts, t0, std::array::from_mut(out))
            }
        };
    }

    /// The row-blocked inner loop: `R` rows × `T` tokens; each pair's activations are loaded
    /// once per token and used for all `R` rows, and each row's codes once for all tokens.
    macro_rules! rows_fn {
        ($name:ident, $features:literal, $dot:ident, $quads:expr) => {
            /// # Safety
            /// The CPU must have the features named; every row as in `tile_scalar`.
            #[target_feature(enable = $features)]
            pub unsafe fn $name<const R: usize, const T: usize>(rows: &[Row; R], acts: &QuantizedActs, t0: usize, out: &mut [[f32; TILE]; R]) {
                let mask = _mm256_set1_epi8(0x0F);
                let mut acc = [[_mm256_setzero_ps(); T]; R];
                let full_pairs = rows[0].k / 64;
                let sh = rows[0].shift;
                let mut xq = [std::ptr::null::<i8>(); T];
                let mut ls = [std::ptr::null::<f32>(); T];
                let mut lz = [std::ptr::null::<f32>(); T];
                for t in 0..T {
                    xq[t] = acts.token(t0 + t).as_ptr();
                    ls[t] = acts.token_lane_scales(t0 + t).as_ptr();
                    lz[t] = acts.token_lane_sums(t0 + t).as_ptr();
                }
                // `$shared`: both chunks of the pair fall in one group (groups of 64 or more),
                // so the (scale, zero) word is one broadcast instead of two halves put together.
                // The rows after this call's (the next call's, in memory order) are fetched
                // while these are multiplied: a block of rows spans a page or less, and the
                // hardware prefetcher stops at page boundaries, so without this every block
                // started with a wait on memory (perf: 70 % of the kernel's samples on the
                // instruction after the code load, TinyLlama's shape).
                let ahead = rows[R - 1].codes.as_ptr().add(rows[R - 1].codes.len());
                // Pair `p`'s share of those rows: as many bytes as this call's rows have in a pair.
                let prefetch = |p: usize| {
                    for l in 0..(32 * R).div_ceil(64) {
                        _mm_prefetch::<_MM_HINT_T0>(ahead.add(p * 32 * R + 64 * l) as *const i8);
                    }
                };
                macro_rules! pair {
                    ($p:expr, $full:expr, $shared:expr) => {{
                        let p = $p;
                        prefetch(p);
                        for r in 0..R {
                            let c = rows[r].codes.as_ptr().add(p * 32);
                            let v = if $full { _mm256_loadu_si256(c as *const __m256i) } else { _mm256_zextsi128_si256(_mm_loadu_si128(c as *const __m128i)) };
                            let lo = _mm256_and_si256(v, mask);
                            let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
                            let szp = rows[r].sz.as_ptr();
                            // Lanes 0–3 take the first chunk's (scale, zero), 4–7 the second's:
                            // the f16 pairs become (s, z, s, z, ..) in f32, then split.
                            let w = if $shared {
                                _mm256_cvtph_ps(_mm_set1_epi32(*szp.add(p >> (sh - 1)) as i32))
                            } else {
                                let (a, b) = (*szp.add((2 * p) >> sh) as i32, *szp.add((2 * p + 1) >> sh) as i32);
                                _mm256_cvtph_ps(_mm_set_epi32(b, b, a, a))
                            };
                            let (sv, zv) = (_mm256_moveldup_ps(w), _mm256_movehdup_ps(w));
                            for t in 0..T {
                                let x = xq[t].add(p * 64);
                                let xlo = _mm256_loadu_si256(x as *const __m256i);
                                let xhi = _mm256_loadu_si256(x.add(32) as *const __m256i);
                                let d = _mm256_cvtepi32_ps($dot(lo, xlo, hi, xhi));
                                // s · (d·Σcq − z·d·Σq) per lane: the zero point's share is z
                                // times each lane's d·Σq.
                                let dq = _mm256_fnmadd_ps(zv, _mm256_loadu_ps(lz[t].add(p * 8)), _mm256_mul_ps(d, _mm256_loadu_ps(ls[t].add(p * 8))));
                                acc[r][t] = _mm256_fmadd_ps(sv, dq, acc[r][t]);
                            }
                        }
                    }};
                }
                // Several tokens, groups of 64 or more: four pairs at a time, their eight blocks'
                // exact integer sums reduced into one vector (lane order: the four first
                // blocks, then the four second ones) before one conversion and the scaling by
                // vectors, instead of a conversion and three float operations per pair and token
                // (the head's kernel does the same over eight blocks). `$quads`: only where 32
                // vector registers hold a row's four pairs of codes beside the accumulators.
                // Whole pairs only (an odd block count's last pair has half its codes).
                let quads = if $quads && T >= 2 && sh >= 1 { full_pairs / 4 } else { 0 };
                // The eight blocks' scales and `d·Σq` of each token in that lane order.
                let first_then_second = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
                let mut bd = [std::ptr::null::<f32>(); T];
                let mut bs = [std::ptr::null::<f32>(); T];
                for t in 0..T {
                    bd[t] = acts.token_block_scales(t0 + t).as_ptr();
                    bs[t] = acts.token_block_sums(t0 + t).as_ptr();
                }
                for q in 0..quads {
                    let p0 = 4 * q;
                    for p in p0..p0 + 4 {
                        prefetch(p);
                    }
                    let per_token: [(__m256, __m256); T] = std::array::from_fn(|t| {
                        let lanes = |a: *const f32| _mm256_permutevar8x32_ps(_mm256_loadu_ps(a.add(2 * p0)), first_then_second);
                        (lanes(bd[t]), lanes(bs[t]))
                    });
                    for r in 0..R {
                        let c = rows[r].codes.as_ptr().add(p0 * 32);
                        let v: [__m256i; 4] = std::array::from_fn(|i| _mm256_loadu_si256(c.add(32 * i) as *const __m256i));
                        let lo: [__m256i; 4] = std::array::from_fn(|i| _mm256_and_si256(v[i], mask));
                        let hi: [__m256i; 4] = std::array::from_fn(|i| _mm256_and_si256(_mm256_srli_epi16(v[i], 4), mask));
                        // (s, z) of the four pairs as f32 pairs, then [s0..s3, s0..s3] and the same of s·z.
                        let szp = rows[r].sz.as_ptr();
                        let word = |i: usize| *szp.add((p0 + i) >> (sh - 1)) as i32;
                        let w = _mm256_cvtph_ps(_mm_set_epi32(word(3), word(2), word(1), word(0)));
                        let sv = _mm256_permutevar8x32_ps(w, _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6));
                        let zv = _mm256_permutevar8x32_ps(w, _mm256_setr_epi32(1, 3, 5, 7, 1, 3, 5, 7));
                        let szv = _mm256_mul_ps(sv, zv);
                        for t in 0..T {
                            let x = xq[t].add(p0 * 64);
                            let d: [__m256i; 4] = std::array::from_fn(|i| {
                                let xlo = _mm256_loadu_si256(x.add(64 * i) as *const __m256i);
                                let xhi = _mm256_loadu_si256(x.add(64 * i + 32) as *const __m256i);
                                $dot(lo[i], xlo, hi[i], xhi)
                            });
                            let sums = _mm256_hadd_epi32(_mm256_hadd_epi32(d[0], d[1]), _mm256_hadd_epi32(d[2], d[3]));
                            let (qd, qs) = per_token[t];
                            acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_mul_ps(sv, qd), acc[r][t]);
                            acc[r][t] = _mm256_fnmadd_ps(szv, qs, acc[r][t]);
                        }
                    }
                }
                if sh >= 1 {
                    for p in 4 * quads..full_pairs {
                        pair!(p, true, true);
                    }
                } else {
                    for p in 0..full_pairs {
                        pair!(p, true, false);
                    }
                }
                // An odd chunk count's last pair has 16 bytes; the activations past k are zeros
                // with scale 0.
                if full_pairs < acts.pairs {
                    pair!(full_pairs, false, false);
                }
                for r in 0..R {
                    for t in 0..T {
                        out[r][t] = hsum(acc[r][t]);
                    }
                }
            }
        };
    }

    #[inline(always)]
    unsafe fn dot_vnni512(lo: __m256i, xlo: __m256i, hi: __m256i, xhi: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), lo, xlo), hi, xhi)
    }
    #[inline(always)]
    unsafe fn dot_avxvnni(lo: __m256i, xlo: __m256i, hi: __m256i, xhi: __m256i) -> __m256i {
        _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), lo, xlo), hi, xhi)
    }
    #[inline(always)]
    unsafe fn dot_avx2(lo: __m256i, xlo: __m256i, hi: __m256i, xhi: __m256i) -> __m256i {
        // Each i16 holds 4 products of at most 15 · 127 in magnitude: no saturation.
        let p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xlo), _mm256_maddubs_epi16(hi, xhi));
        _mm256_madd_epi16(p, _mm256_set1_epi16(1))
    }

    /// The sum of the eight lanes (q8.rs uses it too).
    #[inline(always)]
    pub(in crate::quant::cpu) unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }

    tile_fn!(tile_avx512vnni, rows_avx512vnni);
    tile_fn!(tile_avxvnni, rows_avxvnni);
    tile_fn!(tile_avx2, rows_avx2);
    rows_fn!(rows_avx512vnni, "avx2,fma,avx512f,avx512vl,avx512vnni", dot_vnni512, true);
    rows_fn!(rows_avxvnni, "avx2,fma,avxvnni", dot_avxvnni, false);
    rows_fn!(rows_avx2, "avx2,fma", dot_avx2, false);
}

#[cfg(target_arch = "aarch64")]
pub(super) mod arm {
    use super::{QuantizedActs, Row, TILE};
    use std::arch::aarch64::*;

    /// `acc + ` the 4-byte dot products of `a` and `b` per i32 lane. `vdotq_s32` is still an
    /// unstable intrinsic, the instruction itself is plain inline assembly.
    #[target_feature(enable = "neon,dotprod")]
    #[inline]
    pub(in crate::quant::cpu) unsafe fn sdot(mut acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
        std::arch::asm!("sdot {0:v}.4s, {1:v}.16b, {2:v}.16b", inout(vreg) acc, in(vreg) a, in(vreg) b, options(pure, nomem, nostack));
        acc
    }

    /// # Safety
    /// The CPU must have NEON and the dot-product extension; arguments as in `tile_scalar`.
    #[target_feature(enable = "neon,dotprod")]
    pub unsafe fn tile_neon_dot<const T: usize>(row: &Row, acts: &QuantizedActs, t0: usize, out: &mut [f32; TILE]) {
        let mask = vdupq_n_u8(0x0F);
        let mut acc = [vdupq_n_f32(0.0); T];
        let mut zero = [0f32; T];
        let cp = row.codes.as_ptr();
        let chunks = row.k / 32;
        for p in 0..acts.pairs {
            for h in 0..2 {
                let c = 2 * p + h;
                if c >= chunks {
                    break;
                }
                // Chunk c: low nibbles are its weights 0..16, high nibbles 16..32; as codes
                // below 16 they are valid signed bytes for `sdot`.
                let v = vld1q_u8(cp.add(c * 16));
                let lo = vreinterpretq_s8_u8(vandq_u8(v, mask));
                let hi = vreinterpretq_s8_u8(vshrq_n_u8(v, 4));
                let (s, z) = row.chunk_sz(c);
                for t in 0..T {
                    let x = acts.token(t0 + t).as_ptr().add(p * 64);
                    // Kernel order: this chunk's 0..16 at 16·h, its 16..32 at 32 + 16·h.
                    let xlo = vld1q_s8(x.add(16 * h));
                    let xhi = vld1q_s8(x.add(32 + 16 * h));
                    let d = sdot(sdot(vdupq_n_s32(0), lo, xlo), hi, xhi);
                    let scale = s * acts.block_scale(t0 + t, c);
                    acc[t] = vfmaq_n_f32(acc[t], vcvtq_f32_s32(d), scale);
                    zero[t] += s * z * acts.token_block_sums(t0 + t)[c];
                }
            }
        }
        for t in 0..T {
            out[t] = vaddvq_f32(acc[t]) - zero[t];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{quantize_codes, QuantScheme};
    use crate::rng::Rng;

    /// f64 over the same quantized activations: the value every path must give up to the
    /// order of its float sums.
    fn reference(w: &PackedQ4, acts: &QuantizedActs) -> Vec<f64> {
        let (n, k) = (w.shape.n, w.shape.k);
        let mut y = vec![0f64; acts.m * n];
        let mut row = vec![0f32; k];
        for o in 0..n {
            w.dequantize_row(o, &mut row);
            for t in 0..acts.m {
                y[t * n + o] = (0..k).map(|i| f64::from(row[i]) * f64::from(acts.value(t, i, false))).sum();
            }
        }
        y
    }

    #[test]
    fn every_path_matches_the_quantized_reference_and_stays_within_the_bound() {
        let mut rng = Rng::new(11);
        // (n, k, group): odd chunk counts (k % 64 = 32), group 32 (two groups in a pair),
        // per-channel, SmolLM2's 576.
        for &(n, k, g) in &[(8, 32, 32), (24, 96, 32), (40, 192, 64), (16, 160, 32), (72, 384, 128), (136, 576, 64), (8, 1536, 1536), (33, 224, 32)] {
            let wf: Vec<f32> = (0..n * k).map(|_| rng.normal() * 0.1).collect();
            let w = PackedQ4::from_quantized(&quantize_codes(&wf, n, k, QuantScheme::new(4, g).unwrap()));
            for m in [1, 2, 3, 4, 5, 9, 17] {
                let x: Vec<f32> = (0..m * k).map(|_| rng.normal()).collect();
                let acts = QuantizedActs::new(&x, m, k, false);
                let want = reference(&w, &acts);
                let exact = w.matmul(&x, m, super::super::Kernel::Scalar);
                let mut row = vec![0f32; k];
                for path in A8Path::available() {
                    let got = matmul(&w, &x, m, path);
                    for t in 0..m {
                        for o in 0..n {
                            let (gv, wv) = (got[t * n + o], want[t * n + o]);
                            w.dequantize_row(o, &mut row);
                            let mag: f64 = (0..k).map(|i| f64::from((row[i] * acts.value(t, i, false)).abs())).sum();
                            // Float sums in another order: a few f32 roundings of the terms.
                            assert!((f64::from(gv) - wv).abs() <= 1e-5 * mag + 1e-6, "{path:?} n={n} k={k} g={g} m={m} t={t} o={o}: {gv} vs {wv}");
                            let bound = error_bound(&row, &acts, t);
                            let e = (gv - exact[t * n + o]).abs();
                            assert!(e <= bound * 1.0001 + 1e-4, "{path:?}: |w4a8 - exact| {e} over the bound {bound}");
                        }
                    }
                }
            }
        }
    }
}
