// Hopper warpgroup MMA (wgmma, sm_90a) helpers shared by the large-M GEMM (w4a16_sm90.cu) and
// the skinny one (w4a16_skinny_sm90.cu): the shared-memory descriptor of a K-major operand with
// the 128-byte swizzle, and the fence / commit / wait around asynchronous MMAs.
#pragma once
#include <stdint.h>

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

