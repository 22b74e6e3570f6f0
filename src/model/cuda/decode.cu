// Fused decode-step kernels for the CUDA model path (src/model/cuda/mod.rs).
//
// decode_attention_*: one query token per sequence against the KV cache, read in place: scores,
//   softmax (f32) and the weighted sum of values in one launch per layer, instead of a scale,
//   two batched matmuls, two dtype conversions, a softmax and a transpose copy. One block of
//   256 threads per (sequence, query head), up to ATT_CHUNK_MAX positions; grouped-query heads
//   index their shared KV head. Longer caches take attention_chunk_* + attention_combine_* (below).
//   With `pos` non-null the length comes from the device (pos[0] + 1), so a captured CUDA graph
//   of the decode step replays at any position.
// silu_mul_*: silu(a) * b over rows with their own strides (the gate and up halves of a fused
//   GEMV output, or two separate tensors): one launch instead of two.
// add_rms_norm_*: the residual add and the RMS norm after it, one launch.
// add_rms_norm and silu_mul precede GEMVs in decode and take an L2Prefetch (common.cuh): extra
// blocks on otherwise idle SMs pull the GEMV's weights into L2 while DRAM would sit idle.
// rope_kv_write_*: the rotary embedding of one token's queries, and of its key written into the
//   KV cache with its value, at the position read from the device (CUDA-graph decode).
// paged_attention_chunk_*, rope_kv_write_rows_*: the server's batched decode step over
//   the paged KV cache: every sequence's token in one launch each, at its own position, its
//   positions found through a row table (model/paged.rs) instead of one contiguous cache.
#include "common.cuh"

// 8 consecutive elements (16-byte aligned for 16-bit types, 32-byte for f32) as floats.
template <typename T> __device__ __forceinline__ void load8(const T* p, float* f) {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
    for (int i = 0; i < 8; i++) f[i] = to_f(e[i]);
}
template <> __device__ __forceinline__ void load8<float>(const float* p, float* f) {
    const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
    f[0] = a.x; f[1] = a.y; f[2] = a.z; f[3] = a.w;
    f[4] = b.x; f[5] = b.y; f[6] = b.z; f[7] = b.w;
}

#define ATT_THREADS 256

__device__ __forceinline__ float block_reduce(float v, float* red, bool is_max) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float other = __shfl_xor_sync(0xffffffffu, v, o);
        v = is_max ? fmaxf(v, other) : v + other;
    }
    __syncthreads();  // red may still be read by a previous reduction
    if (lane == 0) red[warp] = v;
    __syncthreads();
    float r = red[0];
#pragma unroll
    for (int w = 1; w < ATT_THREADS / 32; w++) r = is_max ? fmaxf(r, red[w]) : r + red[w];
    return r;
}

// Positions one attention block takes at most; the split kernels take a chunk length (≤ this)
// from the host.
#define ATT_CHUNK_MAX 256

// Shared memory of one attention block: the query, the scores of up to ATT_CHUNK_MAX positions,
// the value streams' partial sums and the reduction scratch.
struct __align__(16) AttSmem {
    float q[256];
    float scores[ATT_CHUNK_MAX];
    float partial[ATT_THREADS * 8];
    float red[8];
};

// One head's attention over n (<= ATT_CHUNK_MAX) positions whose keys and values start at kb and vb:
// the softmax statistics (max, sum of exp) are returned and the unnormalized weighted sum of
// values is left in sm.partial, as `streams` rows of d summed by att_out. sm.q holds the query.
// With a row table (paged caches, `rows` non-null) position j is at row rows[j] of kb and vb.
template <typename T>
__device__ float2 attend_span(AttSmem& sm, const T* __restrict__ kb, const T* __restrict__ vb, int n, int d,
                              long long k_sl, long long v_sl, float scale,
                              const unsigned int* __restrict__ rows = nullptr) {
    const int tid = threadIdx.x;
    const int tpr = d >> 3;                 // threads per key or value row, 8 elements each
    const int streams = ATT_THREADS / tpr;  // rows taken in parallel
    const int stream = tid / tpr, d0 = (tid % tpr) * 8;
    // Scores: the tpr threads of a row read it side by side (one coalesced row per group) and sum
    // their 8 products across the group with shuffles (tpr is a power of two ≤ 32, so a group
    // never straddles a warp). A thread per whole row left most threads idle in short chunks and
    // spread each warp's loads over 32 rows.
    float qf[8];
#pragma unroll
    for (int e = 0; e < 8; e++) qf[e] = sm.q[d0 + e];
    float lmax = -INFINITY;
    for (int base = 0; base < n; base += streams) {  // the same trip count in every thread
        const int j = base + stream;
        float dot = 0.f;
        if (j < n) {
            float f[8];
            load8<T>(kb + (rows != nullptr ? (long long)rows[j] : (long long)j) * k_sl + d0, f);
#pragma unroll
            for (int e = 0; e < 8; e++) dot = fmaf(f[e], qf[e], dot);
        }
        for (int o = tpr >> 1; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
        if (j < n && d0 == 0) {
            dot *= scale;
            sm.scores[j] = dot;
            lmax = fmaxf(lmax, dot);
        }
    }
    const float mx = block_reduce(lmax, sm.red, true);
    float lsum = 0.f;
    for (int j = tid; j < n; j += ATT_THREADS) {
        const float p = __expf(sm.scores[j] - mx);
        sm.scores[j] = p;
        lsum += p;
    }
    const float total = block_reduce(lsum, sm.red, false);  // its barriers also publish the scores
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int j = stream; j < n; j += streams) {
        const float p = sm.scores[j];
        float f[8];
        load8<T>(vb + (rows != nullptr ? (long long)rows[j] : (long long)j) * v_sl + d0, f);
#pragma unroll
        for (int e = 0; e < 8; e++) acc[e] = fmaf(p, f[e], acc[e]);
    }
#pragma unroll
    for (int e = 0; e < 8; e++) sm.partial[stream * d + d0 + e] = acc[e];
    __syncthreads();
    return make_float2(mx, total);
}

// Element i of the weighted value sum attend_span left in sm.partial.
__device__ __forceinline__ float att_out(const AttSmem& sm, int i, int d) {
    float s = 0.f;
    for (int st = 0; st < ATT_THREADS / (d >> 3); st++) s += sm.partial[st * d + i];
    return s;
}

// Loads the query of (sequence blockIdx.y, head blockIdx.x) into sm.q; returns its offset.
template <typename T> __device__ size_t load_query(AttSmem& sm, const T* __restrict__ q, int d, int heads) {
    const size_t qo = ((size_t)blockIdx.y * heads + blockIdx.x) * d;
    for (int i = threadIdx.x; i < d; i += ATT_THREADS) sm.q[i] = to_f(q[qo + i]);
    __syncthreads();
    return qo;
}

// Up to ATT_CHUNK_MAX positions (the caller takes the chunked kernels beyond its chunk length).
template <typename T>
__device__ void decode_attention(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                 T* __restrict__ out, int len, const unsigned int* __restrict__ pos, int d,
                                 int heads, int n_rep, long long k_sb, long long k_sh, long long k_sl, long long v_sb,
                                 long long v_sh, long long v_sl, float scale) {
    __shared__ AttSmem sm;
    if (pos != nullptr) len = (int)pos[0] + 1;
    const int head = blockIdx.x, b = blockIdx.y, kvh = head / n_rep;
    const size_t qo = load_query(sm, q, d, heads);
    const float2 st = attend_span(sm, k + b * k_sb + kvh * k_sh, v + b * v_sb + kvh * v_sh, len, d, k_sl, v_sl, scale);
    const float inv = 1.f / st.y;
    for (int i = threadIdx.x; i < d; i += ATT_THREADS) out[qo + i] = from_f<T>(att_out(sm, i, d) * inv);
}

// Split-sequence attention (flash-decoding): block (head, sequence, c) takes positions
// [c * chunk, +chunk) (chunk ≤ ATT_CHUNK_MAX, the host's choice) and writes its softmax
// statistics and unnormalized output,
// part[((b * heads + head) * nchunks + c) * (d + 2)] = (max, sum, o[d]); a chunk past the
// length writes (-inf, 0). Then one block per head combines the chunks. Hundreds of blocks instead
// of one per head: a 32-head model used 32 SMs, and at long contexts each read megabytes.
template <typename T>
__device__ void attention_chunk(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                float* __restrict__ part, int len, const unsigned int* __restrict__ pos, int d,
                                int heads, int n_rep, long long k_sb, long long k_sh, long long k_sl, long long v_sb,
                                long long v_sh, long long v_sl, float scale, int chunk) {
    __shared__ AttSmem sm;
    if (pos != nullptr) len = (int)pos[0] + 1;
    const int head = blockIdx.x, b = blockIdx.y, c = blockIdx.z, nchunks = gridDim.z, tid = threadIdx.x;
    float* out = part + (((size_t)b * heads + head) * nchunks + c) * (d + 2);
    const int j0 = c * chunk, n = min(chunk, len - j0);
    if (n <= 0) {
        if (tid == 0) {
            out[0] = -INFINITY;
            out[1] = 0.f;
        }
        return;
    }
    const int kvh = head / n_rep;
    load_query(sm, q, d, heads);
    const float2 st = attend_span(sm, k + b * k_sb + kvh * k_sh + j0 * k_sl, v + b * v_sb + kvh * v_sh + j0 * v_sl, n, d,
                                  k_sl, v_sl, scale);
    for (int i = tid; i < d; i += ATT_THREADS) out[2 + i] = att_out(sm, i, d);
    if (tid == 0) {
        out[0] = st.x;
        out[1] = st.y;
    }
}

// attention_chunk over the server's paged KV cache: one query token per sequence b of a batch,
// each with its own length lens[b] and its positions' rows in the pool, table[b * width + j]
// (the pool is [rows, kv_heads, d]: row stride kv_heads * d, head stride d). Chunks past a
// sequence's length write (-inf, 0); attention_combine then reduces the chunks as for one cache.
template <typename T>
__device__ void paged_attention_chunk(const T* __restrict__ q, const T* __restrict__ kp, const T* __restrict__ vp,
                                      float* __restrict__ part, const unsigned int* __restrict__ table,
                                      const unsigned int* __restrict__ lens, int width, int d, int heads, int n_rep,
                                      float scale, int chunk) {
    __shared__ AttSmem sm;
    const int head = blockIdx.x, b = blockIdx.y, c = blockIdx.z, nchunks = gridDim.z, tid = threadIdx.x;
    float* out = part + (((size_t)b * heads + head) * nchunks + c) * (d + 2);
    const int j0 = c * chunk, n = min(chunk, (int)lens[b] - j0);
    if (n <= 0) {
        if (tid == 0) {
            out[0] = -INFINITY;
            out[1] = 0.f;
        }
        return;
    }
    const int kvh = head / n_rep;
    const long long row = (long long)(heads / n_rep) * d;
    load_query(sm, q, d, heads);
    const float2 st = attend_span(sm, kp + (long long)kvh * d, vp + (long long)kvh * d, n, d, row, row, scale,
                                  table + (size_t)b * width + j0);
    for (int i = tid; i < d; i += ATT_THREADS) out[2 + i] = att_out(sm, i, d);
    if (tid == 0) {
        out[0] = st.x;
        out[1] = st.y;
    }
}

// out[b, head] = sum_c exp(m_c - M) o_c / sum_c exp(m_c - M) l_c over the chunks.
template <typename T>
__device__ void attention_combine(const float* __restrict__ part, T* __restrict__ out, int nchunks, int d, int heads) {
    const int head = blockIdx.x, b = blockIdx.y;
    const float* p = part + ((size_t)b * heads + head) * nchunks * (d + 2);
    float mx = -INFINITY;
    for (int c = 0; c < nchunks; c++) mx = fmaxf(mx, p[c * (d + 2)]);
    float den = 0.f;
    for (int c = 0; c < nchunks; c++) {
        const float m = p[c * (d + 2)];
        if (m != -INFINITY) den += __expf(m - mx) * p[c * (d + 2) + 1];
    }
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float num = 0.f;
        for (int c = 0; c < nchunks; c++) {
            const float m = p[c * (d + 2)];
            if (m != -INFINITY) num += __expf(m - mx) * p[c * (d + 2) + 2 + i];
        }
        out[((size_t)b * heads + head) * d + i] = from_f<T>(num / den);
    }
}

template <typename T>
__device__ void silu_mul(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ out, int rows, int cols,
                         long long sa, long long sb, const L2Prefetch& pf) {
    // Blocks past the elements only issue the L2 hint (spread over idle SMs, see l2_prefetch).
    const unsigned work = (unsigned)(((size_t)rows * cols + blockDim.x - 1) / blockDim.x);
    if (blockIdx.x >= work) {
        l2_prefetch(pf, blockIdx.x - work, gridDim.x - work);
        return;
    }
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)rows * cols) return;
    const int r = (int)(i / cols), c = (int)(i % cols);
    const float x = to_f(a[r * sa + c]);
    out[i] = from_f<T>(x / (1.f + __expf(-x)) * to_f(b[r * sb + c]));
}

#define NORM_THREADS 512
// Row elements a thread keeps in registers between the sum of squares and the scaling: rows of
// up to 16 x 512 = 8192 take one pass over memory with 16-byte loads.
#define NORM_PER_THREAD 16

// 8 consecutive floats stored as T (16-byte aligned for 16-bit types, 32-byte for f32).
template <typename T> __device__ __forceinline__ void store8(T* p, const float* f) {
    uint4 u;
    T* e = reinterpret_cast<T*>(&u);
#pragma unroll
    for (int i = 0; i < 8; i++) e[i] = from_f<T>(f[i]);
    *reinterpret_cast<uint4*>(p) = u;
}
template <> __device__ __forceinline__ void store8<float>(float* p, const float* f) {
    reinterpret_cast<float4*>(p)[0] = make_float4(f[0], f[1], f[2], f[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(f[4], f[5], f[6], f[7]);
}

__device__ __forceinline__ float norm_block_sum(float v) {
    __shared__ float red[NORM_THREADS / 32];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
    __syncthreads();
    float total = 0.f;
#pragma unroll
    for (int i = 0; i < NORM_THREADS / 32; i++) total += red[i];
    return total;
}

// The residual add fused with the RMS norm that follows it: sum = x + delta (rounded to T, as the
// separate add would), normed = rsqrt(mean(sum^2) + eps) * sum * w, in f32 like candle's rms_norm.
// One block per row; without delta only the norm (sum is then not written). One launch where
// there were two; blocks past the rows issue the L2 hint for the GEMV that reads `normed`.
// `vec`: h % 8 == 0, h <= NORM_THREADS * NORM_PER_THREAD and 16-byte aligned rows; the row is
// then read once with 16-byte loads and held in registers (a latency-bound kernel: every
// dependent round trip to memory shows in the decode step); else an element loop.
template <typename T>
__device__ void add_rms_norm(const T* __restrict__ x, const T* __restrict__ delta, T* __restrict__ sum,
                             T* __restrict__ normed, const T* __restrict__ w, int rows, int h, float eps, bool vec,
                             const L2Prefetch& pf) {
    if ((int)blockIdx.x >= rows) {
        l2_prefetch(pf, blockIdx.x - rows, gridDim.x - rows);
        return;
    }
    const size_t row = (size_t)blockIdx.x * h;
    if (vec) {
        float v[NORM_PER_THREAD];
        float ss = 0.f;
#pragma unroll
        for (int c = 0; c < NORM_PER_THREAD / 8; c++) {
            const int i = (threadIdx.x + c * NORM_THREADS) * 8;
            if (i < h) {
                load8<T>(x + row + i, v + 8 * c);
                if (delta != nullptr) {
                    float d[8];
                    load8<T>(delta + row + i, d);
#pragma unroll
                    for (int e = 0; e < 8; e++) v[8 * c + e] = to_f(from_f<T>(v[8 * c + e] + d[e]));
                    store8<T>(sum + row + i, v + 8 * c);
                }
#pragma unroll
                for (int e = 0; e < 8; e++) ss = fmaf(v[8 * c + e], v[8 * c + e], ss);
            }
        }
        const float scale = rsqrtf(norm_block_sum(ss) / h + eps);
#pragma unroll
        for (int c = 0; c < NORM_PER_THREAD / 8; c++) {
            const int i = (threadIdx.x + c * NORM_THREADS) * 8;
            if (i < h) {
                float wf[8], o[8];
                load8<T>(w + i, wf);
#pragma unroll
                for (int e = 0; e < 8; e++) o[e] = scale * v[8 * c + e] * wf[e];
                store8<T>(normed + row + i, o);
            }
        }
        return;
    }
    float ss = 0.f;
    for (int i = threadIdx.x; i < h; i += NORM_THREADS) {
        float v = to_f(x[row + i]);
        if (delta != nullptr) {
            const T s = from_f<T>(v + to_f(delta[row + i]));
            sum[row + i] = s;
            v = to_f(s);
        }
        ss = fmaf(v, v, ss);
    }
    const float scale = rsqrtf(norm_block_sum(ss) / h + eps);
    const T* src = delta != nullptr ? sum : x;  // this thread's own writes: no barrier needed
    for (int i = threadIdx.x; i < h; i += NORM_THREADS) normed[row + i] = from_f<T>(scale * to_f(src[row + i]) * to_f(w[i]));
}

// Rotate-half (HF) rotary embedding of elements i and i + half of one head `x` at table row p.
template <typename T>
__device__ __forceinline__ void rotate_pair(const T* __restrict__ x, T* __restrict__ out, const T* __restrict__ cos,
                                            const T* __restrict__ sin, size_t p, int i, int half) {
    const float c = to_f(cos[p * half + i]), s = to_f(sin[p * half + i]);
    const float a = to_f(x[i]), b = to_f(x[i + half]);
    out[i] = from_f<T>(a * c - b * s);
    out[i + half] = from_f<T>(b * c + a * s);
}

// One token's rotary embedding of its queries and the KV-cache write of its key (rotated) and
// value at pos[0], in one launch: grid = kv_heads + heads, d / 2 threads. Block h < kv_heads writes
// KV head h into the caches (head_stride / pos_stride apart); block kv_heads + j rotates query
// head j into q_out ([heads, d]). One launch instead of two per layer of the graph decode step.
template <typename T>
__device__ void rope_kv_write(const T* __restrict__ q, T* __restrict__ q_out, const T* __restrict__ k,
                              const T* __restrict__ v, T* __restrict__ kc, T* __restrict__ vc, const T* __restrict__ cos,
                              const T* __restrict__ sin, const unsigned int* __restrict__ pos, int d, int kv_heads,
                              long long head_stride, long long pos_stride) {
    const int h = blockIdx.x, i = threadIdx.x, half = d >> 1;
    if (i >= half) return;
    const size_t p = pos[0];
    if (h >= kv_heads) {
        const size_t o = (size_t)(h - kv_heads) * d;
        rotate_pair(q + o, q_out + o, cos, sin, p, i, half);
        return;
    }
    const size_t o = (size_t)h * head_stride + p * pos_stride;
    rotate_pair(k + (size_t)h * d, kc + o, cos, sin, p, i, half);
    vc[o + i] = v[(size_t)h * d + i];
    vc[o + i + half] = v[(size_t)h * d + i + half];
}

// rope_kv_write for one token per sequence of a batch, each at its own position pos[b], into the
// paged pool ([rows, kv_heads, d]) at row rows[b]: grid = (kv_heads + heads, batch), d / 2
// threads. q, k and v hold each token's heads x d values q_stride, k_stride and v_stride apart
// (columns of a fused q/k/v output, read in place); q_out is [batch, heads, d].
template <typename T>
__device__ void rope_kv_write_rows(const T* __restrict__ q, long long q_stride, T* __restrict__ q_out,
                                   const T* __restrict__ k, long long k_stride, const T* __restrict__ v, long long v_stride,
                                   T* __restrict__ kp, T* __restrict__ vp, const T* __restrict__ cos, const T* __restrict__ sin,
                                   const unsigned int* __restrict__ pos, const unsigned int* __restrict__ rows, int d,
                                   int heads, int kv_heads) {
    const int h = blockIdx.x, b = blockIdx.y, i = threadIdx.x, half = d >> 1;
    if (i >= half) return;
    if (h >= kv_heads) {
        const int j = h - kv_heads;
        rotate_pair(q + b * q_stride + (size_t)j * d, q_out + ((size_t)b * heads + j) * d, cos, sin, pos[b], i, half);
        return;
    }
    const T* ks = k + b * k_stride + (size_t)h * d;
    const T* vs = v + b * v_stride + (size_t)h * d;
    const size_t dst = ((size_t)rows[b] * kv_heads + h) * d;
    rotate_pair(ks, kp + dst, cos, sin, pos[b], i, half);
    vp[dst + i] = vs[i];
    vp[dst + i + half] = vs[i + half];
}

#define INSTANTIATE(NAME, T)                                                                              \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS) decode_attention_##NAME(                    \
        const T* q, const T* k, const T* v, T* out, int len, const unsigned int* pos, int d, int heads, int n_rep, \
        long long k_sb, long long k_sh, long long k_sl, long long v_sb, long long v_sh, long long v_sl, float scale) { \
        decode_attention<T>(q, k, v, out, len, pos, d, heads, n_rep, k_sb, k_sh, k_sl, v_sb, v_sh, v_sl, scale); \
    }                                                                                                     \
    extern "C" __global__ void rope_kv_write_##NAME(const T* q, T* q_out, const T* k, const T* v, T* kc, T* vc, \
                                                    const T* cos, const T* sin, const unsigned int* pos, int d, \
                                                    int kv_heads, long long head_stride, long long pos_stride) { \
        rope_kv_write<T>(q, q_out, k, v, kc, vc, cos, sin, pos, d, kv_heads, head_stride, pos_stride);    \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_chunk_##NAME(                     \
        const T* q, const T* k, const T* v, float* part, int len, const unsigned int* pos, int d, int heads,  \
        int n_rep, long long k_sb, long long k_sh, long long k_sl, long long v_sb, long long v_sh,         \
        long long v_sl, float scale, int chunk) {                                                         \
        attention_chunk<T>(q, k, v, part, len, pos, d, heads, n_rep, k_sb, k_sh, k_sl, v_sb, v_sh, v_sl, scale, \
                           chunk);                                                                        \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS) paged_attention_chunk_##NAME(               \
        const T* q, const T* kp, const T* vp, float* part, const unsigned int* table, const unsigned int* lens, \
        int width, int d, int heads, int n_rep, float scale, int chunk) {                                 \
        paged_attention_chunk<T>(q, kp, vp, part, table, lens, width, d, heads, n_rep, scale, chunk);     \
    }                                                                                                     \
    extern "C" __global__ void rope_kv_write_rows_##NAME(                                                 \
        const T* q, long long qs, T* q_out, const T* k, long long ks, const T* v, long long vs, T* kp, T* vp, \
        const T* cos, const T* sin, const unsigned int* pos, const unsigned int* rows, int d, int heads,      \
        int kv_heads) {                                                                                   \
        rope_kv_write_rows<T>(q, qs, q_out, k, ks, v, vs, kp, vp, cos, sin, pos, rows, d, heads, kv_heads); \
    }                                                                                                     \
    extern "C" __global__ void attention_combine_##NAME(const float* part, T* out, int nchunks, int d,    \
                                                        int heads) {                                      \
        attention_combine<T>(part, out, nchunks, d, heads);                                               \
    }                                                                                                     \
    extern "C" __global__ void silu_mul_##NAME(const T* a, const T* b, T* out, int rows, int cols, long long sa, \
                                               long long sb, L2Prefetch pf) {                             \
        silu_mul<T>(a, b, out, rows, cols, sa, sb, pf);                                                   \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(NORM_THREADS) add_rms_norm_##NAME(                      \
        const T* x, const T* delta, T* sum, T* normed, const T* w, int rows, int h, float eps, int vec,   \
        L2Prefetch pf) {                                                                                  \
        add_rms_norm<T>(x, delta, sum, normed, w, rows, h, eps, vec != 0, pf);                            \
    }

INSTANTIATE(f16, __half)
INSTANTIATE(bf16, __nv_bfloat16)
INSTANTIATE(f32, float)
