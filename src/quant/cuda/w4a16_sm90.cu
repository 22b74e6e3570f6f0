// W4A16 GEMM for Hopper (sm_90a): warpgroup MMA (wgmma) with the 4-bit weights dequantized in
// registers as the A operand, the way Marlin-style kernels keep dequantization off shared memory.
//
// Y[m, n] = X[m, k] W[n, k]^T is computed as Y^T = W X^T: weights are the wgmma "A" (64 rows per
// warpgroup, from registers) and the tokens the "B" operand (from shared memory, K-major with the
// 128-byte swizzle). The tiled weight layout (see w4a16.cu) gives warp w of a warpgroup, in word w
// of each unit, the m16 x k16 A fragment of rows 16w..16w+15: one 4-byte shared-memory read per
// lane per k16 step.
//
// Block: 2 warpgroups (weight rows 0-63 and 64-127 of the tile) x BT tokens (256 or 128) x k 64
// per stage, 4 stages; wgmma m64nBTk16 with f32 accumulators (BT / 2 per thread). Requires
// k % 64 == 0 and group size % 64 == 0 (one group per stage). The stages are filled by the tensor
// memory accelerator: thread 0 issues, per stage, one 2D tensor copy of the X tile (the copy
// applies the 128-byte swizzle; rows past m read as zeros) and 1D bulk copies of the weight units
// and scales, all completing on the stage's "full" mbarrier; each warp releases a stage on its
// "empty" mbarrier once its MMAs are done, and thread 0 refills it with the tile 4 ahead. The
// warpgroups never meet at a block barrier. Against the previous version (cp.async, a __syncthreads
// per k tile, 128 tokens, two blocks per SM) on an H100: the barrier-free pipeline +5 %, 256-token
// tiles (half the dequantization per MMA) +17 %: 0.81-0.83x cuBLAS at M = 4096 (BENCHMARKS.md).
//
// Filling the GPU. One block of 128 rows x 256 tokens an SM leaves most SMs idle where the tiles
// are few: at 512 tokens a 4096-row layer is 64 tiles on 132 SMs. So the host may choose 128-token
// tiles (two blocks an SM) and split k over gridDim.z: each block of a split takes a contiguous
// run of k tiles, writes its f32 sums to `part`, and the last block of a tile to arrive (a counter
// per tile) adds the splits' sums in split order, so the result does not depend on which block
// came last, and leaves the counter at zero for the next launch.
#include <cuda.h>
#include "common.cuh"
#include "w4_dequant.cuh"
#include "wgmma.cuh"

#define SM90_BN 128      // weight rows per block
#define SM90_BK 64
#define SM90_STAGES 4
#define SM90_MAX_SPLITS 4
#define SM90_W_BYTES (4 * 2 * 512)  // 4 k16 steps x 2 units of 64 rows
#define SM90_SZ_BYTES (SM90_BN * 4)
// X stages first (each 1024-aligned), then weights, scales and the 2 x 4 mbarriers; +1024 for
// aligning the base. Mirrored by sm90_smem in kernels.rs.
template <int BT> struct Sm90Smem {
    static constexpr int X_BYTES = BT * SM90_BK * 2;  // 1024-aligned (swizzle atoms)
    static constexpr int W0 = SM90_STAGES * X_BYTES;
    static constexpr int Z0 = W0 + SM90_STAGES * SM90_W_BYTES;
    static constexpr int BAR0 = Z0 + SM90_STAGES * SM90_SZ_BYTES;
    static constexpr int TOTAL = BAR0 + 2 * SM90_STAGES * 8 + 1024;
};

__device__ __forceinline__ void mbar_init(uint32_t addr, uint32_t count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(addr), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t addr, uint32_t parity) {
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "WAIT_%=:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
        "@!p bra WAIT_%=;\n"
        "}\n" ::"r"(addr),
        "r"(parity)
        : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t addr) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(addr) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(uint32_t addr, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(addr), "r"(bytes) : "memory");
}
// TMA: a 2D box of `map` at (c0 = column, c1 = row) into shared memory, completing on `mbar`.
__device__ __forceinline__ void tma_2d(uint32_t dst, const CUtensorMap* map, int c0, int c1, uint32_t mbar) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(dst),
        "l"(map), "r"(c0), "r"(c1), "r"(mbar)
        : "memory");
}
// TMA: `bytes` contiguous bytes (16-byte aligned, a multiple of 16) into shared memory.
__device__ __forceinline__ void bulk_1d(uint32_t dst, const void* src, uint32_t bytes, uint32_t mbar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(dst), "l"(src),
                 "r"(bytes), "r"(mbar)
                 : "memory");
}

// xmap: X as a 2D f16 tensor (k columns, m rows), 64 x BT boxes, 128-byte swizzle (kernels.rs).
// With gridDim.z > 1 (at most SM90_MAX_SPLITS, at most the k tiles), `part` holds
// gridDim.x * gridDim.y * gridDim.z * 128 * BT floats and `counters` one zero per tile.
template <int BT>
__device__ __forceinline__ void w4_gemm_sm90(const CUtensorMap* xmap, const uint4* __restrict__ q, const __half2* __restrict__ sz,
                                             __half* __restrict__ y, float* __restrict__ part, unsigned int* __restrict__ counters,
                                             int m, int n, int np, int k, int g) {
    using L = Sm90Smem<BT>;
    extern __shared__ uint8_t smem_raw[];
    const uint32_t raw = (uint32_t)__cvta_generic_to_shared(smem_raw);
    const uint32_t base = (raw + 1023) & ~1023u;
    uint8_t* base_ptr = smem_raw + (base - raw);
    const uint32_t bar0 = base + L::BAR0;  // full[stage], then empty[stage]
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int bn = blockIdx.x, bt = blockIdx.y;
    const int nunits = np >> 6;
    // This block's k tiles [kt0, kt0 + nk): split z of gridDim.z.
    const int ktiles = k / SM90_BK, nsplit = gridDim.z, z = blockIdx.z;
    const int kt0 = ktiles * z / nsplit, nk = ktiles * (z + 1) / nsplit - kt0;
    if (tid == 0) {
        for (int s = 0; s < SM90_STAGES; s++) {
            mbar_init(bar0 + s * 8, 1);                   // the producer's expect-tx arrival
            mbar_init(bar0 + (SM90_STAGES + s) * 8, 8);   // every warp's release
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();
    // The last row tile may hold one unit of 64 rows: its second unit's weights and scales are
    // left as they were, and the rows they feed are never stored.
    const int units = min(2, nunits - bn * 2);
    const uint32_t wbytes = units * 512, zbytes = units * 64 * 4;
    // Local tile i is k tile kt0 + i, in stage i % STAGES.
    auto produce = [&](int i) {
        const int s = i % SM90_STAGES, kt = kt0 + i;
        const uint32_t full = bar0 + s * 8;
        mbar_expect_tx(full, L::X_BYTES + 4 * wbytes + zbytes);
        tma_2d(base + s * L::X_BYTES, xmap, kt * SM90_BK, bt * BT, full);
        const uint32_t ws = base + L::W0 + s * SM90_W_BYTES;
#pragma unroll
        for (int kk = 0; kk < 4; kk++) bulk_1d(ws + kk * 2 * 512, q + ((size_t)(kt * 4 + kk) * nunits + bn * 2) * 32, wbytes, full);
        bulk_1d(base + L::Z0 + s * SM90_SZ_BYTES, sz + (size_t)(kt * SM90_BK / g) * np + bn * SM90_BN, zbytes, full);
    };
    if (tid == 0)
        for (int i = 0; i < SM90_STAGES && i < nk; i++) produce(i);

    const int wg = warp >> 2, w = warp & 3;
    const int gi = lane >> 2, ti = lane & 3;
    // This lane's weight rows within the tile (A fragment rows g and g + 8 of warp w).
    const int r0 = wg * 64 + w * 16 + gi, r1 = r0 + 8;
    float acc[BT / 2];
#pragma unroll
    for (int i = 0; i < BT / 2; i++) acc[i] = 0.f;
    // A tile's words and (scale, zero) pairs, read from its stage once it has landed; the next
    // tile's are read while this tile's MMAs run (they are not MMA operands, so ptxas keeps the
    // MMAs asynchronous).
    uint32_t words[4];
    __half2 szr[2];
    auto read_tile = [&](int i) {
        const int s = i % SM90_STAGES;
        mbar_wait(bar0 + s * 8, (i / SM90_STAGES) & 1);
        const uint32_t* w_p = reinterpret_cast<const uint32_t*>(base_ptr + L::W0 + s * SM90_W_BYTES);
        const __half2* sz_p = reinterpret_cast<const __half2*>(base_ptr + L::Z0 + s * SM90_SZ_BYTES);
        szr[0] = sz_p[r0];
        szr[1] = sz_p[r1];
#pragma unroll
        for (int kk = 0; kk < 4; kk++) words[kk] = w_p[(kk * 2 + wg) * 128 + w * 32 + lane];
    };
    if (nk > 0) read_tile(0);
    for (int i = 0; i < nk; i++) {
        const int s = i % SM90_STAGES;
        __half2 zl0, zh0, s0, zl1, zh1, s1;
        sz_consts(szr[0], zl0, zh0, s0);
        sz_consts(szr[1], zl1, zh1, s1);
        uint32_t a[4][4];
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {
            // Tile 2w (row r0) and 2w + 1 (row r1) of the word are the A fragment of rows r0, r1:
            // a0 row r0 k 2t.., a1 row r1 k 2t.., a2 row r0 k 2t+8.., a3 row r1 k 2t+8...
            dequant_word(words[kk], zl0, zh0, s0, zl1, zh1, s1).a_operand(a[kk]);
        }
        const uint32_t xs = base + s * L::X_BYTES;
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < 4; kk++) wgmma_m64k16<BT>(acc, a[kk], desc_sw128(xs + kk * 32));
        wgmma_commit();
        // While the MMAs run: thread 0 refills the stage the previous tile used, once every warp
        // has released it; everyone reads the next tile's words.
        if (tid == 0 && i >= 1 && i - 1 + SM90_STAGES < nk) {
            mbar_wait(bar0 + (SM90_STAGES + (i - 1) % SM90_STAGES) * 8, ((i - 1) / SM90_STAGES) & 1);
            produce(i - 1 + SM90_STAGES);
        }
        if (i + 1 < nk) read_tile(i + 1);
        // The stage and `a` are reused: wait for the MMAs, then release the stage.
        wgmma_wait<0>();
        __syncwarp();
        if (lane == 0) mbar_arrive(bar0 + (SM90_STAGES + s) * 8);
    }

    if (nsplit > 1) {
        // This split's sums, element i of thread tid at ((tile * nsplit + z) * BT / 2 + i) * 256 + tid
        // (a warp's stores of one i are 128 contiguous bytes).
        const size_t tile = (size_t)bt * gridDim.x + bn;
        float* mine = part + (tile * nsplit + z) * (BT / 2) * 256 + tid;
#pragma unroll
        for (int i = 0; i < BT / 2; i++) mine[i * 256] = acc[i];
        __threadfence();
        __shared__ bool last;
        __syncthreads();
        if (tid == 0) last = atomicAdd(&counters[tile], 1u) == (unsigned)nsplit - 1;
        __syncthreads();
        if (!last) return;
        __threadfence();
        // Every split's sums, its own included, in split order (few registers: acc is rewritten).
        const float* all = part + tile * nsplit * (BT / 2) * 256 + tid;
#pragma unroll
        for (int i = 0; i < BT / 2; i++) acc[i] = __ldcg(all + i * 256);
        for (int j = 1; j < nsplit; j++)
#pragma unroll
            for (int i = 0; i < BT / 2; i++) acc[i] += __ldcg(all + ((size_t)j * (BT / 2) + i) * 256);
        if (tid == 0) counters[tile] = 0;  // ready for the next launch
    }

    // acc[4j + e]: weight row r0 (e < 2) or r1, token 8j + 2t + (e & 1).
    const int f0 = bn * SM90_BN + r0, f1 = bn * SM90_BN + r1;
#pragma unroll
    for (int j = 0; j < BT / 8; j++) {
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int tok = bt * BT + j * 8 + ti * 2 + (e & 1);
            const int f = e < 2 ? f0 : f1;
            if (tok < m && f < n) y[(size_t)tok * n + f] = __float2half_rn(acc[4 * j + e]);
        }
    }
}

#define SM90_ENTRY(BT, MINB)                                                                                         \
    extern "C" __global__ void __launch_bounds__(256, MINB)                                                          \
        w4_gemm_f16_sm90_t##BT(const __grid_constant__ CUtensorMap xmap, const uint4* __restrict__ q,                \
                               const __half2* __restrict__ sz, __half* __restrict__ y, float* __restrict__ part,     \
                               unsigned int* __restrict__ counters, int m, int n, int np, int k, int g) {           \
        w4_gemm_sm90<BT>(&xmap, q, sz, y, part, counters, m, n, np, k, g);                                          \
    }
SM90_ENTRY(256, 1)
SM90_ENTRY(128, 2)
