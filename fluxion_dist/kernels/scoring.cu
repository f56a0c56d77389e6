// Quest block scores for every query head of a batch, one launch per layer.
//
// -D HEAD_DIM, -D GROUP (query heads per KV head), -D BLOCK_TOKENS.
//
// A "row group" of HEAD_DIM/8 lanes owns one coarse block: each lane holds 8 channels of the
// GROUP query vectors and reads 8 channels (16 bytes) of each page's kmin/kmax, so a warp
// reads whole 256-byte metadata rows. Coarse levels (factor 4, 16) fold min-of-mins and
// max-of-maxes over `factor` base pages in registers before the dot product; the bytes read
// are the same at every level. All GROUP heads of a KV head share one read of the metadata.
//
// Two metadata formats share the kernel body (a Meta reader): quest_scores reads bf16
// kmin/kmax, quest_scores_compact the int8 mirror of compact_metadata.py (per (page, head)
// 256 bytes of interleaved 8-channel min/max groups and a bf16 scale), so a lane's 8
// channels of both corners are one 16-byte load and a row is half the bytes.
#include "common.cuh"

#define SCORE_THREADS 64  // the launcher's _THREADS
#define ROW_LANES (HEAD_DIM / 8)
#define ROWS_PER_CTA (SCORE_THREADS / ROW_LANES)
#define SCORE_PASSES 2  // coarse blocks per row group per tile at factor 1 (the launcher agrees)

static_assert(HEAD_DIM % 8 == 0 && ROW_LANES <= 32 && 32 % ROW_LANES == 0,
              "HEAD_DIM must be 8 x a power of two, at most 256");
static_assert(GROUP >= 1 && GROUP <= 16, "GROUP out of range");

// 16 bytes of one metadata row. Each row group reads a whole 256-byte row; the L2::256B hint
// lets L2 fetch all of it on the first miss instead of the 32-byte sectors one load touches
// (measured in docs/benchmarks.md, GPU kernels). Read-only for the kernel's
// life (.nc), and no L1 allocation: nothing reads a row twice.
__device__ __forceinline__ uint4 load_meta(const void* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

// Scores of one coarse block for the GROUP heads (every lane of the warp must call: the
// dot products are summed across the row group with shuffles). Past the request's blocks
// (live false) the score is -inf, so selection can never pick it.
//
// max(q*lo, q*hi) = q*(hi+lo)/2 + |q|*(hi-lo)/2: the sum and difference are shared by the
// GROUP heads and |q| is a free operand modifier, so each (head, channel) costs two FMAs
// and no select (which would keep 8*GROUP predicates live). q arrives pre-scaled by 1/2.
__device__ __forceinline__ void score_row(const float (&qr)[GROUP][8], const float (&lo)[8],
                                          const float (&hi)[8], bool live, bool write, int c,
                                          int num_coarse, float* q_scores, float* h_scores) {
    float mid[8], half[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) { mid[i] = hi[i] + lo[i]; half[i] = hi[i] - lo[i]; }
    float best = FLUX_NEG_INF;
#pragma unroll
    for (int g = 0; g < GROUP; ++g) {
        float acc = 0.f;
#pragma unroll
        for (int i = 0; i < 8; ++i) acc = fmaf(qr[g][i], mid[i], fmaf(fabsf(qr[g][i]), half[i], acc));
        acc = group_sum<ROW_LANES>(acc);
        const float s = live ? acc : FLUX_NEG_INF;
        best = fmaxf(best, s);
        if (write && q_scores != nullptr) q_scores[(long long)g * num_coarse + c] = s;
    }
    if (write && h_scores != nullptr) h_scores[c] = best;
}

// bf16 corners: a lane's 8 channels of kmin and of kmax, two 16-byte loads.
struct Bf16Meta {
    const bf16_t* kmin;  // [P, Hkv, HEAD_DIM]
    const bf16_t* kmax;
    struct Raw { uint4 lo, hi; };
    __device__ __forceinline__ static Raw zero() { return {make_uint4(0u, 0u, 0u, 0u), make_uint4(0u, 0u, 0u, 0u)}; }
    __device__ __forceinline__ Raw load(long long row, int ch) const {
        return {load_meta(kmin + row * HEAD_DIM + ch), load_meta(kmax + row * HEAD_DIM + ch)};
    }
    __device__ __forceinline__ static void unpack(const Raw& r, float (&lo)[8], float (&hi)[8]) {
        unpack_bf16x8(r.lo, lo);
        unpack_bf16x8(r.hi, hi);
    }
};

// Four int8 lanes of a word -> float, times the row's scale (exact: 7- and 8-bit significands).
__device__ __forceinline__ void unpack_i8x4(unsigned int w, float s, float* f) {
#pragma unroll
    for (int i = 0; i < 4; ++i) f[i] = (float)(((int)(w << (24 - 8 * i))) >> 24) * s;
}

// The int8 mirror: one 16-byte load holds the lane's 8 minima then 8 maxima; the scale is one
// bf16 per (page, head), the same address for the whole row group (one broadcast read).
struct CompactMeta {
    const signed char* values;     // [P, Hkv, HEAD_DIM/8, 2, 8]
    const bf16_t* scales;          // [P, Hkv]
    struct Raw { uint4 v; float s; };
    __device__ __forceinline__ static Raw zero() { return {make_uint4(0u, 0u, 0u, 0u), 0.f}; }
    __device__ __forceinline__ Raw load(long long row, int ch) const {
        return {load_meta(values + row * (2 * HEAD_DIM) + 2 * ch), bf16_to_f32(__ldg(scales + row))};
    }
    __device__ __forceinline__ static void unpack(const Raw& r, float (&lo)[8], float (&hi)[8]) {
        unpack_i8x4(r.v.x, r.s, lo);
        unpack_i8x4(r.v.y, r.s, lo + 4);
        unpack_i8x4(r.v.z, r.s, hi);
        unpack_i8x4(r.v.w, r.s, hi + 4);
    }
};

template <class Meta>
__device__ __forceinline__ void quest_scores_body(
    const float* __restrict__ q,             // [B, Hkv*GROUP, HEAD_DIM]
    const Meta meta,
    const int* __restrict__ block_tables,    // [B, max_blocks]
    const int* __restrict__ seq_lens,        // [B]
    float* __restrict__ scores,              // [B, Hkv*GROUP, num_coarse], or null
    float* __restrict__ kv_scores,           // [B, Hkv, num_coarse], or null
    int num_kv_heads, int max_blocks, int num_coarse, int factor, float scale)
{
    const int b = blockIdx.z;
    const int kh = blockIdx.y;
    const int lane = threadIdx.x & 31;
    const int row = threadIdx.x / ROW_LANES;
    const int ch = (lane % ROW_LANES) * 8;
    const int hq = num_kv_heads * GROUP;

    const int nb = min((seq_lens[b] + BLOCK_TOKENS - 1) / BLOCK_TOKENS, max_blocks);
    const int nc = (nb + factor - 1) / factor;

    // Scale folded into q: max(q*s*lo, q*s*hi) = s*max(q*lo, q*hi) for s > 0; the 1/2 is
    // score_row's.
    scale *= 0.5f;
    float qr[GROUP][8];
#pragma unroll
    for (int g = 0; g < GROUP; ++g) {
        const float4* src = reinterpret_cast<const float4*>(
            q + ((long long)b * hq + kh * GROUP + g) * HEAD_DIM + ch);
        const float4 a = src[0], c = src[1];
        qr[g][0] = a.x * scale; qr[g][1] = a.y * scale; qr[g][2] = a.z * scale; qr[g][3] = a.w * scale;
        qr[g][4] = c.x * scale; qr[g][5] = c.y * scale; qr[g][6] = c.z * scale; qr[g][7] = c.w * scale;
    }

    float* const q_scores = scores != nullptr ? scores + ((long long)b * hq + kh * GROUP) * num_coarse : nullptr;
    float* const h_scores = kv_scores != nullptr ? kv_scores + ((long long)b * num_kv_heads + kh) * num_coarse : nullptr;
    const int* const table = block_tables + (long long)b * max_blocks;
    const bool writer = (lane % ROW_LANES) == 0;

    if (factor == 1) {
        // Base level: CTAs stride over tiles of SCORE_PASSES x ROWS_PER_CTA blocks, and the
        // next tile's metadata is requested before the current one is scored, so the loads
        // of one tile overlap the arithmetic of the last (a CTA per tile spent most of its
        // life waiting on q, then the table, then the metadata).
        constexpr int TILE = SCORE_PASSES * ROWS_PER_CTA;
        const int num_tiles = (num_coarse + TILE - 1) / TILE;
        using Raw = typename Meta::Raw;
        auto fetch = [&](int tile, Raw (&raw)[SCORE_PASSES]) {
#pragma unroll
            for (int p = 0; p < SCORE_PASSES; ++p) {
                const int c = tile * TILE + p * ROWS_PER_CTA + row;
                raw[p] = Meta::zero();
                if (tile < num_tiles && c < nc) raw[p] = meta.load((long long)table[c] * num_kv_heads + kh, ch);
            }
        };
        Raw cur[SCORE_PASSES];
        fetch(blockIdx.x, cur);
        for (int tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
            Raw nxt[SCORE_PASSES];
            fetch(tile + gridDim.x, nxt);
#pragma unroll
            for (int p = 0; p < SCORE_PASSES; ++p) {
                const int c = tile * TILE + p * ROWS_PER_CTA + row;
                float lo[8], hi[8];
                Meta::unpack(cur[p], lo, hi);
                score_row(qr, lo, hi, c < nc, c < num_coarse && writer, c, num_coarse, q_scores, h_scores);
                cur[p] = nxt[p];
            }
        }
        return;
    }

    // Coarse levels: a row group folds `factor` pages into one box; one coarse block each.
    {
        const int c = blockIdx.x * ROWS_PER_CTA + row;
        float mn[8], mx[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) { mn[i] = FLUX_POS_INF; mx[i] = FLUX_NEG_INF; }
        if (c < nc) {
            const int j_end = min((c + 1) * factor, nb);
#pragma unroll 4
            for (int j = c * factor; j < j_end; ++j) {
                float lo[8], hi[8];
                Meta::unpack(meta.load((long long)table[j] * num_kv_heads + kh, ch), lo, hi);
#pragma unroll
                for (int i = 0; i < 8; ++i) { mn[i] = fminf(mn[i], lo[i]); mx[i] = fmaxf(mx[i], hi[i]); }
            }
        }
        score_row(qr, mn, mx, c < nc, c < num_coarse && writer, c, num_coarse, q_scores, h_scores);
    }
}

#define QUEST_SCORES_ARGS                                                                          \
    const int* __restrict__ block_tables, const int* __restrict__ seq_lens,                        \
        float* __restrict__ scores, float* __restrict__ kv_scores, int num_kv_heads,               \
        int max_blocks, int num_coarse, int factor, float scale
#define QUEST_SCORES_PASS block_tables, seq_lens, scores, kv_scores, num_kv_heads, max_blocks, num_coarse, factor, scale

// kmin, kmax: bf16 [P, Hkv, HEAD_DIM]; scores [B, Hkv*GROUP, num_coarse] or null;
// kv_scores [B, Hkv, num_coarse] or null.
__global__ void __launch_bounds__(SCORE_THREADS) quest_scores(
    const float* __restrict__ q, const bf16_t* __restrict__ kmin, const bf16_t* __restrict__ kmax,
    QUEST_SCORES_ARGS)
{
    quest_scores_body<Bf16Meta>(q, Bf16Meta{kmin, kmax}, QUEST_SCORES_PASS);
}

// values: int8 [P, Hkv, HEAD_DIM/8, 2, 8], scales: bf16 [P, Hkv] (compact_metadata.py).
__global__ void __launch_bounds__(SCORE_THREADS) quest_scores_compact(
    const float* __restrict__ q, const signed char* __restrict__ values, const bf16_t* __restrict__ scales,
    QUEST_SCORES_ARGS)
{
    quest_scores_body<CompactMeta>(q, CompactMeta{values, scales}, QUEST_SCORES_PASS);
}
