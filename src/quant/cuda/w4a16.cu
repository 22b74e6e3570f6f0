// W4A16 kernels for the packed layout of src/quant/cpu.rs: per output row, codes in 32-weight
// chunks of 16 bytes (byte j: weight j in the low nibble, weight j + 16 in the high nibble),
// an f16 scale and a u8 zero per (row, group); w = (q - zero) * scale.
//
// w4_gemv_*: few tokens (M <= 8). Each warp takes ROWS_PER_WARP output rows; each lane streams
// 16-byte chunks of every row (a warp reads 512 contiguous bytes of each row per step),
// dequantizes in registers, multiplies with up to 8 tokens' activations and accumulates in f32;
// warp shuffles reduce.
// w4_dequant_*: the weight dequantized to the activation dtype for a cuBLAS GEMM (prefill).
// poison_*: fills a buffer with NaN (the self-test's guard against unwritten outputs).
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

#define MAX_TOKENS 8

__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f(float v) { return v; }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }

// 32 activations starting at p (16-byte aligned for 16-bit types, as k % 32 == 0).
template <typename T> __device__ __forceinline__ void load32(const T* p, float* out) {
#pragma unroll
    for (int j = 0; j < 32; j++) out[j] = to_f(p[j]);
}
template <> __device__ __forceinline__ void load32<__half>(const __half* p, float* out) {
    const uint4* v = reinterpret_cast<const uint4*>(p);
#pragma unroll
    for (int q = 0; q < 4; q++) {
        uint4 u = v[q];
        const __half2* h = reinterpret_cast<const __half2*>(&u);
#pragma unroll
        for (int e = 0; e < 4; e++) {
            float2 f = __half22float2(h[e]);
            out[q * 8 + 2 * e] = f.x;
            out[q * 8 + 2 * e + 1] = f.y;
        }
    }
}
template <> __device__ __forceinline__ void load32<__nv_bfloat16>(const __nv_bfloat16* p, float* out) {
    const uint4* v = reinterpret_cast<const uint4*>(p);
#pragma unroll
    for (int q = 0; q < 4; q++) {
        uint4 u = v[q];
        const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
        for (int e = 0; e < 4; e++) {
            float2 f = __bfloat1622float2(h[e]);
            out[q * 8 + 2 * e] = f.x;
            out[q * 8 + 2 * e + 1] = f.y;
        }
    }
}

// Rows per warp: each lane keeps one 16-byte load per row in flight (4 independent loads instead
// of 1, which a warp-per-row kernel left too few of to cover HBM latency), and each activation
// chunk, loaded and converted once, serves all of them.
#define ROWS_PER_WARP 4

template <typename T>
__device__ void w4_gemv(const uint8_t* __restrict__ codes, const __half* __restrict__ scales,
                        const uint8_t* __restrict__ zeros, const T* __restrict__ x, T* __restrict__ y,
                        int n, int k, int g, int m) {
    const int row0 = ((blockIdx.x * blockDim.x + threadIdx.x) >> 5) * ROWS_PER_WARP;
    const int lane = threadIdx.x & 31;
    if (row0 >= n) return;
    const int groups = k / g;
    const int chunks = k >> 5;
    float acc[ROWS_PER_WARP][MAX_TOKENS];
#pragma unroll
    for (int r = 0; r < ROWS_PER_WARP; r++)
#pragma unroll
        for (int t = 0; t < MAX_TOKENS; t++) acc[r][t] = 0.f;
    for (int c = lane; c < chunks; c += 32) {
        uint4 packed[ROWS_PER_WARP];
        float s[ROWS_PER_WARP], zs[ROWS_PER_WARP];
        const int gi = (c << 5) / g;
#pragma unroll
        for (int r = 0; r < ROWS_PER_WARP; r++) {
            const int row = row0 + r < n ? row0 + r : n - 1;  // clamped: loads stay in bounds
            packed[r] = __ldg(reinterpret_cast<const uint4*>(codes + (size_t)row * (k >> 1)) + c);
            s[r] = __half2float(scales[(size_t)row * groups + gi]);
            zs[r] = -(float)zeros[(size_t)row * groups + gi] * s[r];
        }
#pragma unroll
        for (int t = 0; t < MAX_TOKENS; t++) {
            if (t < m) {
                float xv[32];
                load32<T>(x + (size_t)t * k + (c << 5), xv);
#pragma unroll
                for (int r = 0; r < ROWS_PER_WARP; r++) {
                    const uint8_t* b = reinterpret_cast<const uint8_t*>(&packed[r]);
                    float a = 0.f;
#pragma unroll
                    for (int j = 0; j < 16; j++) {
                        a = fmaf(fmaf((float)(b[j] & 0xF), s[r], zs[r]), xv[j], a);
                        a = fmaf(fmaf((float)(b[j] >> 4), s[r], zs[r]), xv[j + 16], a);
                    }
                    acc[r][t] += a;
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < ROWS_PER_WARP; r++) {
#pragma unroll
        for (int t = 0; t < MAX_TOKENS; t++) {
            if (t < m) {
                float v = acc[r][t];
#pragma unroll
                for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
                if (lane == 0 && row0 + r < n) y[(size_t)t * n + row0 + r] = from_f<T>(v);
            }
        }
    }
}

template <typename T>
__device__ void w4_dequant(const uint8_t* __restrict__ codes, const __half* __restrict__ scales,
                           const uint8_t* __restrict__ zeros, T* __restrict__ w, int n, int k, int g) {
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    const size_t half_k = (size_t)(k >> 1);
    if (idx >= (size_t)n * half_k) return;
    const int row = (int)(idx / half_k);
    const int bi = (int)(idx % half_k);
    const int k0 = (bi >> 4) * 32 + (bi & 15);
    const int groups = k / g;
    const float s = __half2float(scales[(size_t)row * groups + k0 / g]);
    const float z = (float)zeros[(size_t)row * groups + k0 / g];
    const uint8_t b = codes[idx];
    w[(size_t)row * k + k0] = from_f<T>(((float)(b & 0xF) - z) * s);
    w[(size_t)row * k + k0 + 16] = from_f<T>(((float)(b >> 4) - z) * s);
}

template <typename T> __device__ void poison(T* p, size_t n) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) p[i] = from_f<T>(__int_as_float(0x7fc00000));
}

#define INSTANTIATE(NAME, T)                                                                        \
    extern "C" __global__ void w4_gemv_##NAME(const uint8_t* codes, const __half* scales,          \
                                              const uint8_t* zeros, const T* x, T* y, int n, int k, \
                                              int g, int m) {                                       \
        w4_gemv<T>(codes, scales, zeros, x, y, n, k, g, m);                                         \
    }                                                                                               \
    extern "C" __global__ void w4_dequant_##NAME(const uint8_t* codes, const __half* scales,       \
                                                 const uint8_t* zeros, T* w, int n, int k, int g) { \
        w4_dequant<T>(codes, scales, zeros, w, n, k, g);                                            \
    }                                                                                               \
    extern "C" __global__ void poison_##NAME(T* p, unsigned long long n) { poison<T>(p, (size_t)n); }

INSTANTIATE(f16, __half)
INSTANTIATE(bf16, __nv_bfloat16)
INSTANTIATE(f32, float)
