// The skinny W4A16 GEMM on Hopper's warpgroup MMA (sm_90a): 17 to 128 f16 tokens by default
// (any count runs, in tiles of up to 128 over gridDim.z), the same blocks of 256 rows and k
// slices as w4a16_skinny.cu (its staging and its end are w4_skinny.cuh), but each 64 rows'
// MMAs are one wgmma per k16 step with the tokens as the N side.
//
// Why. The mma.sync kernel gives every warp 64 rows and 16 tokens (two n8 tiles): each 16 x 16
// weight fragment it dequantizes feeds two m16n8k16 MMAs, and at 64 tokens four warps dequantize
// the same words, so the block's 16 warps spend more issue slots on dequantization, ldmatrix
// and MMAs than the weights' bytes need (H100: 47 us at 64 tokens of 4096 x 11008 against
// cuBLAS FP16's 33, BENCHMARKS.md). Here warpgroup q (4 warps) takes rows 64 q .. 64 q + 63 and
// every token: warp w dequantizes the m16 A fragment of rows 16 w .. (one 4-byte word a lane a
// k16 step, as in w4a16_sm90.cu) once, in registers, and one m64nMTk16 wgmma multiplies it by
// all MT tokens read straight from the stage (the staged x rows already carry the 128-byte
// swizzle wgmma's descriptor names): 28 us for that shape (session 19). A block is 16 warps
// (512 threads), one or two an SM; stages are filled by cp.async as in the mma.sync kernel,
// and each k tile's wgmmas are waited for before the next tile's barrier (or, with OVERLAP,
// the one after), so a stage is free when it is refilled.
#include "common.cuh"
#include "w4_dequant.cuh"
#include "w4_sets.cuh"
#include "w4_skinny.cuh"
#include "wgmma.cuh"

#define WGS_THREADS 512

// MT token slots (16, 32, 64 or 128; tokens past m are zero rows of the stage) a block, STAGES
// stages; OVERLAP keeps one tile's wgmmas in flight while the next is dequantized; MINB blocks
// an SM; the k slices' sums added across a cluster of CS blocks (gridDim.y == CS), or with CS = 0
// through global memory. Requires k % 64 == 0 and a group size of 32 or a multiple of 64.
template <int MT, int STAGES, bool OVERLAP, int MINB, int CS = 0>
__device__ __forceinline__ void w4_wgs(const W4Sets& ws, const __half* __restrict__ x, __half* __restrict__ y, int k, int g, int m,
                                       int n_total, float* __restrict__ part, unsigned int* __restrict__ counters) {
    constexpr int STAGE = sk_stage_bytes(MT);
    // The stages, 1024-aligned (swizzle atoms); launch::skinny_smem adds the 1024 bytes.
    extern __shared__ uint8_t wgs_smem_raw[];
    const uint32_t raw = (uint32_t)__cvta_generic_to_shared(wgs_smem_raw);
    const uint32_t smem_base = (raw + 1023) & ~1023u;
    uint8_t* smem = wgs_smem_raw + (smem_base - raw);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    // Row quarter (warpgroup) and m16 tile of this warp; this lane's rows r0 and r0 + 8 of the block.
    const int q = warp >> 2, w = warp & 3;
    const int r0 = q * 64 + w * 16 + (lane >> 2);

    // More than MT tokens are tiles of MT over gridDim.z, each with its own partial sums and
    // arrival counters.
    const int tz = blockIdx.z;
    x += (size_t)tz * MT * k;
    y += (size_t)tz * MT * n_total;
    m = min(MT, m - tz * MT);
    if (part != nullptr) part += (size_t)tz * gridDim.y * MT * gridDim.x * SK_ROWS;
    counters += tz * gridDim.x;
    const GemvRows rows = gemv_rows(ws, blockIdx.x);
    int t0, t1;
    sk_slice(k / SK_BK, t0, t1);
    const bool two_groups = g == 32;
    const SkinnyStager<MT, WGS_THREADS> stager(rows, x, k, g, m);

    float acc[MT / 2];
#pragma unroll
    for (int i = 0; i < MT / 2; i++) acc[i] = 0.f;
    // Tiles in flight ahead of the one being multiplied: with OVERLAP a tile's wgmmas are left
    // running while the next tile is dequantized, so its stage is refilled a tile later.
    constexpr int LEAD = OVERLAP ? STAGES - 2 : STAGES - 1;
#pragma unroll
    for (int s = 0; s < LEAD; s++) {
        if (t0 + s < t1) stager.load(t0 + s, smem_base + s * STAGE);
        cp_async_commit();
    }
    // One k tile: its words and (scale, zero) pairs dequantized into `a`, then four wgmmas.
    auto tile = [&](int idx, uint32_t (&a)[4][4]) {
        const int stage = idx % STAGES;
        const uint8_t* st = smem + stage * STAGE;
        const uint32_t* words = reinterpret_cast<const uint32_t*>(st + SK_X_BYTES(MT)) + q * 128 + w * 32 + lane;
        const __half2* szs = reinterpret_cast<const __half2*>(st + SK_X_BYTES(MT) + SK_W_BYTES) + r0;
        uint32_t wd[4];
#pragma unroll
        for (int kk = 0; kk < 4; kk++) wd[kk] = words[kk * SK_QUARTERS * 128];
        __half2 zl0, zh0, s0, zl1, zh1, s1;
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {
            if (kk == 0 || (kk == 2 && two_groups)) {
                const int off = kk == 2 ? SK_ROWS : 0;
                sz_consts(szs[off], zl0, zh0, s0);
                sz_consts(szs[off + 8], zl1, zh1, s1);
            }
            // Tiles 2w and 2w + 1 of the word are the A fragment of rows r0, r0 + 8 (as in w4a16_sm90.cu).
            dequant_word(wd[kk], zl0, zh0, s0, zl1, zh1, s1).a_operand(a[kk]);
        }
        const uint32_t xs = smem_base + stage * STAGE;
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < 4; kk++) wgmma_m64k16<MT>(acc, a[kk], desc_sw128(xs + kk * 32));
        wgmma_commit();
        // Without OVERLAP the stage is free once this returns; with it, the previous tile's.
        if (OVERLAP)
            wgmma_wait<1>();
        else
            wgmma_wait<0>();
    };
    // Two register sets for the A fragments, so a tile's are not rewritten while its wgmmas run.
    uint32_t a_even[4][4], a_odd[4][4];
    for (int kt = t0; kt < t1; kt++) {
        const int idx = kt - t0;
        cp_async_wait<LEAD - 1>();
        __syncthreads();
        if (kt + LEAD < t1) stager.load(kt + LEAD, smem_base + ((idx + LEAD) % STAGES) * STAGE);
        cp_async_commit();
        if (!OVERLAP || (idx & 1) == 0)
            tile(idx, a_even);
        else
            tile(idx, a_odd);
    }
    wgmma_wait<0>();
    cp_async_wait<0>();
    __syncthreads();

    // The block's sums, [token][row of 256], for sk_finish.
    float* red = reinterpret_cast<float*>(smem);
#pragma unroll
    for (int j = 0; j < MT / 8; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int tok = 8 * j + 2 * (lane & 3) + (e & 1);
            if (tok < m) red[tok * SK_RED_STRIDE + r0 + (e >> 1) * 8] = acc[4 * j + e];
        }
    __syncthreads();
    // Two blocks an SM (64 registers): the reduction's loads four slices at a time.
    if constexpr (CS > 0)
        sk_finish_cluster<CS>(red, rows, y, m, n_total);
    else
        sk_finish < MINB == 2 ? 4 : SK_MAX_SPLITS > (red, rows, y, m, n_total, part, counters);
}

// (MT, STAGES, OVERLAP, blocks an SM) variants. Two 512-thread blocks an SM need at most 64
// registers a thread: only at 16 and 32 slots, whose accumulators are 8 and 16 registers.
#define WGS_ENTRY(MT, ST, OV, MINB, SFX)                                                                            \
    extern "C" __global__ void __launch_bounds__(WGS_THREADS, MINB) w4_wgs_f16_t##MT##_s##ST##SFX(                  \
        W4Sets ws, const __half* x, __half* y, int k, int g, int m, int nt, float* part, unsigned int* counters) { \
        w4_wgs<MT, ST, OV, MINB>(ws, x, y, k, g, m, nt, part, counters);                                           \
    }
WGS_ENTRY(16, 4, false, 1, )
WGS_ENTRY(16, 6, false, 1, )
WGS_ENTRY(16, 4, false, 2, _b2)
WGS_ENTRY(16, 6, false, 2, _b2)
WGS_ENTRY(32, 4, false, 1, )
WGS_ENTRY(32, 6, false, 1, )
WGS_ENTRY(32, 4, false, 2, _b2)
WGS_ENTRY(32, 6, false, 2, _b2)
WGS_ENTRY(64, 4, false, 1, )
WGS_ENTRY(64, 6, false, 1, )
WGS_ENTRY(64, 6, true, 1, _o)
WGS_ENTRY(128, 4, false, 1, )
WGS_ENTRY(128, 6, false, 1, )
WGS_ENTRY(128, 6, true, 1, _o)

// The default variants at 64 and 128 slots (launch::skinny_wgmma_default) with the k
// slices' sums added across a cluster of 2 or 4 blocks (suffix _c2, _c4; launch::skinny_cluster_plan
// says when). Clusters of 8 lost on an H100 (11008 x 4096 at 64 tokens: 44.0 us against 35.9
// with 4 and 30.7 with 8 slices through global memory; BENCHMARKS.md, session 27), most likely
// because its GPCs cannot hold all 16 clusters of 8 of such a launch at once.
#define WGS_CLUSTER_ENTRY(MT, ST, OV, MINB, SFX, CS)                                                                           \
    extern "C" __global__ void __cluster_dims__(1, CS, 1) __launch_bounds__(WGS_THREADS, MINB) w4_wgs_f16_t##MT##_s##ST##SFX##_c##CS( \
        W4Sets ws, const __half* x, __half* y, int k, int g, int m, int nt, float* part, unsigned int* counters) {              \
        w4_wgs<MT, ST, OV, MINB, CS>(ws, x, y, k, g, m, nt, part, counters);                                                    \
    }
#define CLUSTER_SIZES(...) WGS_CLUSTER_ENTRY(__VA_ARGS__, 2) WGS_CLUSTER_ENTRY(__VA_ARGS__, 4)
CLUSTER_SIZES(64, 4, false, 1, )
CLUSTER_SIZES(128, 6, true, 1, _o)
