// What the two skinny GEMMs share (w4a16_skinny.cu on mma.sync, w4a16_skinny_sm90.cu on
// Hopper's wgmma): blocks of 256 rows and a slice of k, the stage each 64-wide k tile streams
// through, and the end of a launch (the block's sums stored, or added across k slices).
#pragma once
#include "common.cuh"
#include "w4_sets.cuh"

// Rows per block: 4 quarters of 64 (the tiled layout's units).
#define SK_QUARTERS 4
#define SK_ROWS (64 * SK_QUARTERS)
#define SK_BK 64
// Most k slices of a launch (the reduction keeps one float4 per slice in registers).
#define SK_MAX_SPLITS 16
// Row stride (floats) of the block's sums in shared memory: lanes (g, t) store token 2t + e, row
// g, and 2 x 260 = 8 (mod 32) puts the 32 lanes in distinct banks.
#define SK_RED_STRIDE 260

// Bytes of one stage: MT tokens x 64 k of x (rows of 128 bytes, the 16-byte pieces of row r at
// piece c ^ (r % 8): the 128-byte swizzle of both ldmatrix and wgmma), the 4 k16 steps x 4 quarters
// of weight units, and the (scale, zero) pairs of up to two groups (group size 32) of 256 rows.
// A multiple of 1024 for every MT, so stages keep the swizzle atoms aligned.
__host__ __device__ constexpr int sk_stage_bytes(int mt) { return mt * 128 + 16 * 512 + 2 * SK_ROWS * 4; }
#define SK_X_BYTES(mt) ((mt) * 128)
#define SK_W_BYTES (16 * 512)

// The copies that fill a stage with k tile kt: every thread copies pieces of x (tokens past m
// zero-filled), the first 128 threads the weight units (unit (kk, quarter tid / 32), piece tid %
// 32) and the (scale, zero) pieces (tid % 64 of group tid / 64). Fixed over the tiles.
template <int MT, int THREADS>
struct SkinnyStager {
    const __half* x;
    const uint8_t* unit_src;
    const __half2* sz;
    size_t unit_stride;
    int k, g, m, np, sz_col, tid, ct;
    bool copies_w, unit_ok, sz_ok, two_groups;

    __device__ __forceinline__ SkinnyStager(const GemvRows& rows, const __half* x_, int k_, int g_, int m_) {
        x = x_;
        k = k_;
        g = g_;
        m = m_;
        np = rows.np;
        sz = rows.sz;
        tid = threadIdx.x;
        ct = tid & 127;
        copies_w = tid < 128;
        two_groups = g == 32;
        const int nunits = np >> 6;
        const int my_unit = rows.nb * SK_QUARTERS + (ct >> 5);
        unit_ok = my_unit < nunits;
        unit_stride = (size_t)nunits * 512;
        unit_src = reinterpret_cast<const uint8_t*>(rows.q) + (size_t)(unit_ok ? my_unit : 0) * 512 + (tid & 31) * 16;
        sz_col = rows.nb * SK_ROWS + (ct & 63) * 4;
        sz_ok = sz_col < np && (ct < 64 || two_groups);
    }

    __device__ __forceinline__ void load(int kt, uint32_t base) const {
        for (int p = tid; p < MT * 8; p += THREADS) {
            const int r = p >> 3, c = p & 7;
            const bool ok = r < m;
            const __half* src = x + (size_t)(ok ? r : 0) * k + kt * SK_BK + c * 8;
            cp_async16(base + r * 128 + ((c ^ (r & 7)) << 4), src, ok);
        }
        if (copies_w) {
#pragma unroll
            for (int i = 0; i < 4; i++)
                cp_async16(base + SK_X_BYTES(MT) + (i * SK_QUARTERS + (ct >> 5)) * 512 + (tid & 31) * 16,
                           unit_src + (size_t)(kt * 4 + i) * unit_stride, unit_ok);
            const int grp = (kt * SK_BK) / g + (ct >> 6);
            if (ct < 64 || two_groups)
                cp_async16(base + SK_X_BYTES(MT) + SK_W_BYTES + ct * 16, sz + (size_t)(sz_ok ? grp : 0) * np + (sz_ok ? sz_col : 0),
                           sz_ok);
        }
    }
};

// The two ends of a split launch (sk_finish, sk_finish_cluster) add the slices' float4s of four
// rows with sk_add4 and store them with sk_store_rows4, so that both give the same bits.
__device__ __forceinline__ void sk_add4(float4& a, const float4& v) {
    a.x += v.x;
    a.y += v.y;
    a.z += v.z;
    a.w += v.w;
}
// Rows row .. row + 3 of one token's output `y_tok` as f16; those at n and beyond (the padded
// rows of the last range) are not stored.
__device__ __forceinline__ void sk_store_rows4(__half* __restrict__ y_tok, int row, int n, const float4& a) {
    const float vals[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
    for (int e = 0; e < 4; e++)
        if (row + e < n) y_tok[row + e] = __float2half_rn(vals[e]);
}

// This block's k tiles [t0, t1) of the launch's `ktiles`, as even slices over gridDim.y (some
// may be empty).
__device__ __forceinline__ void sk_slice(int ktiles, int& t0, int& t1) {
    const int per_split = (ktiles + gridDim.y - 1) / gridDim.y;
    t0 = min(ktiles, (int)blockIdx.y * per_split);
    t1 = min(ktiles, t0 + per_split);
}

// The end of a launch, once `red` ([token][row of 256], SK_RED_STRIDE apart, in shared memory)
// holds the block's sums of its k slice: with one slice, the m tokens' rows stored as f16;
// otherwise the slice's sums written as float4s of 4 rows, and the last block of the row range
// to arrive adds the slices' sums in slice order (deterministic). Its loads are the launch's
// tail, so each thread issues CHUNK slices' loads of an element before adding any (one L2 round
// trip per CHUNK slices, not one per slice; a smaller CHUNK for kernels short of registers).
template <int CHUNK = SK_MAX_SPLITS>
__device__ __forceinline__ void sk_finish(const float* red, const GemvRows& rows, __half* __restrict__ y, int m, int n_total,
                                          float* __restrict__ part, unsigned int* __restrict__ counters) {
    const int tid = threadIdx.x, b = blockIdx.x, split = blockIdx.y, nsplit = gridDim.y;
    const int row0 = rows.nb * SK_ROWS, n = rows.n, out_off = rows.out_off;
    if (nsplit == 1) {
        for (int i = tid; i < m * SK_ROWS; i += blockDim.x) {
            const int t = i / SK_ROWS, r = i % SK_ROWS;
            if (row0 + r < n) y[(size_t)t * n_total + out_off + row0 + r] = __float2half_rn(red[t * SK_RED_STRIDE + r]);
        }
        return;
    }
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
        float4 a = make_float4(0.f, 0.f, 0.f, 0.f);
        for (int c0 = 0; c0 < (CHUNK >= SK_MAX_SPLITS ? 1 : nsplit); c0 += CHUNK) {
            float4 v[CHUNK];
#pragma unroll
            for (int c = 0; c < CHUNK; c++)
                if (c0 + c < nsplit) v[c] = __ldcg(src + (c0 + c) * step);
#pragma unroll
            for (int c = 0; c < CHUNK; c++)
                if (c0 + c < nsplit) sk_add4(a, v[c]);
        }
        sk_store_rows4(y + (size_t)t * n_total + out_off, row, n, a);
    }
    if (tid == 0) counters[b] = 0;  // ready for the next launch
}

// Thread block clusters (sm_90): the barrier of every block of the cluster, with release and
// acquire so that shared memory written before it is seen by the other blocks after it.
__device__ __forceinline__ void sk_cluster_sync() {
    asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}
// The address of shared-memory address `addr` of this block in the block of cluster rank `rank`.
__device__ __forceinline__ uint32_t sk_cluster_map(uint32_t addr, uint32_t rank) {
    uint32_t r;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(r) : "r"(addr), "r"(rank));
    return r;
}
__device__ __forceinline__ float4 sk_cluster_ld4(uint32_t addr) {
    float4 v;
    asm volatile("ld.shared::cluster.v4.f32 {%0,%1,%2,%3}, [%4];\n" : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w) : "r"(addr) : "memory");
    return v;
}

// The end of a launch whose CS k slices of a row range are one thread block cluster (sm_90;
// the kernel's __cluster_dims__ are (1, CS, 1) and gridDim.y == CS, so blockIdx.y is the rank):
// once every block's sums are in its own `red`, block r adds rows r / CS .. of all of them,
// reading the others' shared memory over the cluster's network, and stores them as f16. Why:
// sk_finish's partial sums go through L2 (8 bytes an output and slice, as many bytes as the
// weights at 64 tokens of a 4096-row layer in 16 slices) and the last block of each row range
// adds every slice alone, the launch's tail. The slices are added in order from zero, as
// sk_finish adds them, so both ends give the same bits.
template <int CS>
__device__ __forceinline__ void sk_finish_cluster(const float* red, const GemvRows& rows, __half* __restrict__ y, int m, int n_total) {
    static_assert(CS >= 2 && CS <= 8 && (SK_ROWS / 4) % CS == 0, "a cluster of 2 to 8 blocks that divide the row range");
    constexpr int R4 = SK_ROWS / 4 / CS;  // float4s of rows each block adds
    const int tid = threadIdx.x, rank = blockIdx.y;
    const int row0 = rows.nb * SK_ROWS, n = rows.n, out_off = rows.out_off;
    const uint32_t base = (uint32_t)__cvta_generic_to_shared(red);
    sk_cluster_sync();
    for (int i = tid; i < m * R4; i += blockDim.x) {
        const int t = i / R4, r4 = rank * R4 + i % R4;
        const int row = row0 + 4 * r4;
        if (row >= n) continue;
        const uint32_t off = base + (uint32_t)(t * SK_RED_STRIDE + 4 * r4) * 4u;
        float4 v[CS];
#pragma unroll
        for (int c = 0; c < CS; c++) v[c] = sk_cluster_ld4(sk_cluster_map(off, c));
        float4 a = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
        for (int c = 0; c < CS; c++) sk_add4(a, v[c]);
        sk_store_rows4(y + (size_t)t * n_total + out_off, row, n, a);
    }
    // No block leaves (and frees its shared memory) while another reads it.
    sk_cluster_sync();
}
