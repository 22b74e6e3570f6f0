// Dequantization of the tiled layout's words (see the top of w4a16.cu), shared by the GEMV and
// GEMM kernels of w4a16.cu, the skinny GEMMs and the Hopper GEMM of w4a16_sm90.cu.
#pragma once
#include "common.cuh"

// Dequantized fragments of one word: tile 2i (b0, b1) and tile 2i+1 (b0, b1), as half2.
// zl = 1024 + zero, zh = -(64 + zero), s = scale (as half2 pairs) of the two tiles' rows.
struct Dq {
    __half2 a0, a1, b0, b1;
    // The two tiles as the m16k16 A operand of mma.sync and wgmma (rows r of tile 2i, r + 8 of
    // tile 2i + 1): a0, b0, a1, b1.
    __device__ __forceinline__ void a_operand(uint32_t (&a)[4]) const {
        a[0] = as_u32(a0);
        a[1] = as_u32(b0);
        a[2] = as_u32(a1);
        a[3] = as_u32(b1);
    }
};
__device__ __forceinline__ Dq dequant_word(uint32_t w, __half2 zlA, __half2 zhA, __half2 sA, __half2 zlB,
                                           __half2 zhB, __half2 sB) {
    const __half2 sixteenth = __float2half2_rn(0.0625f);
    Dq d;
    uint32_t lo = lop3_and_or(w, 0x000F000Fu, 0x64006400u);
    uint32_t hi = lop3_and_or(w, 0x00F000F0u, 0x64006400u);
    d.a0 = __hmul2(__hsub2(as_h2(lo), zlA), sA);
    d.a1 = __hmul2(__hfma2(as_h2(hi), sixteenth, zhA), sA);
    w >>= 8;
    lo = lop3_and_or(w, 0x000F000Fu, 0x64006400u);
    hi = lop3_and_or(w, 0x00F000F0u, 0x64006400u);
    d.b0 = __hmul2(__hsub2(as_h2(lo), zlB), sB);
    d.b1 = __hmul2(__hfma2(as_h2(hi), sixteenth, zhB), sB);
    return d;
}

// As dequant_word without the scales: the exact integers q - zero (the GEMV scales its per-group
// sums once instead, in f32).
__device__ __forceinline__ Dq dequant_word_unscaled(uint32_t w, __half2 zlA, __half2 zhA, __half2 zlB, __half2 zhB) {
    const __half2 sixteenth = __float2half2_rn(0.0625f);
    Dq d;
    uint32_t lo = lop3_and_or(w, 0x000F000Fu, 0x64006400u);
    uint32_t hi = lop3_and_or(w, 0x00F000F0u, 0x64006400u);
    d.a0 = __hsub2(as_h2(lo), zlA);
    d.a1 = __hfma2(as_h2(hi), sixteenth, zhA);
    w >>= 8;
    lo = lop3_and_or(w, 0x000F000Fu, 0x64006400u);
    hi = lop3_and_or(w, 0x00F000F0u, 0x64006400u);
    d.b0 = __hsub2(as_h2(lo), zlB);
    d.b1 = __hfma2(as_h2(hi), sixteenth, zhB);
    return d;
}

// The (scale, zero) pair of a row as the half2 constants dequant_word wants.
__device__ __forceinline__ void sz_consts(__half2 sz, __half2& zl, __half2& zh, __half2& s) {
    const __half z = __high2half(sz);
    s = __half2half2(__low2half(sz));
    zl = __half2half2(__hadd(z, __float2half(1024.f)));
    zh = __half2half2(__hneg(__hadd(z, __float2half(64.f))));
}
