// The skinny W4A16 GEMM: up to 64 tokens (the default path from 9: batched decode, speculative
// verification, short prompts), f16, on the tiled layout of w4a16.cu (units of 16 k x 64 rows).
//
// Why another kernel. At these token counts the weights are still the bulk of the bytes (4096 x
// 11008 at 4 bits is 22.5 MB; 64 tokens of x are 0.5 MB), so the goal is the batch-1 GEMV's time
// for every token count, Marlin's goal. The ring GEMV stages x per warp (each block of 64 rows
// re-reads all of it: 88 MB of L2 traffic at 64 tokens) and its per-warp rings of 64 tokens take
// 141 KB, one 4-warp block per SM; the sm80 GEMM puts tokens on the MMA's m16 side (a 64-token
// tile is 4 warps of mostly padding at 16 tokens, each dequantizing the same words) and has no
// split-k, so an 11008-row layer is 86 blocks on 132 SMs.
//
// Here a block owns 256 rows and a slice of k (split-k over gridDim.y so that even 4096 rows
// fill the GPU); its warps share one staged copy of x. Each warp takes 64 rows, two token
// tiles (16 tokens) and 4 / KW of each tile's four k16 steps, so 16 tokens take 4 KW warps and
// 64 tokens 16. KW > 1 splits k inside the block, whose warps add their sums in shared memory at
// the end: short k slices (many blocks, each a few tiles) spent most of their life waiting for
// their first tiles and on the reduction (H100, ncu: SMs active 42-60 % of a 16-token launch,
// 2 warps a scheduler), so KW puts more warps on fewer, longer slices. With all of a warp's token tiles
// (8 at 64 tokens, 217 registers) an SM held 8 warps, each issuing its MMAs back to back with
// nothing to hide their latency (H100: 55 us at 64 tokens of 4096 x 11008 with the fewest
// slices, 1.7 us a k tile per block; BENCHMARKS.md). The weights are the
// m16 A operand (one 4-byte word per lane dequantizes to a 16 x 16 fragment), the tokens the n8
// B operand, read from shared memory by ldmatrix (two token tiles per instruction). Each 64-wide
// k tile (x, the four warps' units and the tile's (scale, zero) pairs) streams through a 4-stage
// cp.async pipeline. The block's sums go through shared memory to coalesced stores; with several
// k slices each block writes f32 partial sums and the last block of a row range to arrive adds
// them in slice order (deterministic), as the GEMVs do. The staging and that end are shared with
// the wgmma kernel of w4a16_skinny_sm90.cu (w4_skinny.cuh).
#include "common.cuh"
#include "w4_dequant.cuh"
#include "w4_sets.cuh"
#include "w4_skinny.cuh"

#define SK_STAGES 4

__device__ __forceinline__ void sk_ldmatrix_x4(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
}

// MT token slots (16, 32 or 64; tokens past m are zero rows whose MMAs are skipped a whole tile
// at a time); KW warps share each 64 rows' k steps (1, 2 or 4). Requires k % 64 == 0 and a group
// size of 32 or a multiple of 64.
template <int MT, int KW>
__device__ __forceinline__ void w4_skinny(const W4Sets& ws, const __half* __restrict__ x, __half* __restrict__ y, int k, int g, int m,
                          int n_total, float* __restrict__ part, unsigned int* __restrict__ counters) {
    // Token tiles of n8 per warp, and the warps' token groups.
    constexpr int NT = 2, TG = MT / 16, THREADS = 128 * TG * KW, KSTEPS = 4 / KW;
    constexpr int STAGE = sk_stage_bytes(MT);
    constexpr int X_BYTES = SK_X_BYTES(MT);
    extern __shared__ __align__(128) uint8_t sk_smem[];
    const int tid = threadIdx.x, lane = tid & 31;
    // Row quarter, k-step group and token group of this warp: rows 64 warp .., k16 steps
    // KSTEPS kg .. of every tile, tokens 16 tg .. 16 tg + 15.
    const int warp = (tid >> 5) & (SK_QUARTERS - 1), kg = (tid >> 7) % KW, tg = tid / (128 * KW);
    const int gi = lane >> 2, ti = lane & 3;

    // This block's weight and its range of 256 rows in it, and its k tiles.
    const GemvRows rows = gemv_rows(ws, blockIdx.x);
    int t0, t1;
    sk_slice(k / SK_BK, t0, t1);
    // Group size 32: a tile holds two groups, one per pair of k16 steps.
    const bool two_groups = g == 32;
    const uint32_t smem_base = (uint32_t)__cvta_generic_to_shared(sk_smem);
    const SkinnyStager<MT, THREADS> stager(rows, x, k, g, m);
    auto load_stage = [&](int kt, int stage) { stager.load(kt, smem_base + stage * STAGE); };

    float acc[NT][4][4];
#pragma unroll
    for (int j = 0; j < NT; j++)
#pragma unroll
        for (int wi = 0; wi < 4; wi++)
#pragma unroll
            for (int e = 0; e < 4; e++) acc[j][wi][e] = 0.f;

#pragma unroll
    for (int s = 0; s < SK_STAGES - 1; s++) {
        if (t0 + s < t1) load_stage(t0 + s, s);
        cp_async_commit();
    }
    // This warp's token tiles holding real tokens (warp-uniform; a group past m skips its MMAs).
    const int live_tiles = min(NT, max(0, (m - 16 * tg + 7) >> 3));
    for (int kt = t0; kt < t1; kt++) {
        const int idx = kt - t0;
        cp_async_wait<SK_STAGES - 2>();
        __syncthreads();
        if (kt + SK_STAGES - 1 < t1) load_stage(kt + SK_STAGES - 1, (idx + SK_STAGES - 1) % SK_STAGES);
        cp_async_commit();

        const int stage = idx % SK_STAGES;
        const uint32_t xs = smem_base + stage * STAGE;
        const uint8_t* st = sk_smem + stage * STAGE;
        const uint32_t* words = reinterpret_cast<const uint32_t*>(st + X_BYTES) + warp * 128 + lane;
        const __half2* szs = reinterpret_cast<const __half2*>(st + X_BYTES + SK_W_BYTES) + warp * 64 + gi;
        __half2 zl[8], zh[8], sc[8];
#pragma unroll
        for (int kq = 0; kq < KSTEPS; kq++) {
            const int kk = kg * KSTEPS + kq;
            if (kq == 0 || (kk == 2 && two_groups)) {
                const int off = two_groups && kk >= 2 ? SK_ROWS : 0;
#pragma unroll
                for (int j = 0; j < 8; j++) sz_consts(szs[off + j * 8], zl[j], zh[j], sc[j]);
            }
            // B fragments of token tiles 2 jp and 2 jp + 1: lane l addresses row l % 8 of matrix
            // l / 8 (token tile 2 jp + l / 16, k half (l / 8) % 2 of this k16 step).
            uint32_t bf[NT][2];
#pragma unroll
            for (int jp = 0; jp < NT / 2; jp++) {
                const int mi = lane >> 3, r = lane & 7;
                const int tok = 16 * tg + 8 * (2 * jp + (mi >> 1)) + r;
                const int c = kk * 2 + (mi & 1);
                sk_ldmatrix_x4(xs + tok * 128 + ((c ^ r) << 4), bf[2 * jp][0], bf[2 * jp][1], bf[2 * jp + 1][0],
                               bf[2 * jp + 1][1]);
            }
            uint32_t w[4];
#pragma unroll
            for (int wi = 0; wi < 4; wi++) w[wi] = words[kk * SK_QUARTERS * 128 + wi * 32];
#pragma unroll
            for (int wi = 0; wi < 4; wi++) {
                const Dq d = dequant_word(w[wi], zl[2 * wi], zh[2 * wi], sc[2 * wi], zl[2 * wi + 1], zh[2 * wi + 1],
                                          sc[2 * wi + 1]);
                uint32_t a[4];
                d.a_operand(a);
#pragma unroll
                for (int j = 0; j < NT; j++)
                    if (j < live_tiles) mma16816(acc[j][wi], a, bf[j][0], bf[j][1]);
            }
        }
    }
    cp_async_wait<0>();
    __syncthreads();

    // The block's sums, [token][row of 256], through shared memory for coalesced stores; this
    // warp's are tokens 16 tg .. of rows 64 warp ...; the k-step groups add theirs in order.
    float* red = reinterpret_cast<float*>(sk_smem);
    float* warp_red = red + 16 * tg * SK_RED_STRIDE + warp * 64;
    if (kg == 0) store_mma_sums<NT>(acc, warp_red, m - 16 * tg, gi, ti, SK_RED_STRIDE);
    __syncthreads();
#pragma unroll
    for (int g = 1; g < KW; g++) {
        if (kg == g) store_mma_sums<NT, true>(acc, warp_red, m - 16 * tg, gi, ti, SK_RED_STRIDE);
        __syncthreads();
    }
    sk_finish(red, rows, y, m, n_total, part, counters);
}

// (MT, KW) pairs whose blocks fit the register file at the kernel's ~104 registers a thread.
#define SKINNY_ENTRY(MT, KW)                                                                             \
    extern "C" __global__ void __launch_bounds__(128 * (MT / 16) * KW) w4_skinny_f16_t##MT##_k##KW(                   \
        W4Sets ws, const __half* x, __half* y, int k, int g, int m, int nt, float* part, unsigned int* counters) { \
        w4_skinny<MT, KW>(ws, x, y, k, g, m, nt, part, counters);                                         \
    }
SKINNY_ENTRY(16, 1)
SKINNY_ENTRY(16, 2)
SKINNY_ENTRY(16, 4)
SKINNY_ENTRY(32, 1)
SKINNY_ENTRY(32, 2)
SKINNY_ENTRY(64, 1)
