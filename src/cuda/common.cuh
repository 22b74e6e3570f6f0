// Helpers shared by every CUDA source of the crate (build.rs puts this folder on the include
// path): dtype conversions, bit tricks, cp.async and the f16 tensor-core MMA.
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f(float v) { return v; }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }

// (a & b) | c
__device__ __forceinline__ uint32_t lop3_and_or(uint32_t a, uint32_t b, uint32_t c) {
    uint32_t d;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}
__device__ __forceinline__ __half2 as_h2(uint32_t v) { return *reinterpret_cast<__half2*>(&v); }
__device__ __forceinline__ uint32_t as_u32(__half2 v) { return *reinterpret_cast<uint32_t*>(&v); }

// 16 bytes global -> shared, asynchronously.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src));
}
// As cp_async16; with `valid` false the 16 bytes are zero-filled instead (tile edges).
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
    const int n = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// c (f32) += a (f16 m16k16 fragment, 4 registers) x b (f16 k16n8 fragment).
__device__ __forceinline__ void mma16816(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Up to 8 device ranges to pull into L2 ahead of the kernel that reads them (the next layer's
// weights, while a latency-bound kernel leaves DRAM idle). Mirrors `L2Prefetch` in
// src/quant/cuda/prefetch.rs; bytes are multiples of 16, empty ranges have bytes 0.
struct L2Prefetch {
    unsigned long long ptr[8];
    unsigned long long bytes[8];
};

#define L2_PREFETCH_CHUNK 4096u

// Block `block` of `blocks` (thread threadIdx.x of blockDim.x) issues its share of the ranges as
// bulk L2 prefetches of up to 4 KB, chunk c going to block c % blocks: an SM's TMA unit takes
// its time over each, so a few blocks issuing megabytes would hold their kernel up for tens of
// microseconds; spread over every SM the issue costs about a microsecond. Nothing waits for the
// data. Compute 9.0 and newer; older cards skip the hint.
__device__ __forceinline__ void l2_prefetch(const L2Prefetch& p, unsigned block, unsigned blocks) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    const unsigned long long part = (unsigned long long)threadIdx.x * blocks + block;
    const unsigned long long parts = (unsigned long long)blockDim.x * blocks;
#pragma unroll  // constant indices: the parameter struct is not copied to local memory
    for (int r = 0; r < 8; r++) {
        const unsigned long long bytes = p.bytes[r];
        const unsigned long long chunks = (bytes + L2_PREFETCH_CHUNK - 1) / L2_PREFETCH_CHUNK;
        for (unsigned long long c = part; c < chunks; c += parts) {
            const unsigned long long off = c * L2_PREFETCH_CHUNK;
            const unsigned size = (unsigned)min((unsigned long long)L2_PREFETCH_CHUNK, bytes - off) & ~15u;
            if (size > 0)
                asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(p.ptr[r] + off), "r"(size) : "memory");
        }
    }
#endif
}
