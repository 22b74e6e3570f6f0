//! The W4A8 kernel over weights in panels of eight rows ([`PanelQ4`], see its layout): the
//! decode path (a few tokens) on x86. Per 32-chunk the panel's four code words are unpacked once
//! for all tokens; each token's eight broadcast 4-byte pieces meet them in eight `vpdpbusd`, and
//! lane `r` then holds row `r`'s exact integer sum of the chunk. The float work per chunk and
//! token is a conversion and two fused multiply-adds for all eight rows:
//! `y_r += s_r·d·(Σ c·q)_r − s_r·z_r·(d·Σ q)`, with the token's block scale `d` and `d·Σq` from
//! [`QuantizedActs`]. The row-major kernel ([`super::w4a8`]) spends per row and chunk pair a
//! conversion, three float operations and (at several tokens) horizontal sums, and ran at about a
//! third of the integer units' rate; this one reads the same bytes.
//!
//! With AVX-512 and `PAIR_MIN_TOKENS` tokens or more, two panels go through 512-bit vectors
//! together (lanes 0–7 one panel's rows, 8–15 the other's), the same operations lane for lane.
//!
//! Same arithmetic as [`super::w4a8`]: identical integer sums, float sums in another order.
//! Activations in the 4-bit kernels' order (see [`super::acts::pair_slot`]): a chunk's 4-byte
//! pieces are contiguous in it too.
use super::acts::QuantizedActs;
use super::w4a8::A8Path;
use super::PackedQ4;
use crate::quant::format::panel::{PanelQ4, PANEL_ROWS};

/// Tokens that share one pass over a panel's codes.
const TOKENS: usize = 8;

/// Tokens from which AVX-512 CPUs take two panels at a time (see [`matmul_acts`]). Below it
/// the call waits on memory, not on instructions, and one panel at a time (one stream of codes,
/// the next panel prefetched) is faster. Measured on the 2-core EPYC VM, SmolLM2's shapes,
/// weights read from memory, two alternated rounds (µs, one panel → pairs): 1 token 14–53 →
/// 16–73, 2 tokens about even, 4 mixed, 6 tokens 33–100 → 27–92, 8 tokens 34–157 → 27–119.
const PAIR_MIN_TOKENS: usize = 6;

/// Whether the panel kernel runs `ws` on `path`: an x86 SIMD path, whole panels of rows, and
/// not turned off with `AWQ_RUN_W4_PANELS=0` (to compare with the row-major kernel).
pub fn applies(ws: &[&PackedQ4], path: A8Path) -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let on = *ON.get_or_init(|| std::env::var("AWQ_RUN_W4_PANELS").map_or(true, |v| v != "0"));
    on && cfg!(target_arch = "x86_64") && matches!(path, A8Path::Avx512Vnni | A8Path::AvxVnni | A8Path::Avx2) && ws.iter().all(|w| PanelQ4::fits(w))
}

/// `y` `[m][Σ n]` of the weights `ws` (each [`PanelQ4::fits`]) on activations in kernel order;
/// `path` one that [`applies`].
pub fn matmul_acts(ws: &[&PackedQ4], acts: &QuantizedActs, path: A8Path) -> Vec<f32> {
    let m = acts.m;
    let panels: Vec<&PanelQ4> = ws.iter().map(|w| w.panels()).collect();
    let mut starts = Vec::with_capacity(ws.len() + 1);
    starts.push(0);
    for w in ws {
        starts.push(starts.last().unwrap() + w.shape.n);
    }
    let n = *starts.last().unwrap();
    // Every weight is whole panels, so rows r .. r + 8 (r a multiple of 8) are one panel.
    let panel_at = |r: usize| {
        let wi = starts.partition_point(|&s| s <= r) - 1;
        let pq = panels[wi];
        let p = (r - starts[wi]) / PANEL_ROWS;
        (pq.panel_codes(p), pq.panel_sz(p), pq.group_size / 32)
    };
    // With AVX-512 and several tokens, two panels at a time (16 rows across a 512-bit vector:
    // half the instructions of two passes over 256-bit ones; the panels may belong to two
    // weights). See PAIR_MIN_TOKENS for where that pays.
    let pairs = path == A8Path::Avx512Vnni && m >= PAIR_MIN_TOKENS;
    let block = if pairs { 2 * PANEL_ROWS } else { PANEL_ROWS };
    super::par_output_blocks(
        m,
        n,
        block,
        // The tile's outputs, once per task rather than zeroed per block.
        || [[0f32; 2 * PANEL_ROWS]; TOKENS],
        |y, rows, out| {
            let (a, b) = (panel_at(rows.start), (rows.len() > PANEL_ROWS).then(|| panel_at(rows.start + PANEL_ROWS)));
            let mut t0 = 0;
            while t0 < m {
                let tile = TOKENS.min(m - t0);
                match b {
                    Some(b) => pair_tile(a, b, acts, t0, tile, y),
                    None => panel_tile(path, a.0, a.1, a.2, acts, t0, tile, y),
                }
                for (t, yt) in y[..tile].iter().enumerate() {
                    out.put_run(t0 + t, rows.start, &yt[..rows.len()]);
                }
                t0 += tile;
            }
        },
    )
}

/// One panel's codes, its scales and zeros, and chunks per group.
type PanelRef<'a> = (&'a [u8], &'a [half::f16], usize);

/// Two panels (rows `0..8` of `y` from `a`, `8..16` from `b`) on the AVX512-VNNI path.
fn pair_tile(a: PanelRef, b: PanelRef, acts: &QuantizedActs, t0: usize, tile: usize, y: &mut [[f32; 2 * PANEL_ROWS]; TOKENS]) {
    assert!(a.0.len() == b.0.len() && a.2 == b.2, "paired panels of different shapes");
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: pairs are formed only on the AVX512-VNNI path, which `applies` admits only
        // where `A8Path::available` lists it.
        const_tokens!(tile, T => unsafe { x86::pair_avx512vnni::<T>(a.0, b.0, a.1, b.1, a.2, acts, t0, y) })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (a, b, acts, t0, tile, y);
        unreachable!("the panel kernel runs only on x86");
    }
}

#[allow(clippy::too_many_arguments)]
fn panel_tile(path: A8Path, codes: &[u8], sz: &[half::f16], group_chunks: usize, acts: &QuantizedActs, t0: usize, tile: usize, y: &mut [[f32; 2 * PANEL_ROWS]; TOKENS]) {
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! dispatch {
            ($f:ident) => {
                // SAFETY: `applies` admits only paths `A8Path::available` lists on this CPU.
                const_tokens!(tile, T => unsafe { x86::$f::<T>(codes, sz, group_chunks, acts, t0, y) })
            };
        }
        match path {
            A8Path::Avx512Vnni => dispatch!(panel_avx512vnni),
            A8Path::AvxVnni => dispatch!(panel_avxvnni),
            A8Path::Avx2 => dispatch!(panel_avx2),
            _ => unreachable!("the panel kernel runs only the paths `applies` admits"),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (path, codes, sz, group_chunks, acts, t0, tile, y);
        unreachable!("the panel kernel runs only on x86");
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{QuantizedActs, PANEL_ROWS, TOKENS};
    use half::f16;
    use std::arch::x86_64::*;

    macro_rules! panel_fn {
        ($name:ident, $features:literal, $unpack:ident, $dot:ident) => {
            /// # Safety
            /// The CPU must have the features named; `codes` and `sz` one panel's, `acts` in
            /// kernel order with tokens `t0 .. t0 + T`.
            #[target_feature(enable = $features)]
            pub unsafe fn $name<const T: usize>(codes: &[u8], sz: &[f16], group_chunks: usize, acts: &QuantizedActs, t0: usize, y: &mut [[f32; 2 * PANEL_ROWS]; TOKENS]) {
                let chunks = codes.len() / 128;
                debug_assert!(sz.len() * group_chunks >= chunks * 2 * PANEL_ROWS);
                let cp = codes.as_ptr();
                let mut acc = [_mm256_setzero_ps(); T];
                let rows = acts.tile_rows::<T>(t0, chunks);
                let (xp, bd, bs) = (rows.q, rows.scales, rows.sums);
                // The next panel is fetched while this one is multiplied (the hardware
                // prefetcher stops at page boundaries; see the row-major kernel).
                let ahead = cp.add(codes.len());
                let (mut sv, mut szv) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                for c in 0..chunks {
                    _mm_prefetch::<_MM_HINT_T0>(ahead.add(c * 128) as *const i8);
                    _mm_prefetch::<_MM_HINT_T0>(ahead.add(c * 128 + 64) as *const i8);
                    if c % group_chunks == 0 {
                        let at = sz.as_ptr().add(c / group_chunks * 2 * PANEL_ROWS) as *const __m128i;
                        sv = _mm256_cvtph_ps(_mm_loadu_si128(at));
                        szv = _mm256_mul_ps(sv, _mm256_cvtph_ps(_mm_loadu_si128(at.add(1))));
                    }
                    let words: [__m256i; 4] = std::array::from_fn(|j| _mm256_loadu_si256(cp.add(c * 128 + 32 * j) as *const __m256i));
                    let (lo, hi) = $unpack(&words);
                    // The chunk's pieces in kernel order: inputs 0..16 of an even chunk at 0 of
                    // its pair, of an odd one at 16; inputs 16..32 32 bytes further.
                    let off = (c / 2) * 64 + (c % 2) * 16;
                    for t in 0..T {
                        let x = xp[t].add(off);
                        let sums = $dot(&lo, &hi, x);
                        let d = _mm256_set1_ps(*bd[t].add(c));
                        acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_mul_ps(sv, d), acc[t]);
                        acc[t] = _mm256_fnmadd_ps(szv, _mm256_set1_ps(*bs[t].add(c)), acc[t]);
                    }
                }
                for t in 0..T {
                    _mm256_storeu_ps(y[t].as_mut_ptr(), acc[t]);
                }
            }
        };
    }

    #[inline(always)]
    unsafe fn piece(x: *const i8, at: usize) -> __m256i {
        _mm256_set1_epi32((x.add(at) as *const i32).read_unaligned())
    }

    /// For `vpdpbusd`: the low nibbles, and the high ones left in place (16 times the code, at
    /// most 240: the instruction's unsigned operand takes it, and the sum is divided back exactly).
    #[inline(always)]
    unsafe fn unpack_shifted(words: &[__m256i; 4]) -> ([__m256i; 4], [__m256i; 4]) {
        let (lo_mask, hi_mask) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(0xF0u8 as i8));
        (std::array::from_fn(|j| _mm256_and_si256(words[j], lo_mask)), std::array::from_fn(|j| _mm256_and_si256(words[j], hi_mask)))
    }

    /// For `vpmaddubsw` (which saturates i16): both nibbles as codes 0..15.
    #[inline(always)]
    unsafe fn unpack_codes(words: &[__m256i; 4]) -> ([__m256i; 4], [__m256i; 4]) {
        let mask = _mm256_set1_epi8(0x0F);
        (std::array::from_fn(|j| _mm256_and_si256(words[j], mask)), std::array::from_fn(|j| _mm256_and_si256(_mm256_srli_epi16(words[j], 4), mask)))
    }

    macro_rules! vnni_dot {
        ($name:ident, $dp:ident) => {
            /// The chunk's eight row sums: two chains of four (low and high nibbles), the high
            /// one divided by 16 (exact: every term is a multiple of 16).
            #[inline(always)]
            unsafe fn $name(lo: &[__m256i; 4], hi: &[__m256i; 4], x: *const i8) -> __m256i {
                let (mut a, mut b) = (_mm256_setzero_si256(), _mm256_setzero_si256());
                for j in 0..4 {
                    a = $dp(a, lo[j], piece(x, 4 * j));
                    b = $dp(b, hi[j], piece(x, 32 + 4 * j));
                }
                _mm256_add_epi32(a, _mm256_srai_epi32(b, 4))
            }
        };
    }
    vnni_dot!(dot_vnni512, _mm256_dpbusd_epi32);
    vnni_dot!(dot_avxvnni, _mm256_dpbusd_avx_epi32);

    /// AVX2: `vpmaddubsw` pairs (at most 2 · 15 · 127, no saturation) summed to i32 by `vpmaddwd`.
    #[inline(always)]
    unsafe fn dot_avx2(lo: &[__m256i; 4], hi: &[__m256i; 4], x: *const i8) -> __m256i {
        let mut p = _mm256_setzero_si256();
        for j in 0..4 {
            p = _mm256_add_epi16(p, _mm256_maddubs_epi16(lo[j], piece(x, 4 * j)));
            p = _mm256_add_epi16(p, _mm256_maddubs_epi16(hi[j], piece(x, 32 + 4 * j)));
        }
        _mm256_madd_epi16(p, _mm256_set1_epi16(1))
    }

    panel_fn!(panel_avx512vnni, "avx2,fma,f16c,avx512f,avx512vl,avx512vnni", unpack_shifted, dot_vnni512);
    panel_fn!(panel_avxvnni, "avx2,fma,f16c,avxvnni", unpack_shifted, dot_avxvnni);
    panel_fn!(panel_avx2, "avx2,fma,f16c", unpack_codes, dot_avx2);

    /// Two panels side by side in 512-bit vectors: lanes 0–7 rows of `ca`, lanes 8–15 rows of
    /// `cb`; otherwise the arithmetic of the 256-bit kernels, lane for lane.
    ///
    /// # Safety
    /// The CPU must have AVX512F, AVX512VL, AVX512-VNNI and F16C; `ca`/`cb` and `sa`/`sb` two
    /// panels' codes and scales of the same shape, `acts` in kernel order with tokens
    /// `t0 .. t0 + T`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
    pub unsafe fn pair_avx512vnni<const T: usize>(ca: &[u8], cb: &[u8], sa: &[f16], sb: &[f16], group_chunks: usize, acts: &QuantizedActs, t0: usize, y: &mut [[f32; 2 * PANEL_ROWS]; TOKENS]) {
        let chunks = ca.len() / 128;
        debug_assert!(cb.len() == ca.len() && sa.len() == sb.len() && sa.len() * group_chunks >= chunks * 2 * PANEL_ROWS);
        let (pa, pb) = (ca.as_ptr(), cb.as_ptr());
        let mut acc = [_mm512_setzero_ps(); T];
        let rows = acts.tile_rows::<T>(t0, chunks);
        let (xp, bd, bs) = (rows.q, rows.scales, rows.sums);
        // The two panels after `b` in memory, fetched while these are multiplied: where `a` and
        // `b` are neighbours (all but a block that spans two weights), the next block's rows.
        // (Prefetches do not fault; the addresses past a weight's end are only never used.)
        let (ahead_a, ahead_b) = (pb.wrapping_add(cb.len()), pb.wrapping_add(2 * cb.len()));
        let (lo_mask, hi_mask) = (_mm512_set1_epi8(0x0F), _mm512_set1_epi8(0xF0u8 as i8));
        let (mut sv, mut szv) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        // (A macro, not a closure: a closure would not inherit this function's target features.)
        macro_rules! both_ph {
            ($p:expr, $q:expr) => {{
                let lo = _mm256_cvtph_ps(_mm_loadu_si128($p as *const __m128i));
                let hi = _mm256_cvtph_ps(_mm_loadu_si128($q as *const __m128i));
                _mm512_castpd_ps(_mm512_insertf64x4::<1>(_mm512_castps_pd(_mm512_castps256_ps512(lo)), _mm256_castps_pd(hi)))
            }};
        }
        for c in 0..chunks {
            _mm_prefetch::<_MM_HINT_T0>(ahead_a.wrapping_add(c * 128) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(ahead_a.wrapping_add(c * 128 + 64) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(ahead_b.wrapping_add(c * 128) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(ahead_b.wrapping_add(c * 128 + 64) as *const i8);
            if c % group_chunks == 0 {
                let at = c / group_chunks * 2 * PANEL_ROWS;
                sv = both_ph!(sa.as_ptr().add(at), sb.as_ptr().add(at));
                szv = _mm512_mul_ps(sv, both_ph!(sa.as_ptr().add(at + PANEL_ROWS), sb.as_ptr().add(at + PANEL_ROWS)));
            }
            let mut words = [_mm512_setzero_si512(); 4];
            for (j, w) in words.iter_mut().enumerate() {
                let lo = _mm256_loadu_si256(pa.add(c * 128 + 32 * j) as *const __m256i);
                let hi = _mm256_loadu_si256(pb.add(c * 128 + 32 * j) as *const __m256i);
                *w = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi);
            }
            let (mut lo, mut hi) = ([_mm512_setzero_si512(); 4], [_mm512_setzero_si512(); 4]);
            for j in 0..4 {
                lo[j] = _mm512_and_si512(words[j], lo_mask);
                hi[j] = _mm512_and_si512(words[j], hi_mask);
            }
            let off = (c / 2) * 64 + (c % 2) * 16;
            for t in 0..T {
                let x = xp[t].add(off);
                let (mut s_lo, mut s_hi) = (_mm512_setzero_si512(), _mm512_setzero_si512());
                for j in 0..4 {
                    s_lo = _mm512_dpbusd_epi32(s_lo, lo[j], _mm512_set1_epi32((x.add(4 * j) as *const i32).read_unaligned()));
                    s_hi = _mm512_dpbusd_epi32(s_hi, hi[j], _mm512_set1_epi32((x.add(32 + 4 * j) as *const i32).read_unaligned()));
                }
                let sums = _mm512_add_epi32(s_lo, _mm512_srai_epi32::<4>(s_hi));
                let d = _mm512_set1_ps(*bd[t].add(c));
                acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_mul_ps(sv, d), acc[t]);
                acc[t] = _mm512_fnmadd_ps(szv, _mm512_set1_ps(*bs[t].add(c)), acc[t]);
            }
        }
        for t in 0..T {
            _mm512_storeu_ps(y[t].as_mut_ptr(), acc[t]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{quantize_codes, QuantScheme};
    use crate::rng::Rng;

    /// Every x86 path against the exact sum of the dequantized weight times the quantized
    /// activations, on awkward shapes (one chunk, odd chunk counts, groups of 32 to 128 and not a
    /// power of two) and token counts below, at and past a tile (one panel at a time below
    /// `PAIR_MIN_TOKENS`, two from it, pairs that span two weights and a last panel alone);
    /// several weights in one call.
    #[test]
    fn every_path_matches_the_quantized_reference() {
        let mut rng = Rng::new(17);
        for &(n, k, g) in &[(8usize, 32usize, 32usize), (24, 96, 32), (16, 576, 64), (40, 384, 128), (8, 288, 96), (16, 2048, 128)] {
            let make = |rng: &mut Rng, n: usize| {
                let wf: Vec<f32> = (0..n * k).map(|_| rng.normal() * 0.05).collect();
                PackedQ4::from_quantized(&quantize_codes(&wf, n, k, QuantScheme::new(4, g).unwrap()))
            };
            let (a, b) = (make(&mut rng, n), make(&mut rng, 2 * n));
            let ws = [&a, &b];
            let paths: Vec<A8Path> = A8Path::available().into_iter().filter(|&p| applies(&ws, p)).collect();
            for m in [1, 3, 8, 11] {
                let x: Vec<f32> = (0..m * k).map(|_| rng.normal()).collect();
                let acts = QuantizedActs::new(&x, m, k, false);
                for &path in &paths {
                    let y = matmul_acts(&ws, &acts, path);
                    let total = 3 * n;
                    let mut row = vec![0f32; k];
                    for t in 0..m {
                        for o in 0..total {
                            let (w, lo) = if o < n { (&a, o) } else { (&b, o - n) };
                            w.dequantize_row(lo, &mut row);
                            let terms: Vec<f64> = (0..k).map(|i| f64::from(row[i]) * f64::from(acts.value(t, i, false))).collect();
                            let want: f64 = terms.iter().sum();
                            let mag: f64 = terms.iter().map(|v| v.abs()).sum();
                            let got = f64::from(y[t * total + o]);
                            assert!((got - want).abs() <= 1e-5 * mag + 1e-6, "{path:?} n={n} k={k} g={g} m={m} row {o}: {got} vs {want}");
                        }
                    }
                }
            }
        }
    }
}
