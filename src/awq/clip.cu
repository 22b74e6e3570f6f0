// The AWQ clip search on the GPU, one kernel for a whole layer: for every (row, group) of the
// weight and every candidate range, the group quantized on the clamped range, d = Q(clamp(w)) - w,
// and its error d^T G d through the group's Gram matrix G (in shared memory). The quantizer is
// the host loop's operation for operation: the _rn intrinsics keep nvcc from fusing a multiply
// and an add, IEEE division, roundf (half away from zero, as Rust's round). Only the error's sum
// runs in another order than on the host.
//
// A block takes one group (blockIdx.y) and ROWS_PER_BLOCK rows (blockIdx.x); a warp takes WR rows
// at a time, so that every G value read from shared memory feeds WR rows. Lane l holds the G/32
// consecutive weights l*PER .. l*PER+PER-1 of each row: with G symmetric, (G d)_i = sum_j G[j][i] d_j
// reads a row of G as one float4/float2/float per lane, without bank conflicts.
#include <cfloat>

#define CLIP_WARPS 8
#define CLIP_WR 4
#define CLIP_ITERS 4
#define CLIP_ROWS_PER_BLOCK (CLIP_WARPS * CLIP_WR * CLIP_ITERS)

template <int G>
__device__ __forceinline__ void clip_search_group(const float* __restrict__ w, const float* __restrict__ gram, int out, int inp, int steps, int asym,
                                                  float n_grid, float max_code, float* __restrict__ lo_out, float* __restrict__ hi_out) {
    constexpr int PER = G / 32;
    extern __shared__ float smem[];
    float* gs = smem;                                          // [G][G]
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    float* ds = smem + G * G + warp * CLIP_WR * G;             // this warp's [WR][G] candidate d's
    const int gi = blockIdx.y, groups = inp / G;
    const float* gsrc = gram + (size_t)gi * G * G;
    for (int i = threadIdx.x * 4; i < G * G; i += blockDim.x * 4) {
        *reinterpret_cast<float4*>(gs + i) = *reinterpret_cast<const float4*>(gsrc + i);
    }
    __syncthreads();
    const int inner = asym ? steps : 1;
    for (int it = 0; it < CLIP_ITERS; it++) {
        const int row0 = blockIdx.x * CLIP_ROWS_PER_BLOCK + (it * CLIP_WARPS + warp) * CLIP_WR;
        if (row0 >= out) break;
        float wv[CLIP_WR][PER], mn[CLIP_WR], mx[CLIP_WR], amax[CLIP_WR];
        float best_e[CLIP_WR], best_lo[CLIP_WR], best_hi[CLIP_WR];
        #pragma unroll
        for (int r = 0; r < CLIP_WR; r++) {
            const int row = min(row0 + r, out - 1);            // rows past the end repeat the last (never written)
            const float* src = w + (size_t)row * inp + gi * G + lane * PER;
            float a = FLT_MAX, b = -FLT_MAX;
            #pragma unroll
            for (int p = 0; p < PER; p++) {
                wv[r][p] = src[p];
                a = fminf(a, wv[r][p]);
                b = fmaxf(b, wv[r][p]);
            }
            #pragma unroll
            for (int o = 16; o > 0; o /= 2) {
                a = fminf(a, __shfl_xor_sync(0xffffffffu, a, o));
                b = fmaxf(b, __shfl_xor_sync(0xffffffffu, b, o));
            }
            mn[r] = a;
            mx[r] = b;
            amax[r] = fmaxf(fabsf(a), fabsf(b));
            best_e[r] = FLT_MAX;
            best_lo[r] = a;
            best_hi[r] = b;
        }
        for (int i = 0; i < steps; i++) {
            const float f_hi = __fsub_rn(1.0f, __fdiv_rn((float)i, n_grid));
            for (int j = 0; j < inner; j++) {
                const float f_lo = __fsub_rn(1.0f, __fdiv_rn((float)j, n_grid));
                float lo[CLIP_WR], hi[CLIP_WR];
                #pragma unroll
                for (int r = 0; r < CLIP_WR; r++) {
                    lo[r] = asym ? __fmul_rn(mn[r], f_lo) : __fmul_rn(-amax[r], f_hi);
                    hi[r] = asym ? __fmul_rn(mx[r], f_hi) : __fmul_rn(amax[r], f_hi);
                    // The clamped group's extremes, its scale and zero point.
                    const float cmn = fminf(fmaxf(mn[r], lo[r]), hi[r]);
                    const float cmx = fminf(fmaxf(mx[r], lo[r]), hi[r]);
                    const float scale = __fdiv_rn(fmaxf(__fsub_rn(cmx, cmn), 1e-5f), max_code);
                    const float zero = fminf(fmaxf(-roundf(__fdiv_rn(cmn, scale)), 0.0f), max_code);
                    #pragma unroll
                    for (int p = 0; p < PER; p++) {
                        const float c = fminf(fmaxf(wv[r][p], lo[r]), hi[r]);
                        const float q = fminf(fmaxf(__fadd_rn(roundf(__fdiv_rn(c, scale)), zero), 0.0f), max_code);
                        ds[r * G + lane * PER + p] = __fsub_rn(__fmul_rn(__fsub_rn(q, zero), scale), wv[r][p]);
                    }
                }
                __syncwarp();
                // (G d)_i for this lane's i, every row at once.
                float acc[CLIP_WR][PER];
                #pragma unroll
                for (int r = 0; r < CLIP_WR; r++)
                    #pragma unroll
                    for (int p = 0; p < PER; p++) acc[r][p] = 0.0f;
                #pragma unroll 4
                for (int k = 0; k < G; k += 4) {
                    float4 dk[CLIP_WR];
                    #pragma unroll
                    for (int r = 0; r < CLIP_WR; r++) dk[r] = *reinterpret_cast<const float4*>(ds + r * G + k);
                    #pragma unroll
                    for (int kk = 0; kk < 4; kk++) {
                        float gv[PER];
                        const float* grow = gs + (k + kk) * G + lane * PER;
                        if constexpr (PER == 4) {
                            const float4 v = *reinterpret_cast<const float4*>(grow);
                            gv[0] = v.x; gv[1] = v.y; gv[2] = v.z; gv[3] = v.w;
                        } else if constexpr (PER == 2) {
                            const float2 v = *reinterpret_cast<const float2*>(grow);
                            gv[0] = v.x; gv[1] = v.y;
                        } else {
                            gv[0] = grow[0];
                        }
                        #pragma unroll
                        for (int r = 0; r < CLIP_WR; r++) {
                            const float dv = kk == 0 ? dk[r].x : kk == 1 ? dk[r].y : kk == 2 ? dk[r].z : dk[r].w;
                            #pragma unroll
                            for (int p = 0; p < PER; p++) acc[r][p] = fmaf(gv[p], dv, acc[r][p]);
                        }
                    }
                }
                #pragma unroll
                for (int r = 0; r < CLIP_WR; r++) {
                    float e = 0.0f;
                    #pragma unroll
                    for (int p = 0; p < PER; p++) e = fmaf(ds[r * G + lane * PER + p], acc[r][p], e);
                    #pragma unroll
                    for (int o = 16; o > 0; o /= 2) e += __shfl_xor_sync(0xffffffffu, e, o);
                    e = __shfl_sync(0xffffffffu, e, 0);         // one value for every lane's decision
                    // Strictly better only: on ties the earlier (less shrunk) candidate stays.
                    if (e < best_e[r]) {
                        best_e[r] = e;
                        best_lo[r] = lo[r];
                        best_hi[r] = hi[r];
                    }
                }
                __syncwarp();
            }
        }
        if (lane == 0) {
            #pragma unroll
            for (int r = 0; r < CLIP_WR; r++) {
                if (row0 + r < out) {
                    lo_out[(size_t)(row0 + r) * groups + gi] = best_lo[r];
                    hi_out[(size_t)(row0 + r) * groups + gi] = best_hi[r];
                }
            }
        }
    }
}

#define CLIP_KERNEL(G)                                                                                                       \
    extern "C" __global__ void __launch_bounds__(CLIP_WARPS * 32) clip_search_g##G(                                           \
        const float* __restrict__ w, const float* __restrict__ gram, int out, int inp, int steps, int asym, float n_grid,      \
        float max_code, float* __restrict__ lo_out, float* __restrict__ hi_out) {                                             \
        clip_search_group<G>(w, gram, out, inp, steps, asym, n_grid, max_code, lo_out, hi_out);                              \
    }

CLIP_KERNEL(32)
CLIP_KERNEL(64)
CLIP_KERNEL(128)
