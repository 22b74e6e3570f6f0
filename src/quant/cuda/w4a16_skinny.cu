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
// them in slice order (deterministic), as the GEMVs do.
#include "common.cuh"
#include "w4_dequant.cuh"
#include "w4_sets.cuh"

// Warps along the rows (64 rows each); a block has SK_WARPS x (MT / 16) warps.
#define SK_WARPS 4
#define SK_ROWS (64 * SK_WARPS)
#define SK_BK 64
#define SK_STAGES 4
// Most k slices of a launch (the reduction keeps one float4 per slice in registers).
#define SK_MAX_SPLITS 16
// Row stride (floats) of the block's sums in shared memory: lanes (g, t) store token 2t + e, row
// g, and 2 x 260 = 8 (mod 32) puts the 32 lanes in distinct banks.
#define SK_RED_STRIDE 260

// Bytes of one stage: MT tokens x 64 k of x (rows of 128 bytes), 4 k16 steps x 4 warps of weight
// units, and the (scale, zero) pairs of up to two groups (group size 32) of 256 rows. A block's
// dynamic shared memory is SK_STAGES of these or the block's sums, whichever is more
// (`launch::skinny_smem` on the Rust side).
__host__ __device__ constexpr int sk_stage_bytes(int mt) { return mt * 128 + 16 * 512 + 2 * SK_ROWS * 4; }

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
    constexpr int X_BYTES = MT * 128, W_BYTES = 16 * 512;
    extern __shared__ __align__(128) uint8_t sk_smem[];
    const int tid = threadIdx.x, lane = tid & 31;
    // Row quarter, k-step group and token group of this warp: rows 64 warp .., k16 steps
    // KSTEPS kg .. of every tile, tokens 16 tg .. 16 tg + 15.
    const int warp = (tid >> 5) & (SK_WARPS - 1), kg = (tid >> 7) % KW, tg = tid / (128 * KW);
    const int gi = lane >> 2, ti = lane & 3;
    const int b = blockIdx.x, split = blockIdx.y, nsplit = gridDim.y;

    // This block's weight and its range of 256 rows in it.
    const GemvRows rows = gemv_rows(ws, b);
    const int rb = rows.nb, np = rows.np, n = rows.n, out_off = rows.out_off;
    const uint8_t* __restrict__ q = reinterpret_cast<const uint8_t*>(rows.q);
    const __half2* __restrict__ sz = rows.sz;
    const int nunits = np >> 6;

    const int ktiles = k / SK_BK;
    const int per_split = (ktiles + nsplit - 1) / nsplit;
    const int t0 = min(ktiles, split * per_split), t1 = min(ktiles, t0 + per_split);
    // Group size 32: a tile holds two groups, one per pair of k16 steps.
    const bool two_groups = g == 32;
    const uint32_t smem_base = (uint32_t)__cvta_generic_to_shared(sk_smem);

    // The copy duties of the block's first 128 threads, fixed over the tiles: unit (kk = i,
    // warp column tid / 32) piece tid % 32 of the weights; (scale, zero) piece tid % 64 of group
    // tid / 64. Every thread copies x pieces.
    const int ct = tid & 127;
    const bool copies_w = tid < 128;
    const int my_unit = rb * SK_WARPS + (ct >> 5);
    const bool unit_ok = my_unit < nunits;
    const size_t unit_stride = (size_t)nunits * 512;
    const uint8_t* unit_src = q + (size_t)(unit_ok ? my_unit : 0) * 512 + lane * 16;
    const int sz_col = rb * SK_ROWS + (ct & 63) * 4;
    const bool sz_ok = sz_col < np && (ct < 64 || two_groups);

    auto load_stage = [&](int kt, int stage) {
        const uint32_t base = smem_base + stage * STAGE;
        for (int p = tid; p < MT * 8; p += THREADS) {
            const int r = p >> 3, c = p & 7;
            const bool ok = r < m;
            const __half* src = x + (size_t)(ok ? r : 0) * k + kt * SK_BK + c * 8;
            cp_async16(base + r * 128 + ((c ^ (r & 7)) << 4), src, ok);
        }
        if (copies_w) {
#pragma unroll
            for (int i = 0; i < 4; i++)
                cp_async16(base + X_BYTES + (i * SK_WARPS + (ct >> 5)) * 512 + lane * 16,
                           unit_src + (size_t)(kt * 4 + i) * unit_stride, unit_ok);
            const int grp = (kt * SK_BK) / g + (ct >> 6);
            if (ct < 64 || two_groups)
                cp_async16(base + X_BYTES + W_BYTES + ct * 16, sz + (size_t)(sz_ok ? grp : 0) * np + (sz_ok ? sz_col : 0),
                           sz_ok);
        }
    };

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
        const __half2* szs = reinterpret_cast<const __half2*>(st + X_BYTES + W_BYTES) + warp * 64 + gi;
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
            for (int wi = 0; wi < 4; wi++) w[wi] = words[kk * SK_WARPS * 128 + wi * 32];
#pragma unroll
            for (int wi = 0; wi < 4; wi++) {
                const Dq d = dequant_word(w[wi], zl[2 * wi], zh[2 * wi], sc[2 * wi], zl[2 * wi + 1], zh[2 * wi + 1],
                                          sc[2 * wi + 1]);
                const uint32_t a[4] = {as_u32(d.a0), as_u32(d.b0), as_u32(d.a1), as_u32(d.b1)};
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
    const int row0 = rb * SK_ROWS;
    if (nsplit == 1) {
        for (int i = tid; i < m * SK_ROWS; i += blockDim.x) {
            const int t = i / SK_ROWS, r = i % SK_ROWS;
            if (row0 + r < n) y[(size_t)t * n_total + out_off + row0 + r] = __float2half_rn(red[t * SK_RED_STRIDE + r]);
        }
        return;
    }
    // Split k: this slice's sums as float4s of 4 rows, then the last block of the row range to
    // arrive adds the slices' sums in slice order (deterministic). Its loads are the launch's
    // tail, so each thread issues every slice's load of an element before adding any (one L2
    // round trip per element, not one per slice).
    const size_t ld4 = (size_t)gridDim.x * (SK_ROWS / 4);
    float4* part4 = reinterpret_cast<float4*>(part);
    for (int i = tid; i < m * (SK_ROWS / 4); i += blockDim.x) {
        const int t = i / (SK_ROWS / 4), r4 = i % (SK_ROWS / 4);
        const float* src = red + t * SK_RED_STRIDE + 4 * r4;
        part4[((size_t)split * m + t) * ld4 + (size_t)b * (SK_ROWS / 4) + r4] = make_float4(src[0], src[1], src[2], src[3]);
    }
    __threadfence();
    __shared__ bool last;
    __syncthreads();
    if (tid == 0) last = atomicAdd(&counters[b], 1u) == (unsigned)nsplit - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    for (int i = tid; i < m * (SK_ROWS / 4); i += blockDim.x) {
        const int t = i / (SK_ROWS / 4), r4 = i % (SK_ROWS / 4);
        const int row = row0 + 4 * r4;
        if (row >= n) continue;
        const float4* src = part4 + (size_t)t * ld4 + (size_t)b * (SK_ROWS / 4) + r4;
        const size_t step = (size_t)m * ld4;
        float4 v[SK_MAX_SPLITS];
#pragma unroll
        for (int sp = 0; sp < SK_MAX_SPLITS; sp++)
            if (sp < nsplit) v[sp] = __ldcg(src + sp * step);
        float4 a = v[0];
#pragma unroll
        for (int sp = 1; sp < SK_MAX_SPLITS; sp++)
            if (sp < nsplit) {
                a.x += v[sp].x;
                a.y += v[sp].y;
                a.z += v[sp].z;
                a.w += v[sp].w;
            }
        __half* dst = y + (size_t)t * n_total + out_off + row;
        const float vals[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
        for (int e = 0; e < 4; e++)
            if (row + e < n) dst[e] = __float2half_rn(vals[e]);
    }
    if (tid == 0) counters[b] = 0;  // ready for the next launch
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
