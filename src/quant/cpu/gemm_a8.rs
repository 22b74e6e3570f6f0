//! The W4A8 GEMM for prompts (AVX512-VNNI): the same numbers as the W4A8 GEMV of [`super::w4a8`]
//! (activations in int8 per 32-block, exact integer sums per block, scales applied per block),
//! arranged for many tokens.
//!
//! The GEMV puts the 32 weights of a chunk across one vector and sums them horizontally; with many
//! tokens it is better to put **rows** across the vector. Each thread takes panels of
//! [`PANEL_ROWS`] output rows, unpacks their 4-bit codes once into `vpdpbusd`'s operand layout (a
//! 64-byte vector holds 4 consecutive codes of each of 16 rows, as unsigned bytes), and then runs
//! every token of the call against the panel, [`TOKENS`] at a time: chunk by chunk the panel's
//! codes sit in registers while each token of the block brings, per 4 inputs, one broadcast of its
//! 4 int8 activations and one `vpdpbusd` per 16 rows. Per 32-block the integer sums of each
//! (row, token) are converted once and scaled by the row's group scale times the block's
//! activation scale, and the zero point's share subtracted (`s·z` times the block's `d·Σq`) — 4
//! float operations per 8 `vpdpbusd`. The panel (32 rows × k codes) stays in L1/L2 while the
//! tokens stream past it.
use super::acts::QuantizedActs;
use super::super::format::packed::ScaleTable;
use super::{pool, PackedQ4, RowMap};

/// Output rows of one panel (two 16-lane vectors).
pub const PANEL_ROWS: usize = 32;
/// Tokens that meet a panel's codes, held in registers, chunk by chunk (their float sums stay
/// in L1: 4 KiB).
pub const TOKENS: usize = 32;

/// Whether this CPU runs the GEMM (AVX-512 with VNNI and byte/word instructions).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// One panel's weights in the kernel's layout.
struct Panel {
    /// Per 32-chunk, per 4-input step (8), per row half (2): 16 rows' 4 codes as a u32 each
    /// (read by the x86 tile only; elsewhere the GEMM is never chosen, see `available`).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    codes: Vec<u32>,
    /// Per group: the 32 rows' scales, then their `scale · zero`.
    scales: Vec<f32>,
    zeros: Vec<f32>,
    /// Rows of the panel that exist (the last panel may be short; the rest are zero).
    rows: usize,
    /// Packed codes of a row of zeros, read in place of the rows a short panel lacks.
    zero_row: Vec<u8>,
}

impl Panel {
    fn new(k: usize, groups: usize) -> Self {
        Self {
            codes: vec![0; k / 32 * 8 * PANEL_ROWS],
            scales: vec![0.0; groups * PANEL_ROWS],
            zeros: vec![0.0; groups * PANEL_ROWS],
            rows: 0,
            zero_row: vec![0; k / 2],
        }
    }

    /// Unpacks global rows `r0 ..` (up to [`PANEL_ROWS`], fewer at the end of `map`).
    ///
    /// This runs once per panel per call, whatever the token count, so at a few tokens it is a
    /// large share of the GEMM's time: the codes are transposed with vector shuffles
    /// ([`x86::unpack_codes`]), not moved one word at a time.
    fn fill(&mut self, map: &RowMap, r0: usize, k: usize, groups: usize) {
        self.rows = PANEL_ROWS.min(map.n - r0);
        self.scales.fill(0.0);
        self.zeros.fill(0.0);
        let mut rows: [&[u8]; PANEL_ROWS] = [&self.zero_row; PANEL_ROWS];
        for (i, row) in rows.iter_mut().enumerate().take(self.rows) {
            let (w, o) = map.locate(r0 + i);
            let table = w.scale_table();
            let g = w.groups();
            for gi in 0..groups {
                let (sc, z) = ScaleTable::unpack(table.sz[o * (g + 1) + gi]);
                self.scales[gi * PANEL_ROWS + i] = sc;
                self.zeros[gi * PANEL_ROWS + i] = sc * z;
            }
            *row = &w.codes[o * k / 2..(o + 1) * k / 2];
        }
        // SAFETY: the GEMM runs only where `available()` holds (AVX512F and BW); every row
        // holds k / 2 bytes and `codes` k / 32 · 8 · PANEL_ROWS words.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            x86::unpack_codes(&rows, k / 32, &mut self.codes)
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = rows;
    }
}

/// `y[t][o]` (`[m][Σ n]`) for the weights `ws` (same `k` and group size) on activations quantized
/// in natural order (`QuantizedActs::new(.., true)`); [`available`] must hold.
pub fn matmul_many(ws: &[&PackedQ4], acts: &QuantizedActs) -> Vec<f32> {
    assert!(available(), "the W4A8 GEMM needs AVX512-VNNI");
    let (m, k) = (acts.m, acts.k);
    let gsize = ws[0].shape.group_size;
    assert!(ws.iter().all(|w| w.shape.k == k && w.shape.group_size == gsize), "fused 4-bit weights of different shapes");
    let map = RowMap::new(ws);
    let n = map.n;
    let groups = k / gsize;
    // Not zeroed: every tile stores all its rows for each of its tokens (a prompt's output is
    // megabytes, zeroed on the calling thread alone).
    let mut y = super::Unstored::new(m, n);
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
    let y_ptr = y.ptr();
    pool::for_ranges(n.div_ceil(PANEL_ROWS), 1, |panels| {
        let mut panel = Panel::new(k, groups);
        for p in panels {
            panel.fill(&map, p * PANEL_ROWS, k, groups);
            let mut t0 = 0;
            while t0 < m {
                let tile = TOKENS.min(m - t0);
                // SAFETY: `available()` was checked above; this task owns output columns
                // p·32 .. p·32 + rows of every token row.
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    let out = Out { y: y_ptr, n, r0: p * PANEL_ROWS, rows: panel.rows };
                    x86::block(&panel, acts, t0, tile, gsize / 32, &out);
                }
                t0 += tile;
            }
        }
    });
    // SAFETY: the panels cover all n rows and the tiles all m tokens, and a tile stores every
    // row of its panel for each of its tokens.
    unsafe { y.all_stored() }
}

/// Where a tile writes: `y[t][r0 + i]` for `i < rows`, rows of `n`.
#[cfg(target_arch = "x86_64")]
struct Out {
    y: super::SendPtr,
    n: usize,
    r0: usize,
    rows: usize,
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Out, Panel, QuantizedActs, PANEL_ROWS, TOKENS};
    use std::arch::x86_64::*;

    /// Writes `codes` in [`Panel`]'s layout from 32 rows of packed codes (`k / 2` bytes each,
    /// chunk `c`'s byte `j` holding input `j` in its low nibble and input `j + 16` in its high
    /// one). Per chunk and 16 rows: the rows' 16 bytes (4 words each) are a 16 × 4 matrix of
    /// words, transposed in registers into one vector per word (step), whose low nibbles are
    /// steps 0–3 and high nibbles steps 4–7.
    ///
    /// # Safety
    /// The CPU must have AVX512F; every row must hold `chunks · 16` bytes and `codes` at least
    /// `chunks · 8 · PANEL_ROWS` words.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn unpack_codes(rows: &[&[u8]; PANEL_ROWS], chunks: usize, codes: &mut [u32]) {
        debug_assert!(rows.iter().all(|r| r.len() >= chunks * 16) && codes.len() >= chunks * 8 * PANEL_ROWS);
        // Within 4 rows' 16 words (row-major), word w of row r goes to position 4w + r.
        let by_word = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
        let nibbles = _mm512_set1_epi32(0x0F0F_0F0F);
        let out = codes.as_mut_ptr();
        for half in 0..2 {
            let r = &rows[half * 16..half * 16 + 16];
            for c in 0..chunks {
                // (No closures here: they would not inherit this function's target features.)
                let mut p = [std::ptr::null::<__m128i>(); 16];
                for (p, row) in p.iter_mut().zip(r) {
                    *p = row.as_ptr().add(c * 16) as *const __m128i;
                }
                // Sixteen rows are read side by side, more streams than the hardware prefetcher
                // follows: ask for each row's line 8 chunks (two lines) ahead, once per line.
                if c % 4 == 0 && c + 8 < chunks {
                    for row in r {
                        _mm_prefetch::<_MM_HINT_T0>(row.as_ptr().add((c + 8) * 16) as *const i8);
                    }
                }
                // b[j]'s 128-bit lane w: word w of rows 4j .. 4j + 3.
                let mut b = [_mm512_setzero_si512(); 4];
                for (j, b) in b.iter_mut().enumerate() {
                    let mut a = _mm512_castsi128_si512(_mm_loadu_si128(p[4 * j]));
                    a = _mm512_inserti32x4::<1>(a, _mm_loadu_si128(p[4 * j + 1]));
                    a = _mm512_inserti32x4::<2>(a, _mm_loadu_si128(p[4 * j + 2]));
                    a = _mm512_inserti32x4::<3>(a, _mm_loadu_si128(p[4 * j + 3]));
                    *b = _mm512_permutexvar_epi32(by_word, a);
                }
                let words = [word::<0x00>(&b), word::<0x55>(&b), word::<0xAA>(&b), word::<0xFF>(&b)];
                for (s, v) in words.into_iter().enumerate() {
                    let low = _mm512_and_si512(v, nibbles);
                    let high = _mm512_and_si512(_mm512_srli_epi32::<4>(v), nibbles);
                    _mm512_storeu_si512(out.add(((c * 8 + s) * 2 + half) * 16) as *mut __m512i, low);
                    _mm512_storeu_si512(out.add(((c * 8 + s + 4) * 2 + half) * 16) as *mut __m512i, high);
                }
            }
        }
    }

    /// Word `S & 3` of all 16 rows: lane `S & 3` of each of `b[0..4]`, side by side (`S` repeats
    /// the lane in all four 2-bit fields of the shuffle's immediate).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn word<const S: i32>(b: &[__m512i; 4]) -> __m512i {
        let x = _mm512_shuffle_i32x4::<S>(b[0], b[1]);
        let y = _mm512_shuffle_i32x4::<S>(b[2], b[3]);
        // Lanes 0 and 2 of x, then of y.
        _mm512_shuffle_i32x4::<0x88>(x, y)
    }

    /// Tokens `t0 .. t0 + tb` (`tb` ≤ [`TOKENS`]) against one panel; `cpg` chunks per group.
    ///
    /// Chunk by chunk, the panel's 16 code vectors of the chunk are loaded once into registers
    /// and every token of the block meets them: 8 broadcasts of its 4-byte pieces, 16
    /// `vpdpbusd`, then the float update of its 32 sums (kept in `acc`, on the stack: a token's
    /// two vectors are read and written once per chunk, which the load/store units absorb).
    /// Holding the codes rather than the tokens' sums in registers is what keeps the integer
    /// units busy: with a few tokens' sums held instead, the compiler ran out of registers and
    /// moved the broadcasts through the stack.
    ///
    /// # Safety
    /// The CPU must have AVX512F, AVX512BW and AVX512-VNNI; the output columns of the panel
    /// belong to the caller.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn block(p: &Panel, acts: &QuantizedActs, t0: usize, tb: usize, cpg: usize, out: &Out) {
        debug_assert!(tb <= TOKENS);
        let chunks = acts.k / 32;
        let mut acc = [[_mm512_setzero_ps(); 2]; TOKENS];
        // Per token: its int8 values, and per 32-block its scale `d` and `d·Σq`.
        let (stride, bstride) = (acts.pairs * 64, acts.pairs * 2);
        let xq = acts.q.as_ptr().add(t0 * stride);
        let ds = acts.block_scales.as_ptr().add(t0 * bstride);
        let bs = acts.block_sums.as_ptr().add(t0 * bstride);
        let codes = p.codes.as_ptr();
        for c in 0..chunks {
            let wc = codes.add(c * 8 * PANEL_ROWS);
            let mut w = [_mm512_setzero_si512(); 16];
            for (i, w) in w.iter_mut().enumerate() {
                *w = _mm512_loadu_si512(wc.add(i * 16) as *const __m512i);
            }
            let g = c / cpg;
            let sc = [_mm512_loadu_ps(p.scales.as_ptr().add(g * PANEL_ROWS)), _mm512_loadu_ps(p.scales.as_ptr().add(g * PANEL_ROWS + 16))];
            let sz = [_mm512_loadu_ps(p.zeros.as_ptr().add(g * PANEL_ROWS)), _mm512_loadu_ps(p.zeros.as_ptr().add(g * PANEL_ROWS + 16))];
            for (t, acc) in acc.iter_mut().enumerate().take(tb) {
                let x = xq.add(t * stride + c * 32) as *const i32;
                let (mut s0, mut s1) = (_mm512_setzero_si512(), _mm512_setzero_si512());
                for s in 0..8 {
                    let b = _mm512_set1_epi32(x.add(s).read_unaligned());
                    s0 = _mm512_dpbusd_epi32(s0, w[2 * s], b);
                    s1 = _mm512_dpbusd_epi32(s1, w[2 * s + 1], b);
                }
                let d = _mm512_set1_ps(*ds.add(t * bstride + c));
                let zb = _mm512_set1_ps(*bs.add(t * bstride + c));
                acc[0] = _mm512_fnmadd_ps(sz[0], zb, _mm512_fmadd_ps(_mm512_cvtepi32_ps(s0), _mm512_mul_ps(sc[0], d), acc[0]));
                acc[1] = _mm512_fnmadd_ps(sz[1], zb, _mm512_fmadd_ps(_mm512_cvtepi32_ps(s1), _mm512_mul_ps(sc[1], d), acc[1]));
            }
        }
        for (t, a) in acc.iter().enumerate().take(tb) {
            for (h, v) in a.iter().enumerate() {
                let first = 16 * h;
                if first >= out.rows {
                    break;
                }
                let n_valid = (out.rows - first).min(16);
                let mask: __mmask16 = if n_valid == 16 { 0xFFFF } else { (1u16 << n_valid) - 1 };
                _mm512_mask_storeu_ps(out.y.0.add((t0 + t) * out.n + out.r0 + first), mask, *v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{quantize_codes, QuantScheme};
    use crate::rng::Rng;

    #[test]
    fn matches_the_reference_on_the_same_quantized_activations() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX512-VNNI");
            return;
        }
        let mut rng = Rng::new(5);
        // (n per weight, k, group): rows that fill no panel and part of one, odd chunk counts,
        // groups of 1, 2, 3 and 4 chunks and per-channel, SmolLM2's widths.
        for &(ns, k, g) in &[(&[40usize][..], 96usize, 32usize), (&[24, 16][..], 192, 64), (&[72][..], 384, 128), (&[33 * 8 - 8][..], 96, 96), (&[8][..], 576, 576), (&[64, 16, 16][..], 576, 64)] {
            let ws: Vec<PackedQ4> = ns
                .iter()
                .map(|&n| {
                    let wf: Vec<f32> = (0..n * k).map(|_| rng.normal() * 0.1).collect();
                    PackedQ4::from_quantized(&quantize_codes(&wf, n, k, QuantScheme::new(4, g).unwrap()))
                })
                .collect();
            let refs: Vec<&PackedQ4> = ws.iter().collect();
            let total: usize = ns.iter().sum();
            for m in [1, 5, 6, 7, 13, 70] {
                let x: Vec<f32> = (0..m * k).map(|_| rng.normal()).collect();
                let acts = QuantizedActs::new(&x, m, k, true);
                let y = matmul_many(&refs, &acts);
                let mut row = vec![0f32; k];
                let mut o0 = 0;
                for w in &ws {
                    for o in 0..w.shape.n {
                        w.dequantize_row(o, &mut row);
                        for t in 0..m {
                            let want: f64 = (0..k).map(|i| f64::from(row[i]) * f64::from(acts.value(t, i, true))).sum();
                            let mag: f64 = (0..k).map(|i| f64::from((row[i] * acts.value(t, i, true)).abs())).sum();
                            let got = f64::from(y[t * total + o0 + o]);
                            assert!((got - want).abs() <= 1e-5 * mag + 1e-6, "n={ns:?} k={k} g={g} m={m} t={t} row {}: {got} vs {want}", o0 + o);
                        }
                    }
                    o0 += w.shape.n;
                }
            }
        }
    }
}
