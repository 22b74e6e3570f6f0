// W4A16 GEMM for Hopper (sm_90a): warpgroup MMA (wgmma) with the 4-bit weights dequantized in
// registers as the A operand, the way Marlin-style kernels keep dequantization off shared memory.
//
// Y[m, n] = X[m, k] W[n, k]^T is computed as Y^T = W X^T: weights are the wgmma "A" (64 rows per
// warpgroup, from registers) and the tokens the "B" operand (from shared memory, K-major with the
// 128-byte swizzle). The tiled weight layout (see w4a16.cu) gives warp w of a warpgroup, in word w
// of each unit, the m16 x k16 A fragment of rows 16w..16w+15: one 4-byte shared-memory read per
// lane per k16 step.
//
// Block: 2 warpgroups (weight rows 0-63 and 64-127 of the tile) x 256 tokens x k 64 per stage,
// 4 stages, one block per SM; wgmma m64n256k16 with f32 accumulators (128 per thread). Requires
// k % 64 == 0 and group size % 64 == 0 (one group per stage). The stages are filled by the tensor
// memory accelerator: thread 0 issues, per stage, one 2D tensor copy of the X tile (the copy
// applies the 128-byte swizzle; rows past m read as zeros) and 1D bulk copies of the weight units
// and scales, all completing on the stage's "full" mbarrier; each warp releases a stage on its
// "empty" mbarrier once its MMAs are done, and thread 0 refills it with the tile 4 ahead. The
// warpgroups never meet at a block barrier. Against the previous version (cp.async, a __syncthreads
// per k tile, 128 tokens, two blocks per SM) on an H100: the barrier-free pipeline +5 %, 256-token
// tiles (half the dequantization per MMA) +17 %: 0.81-0.83x cuBLAS at M = 4096 (BENCHMARKS.md).
#include <cuda.h>
#include "common.cuh"
#include "w4_dequant.cuh"
#include "wgmma.cuh"

#define SM90_BN 128      // weight rows per block
#define SM90_BT 256      // tokens per block
#define SM90_BK 64
#define SM90_STAGES 4
#define SM90_X_BYTES (SM90_BT * SM90_BK * 2)  // 32 KB, 1024-aligned (swizzle atoms)
#define SM90_W_BYTES (4 * 2 * 512)            // 4 k16 steps x 2 units of 64 rows
#define SM90_SZ_BYTES (SM90_BN * 4)
// X stages first (each 1024-aligned), then weights, scales and the 2 x 4 mbarriers; +1024 for
// aligning the base. Mirrored by SM90_SMEM in mod.rs.
#define SM90_W0 (SM90_STAGES * SM90_X_BYTES)
#define SM90_Z0 (SM90_W0 + SM90_STAGES * SM90_W_BYTES)
#define SM90_BAR0 (SM90_Z0 + SM90_STAGES * SM90_SZ_BYTES)
#define SM90_SMEM (SM90_BAR0 + 2 * SM90_STAGES * 8 + 1024)

// d (128 f32) += A (4 regs, f16 fragment) x B (descriptor), m64n256k16.
__device__ __forceinline__ void wgmma_m64n256(float* d, const uint32_t* a, uint64_t desc) {
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "setp.ne.b32 p, %133, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.f16.f16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, "
        "{%128, %129, %130, %131}, %132, p, 1, 1, 0;\n"
        "}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1));
}

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

// xmap: X as a 2D f16 tensor (k columns, m rows), 64 x SM90_BT boxes, 128-byte swizzle (mod.rs).
extern "C" __global__ void __launch_bounds__(256, 1)
    w4_gemm_f16_sm90(const __grid_constant__ CUtensorMap xmap, const uint4* __restrict__ q, const __half2* __restrict__ sz,
                     __half* __restrict__ y, int m, int n, int np, int k, int g) {
    extern __shared__ uint8_t smem_raw[];
    const uint32_t raw = (uint32_t)__cvta_generic_to_shared(smem_raw);
    const uint32_t base = (raw + 1023) & ~1023u;
    uint8_t* base_ptr = smem_raw + (base - raw);
    const uint32_t bar0 = base + SM90_BAR0;  // full[stage], then empty[stage]
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int bn = blockIdx.x, bt = blockIdx.y;
    const int nunits = np >> 6;
    const int ktiles = k / SM90_BK;
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
    auto produce = [&](int kt) {
        const int s = kt % SM90_STAGES;
        const uint32_t full = bar0 + s * 8;
        mbar_expect_tx(full, SM90_X_BYTES + 4 * wbytes + zbytes);
        tma_2d(base + s * SM90_X_BYTES, &xmap, kt * SM90_BK, bt * SM90_BT, full);
        const uint32_t ws = base + SM90_W0 + s * SM90_W_BYTES;
#pragma unroll
        for (int kk = 0; kk < 4; kk++) bulk_1d(ws + kk * 2 * 512, q + ((size_t)(kt * 4 + kk) * nunits + bn * 2) * 32, wbytes, full);
        bulk_1d(base + SM90_Z0 + s * SM90_SZ_BYTES, sz + (size_t)(kt * SM90_BK / g) * np + bn * SM90_BN, zbytes, full);
    };
    if (tid == 0)
        for (int kt = 0; kt < SM90_STAGES && kt < ktiles; kt++) produce(kt);

    const int wg = warp >> 2, w = warp & 3;
    const int gi = lane >> 2, ti = lane & 3;
    // This lane's weight rows within the tile (A fragment rows g and g + 8 of warp w).
    const int r0 = wg * 64 + w * 16 + gi, r1 = r0 + 8;
    float acc[128];
#pragma unroll
    for (int i = 0; i < 128; i++) acc[i] = 0.f;
    // A tile's words and (scale, zero) pairs, read from its stage once it has landed; the next
    // tile's are read while this tile's MMAs run (they are not MMA operands, so ptxas keeps the
    // MMAs asynchronous).
    uint32_t words[4];
    __half2 szr[2];
    auto read_tile = [&](int kt) {
        const int s = kt % SM90_STAGES;
        mbar_wait(bar0 + s * 8, (kt / SM90_STAGES) & 1);
        const uint32_t* w_p = reinterpret_cast<const uint32_t*>(base_ptr + SM90_W0 + s * SM90_W_BYTES);
        const __half2* sz_p = reinterpret_cast<const __half2*>(base_ptr + SM90_Z0 + s * SM90_SZ_BYTES);
        szr[0] = sz_p[r0];
        szr[1] = sz_p[r1];
#pragma unroll
        for (int kk = 0; kk < 4; kk++) words[kk] = w_p[(kk * 2 + wg) * 128 + w * 32 + lane];
    };
    if (ktiles > 0) read_tile(0);
    for (int kt = 0; kt < ktiles; kt++) {
        const int s = kt % SM90_STAGES;
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
        const uint32_t xs = base + s * SM90_X_BYTES;
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < 4; kk++) wgmma_m64n256(acc, a[kk], desc_sw128(xs + kk * 32));
        wgmma_commit();
        // While the MMAs run: thread 0 refills the stage the previous tile used, once every warp
        // has released it; everyone reads the next tile's words.
        if (tid == 0 && kt >= 1 && kt - 1 + SM90_STAGES < ktiles) {
            mbar_wait(bar0 + (SM90_STAGES + (kt - 1) % SM90_STAGES) * 8, ((kt - 1) / SM90_STAGES) & 1);
            produce(kt - 1 + SM90_STAGES);
        }
        if (kt + 1 < ktiles) read_tile(kt + 1);
        // The stage and `a` are reused: wait for the MMAs, then release the stage.
        wgmma_wait<0>();
        __syncwarp();
        if (lane == 0) mbar_arrive(bar0 + (SM90_STAGES + s) * 8);
    }

    // acc[4j + e]: weight row r0 (e < 2) or r1, token 8j + 2t + (e & 1).
    const int f0 = bn * SM90_BN + r0, f1 = bn * SM90_BN + r1;
#pragma unroll
    for (int j = 0; j < 32; j++) {
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int tok = bt * SM90_BT + j * 8 + ti * 2 + (e & 1);
            const int f = e < 2 ? f0 : f1;
            if (tok < m && f < n) y[(size_t)tok * n + f] = __float2half_rn(acc[4 * j + e]);
        }
    }
}
