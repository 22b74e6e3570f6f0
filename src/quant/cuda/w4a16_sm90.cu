// W4A16 GEMM for Hopper (sm_90a): warpgroup MMA (wgmma) with the 4-bit weights dequantized in
// registers as the A operand, the way Marlin-style kernels keep dequantization off shared memory.
//
// Y[m, n] = X[m, k] W[n, k]^T is computed as Y^T = W X^T: weights are the wgmma "A" (64 rows per
// warpgroup, from registers) and the tokens the "B" operand (from shared memory, K-major with the
// 128-byte swizzle, exactly the layout the sm_80 kernel in w4a16.cu already stages activations in).
// The tiled weight layout (see w4a16.cu) gives warp w of a warpgroup, in word w of each unit, the
// m16 x k16 A fragment of rows 16w..16w+15: one 4-byte shared-memory read per lane per k16 step.
//
// Block: 2 warpgroups (weight rows 0-63 and 64-127 of the tile) x 128 tokens x k 64 per stage,
// cp.async into a 4-deep pipeline; wgmma m64n128k16 with f32 accumulators. Requires k % 64 == 0
// and group size % 64 == 0 (one group per stage).
#include "common.cuh"
#include "w4_dequant.cuh"

#define SM90_BN 128      // weight rows per block
#define SM90_BT 128      // tokens per block
#define SM90_BK 64
#define SM90_STAGES 4
#define SM90_X_BYTES (SM90_BT * SM90_BK * 2)  // 16 KB, 1024-aligned (swizzle atoms)
#define SM90_W_BYTES (8 * 512)
#define SM90_SZ_BYTES (SM90_BN * 4)
// X tiles first (each 1024-aligned), then weights, then scales; +1024 for aligning the base.
#define SM90_SMEM (SM90_STAGES * (SM90_X_BYTES + SM90_W_BYTES + SM90_SZ_BYTES) + 1024)

// Shared-memory matrix descriptor: K-major, 128-byte swizzle, 8-row atoms 1024 bytes apart.
__device__ __forceinline__ uint64_t desc_sw128(uint32_t addr) {
    uint64_t d = 0;
    d |= (uint64_t)((addr & 0x3FFFF) >> 4);
    d |= (uint64_t)1 << 16;                 // leading byte offset (unused with this swizzle)
    d |= (uint64_t)(1024 >> 4) << 32;       // stride byte offset: next 8-row atom
    d |= (uint64_t)1 << 62;                 // 128-byte swizzle
    return d;
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// d (64 f32) += A (4 regs, f16 fragment) x B (descriptor), m64n128k16.
__device__ __forceinline__ void wgmma_m64n128(float* d, const uint32_t* a, uint64_t desc) {
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "setp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
        "{%64, %65, %66, %67}, %68, p, 1, 1, 0;\n"
        "}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1));
}

extern "C" __global__ void __launch_bounds__(256, 1)
    w4_gemm_f16_sm90(const __half* __restrict__ x, const uint4* __restrict__ q, const __half2* __restrict__ sz,
                     __half* __restrict__ y, int m, int n, int np, int k, int g) {
    extern __shared__ uint8_t smem_raw[];
    const uint32_t raw = (uint32_t)__cvta_generic_to_shared(smem_raw);
    const uint32_t base = (raw + 1023) & ~1023u;
    uint8_t* base_ptr = smem_raw + (base - raw);
    const uint32_t x_s0 = base;
    const uint32_t w_s0 = base + SM90_STAGES * SM90_X_BYTES;
    const uint32_t sz_s0 = w_s0 + SM90_STAGES * SM90_W_BYTES;
    const uint32_t* w_p0 = reinterpret_cast<const uint32_t*>(base_ptr + SM90_STAGES * SM90_X_BYTES);
    const __half2* sz_p0 = reinterpret_cast<const __half2*>(base_ptr + SM90_STAGES * (SM90_X_BYTES + SM90_W_BYTES));

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int wg = warp >> 2, w = warp & 3;
    const int gi = lane >> 2, ti = lane & 3;
    const int bn = blockIdx.x, bt = blockIdx.y;
    const int nunits = np >> 6;
    const int ktiles = k / SM90_BK;

    auto load_stage = [&](int kt, int stage) {
        const uint32_t xs = x_s0 + stage * SM90_X_BYTES;
#pragma unroll
        for (int i = 0; i < SM90_BT * 8 / 256; i++) {
            const int idx = tid + i * 256;
            const int r = idx >> 3, c = idx & 7;
            const int row = bt * SM90_BT + r;
            const bool ok = row < m;
            cp_async16(xs + r * 128 + ((c ^ (r & 7)) << 4), x + (size_t)(ok ? row : 0) * k + kt * SM90_BK + c * 8, ok);
        }
        {
            const int u = tid >> 5, kk = u >> 1, h = u & 1;
            const int unit_n = bn * 2 + h;
            const bool ok = unit_n < nunits;
            const uint4* src = q + ((size_t)(kt * 4 + kk) * nunits + (ok ? unit_n : 0)) * 32 + lane;
            cp_async16(w_s0 + stage * SM90_W_BYTES + (u * 32 + lane) * 16, src, ok);
        }
        if (tid < 32) {
            const int grp = kt * SM90_BK / g;
            const int col = bn * SM90_BN + tid * 4;
            const bool ok = col < np;
            cp_async16(sz_s0 + stage * SM90_SZ_BYTES + tid * 16, sz + (size_t)grp * np + (ok ? col : 0), ok);
        }
    };

    float acc[64];
#pragma unroll
    for (int i = 0; i < 64; i++) acc[i] = 0.f;

#pragma unroll
    for (int s = 0; s < SM90_STAGES - 1; s++) {
        if (s < ktiles) load_stage(s, s);
        cp_async_commit();
    }
    // This lane's weight rows within the tile (A fragment rows g and g + 8 of warp w).
    const int r0 = wg * 64 + w * 16 + gi, r1 = r0 + 8;
    for (int kt = 0; kt < ktiles; kt++) {
        cp_async_wait<SM90_STAGES - 2>();
        // cp.async writes are generic-proxy writes; wgmma reads through the async proxy.
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        __syncthreads();
        if (kt + SM90_STAGES - 1 < ktiles) load_stage(kt + SM90_STAGES - 1, (kt + SM90_STAGES - 1) % SM90_STAGES);
        cp_async_commit();

        const int stage = kt % SM90_STAGES;
        __half2 zl0, zh0, s0, zl1, zh1, s1;
        sz_consts(sz_p0[stage * SM90_BN + r0], zl0, zh0, s0);
        sz_consts(sz_p0[stage * SM90_BN + r1], zl1, zh1, s1);
        uint32_t a[4][4];
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {
            const uint32_t word = w_p0[stage * (SM90_W_BYTES / 4) + (kk * 2 + wg) * 128 + w * 32 + lane];
            // Tile 2w (row r0) and 2w + 1 (row r1) of the word are the A fragment of rows r0, r1:
            // a0 row r0 k 2t.., a1 row r1 k 2t.., a2 row r0 k 2t+8.., a3 row r1 k 2t+8...
            const Dq d = dequant_word(word, zl0, zh0, s0, zl1, zh1, s1);
            a[kk][0] = as_u32(d.a0);
            a[kk][1] = as_u32(d.b0);
            a[kk][2] = as_u32(d.a1);
            a[kk][3] = as_u32(d.b1);
        }
        const uint32_t xs = x_s0 + stage * SM90_X_BYTES;
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < 4; kk++) wgmma_m64n128(acc, a[kk], desc_sw128(xs + kk * 32));
        wgmma_commit();
        // The next iteration refills the stage read here and rewrites `a`: wait for the MMAs.
        wgmma_wait<0>();
    }
    cp_async_wait<0>();

    // acc[4j + e]: weight row r0 (e < 2) or r1, token 8j + 2t + (e & 1).
    const int f0 = bn * SM90_BN + r0, f1 = bn * SM90_BN + r1;
#pragma unroll
    for (int j = 0; j < 16; j++) {
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int tok = bt * SM90_BT + j * 8 + ti * 2 + (e & 1);
            const int f = e < 2 ? f0 : f1;
            if (tok < m && f < n) y[(size_t)tok * n + f] = __float2half_rn(acc[4 * j + e]);
        }
    }
}
