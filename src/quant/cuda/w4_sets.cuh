// The pieces every kernel on the tiled layout (see the top of w4a16.cu) shares around its
// main loop: the weights of one launch and which of them a block works on, and the store of a
// warp's MMA totals. Included by w4a16.cu and w4a16_skinny.cu.
#pragma once
#include "common.cuh"

// Up to three weights that share an input; their outputs are concatenated along n.
struct W4Sets {
    unsigned long long q[3];   // tiled codes (uint4 units)
    unsigned long long sz[3];  // half2 (scale, zero) [groups][np]
    int n[3];                  // true output rows
    int np[3];                 // padded rows (multiple of 64)
    int block_start[4];        // first block of each set; block_start[3] = grid size
};

// The weight a block works on: block b of the launch is row range nb of set `set` (ranges of
// the kernel's own height: 64 rows for the GEMVs, 256 for the skinny GEMM).
struct GemvRows {
    const uint32_t* q;
    const __half2* sz;
    int nb, n, np, out_off;
};
__device__ __forceinline__ GemvRows gemv_rows(const W4Sets& ws, int b) {
    const int set = b < ws.block_start[1] ? 0 : (b < ws.block_start[2] ? 1 : 2);
    // Selects, not indexing: a run-time index would copy the parameter struct to local memory.
#define PICK(a) (set == 0 ? (a)[0] : (set == 1 ? (a)[1] : (a)[2]))
    GemvRows r;
    r.nb = b - PICK(ws.block_start);
    r.np = PICK(ws.np);
    r.n = PICK(ws.n);
    r.out_off = (set > 0 ? ws.n[0] : 0) + (set > 1 ? ws.n[1] : 0);
    r.q = reinterpret_cast<const uint32_t*>(PICK(ws.q));
    r.sz = reinterpret_cast<const __half2*>(PICK(ws.sz));
#undef PICK
    return r;
}

// A warp's MMA totals (NT token tiles of 8 x 4 m16 row tiles, c0..c3 as in mma16816, weights as
// the A operand) stored to its rows of a reduction buffer, `warp_red[token * stride + row]`, for
// the m real tokens (the tiles' other columns are discarded copies or zero rows); ADD adds them
// to what is there (the k-step groups of the skinny GEMM).
template <int NT, bool ADD = false>
__device__ __forceinline__ void store_mma_sums(const float (&acc)[NT][4][4], float* warp_red, int m, int gi, int ti,
                                               int stride) {
#pragma unroll
    for (int j = 0; j < NT; j++)
#pragma unroll
        for (int wi = 0; wi < 4; wi++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int tok = 8 * j + 2 * ti + (e & 1);
                float& dst = warp_red[tok * stride + wi * 16 + gi + (e >> 1) * 8];
                if (tok < m) dst = ADD ? dst + acc[j][wi][e] : acc[j][wi][e];
            }
}

