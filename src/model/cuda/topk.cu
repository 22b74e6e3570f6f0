// The k largest logits of each row (src/model/cuda/topk.rs), so that a batched server step copies
// k (value, id) pairs a sequence to the host instead of its whole vocabulary (64 rows of Llama-2's
// 32000 f32 logits are 8 MB a step; of Llama-3's 128256, 33 MB).
//
// Order: falling value, then rising id — the order the sampler ranks candidates in — with NaN
// below every number (the sampler never draws it), -0 below +0 (as f32::total_cmp). Each value
// maps to a 32-bit key whose unsigned order is that order; (key, ~id) is then unique per element.
//
// One block per row. A radix select finds the k-th largest key in four passes over the row (its
// top 8, 16, 24, 32 bits: a 256-bin histogram in shared memory each, lanes of a warp that hit the
// same bin adding once). A fifth pass gathers the keys above it and, in id order, as many of
// those equal to it as the k still need: each thread reads a contiguous range of ids and a prefix
// sum over the threads gives every element its slot, so the result never depends on timing.
// The k pairs are then sorted in shared memory (bitonic, k ≤ TOPK_MAX).
#include "common.cuh"

#define TOPK_THREADS 256
#define TOPK_MAX 256

// Unsigned order = numeric order; NaN lowest.
__device__ __forceinline__ uint32_t order_key(float v) {
    if (isnan(v)) return 0u;
    const uint32_t b = __float_as_uint(v);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// Exclusive prefix sum of `v` over the block's threads; `*total` gets the sum of all.
__device__ __forceinline__ int block_exclusive_sum(int v, int* warp_sums, int* total) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int x = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int y = __shfl_up_sync(0xffffffffu, x, o);
        if (lane >= o) x += y;
    }
    if (lane == 31) warp_sums[warp] = x;
    __syncthreads();
    if (warp == 0) {
        int s = lane < TOPK_THREADS / 32 ? warp_sums[lane] : 0;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const int y = __shfl_up_sync(0xffffffffu, s, o);
            if (lane >= o) s += y;
        }
        if (lane < TOPK_THREADS / 32) warp_sums[lane] = s;
    }
    __syncthreads();
    const int before = (warp > 0 ? warp_sums[warp - 1] : 0) + x - v;
    *total = warp_sums[TOPK_THREADS / 32 - 1];
    __syncthreads();
    return before;
}

// values/ids [rows, k]; logits [rows, vocab] contiguous; 1 ≤ k ≤ min(vocab, TOPK_MAX).
extern "C" __global__ void __launch_bounds__(TOPK_THREADS)
    logits_topk_f32(const float* logits, float* values, unsigned int* ids, int vocab, int k) {
    __shared__ int hist[256];
    __shared__ int warp_sums[TOPK_THREADS / 32];
    __shared__ uint32_t s_prefix;
    __shared__ int s_need;
    __shared__ unsigned long long pairs[TOPK_MAX];
    const float* row = logits + (size_t)blockIdx.x * vocab;
    const int t = threadIdx.x, lane = t & 31;
    // The k-th largest key agrees with `prefix` on the bits of `mask`; `need` of the keys that
    // agree with it belong to the top k.
    uint32_t prefix = 0, mask = 0;
    int need = k;
    for (int shift = 24; shift >= 0; shift -= 8) {
        hist[t] = 0;
        __syncthreads();
        for (int base = 0; base < vocab; base += TOPK_THREADS) {
            const int i = base + t;
            int bin = -1;
            if (i < vocab) {
                const uint32_t key = order_key(row[i]);
                if ((key & mask) == prefix) bin = (key >> shift) & 255;
            }
            // Every lane takes part (the loop bound is the same for the whole block).
            const unsigned peers = __match_any_sync(0xffffffffu, bin);
            if (bin >= 0 && (__ffs(peers) - 1) == lane) atomicAdd(&hist[bin], __popc(peers));
        }
        __syncthreads();
        if (t == 0) {
            int above = 0, d = 255;
            for (; d > 0; d--) {
                if (above + hist[d] >= need) break;
                above += hist[d];
            }
            s_prefix = prefix | ((uint32_t)d << shift);
            s_need = need - above;
        }
        __syncthreads();
        prefix = s_prefix;
        need = s_need;
        mask |= 255u << shift;
    }
    // `prefix` is now the k-th largest key: the k - need keys above it all belong, and the first
    // `need` equal to it in id order.
    const int chunk = (vocab + TOPK_THREADS - 1) / TOPK_THREADS;
    const int lo = min(t * chunk, vocab), hi = min(lo + chunk, vocab);
    int gt = 0, eq = 0;
    for (int i = lo; i < hi; i++) {
        const uint32_t key = order_key(row[i]);
        gt += key > prefix;
        eq += key == prefix;
    }
    int total_gt, total_eq;
    int at_gt = block_exclusive_sum(gt, warp_sums, &total_gt);
    int at_eq = block_exclusive_sum(eq, warp_sums, &total_eq);
    const int first_eq = k - need;  // == total_gt
    for (int i = lo; i < hi; i++) {
        const uint32_t key = order_key(row[i]);
        const unsigned long long pair = ((unsigned long long)key << 32) | (0xffffffffu - (uint32_t)i);
        if (key > prefix) {
            pairs[at_gt++] = pair;
        } else if (key == prefix) {
            if (at_eq < need) pairs[first_eq + at_eq] = pair;
            at_eq++;
        }
    }
    int p2 = 1;
    while (p2 < k) p2 <<= 1;
    for (int i = k + t; i < p2; i += TOPK_THREADS) pairs[i] = 0;
    __syncthreads();
    // Bitonic sort of pairs[0 .. p2), falling.
    for (int size = 2; size <= p2; size <<= 1) {
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            for (int i = t; i < p2; i += TOPK_THREADS) {
                const int j = i ^ stride;
                if (j > i) {
                    const unsigned long long a = pairs[i], b = pairs[j];
                    const bool falling = (i & size) == 0;
                    if (falling ? a < b : a > b) {
                        pairs[i] = b;
                        pairs[j] = a;
                    }
                }
            }
            __syncthreads();
        }
    }
    for (int i = t; i < k; i += TOPK_THREADS) {
        const unsigned int id = 0xffffffffu - (unsigned int)(pairs[i] & 0xffffffffu);
        values[(size_t)blockIdx.x * k + i] = row[id];
        ids[(size_t)blockIdx.x * k + i] = id;
    }
}
