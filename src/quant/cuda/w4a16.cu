// W4A16 kernels on the tiled device layout of src/quant/tiled.rs.
//
// Layout. The weight W [n, k] (n padded to np, a multiple of 64) is cut into units of 16 k x 64 n,
// stored k-unit-major: unit (kb, nb) at ((kb * np/64) + nb) * 512 bytes. Inside a unit, lane l
// (g = l / 4, t = l % 4) owns word i at byte 128 i + 4 l (word-major: one coalesced 4-byte load per
// lane reads a row of words, conflict-free in shared memory too); word i holds the mma.m16n8k16 B
// fragments of two n8 tiles, 2i and 2i+1, for rows n = nb*64 + 16i + g and n + 8, as nibbles
//   0: W[n][2t]  4: W[n][2t+1]  1: W[n][2t+8]  5: W[n][2t+9]
//   2: W[n+8][2t] 6: W[n+8][2t+1] 3: W[n+8][2t+8] 7: W[n+8][2t+9]      (k relative to 16 kb),
// so four 4-byte loads per lane give a warp a 16 x 64 slice, and a `lop3` with 0x64006400 turns
// nibble pairs (0,4), (1,5), ... into fp16 pairs 1024 + q (or 1024 + 16 q) without conversions.
// Scales and zeros: sz[group * np + n] = (scale, zero) as a half2; w = (q - zero) * scale.
//
// w4_gemv1_f16_g*: up to 8 tokens (decode, small batches; _t16: up to 16 at g 64/128), f16, group
//   size 32, 64 or 128, up to 3 weights sharing the input in one launch: each warp loads its
//   words straight into registers 8 k16 steps ahead of the tensor-core math (see w4_gemv1
//   below); the fastest up to 16 tokens.
// w4_gemv_*: up to 8 tokens on CUDA cores (any dtype), or 8, 16, 32 or 64 token slots on tensor
//   cores (f16: w4_gemv_f16_mma*), up to 3 weights sharing the input (q/k/v, gate/up) in one launch.
//   A block of 4 warps owns 64 output rows and a slice of k (split-k over gridDim.y, so even a
//   4096-row layer fills the GPU), divided among its warps, each streaming its weights through a
//   cp.async ring in shared memory several rounds ahead; partial sums meet in shared memory,
//   then the last block of a row range to finish adds the slices' sums (no second launch).
//   Accumulation in f32. Each block, once its reads are issued and landed, prefetches its share
//   of an optional list of ranges into L2 (the next layer's weights in decode).
// w4_gemm_f16_*: tensor cores (mma.sync m16n8k16, f32 accumulators). Block tile BM x 128 x 64,
//   A (activations) and B (packed weights) staged through shared memory with cp.async in a
//   4-deep pipeline; B is dequantized in registers right before the mma, as Marlin does.
// w4_dequant_*: the dense weight, for the cuBLAS fallback (bf16/f32 prefill, odd group sizes).
// poison_*: fills a buffer with NaN (the self-test's guard against unwritten outputs).
#include "common.cuh"
#include "w4_dequant.cuh"
#include "w4_sets.cuh"

// ---------------------------------------------------------------------------------------------
// GEMV

// The end of both GEMVs: `sum(t, r)` is this block's sum for token t, row r of its range (from
// shared memory, after a __syncthreads). One k slice writes y; with several, each block
// publishes its sums and the last block of the row range to arrive adds them up (no second
// launch) and leaves the range's arrival counter at zero for the next launch.
template <typename T, int MT, typename Sum>
__device__ __forceinline__ void gemv_store(Sum sum, const GemvRows& rows, int m, int n_total, T* __restrict__ y,
                                           float* __restrict__ part, unsigned int* __restrict__ counters) {
    const int b = blockIdx.x, split = blockIdx.y, nsplit = gridDim.y;
    if (nsplit == 1) {
        for (int idx = threadIdx.x; idx < MT * 64; idx += blockDim.x) {
            const int t = idx >> 6, r = idx & 63, row = rows.nb * 64 + r;
            if (t < m && row < rows.n) y[(size_t)t * n_total + rows.out_off + row] = from_f<T>(sum(t, r));
        }
        return;
    }
    for (int idx = threadIdx.x; idx < MT * 64; idx += blockDim.x) {
        const int t = idx >> 6, r = idx & 63;
        if (t < m) part[((size_t)split * m + t) * (gridDim.x * 64) + b * 64 + r] = sum(t, r);
    }
    __threadfence();
    __shared__ bool last;
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(&counters[b], 1u) == (unsigned)nsplit - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    for (int idx = threadIdx.x; idx < MT * 64; idx += blockDim.x) {
        const int t = idx >> 6, r = idx & 63, row = rows.nb * 64 + r;
        if (t < m && row < rows.n) {
            float v = 0.f;
            for (int sp = 0; sp < nsplit; sp++) v += __ldcg(part + ((size_t)sp * m + t) * (gridDim.x * 64) + b * 64 + r);
            y[(size_t)t * n_total + rows.out_off + row] = from_f<T>(v);
        }
    }
    if (threadIdx.x == 0) counters[b] = 0;  // ready for the next launch
}

#define GEMV_WARPS 4
// Slots of each warp's ring: 2 rounds ahead of the math (a 4-slot ring measured no faster).
#define GEMV_SLOTS 3
// Staged activation rows are padded from 64 to 72 elements: the tensor-core path reads token g's
// row in lanes 4g..4g+3, and an unpadded 128-byte stride put all eight tokens in one bank.
#define GEMV_XS 72
#define GEMV_UNITS_BYTES (4 * 512)
// (scale, zero) pairs of 64 rows for one group.
#define GEMV_SZ_GROUP_BYTES (64 * 4)
// Row stride of the cross-warp reduction buffers (both GEMVs): 64 sums padded so the tensor-core
// paths' stores (token 2t + e in lanes 4g + t) fall in distinct banks.
#define GEMV_RED_STRIDE 68

// Bytes of one ring slot, shared by the kernel and its wrapper (gemv_smem in mod.rs): four weight
// units, the (scale, zero) pairs of the groups a 64-wide k window can touch (a window starting at
// any k16 step spans up to ceil(48 / g) + 1 groups; g is a multiple of 32) and `m` tokens' 64
// activations, padded rows of GEMV_XS.
__host__ __device__ __forceinline__ int gemv_sz_groups(int g) { return (48 + g - 1) / g + 1; }
__host__ __device__ __forceinline__ int gemv_slot_bytes(int g, int m, int elem) {
    return GEMV_UNITS_BYTES + gemv_sz_groups(g) * GEMV_SZ_GROUP_BYTES + m * GEMV_XS * elem;
}

template <typename T> __device__ __forceinline__ float2 load_x2(const T* p);
template <> __device__ __forceinline__ float2 load_x2<__half>(const __half* p) {
    return __half22float2(*reinterpret_cast<const __half2*>(p));
}
template <> __device__ __forceinline__ float2 load_x2<__nv_bfloat16>(const __nv_bfloat16* p) {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p));
}
template <> __device__ __forceinline__ float2 load_x2<float>(const float* p) {
    return *reinterpret_cast<const float2*>(p);
}

// MMA (f16 activations only): the products run on the tensor cores, Marlin-style: each unit word
// turns into the exact integers (q - zero) of the m16k16 A fragment of 16 rows, and the up-to-8
// tokens are the n8 B operand; no f16 -> f32 conversions. Otherwise the same integers are
// converted to f32 and multiplied with f32 activations. Either way a group's sums are scaled once,
// in f32, when the group ends. The loop is instruction-bound at batch 1 (Nsight Compute: DRAM at
// a third of its peak), so it does no divisions and no 64-bit index math: it counts groups and
// advances pointers.
template <typename T, int MT, bool MMA>
__device__ void w4_gemv(const W4Sets& ws, const T* __restrict__ x, T* __restrict__ y, int k, int g, int m,
                        int n_total, float* __restrict__ part, unsigned int* __restrict__ counters,
                        const L2Prefetch& pf) {
    static_assert(!MMA || (MT % 8 == 0 && sizeof(T) == 2), "the MMA GEMV takes f16 and 8, 16, 32 or 64 token slots");
    // n8 token tiles of the MMA path. With one, the MMA sums the exact integers (q - zero) per
    // group and scales once per group (instruction-bound: the fewest instructions per word); with
    // more, each dequantized word feeds NT MMAs, so the weights are scaled in f16 first (as the
    // GEMMs do) and accumulate straight into the totals: a third of the accumulator registers.
    constexpr int NT = MT / 8;
    constexpr bool EXACT_GROUPS = !MMA || NT == 1;
    const int b = blockIdx.x;
    const int split = blockIdx.y, nsplit = gridDim.y;
    const GemvRows rows = gemv_rows(ws, b);
    const int nb = rows.nb, np = rows.np;
    const uint32_t* __restrict__ q = rows.q;
    const __half2* __restrict__ sz = rows.sz;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int gi = lane >> 2, ti = lane & 3;
    const int ksteps = k >> 4, nunits = np >> 6;
    // This block's slice of the k16 steps; each warp takes a contiguous range of it, so its
    // scales change only every g/16 steps.
    const int per_split = (ksteps + nsplit - 1) / nsplit;
    const int b0 = split * per_split, b1 = min(ksteps, b0 + per_split);
    const int per = (b1 - b0 + GEMV_WARPS - 1) / GEMV_WARPS;
    const int s0 = b0 + warp * per, s1 = min(b1, s0 + per);
    float acc[MT][8];
#pragma unroll
    for (int t = 0; t < MT; t++)
#pragma unroll
        for (int j = 0; j < 8; j++) acc[t][j] = 0.f;
    // MMA: m16 tile wi (rows 16 wi .. 16 wi + 15) of token tile j: c0, c1 row g tokens
    // 8 j + 2t, 2t+1; c2, c3 row g + 8. With one token tile gacc sums the exact (q - zero) x
    // products of the current group and macc the scaled groups; with more, macc takes the
    // products of the scaled weights directly.
    float macc[MMA ? NT : 1][4][4], gacc[4][4];
#pragma unroll
    for (int wi = 0; wi < 4; wi++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            gacc[wi][e] = 0.f;
#pragma unroll
            for (int j = 0; j < (MMA ? NT : 1); j++) macc[j][wi][e] = 0.f;
        }
    // Per group: exact integers (q - zero) times x summed in `gsum`, then scaled once into acc.
    float gsum[MT][8];
#pragma unroll
    for (int t = 0; t < MT; t++)
#pragma unroll
        for (int j = 0; j < 8; j++) gsum[t][j] = 0.f;
    __half2 zl[8], zh[8], sh[8];
    float sc[8];
    // A group's sums, scaled once into the totals (row 16 wi + g takes scale j = 2 wi, row + 8 2 wi + 1).
    auto flush = [&]() {
        if constexpr (MMA) {
            if constexpr (NT == 1) {
#pragma unroll
                for (int wi = 0; wi < 4; wi++)
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        macc[0][wi][e] = fmaf(sc[2 * wi + (e >> 1)], gacc[wi][e], macc[0][wi][e]);
                        gacc[wi][e] = 0.f;
                    }
            }
        } else {
#pragma unroll
            for (int t = 0; t < MT; t++)
#pragma unroll
                for (int j = 0; j < 8; j++) {
                    acc[t][j] = fmaf(sc[j], gsum[t][j], acc[t][j]);
                    gsum[t][j] = 0.f;
                }
        }
    };
    // Rounds of four k16 steps stream through a per-warp ring of GEMV_SLOTS slots in shared
    // memory with cp.async, GEMV_SLOTS - 1 rounds ahead of the math. A slot holds everything a
    // round reads: the four 512-byte weight units, the (scale, zero) pairs of the groups the round
    // touches (64 rows x 4 bytes each) and the round's 64 activations of the m tokens. Read from
    // global memory directly, the scales and activations were dependent loads stalling every step.
    // Slots are sized for this launch's m and g, so an SM holds as many blocks as it can.
    extern __shared__ __align__(16) uint8_t gemv_smem[];
    const int SZ_BYTES = gemv_sz_groups(g) * GEMV_SZ_GROUP_BYTES;
    const int SLOT = gemv_slot_bytes(g, m, (int)sizeof(T));
    uint8_t* ring = gemv_smem + warp * (GEMV_SLOTS * SLOT);
    const uint32_t ring_s = (uint32_t)__cvta_generic_to_shared(ring);
    const int groups = k / g;
    // Group bookkeeping without divisions in the loop (a division by the run-time g costs ~20
    // instructions, and the loop is instruction-bound): a group spans spg = g / 16 >= 2 steps;
    // the issue and the math side each track theirs as the steps advance.
    const int spg = g >> 4;
    const int szg = gemv_sz_groups(g);
    // Issue side: the next round's first group and where the group after it starts; the weight
    // units of step s for this lane at unit_ptr + (s - s0) * unit_stride.
    int ga_issue = s0 / spg, gnext_issue = (ga_issue + 1) * spg;
    const size_t unit_stride = (size_t)nunits * 512;
    const uint8_t* unit_ptr = reinterpret_cast<const uint8_t*>(q) + ((size_t)s0 * nunits + nb) * 512 + lane * 16;
    const __half2* sz_rows = sz + nb * 64;
    // Activation pieces: piece pc = lane + 32 r is token pc / XP, 16-byte piece pc % XP of the
    // round's 64 values; addresses set up once and advanced by a round each time.
    constexpr int XP = 64 * (int)sizeof(T) / 16;
    constexpr int XR = (MT * XP + 31) / 32;
    // Up to 8 tokens each lane keeps a table of its pieces' addresses; with more (f16, XP = 8)
    // lane l copies piece l % 8 of tokens l / 8 + 4 r, addresses computed as the rounds go (a
    // table of 16 would take 64 registers).
    constexpr bool X_TABLE = MT <= 8;
    constexpr int XT = X_TABLE ? XR : 1;
    const uint8_t* x_src[XT];
    int x_dst[XT], x_piece[XT];
    bool x_on[XT];
    const int x_tok0 = lane / XP, x_pc = lane % XP;
    const T* x_lane = x + (size_t)x_tok0 * k + s0 * 16 + x_pc * (16 / (int)sizeof(T));
#pragma unroll
    for (int r = 0; r < XT; r++) {
        const int pc = lane + 32 * r, t = pc / XP;
        x_piece[r] = pc % XP;
        x_on[r] = pc < MT * XP && t < m;
        x_src[r] = reinterpret_cast<const uint8_t*>(x + (size_t)min(t, m - 1) * k + s0 * 16) + x_piece[r] * 16;
        x_dst[r] = t * GEMV_XS * (int)sizeof(T) + x_piece[r] * 16;
    }
    auto issue_round = [&](int s, int slot) {
        if (s < s1) {
            const uint32_t base = ring_s + slot * SLOT;
            const int n_steps = min(4, s1 - s);
#pragma unroll
            for (int i = 0; i < 4; i++)
                if (i < n_steps) cp_async16(base + i * 512 + lane * 16, unit_ptr + i * unit_stride);
            unit_ptr += 4 * unit_stride;
            while (s >= gnext_issue) {
                ga_issue++;
                gnext_issue += spg;
            }
            // The (scale, zero) pairs of szg groups from the round's first one: 16 pieces of 16
            // bytes per group (the round uses a prefix of them; those past the last group are skipped).
#pragma unroll
            for (int r = 0; r < 2; r++) {
                const int pc = lane + 32 * r;
                const int grp = ga_issue + (pc >> 4);
                if (pc < szg * 16 && grp < groups)
                    cp_async16(base + GEMV_UNITS_BYTES + pc * 16, sz_rows + (size_t)grp * np + (pc & 15) * 4);
            }
            // Activations: 64 per token (n_steps * 16 of them valid), this lane's 16-byte pieces.
            const int valid = n_steps * 16 * (int)sizeof(T) / 16;
            if constexpr (X_TABLE) {
#pragma unroll
                for (int r = 0; r < XR; r++) {
                    if (x_on[r] && x_piece[r] < valid) cp_async16(base + GEMV_UNITS_BYTES + SZ_BYTES + x_dst[r], x_src[r]);
                    x_src[r] += 64 * sizeof(T);
                }
            } else {
#pragma unroll
                for (int r = 0; r < XR; r++) {
                    const int t = x_tok0 + r * (32 / XP);
                    if (t < m && x_pc < valid)
                        cp_async16(base + GEMV_UNITS_BYTES + SZ_BYTES + t * GEMV_XS * (int)sizeof(T) + x_pc * 16,
                                   x_lane + (size_t)(r * (32 / XP)) * k);
                }
                x_lane += 64;
            }
        }
        cp_async_commit();
    };
#pragma unroll
    for (int r = 0; r < GEMV_SLOTS - 1; r++) issue_round(s0 + 4 * r, r);
    // The tensor-core path reads a B row for each of 8 token slots; those past m (whose products
    // are discarded) read token 0's row, so no lane leaves the ring.
    const int xrow = gi < m ? gi : 0;
    // Math side: the round's first group (its scales' offset in the slot), the current step's
    // group and the step where the next one starts; scales are loaded on a group change.
    int ga_math = s0 / spg, gnext_math = (ga_math + 1) * spg;
    int cur_group = ga_math, next_change = gnext_math;
    bool have_scales = false;
    for (int s = s0, round = 0; s < s1; s += 4, round++) {
        cp_async_wait<GEMV_SLOTS - 2>();
        __syncwarp();  // every lane's pieces of this round have landed; last round's reads are done
        issue_round(s + 4 * (GEMV_SLOTS - 1), (round + GEMV_SLOTS - 1) % GEMV_SLOTS);
        const uint8_t* slot = ring + (round % GEMV_SLOTS) * SLOT;
        const uint32_t* slot_words = reinterpret_cast<const uint32_t*>(slot);
        const __half2* slot_sz = reinterpret_cast<const __half2*>(slot + GEMV_UNITS_BYTES);
        const T* slot_x = reinterpret_cast<const T*>(slot + GEMV_UNITS_BYTES + SZ_BYTES);
        while (s >= gnext_math) {
            ga_math++;
            gnext_math += spg;
        }
#pragma unroll
        for (int i = 0; i < 4; i++) {
            if (s + i < s1) {
                if (s + i >= next_change) {
                    flush();
                    cur_group++;
                    next_change += spg;
                    have_scales = false;
                }
                if (!have_scales) {
                    have_scales = true;
#pragma unroll
                    for (int j = 0; j < 8; j++) {
                        const __half2 p = slot_sz[(cur_group - ga_math) * 64 + j * 8 + gi];
                        __half2 scale_h2;  // the GEMMs' f16 scale; the GEMV scales in f32 below
                        sz_consts(p, zl[j], zh[j], scale_h2);
                        sh[j] = scale_h2;
                        sc[j] = __low2float(p);
                    }
                }
                if constexpr (MMA && NT == 1) {
                    // B fragment: token g, k 2t, 2t+1 (b0) and 2t+8, 2t+9 (b1) of this step.
                    const uint32_t* xs = reinterpret_cast<const uint32_t*>(slot_x + xrow * GEMV_XS + i * 16 + 2 * ti);
                    const uint32_t b0 = xs[0], b1 = xs[4];
#pragma unroll
                    for (int wi = 0; wi < 4; wi++) {
                        const uint32_t w = slot_words[i * 128 + wi * 32 + lane];
                        const Dq d = dequant_word_unscaled(w, zl[2 * wi], zh[2 * wi], zl[2 * wi + 1], zh[2 * wi + 1]);
                        uint32_t a[4];
                        d.a_operand(a);
                        mma16816(gacc[wi], a, b0, b1);
                    }
                } else if constexpr (MMA) {
                    // Token tile j's B fragment: token 8 j + g (token 0's row past m: those
                    // products are discarded, and the row stays inside the ring).
                    uint32_t bf[NT][2];
#pragma unroll
                    for (int j = 0; j < NT; j++) {
                        const int row = 8 * j + gi < m ? 8 * j + gi : 0;
                        const uint32_t* xs = reinterpret_cast<const uint32_t*>(slot_x + row * GEMV_XS + i * 16 + 2 * ti);
                        bf[j][0] = xs[0];
                        bf[j][1] = xs[4];
                    }
#pragma unroll
                    for (int wi = 0; wi < 4; wi++) {
                        const uint32_t w = slot_words[i * 128 + wi * 32 + lane];
                        const Dq d = dequant_word(w, zl[2 * wi], zh[2 * wi], sh[2 * wi], zl[2 * wi + 1], zh[2 * wi + 1], sh[2 * wi + 1]);
                        uint32_t a[4];
                        d.a_operand(a);
#pragma unroll
                        for (int j = 0; j < NT; j++)
                            if (8 * j < m) mma16816(macc[j][wi], a, bf[j][0], bf[j][1]);
                    }
                } else {
                uint32_t words[4];
#pragma unroll
                for (int wi = 0; wi < 4; wi++) words[wi] = slot_words[i * 128 + wi * 32 + lane];
                float2 w0[8], w1[8];  // tile j: q - zero at (k 2t, 2t+1), (k 2t+8, 2t+9), exact
#pragma unroll
                for (int wi = 0; wi < 4; wi++) {
                    const __half2 sixteenth = __float2half2_rn(0.0625f);
                    uint32_t w = words[wi];
                    uint32_t lo = lop3_and_or(w, 0x000F000Fu, 0x64006400u);
                    uint32_t hi = lop3_and_or(w, 0x00F000F0u, 0x64006400u);
                    w0[2 * wi] = __half22float2(__hsub2(as_h2(lo), zl[2 * wi]));
                    w1[2 * wi] = __half22float2(__hfma2(as_h2(hi), sixteenth, zh[2 * wi]));
                    w >>= 8;
                    lo = lop3_and_or(w, 0x000F000Fu, 0x64006400u);
                    hi = lop3_and_or(w, 0x00F000F0u, 0x64006400u);
                    w0[2 * wi + 1] = __half22float2(__hsub2(as_h2(lo), zl[2 * wi + 1]));
                    w1[2 * wi + 1] = __half22float2(__hfma2(as_h2(hi), sixteenth, zh[2 * wi + 1]));
                }
#pragma unroll
                for (int t = 0; t < MT; t++) {
                    if (t < m) {
                        const T* xr = slot_x + t * GEMV_XS + i * 16 + 2 * ti;
                        const float2 x0 = load_x2<T>(xr), x1 = load_x2<T>(xr + 8);
#pragma unroll
                        for (int j = 0; j < 8; j++) {
                            float a = gsum[t][j];
                            a = fmaf(w0[j].x, x0.x, a);
                            a = fmaf(w0[j].y, x0.y, a);
                            a = fmaf(w1[j].x, x1.x, a);
                            a = fmaf(w1[j].y, x1.y, a);
                            gsum[t][j] = a;
                        }
                    }
                }
                }  // CUDA cores
            }
        }
    }
    cp_async_wait<0>();
    const bool any_steps = s0 < s1;
    // This block's reads are done: its share of the next layer's weights goes to L2 now, so DRAM
    // stays busy through the grid's tail and the launches until the next GEMV.
    l2_prefetch(pf, blockIdx.y * gridDim.x + blockIdx.x, gridDim.x * gridDim.y);
    if (any_steps && EXACT_GROUPS) flush();
    // The four lanes of a row group hold partial sums over different k; then the warps meet, in
    // the rings' memory once every warp is done with its ring.
    __syncthreads();
    float* red = reinterpret_cast<float*>(gemv_smem);
#define RED(w, t, r) red[((w) * MT + (t)) * GEMV_RED_STRIDE + (r)]
    if constexpr (MMA) {
        store_mma_sums<NT>(macc, &RED(warp, 0, 0), m, gi, ti, GEMV_RED_STRIDE);
    } else {
#pragma unroll
        for (int t = 0; t < MT; t++)
#pragma unroll
            for (int j = 0; j < 8; j++) {
                float v = acc[t][j];
                v += __shfl_xor_sync(0xffffffffu, v, 1);
                v += __shfl_xor_sync(0xffffffffu, v, 2);
                if (ti == 0) RED(warp, t, j * 8 + gi) = v;
            }
    }
    __syncthreads();
    gemv_store<T, MT>(
        [&](int t, int r) {
            float v = 0.f;
#pragma unroll
            for (int w = 0; w < GEMV_WARPS; w++) v += RED(w, t, r);
            return v;
        },
        rows, m, n_total, y, part, counters);
#undef RED
}

// ---------------------------------------------------------------------------------------------
// Batch-1 GEMV (f16): the decode step's kernel

// A 4-byte weight word that is read once: not kept in L1.
__device__ __forceinline__ uint32_t ld_stream(const uint32_t* p) {
    uint32_t v;
    asm volatile("ld.global.nc.L1::no_allocate.u32 %0, [%1];\n" : "=r"(v) : "l"(p));
    return v;
}
// As mma16816 with zero accumulators in (the first step of a group).
__device__ __forceinline__ void mma16816_first(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%10,%10,%10};\n"
        : "=f"(c[0]), "=f"(c[1]), "=f"(c[2]), "=f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(0.f));
}

#define GEMV1_MAX_WARPS 8
// Padding (in 4-byte words) of each token's row of staged x: lanes of row group g read token g's
// row, and the pad puts the eight rows in distinct banks.
#define GEMV1_X_PAD 4

// Few tokens (decode: one; batched decode and speculative verification: up to 64), f16, group
// size 16 * SPG. Blocks of 4 or 8 warps own 64 rows and a slice of k (split-k over gridDim.y as
// in w4_gemv); the warps divide the slice in whole groups, so a group's steps are a compile-time
// loop and its scale and zero constants are set up once. Each warp loads its weights straight
// from global memory into registers, AHEAD groups (8 k16 steps, 4 KB) ahead of the math: no
// shared-memory ring, no cp.async bookkeeping, and a group's loads are issued as its slot frees.
// Its slice of x (m tokens' rows) is staged once in shared memory (in registers it took the
// window's room: 5 % slower at one token). On an H100 this streams 4096 x 11008 at 77 % of the
// copy bandwidth where the ring kernel reaches 58 % (BENCHMARKS.md). The products run on the
// tensor cores as in w4_gemv's MMA path: the weights are the m16 A operand and the tokens the n8
// B operand, NT tiles of 8 token slots (slots past m compute discarded copies of token 0). With
// one tile the MMA sums the exact integers (q - zero) per group and scales once per group; with
// more, each dequantized word feeds NT MMAs, so the words are scaled in f16 first (as the GEMMs
// do) and accumulate straight into the totals.
template <int SPG, int AHEAD, int NT>
__device__ void w4_gemv1(const W4Sets& ws, const __half* __restrict__ x, __half* __restrict__ y, int k, int m,
                         int n_total, float* __restrict__ part, unsigned int* __restrict__ counters, const L2Prefetch& pf) {
    constexpr int D = SPG * AHEAD;  // k16 steps in flight
    constexpr bool EXACT = NT == 1;
    const GemvRows rows = gemv_rows(ws, blockIdx.x);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int gi = lane >> 2, ti = lane & 3;
    const int warps = blockDim.x >> 5;
    const int nunits = rows.np >> 6;
    // This warp's groups [g0, g0 + ng) of the G in k.
    const int G = k / (16 * SPG);
    const int W = gridDim.y * warps, wg = blockIdx.y * warps + warp;
    const int g0 = G * wg / W, ng = G * (wg + 1) / W - g0;
    // Word offsets (the wrapper keeps a weight under 2^32 words): this lane's word of step s of
    // this row range is at (s * nunits + nb) * 128 + lane, words i = 0..3 of a unit 32 apart.
    const uint32_t step_words = (uint32_t)nunits * 128;
    uint32_t off = ((uint32_t)g0 * SPG * nunits + rows.nb) * 128 + lane;
    uint32_t wbuf[D][4];
#pragma unroll
    for (int j = 0; j < D; j++) {
        if (j / SPG < ng) {
#pragma unroll
            for (int i = 0; i < 4; i++) wbuf[j][i] = ld_stream(rows.q + off + i * 32);
            off += step_words;
        }
    }
    // (scale, zero) of rows 8 j + g of the range (j = 2 wi + h: m16 tile wi, half h), per group.
    const __half2* szp = rows.sz + (size_t)g0 * rows.np + rows.nb * 64 + gi;
    __half2 szbuf[AHEAD][8];
#pragma unroll
    for (int a = 0; a < AHEAD; a++) {
        if (a < ng) {
#pragma unroll
            for (int j = 0; j < 8; j++) szbuf[a][j] = __ldg(szp + j * 8);
            szp += rows.np;
        }
    }
    // This warp's x: m rows of ceil(G / W) groups' room (gemv1_smem in kernels.rs), padded, in
    // 16-byte pieces (the wrapper aligns x to 16 bytes; a group is at least 64 bytes).
    extern __shared__ __align__(16) uint32_t gemv1_xs[];
    const int row_words = (G + W - 1) / W * SPG * 8 + GEMV1_X_PAD;
    uint32_t* xs = gemv1_xs + warp * m * row_words;
    {
        const int pieces = ng * SPG * 2;  // per token
        for (int p = lane; p < m * pieces; p += 32) {
            const int t = p / pieces, c = p - t * pieces;
            reinterpret_cast<uint4*>(xs + t * row_words)[c] =
                __ldg(reinterpret_cast<const uint4*>(x + (size_t)t * k + (size_t)g0 * SPG * 16) + c);
        }
        __syncwarp();
    }
    // B fragment of step s for token tile j: token 8 j + g's x[16 s + 2t, +1] and
    // x[16 s + 2t + 8, +9], 8 words per step (token 0's row for slots past m).
    const uint32_t* xg[NT];
#pragma unroll
    for (int j = 0; j < NT; j++) xg[j] = xs + (8 * j + gi < m ? 8 * j + gi : 0) * row_words + ti;
    // One tile: rows 16 wi + g (e = 0, 1) and + 8 (e = 2, 3), tokens 2t, 2t + 1.
    float acc[NT][4][4];
#pragma unroll
    for (int j = 0; j < NT; j++)
#pragma unroll
        for (int wi = 0; wi < 4; wi++)
#pragma unroll
            for (int e = 0; e < 4; e++) acc[j][wi][e] = 0.f;
    for (int gb = 0; gb < ng; gb += AHEAD) {
#pragma unroll
        for (int a = 0; a < AHEAD; a++) {
            if (gb + a < ng) {
                const bool refill = gb + a + AHEAD < ng;
                __half2 zl[8], zh[8], sh[8];
                float sc[8];
#pragma unroll
                for (int j = 0; j < 8; j++) {
                    sz_consts(szbuf[a][j], zl[j], zh[j], sh[j]);
                    sc[j] = __low2float(szbuf[a][j]);
                }
                if (refill) {
#pragma unroll
                    for (int j = 0; j < 8; j++) szbuf[a][j] = __ldg(szp + j * 8);
                    szp += rows.np;
                }
                // One tile: the group's exact sums of (q - zero) x, scaled once at its end.
                float gacc[4][4];
#pragma unroll
                for (int i = 0; i < SPG; i++) {
                    const int j = a * SPG + i;
                    const uint32_t w[4] = {wbuf[j][0], wbuf[j][1], wbuf[j][2], wbuf[j][3]};
                    uint32_t b[NT][2];
#pragma unroll
                    for (int tt = 0; tt < NT; tt++) {
                        b[tt][0] = xg[tt][j * 8];
                        b[tt][1] = xg[tt][j * 8 + 4];
                    }
                    if (refill) {
#pragma unroll
                        for (int c = 0; c < 4; c++) wbuf[j][c] = ld_stream(rows.q + off + c * 32);
                        off += step_words;
                    }
#pragma unroll
                    for (int wi = 0; wi < 4; wi++) {
                        if constexpr (EXACT) {
                            const Dq d = dequant_word_unscaled(w[wi], zl[2 * wi], zh[2 * wi], zl[2 * wi + 1], zh[2 * wi + 1]);
                            uint32_t af[4];
                            d.a_operand(af);
                            if (i == 0) mma16816_first(gacc[wi], af, b[0][0], b[0][1]);
                            else mma16816(gacc[wi], af, b[0][0], b[0][1]);
                        } else {
                            const Dq d = dequant_word(w[wi], zl[2 * wi], zh[2 * wi], sh[2 * wi], zl[2 * wi + 1], zh[2 * wi + 1], sh[2 * wi + 1]);
                            uint32_t af[4];
                            d.a_operand(af);
#pragma unroll
                            for (int tt = 0; tt < NT; tt++)
                                if (8 * tt < m) mma16816(acc[tt][wi], af, b[tt][0], b[tt][1]);
                        }
                    }
                }
                if constexpr (EXACT) {
#pragma unroll
                    for (int wi = 0; wi < 4; wi++)
#pragma unroll
                        for (int e = 0; e < 4; e++) acc[0][wi][e] = fmaf(sc[2 * wi + (e >> 1)], gacc[wi][e], acc[0][wi][e]);
                }
            }
        }
#pragma unroll
        for (int j = 0; j < NT; j++) xg[j] += D * 8;
    }
    // This block's reads are issued: its share of the next layer's weights goes to L2 now.
    l2_prefetch(pf, blockIdx.y * gridDim.x + blockIdx.x, gridDim.x * gridDim.y);
    // The warps' sums meet in the x staging memory, once every warp is done with its x.
    __syncthreads();
    float* red = reinterpret_cast<float*>(gemv1_xs);
    store_mma_sums<NT>(acc, red + warp * m * GEMV_RED_STRIDE, m, gi, ti, GEMV_RED_STRIDE);
    __syncthreads();
    gemv_store<__half, 8 * NT>(
        [&](int t, int r) {
            float v = 0.f;
            for (int w = 0; w < warps; w++) v += red[(w * m + t) * GEMV_RED_STRIDE + r];
            return v;
        },
        gemv_rows(ws, blockIdx.x), m, n_total, y, part, counters);  // recomputed: fewer live registers
}

// ---------------------------------------------------------------------------------------------
// GEMM (f16) on tensor cores

#define GM_BN 128
#define GM_BK 64
#define GM_STAGES 4

__device__ __forceinline__ void ldmatrix_x4(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
}
// Shared memory of one stage: A [BM][64] f16 (rows of 128 bytes, 16-byte chunks XOR-swizzled by
// row so ldmatrix reads are conflict-free), B 8 units of 512 bytes, and 128 (scale, zero) pairs.
template <int WM> struct GemmSmem {
    static constexpr int BM = 4 * 16 * WM;
    static constexpr int A_BYTES = BM * GM_BK * 2;
    static constexpr int B_BYTES = 8 * 512;
    static constexpr int SZ_BYTES = GM_BN * 4;
    static constexpr int STAGE = A_BYTES + B_BYTES + SZ_BYTES;
    static constexpr int TOTAL = STAGE * GM_STAGES;
};

// 8 warps: 4 along m (WM m16 tiles each) x 2 along n (64 columns = 8 n8 tiles each).
// Requires k % 64 == 0 and g % 64 == 0 (one group per stage); m and n are free.
template <int WM>
__device__ void w4_gemm_f16(const __half* __restrict__ x, const uint4* __restrict__ q, const __half2* __restrict__ sz,
                            __half* __restrict__ y, int m, int n, int np, int k, int g) {
    using S = GemmSmem<WM>;
    extern __shared__ __align__(16) uint8_t smem[];
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int wm = warp >> 1, wn = warp & 1;
    const int bm = blockIdx.y, bn = blockIdx.x;
    const int nunits = np >> 6;
    const int ktiles = k / GM_BK;
    const uint32_t smem_base = (uint32_t)__cvta_generic_to_shared(smem);

    auto load_stage = [&](int kt, int stage) {
        const uint32_t a_s = smem_base + stage * S::STAGE;
        const uint32_t b_s = a_s + S::A_BYTES;
        const uint32_t sz_s = b_s + S::B_BYTES;
        // A: BM rows x 8 chunks of 16 bytes.
#pragma unroll
        for (int i = 0; i < S::BM * 8 / 256; i++) {
            const int idx = tid + i * 256;
            const int r = idx >> 3, c = idx & 7;
            const int row = bm * S::BM + r;
            const bool ok = row < m;
            const __half* src = x + (size_t)(ok ? row : 0) * k + kt * GM_BK + c * 8;
            cp_async16(a_s + r * 128 + ((c ^ (r & 7)) << 4), src, ok);
        }
        // B: units (k16 step kk, n64 half wn) = tid / 32, one 16-byte piece per lane.
        {
            const int u = tid >> 5, kk = u >> 1, h = u & 1;
            const int unit_n = bn * 2 + h;
            const bool ok = unit_n < nunits;
            const uint4* src = q + ((size_t)(kt * 4 + kk) * nunits + (ok ? unit_n : 0)) * 32 + lane;
            cp_async16(b_s + (u * 32 + lane) * 16, src, ok);
        }
        // Scales and zeros of the stage's group for the block's 128 rows.
        if (tid < 32) {
            const int grp = kt * GM_BK / g;
            const int col = bn * GM_BN + tid * 4;
            const bool ok = col < np;
            const __half2* src = sz + (size_t)grp * np + (ok ? col : 0);
            cp_async16(sz_s + tid * 16, src, ok);
        }
    };

    float acc[WM][8][4];
#pragma unroll
    for (int i = 0; i < WM; i++)
#pragma unroll
        for (int j = 0; j < 8; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) acc[i][j][e] = 0.f;

#pragma unroll
    for (int s = 0; s < GM_STAGES - 1; s++) {
        if (s < ktiles) load_stage(s, s);
        cp_async_commit();
    }
    for (int kt = 0; kt < ktiles; kt++) {
        cp_async_wait<GM_STAGES - 2>();
        __syncthreads();
        // Refill the buffer every warp finished with in the previous iteration.
        if (kt + GM_STAGES - 1 < ktiles) load_stage(kt + GM_STAGES - 1, (kt + GM_STAGES - 1) % GM_STAGES);
        cp_async_commit();

        const int stage = kt % GM_STAGES;
        const uint32_t a_s = smem_base + stage * S::STAGE;
        const uint8_t* stage_ptr = smem + stage * S::STAGE;
        const uint4* b_s = reinterpret_cast<const uint4*>(stage_ptr + S::A_BYTES);
        const __half2* sz_s = reinterpret_cast<const __half2*>(stage_ptr + S::A_BYTES + S::B_BYTES);
        __half2 zl[8], zh[8], sc[8];
#pragma unroll
        for (int j = 0; j < 8; j++) sz_consts(sz_s[wn * 64 + j * 8 + (lane >> 2)], zl[j], zh[j], sc[j]);
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {
            uint32_t a[WM][4];
#pragma unroll
            for (int i = 0; i < WM; i++) {
                const int r = wm * WM * 16 + i * 16 + (lane & 15);
                const int c = kk * 2 + (lane >> 4);
                ldmatrix_x4(a_s + r * 128 + ((c ^ (r & 7)) << 4), a[i][0], a[i][1], a[i][2], a[i][3]);
            }
            const uint32_t* bu = reinterpret_cast<const uint32_t*>(b_s) + (kk * 2 + wn) * 128 + lane;
            const uint32_t words[4] = {bu[0], bu[32], bu[64], bu[96]};
#pragma unroll
            for (int wi = 0; wi < 4; wi++) {
                Dq d = dequant_word(words[wi], zl[2 * wi], zh[2 * wi], sc[2 * wi], zl[2 * wi + 1], zh[2 * wi + 1],
                                    sc[2 * wi + 1]);
#pragma unroll
                for (int i = 0; i < WM; i++) {
                    mma16816(acc[i][2 * wi], a[i], as_u32(d.a0), as_u32(d.a1));
                    mma16816(acc[i][2 * wi + 1], a[i], as_u32(d.b0), as_u32(d.b1));
                }
            }
        }
    }
    cp_async_wait<0>();

#pragma unroll
    for (int i = 0; i < WM; i++) {
        const int row = bm * S::BM + wm * WM * 16 + i * 16 + (lane >> 2);
#pragma unroll
        for (int j = 0; j < 8; j++) {
            const int col = bn * GM_BN + wn * 64 + j * 8 + (lane & 3) * 2;
            if (col < n) {  // n is even, so col + 1 < n too
                if (row < m)
                    *reinterpret_cast<__half2*>(y + (size_t)row * n + col) = __floats2half2_rn(acc[i][j][0], acc[i][j][1]);
                if (row + 8 < m)
                    *reinterpret_cast<__half2*>(y + (size_t)(row + 8) * n + col) =
                        __floats2half2_rn(acc[i][j][2], acc[i][j][3]);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Dequantization (dense [n, k] in T) and poisoning

// One thread per (unit, lane): 32 weights.
template <typename T>
__device__ void w4_dequant(const uint4* __restrict__ q, const __half2* __restrict__ sz, T* __restrict__ w, int n,
                           int np, int k, int g) {
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    const int nunits = np >> 6;
    const size_t total = (size_t)(k >> 4) * nunits * 32;
    if (idx >= total) return;
    const int lane = (int)(idx & 31);
    const size_t unit = idx >> 5;
    const int kb = (int)(unit / nunits), nb = (int)(unit % nunits);
    const int gi = lane >> 2, ti = lane & 3;
    const int k0 = kb * 16 + 2 * ti;
    const int grp = (kb * 16) / g;
    const uint32_t* uq = reinterpret_cast<const uint32_t*>(q) + unit * 128 + lane;
    const uint32_t words[4] = {uq[0], uq[32], uq[64], uq[96]};
#pragma unroll
    for (int wi = 0; wi < 4; wi++) {
        const int ra = nb * 64 + wi * 16 + gi, rb = ra + 8;
        __half2 zlA, zhA, sA, zlB, zhB, sB;
        sz_consts(sz[(size_t)grp * np + ra], zlA, zhA, sA);
        sz_consts(sz[(size_t)grp * np + rb], zlB, zhB, sB);
        Dq d = dequant_word(words[wi], zlA, zhA, sA, zlB, zhB, sB);
        if (ra < n) {
            w[(size_t)ra * k + k0] = from_f<T>(__low2float(d.a0));
            w[(size_t)ra * k + k0 + 1] = from_f<T>(__high2float(d.a0));
            w[(size_t)ra * k + k0 + 8] = from_f<T>(__low2float(d.a1));
            w[(size_t)ra * k + k0 + 9] = from_f<T>(__high2float(d.a1));
        }
        if (rb < n) {
            w[(size_t)rb * k + k0] = from_f<T>(__low2float(d.b0));
            w[(size_t)rb * k + k0 + 1] = from_f<T>(__high2float(d.b0));
            w[(size_t)rb * k + k0 + 8] = from_f<T>(__low2float(d.b1));
            w[(size_t)rb * k + k0 + 9] = from_f<T>(__high2float(d.b1));
        }
    }
}

template <typename T> __device__ void poison(T* p, size_t n) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) p[i] = from_f<T>(__int_as_float(0x7fc00000));
}

#define GEMV_ENTRY(NAME, T, MT)                                                                           \
    extern "C" __global__ void __launch_bounds__(128) w4_gemv_##NAME##_##MT(                                \
        W4Sets ws, const T* x, T* y, int k, int g, int m, int nt, float* part, unsigned int* counters,     \
        L2Prefetch pf) {                                                                                  \
        w4_gemv<T, MT, false>(ws, x, y, k, g, m, nt, part, counters, pf);                                 \
    }
#define INSTANTIATE(NAME, T)                                                                          \
    GEMV_ENTRY(NAME, T, 1)                                                                            \
    GEMV_ENTRY(NAME, T, 2)                                                                            \
    GEMV_ENTRY(NAME, T, 4)                                                                            \
    GEMV_ENTRY(NAME, T, 8)                                                                            \
    extern "C" __global__ void w4_dequant_##NAME(const uint4* q, const __half2* sz, T* w, int n, int np, int k,   \
                                                 int g) {                                             \
        w4_dequant<T>(q, sz, w, n, np, k, g);                                                         \
    }                                                                                                 \
    extern "C" __global__ void poison_##NAME(T* p, unsigned long long n) { poison<T>(p, (size_t)n); }

INSTANTIATE(f16, __half)
INSTANTIATE(bf16, __nv_bfloat16)
INSTANTIATE(f32, float)

// No minimum of resident blocks: capping registers for 5 per SM (96, no spills) decoded 4% slower
// than the uncapped 106 registers (4 per SM) on an H100, in the same run.
extern "C" __global__ void __launch_bounds__(128) w4_gemv_f16_mma(W4Sets ws, const __half* x, __half* y, int k, int g,
                                                                  int m, int nt, float* part, unsigned int* counters,
                                                                  L2Prefetch pf) {
    w4_gemv<__half, 8, true>(ws, x, y, k, g, m, nt, part, counters, pf);
}
// 9 to 64 tokens (batched decode, speculative verification, short prompts): one pass over the
// weights for every token, the tokens as 2, 4 or 8 n8 tiles of the MMA.
#define GEMV_MMA_ENTRY(MT)                                                                                \
    extern "C" __global__ void __launch_bounds__(128) w4_gemv_f16_mma##MT(                                \
        W4Sets ws, const __half* x, __half* y, int k, int g, int m, int nt, float* part,                  \
        unsigned int* counters, L2Prefetch pf) {                                                          \
        w4_gemv<__half, MT, true>(ws, x, y, k, g, m, nt, part, counters, pf);                             \
    }
GEMV_MMA_ENTRY(16)
GEMV_MMA_ENTRY(32)
GEMV_MMA_ENTRY(64)

// Up to 8 (or 16) tokens at group sizes 32, 64 and 128: 8 k16 steps in flight per warp. At most
// 128 registers, so an SM holds 16 warps. With 16 slots and no register cap (253 registers, one
// block per SM) 4096 x 11008 took 38 us at 16 tokens on an H100, the ring kernel 25; 32 and 64
// slots lost to the ring kernel on the 11008-row shapes too, and are not built.
#define GEMV1_ENTRY(G, SPG, AHEAD, NT, SFX, MINB)                                                           \
    extern "C" __global__ void __launch_bounds__(32 * GEMV1_MAX_WARPS, MINB) w4_gemv1_f16_g##G##SFX(           \
        W4Sets ws, const __half* x, __half* y, int k, int m, int nt, float* part, unsigned int* counters, \
        L2Prefetch pf) {                                                                                  \
        w4_gemv1<SPG, AHEAD, NT>(ws, x, y, k, m, nt, part, counters, pf);                                 \
    }
GEMV1_ENTRY(32, 2, 4, 1, , 2)
GEMV1_ENTRY(64, 4, 2, 1, , 2)
GEMV1_ENTRY(128, 8, 1, 1, , 2)
// (Group size 32 keeps 4 groups' scales in flight: with 16 slots it spills.)
GEMV1_ENTRY(64, 4, 2, 2, _t16, 2)
GEMV1_ENTRY(128, 8, 1, 2, _t16, 2)

#define INSTANTIATE_GEMM(WM)                                                                            \
    extern "C" __global__ void __launch_bounds__(256) w4_gemm_f16_wm##WM(                               \
        const __half* x, const uint4* q, const __half2* sz, __half* y, int m, int n, int np, int k, int g) { \
        w4_gemm_f16<WM>(x, q, sz, y, m, n, np, k, g);                                                   \
    }
INSTANTIATE_GEMM(1)
INSTANTIATE_GEMM(2)
INSTANTIATE_GEMM(4)
