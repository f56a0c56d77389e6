// The rescoring stage of selection (policy.select step 5): exact scores of candidate blocks.
//
// -D HEAD_DIM (64 or 128), -D GROUP (query heads per KV head), -D BLOCK_TOKENS.
//
// candidate_lse     per entry of the candidates' CSR (row = request * KV head) and query head
//                   of the group, the block's log-sum-exp of q.k * scale over its tokens
//                   (those before the sequence end), K read from where it lies: a slot of
//                   the GPU block cache, else the arena page (pinned host memory, read through
//                   its UVA device pointer). Grid (entry tiles, rows), as attention.cu: each
//                   warp owns whole blocks, HEAD_DIM/8 lanes share a token row and load 16
//                   bytes each, so a block's 16 K rows are in flight at once. Scores in log2
//                   units with scale * log2(e) folded into q; the result in natural units.
// candidate_scores  one CTA per row: the row's dense scores [n_stride] become -inf, then each
//                   candidate gets its share of the group's candidate mass,
//                   log sum_g exp(lse_g - Z_g) with Z_g = logsumexp over the row's candidates
//                   (reference.candidate_shares), and a kept block (sink or window) the
//                   largest finite score, so the top-k that follows takes the kept blocks
//                   first and then the candidates with the most exact mass; never another.
#include "common.cuh"

#define LSE_WARPS 4
#define LSE_THREADS (LSE_WARPS * 32)
#define LSE_ENTRIES_PER_WARP 4
#define LSE_TILE (LSE_WARPS * LSE_ENTRIES_PER_WARP)  // entries per CTA (rescore.py: _TILE)
#define SCORE_THREADS 256
#define SCORE_WARPS (SCORE_THREADS / 32)
#define ROW_LANES (HEAD_DIM / 8)
#define ROWS_PER_LOAD (32 / ROW_LANES)
#define SLOTS (BLOCK_TOKENS / ROWS_PER_LOAD)
#define KV_RUN (2 * BLOCK_TOKENS * HEAD_DIM)  // elements of one (block, head): K rows then V rows
#define FORCED_SCORE 3.0e38f  // block_table.cu's

static_assert(HEAD_DIM == 64 || HEAD_DIM == 128, "HEAD_DIM must be 64 or 128");
static_assert(BLOCK_TOKENS % ROWS_PER_LOAD == 0, "BLOCK_TOKENS must split evenly over a warp");
static_assert(GROUP >= 1 && GROUP <= 16, "GROUP out of range");

__global__ void __launch_bounds__(LSE_THREADS) candidate_lse(
    const float* __restrict__ q,             // [B, Hq, HEAD_DIM]
    const bf16_t* __restrict__ kv_pages,     // [P, Hkv, 2, BLOCK_TOKENS, HEAD_DIM]
    const bf16_t* __restrict__ cache_pool,   // [S, 2, BLOCK_TOKENS, HEAD_DIM], or null
    const int* __restrict__ slot_of,         // [P * Hkv] cache slot or -1, or null
    const int* __restrict__ block_tables,    // [B, max_blocks]
    const int* __restrict__ seq_lens,        // [B]
    const int* __restrict__ cand_indptr,     // [B*Hkv + 1]
    const int* __restrict__ cand_blocks,     // [nnz] logical block ids
    float* __restrict__ lse_out,             // [nnz, GROUP]
    int num_kv_heads, int max_blocks, float scale_log2)
{
    __shared__ __align__(16) float sm_q[GROUP][HEAD_DIM];

    const int row = blockIdx.y;
    const int b = row / num_kv_heads, kh = row % num_kv_heads;
    const int start = cand_indptr[row] + blockIdx.x * LSE_TILE;
    const int end = min(cand_indptr[row + 1], start + LSE_TILE);
    if (start >= end) return;  // uniform over the CTA: the tile is past the row's list
    const long long head0 = ((long long)b * num_kv_heads + kh) * GROUP;
    for (int idx = threadIdx.x; idx < GROUP * HEAD_DIM; idx += LSE_THREADS)
        sm_q[idx / HEAD_DIM][idx % HEAD_DIM] = q[head0 * HEAD_DIM + idx] * scale_log2;
    __syncthreads();

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int sub = lane / ROW_LANES;  // which token row of a load this lane reads
    const int ch = (lane % ROW_LANES) * 8;
    const int seq_len = seq_lens[b];
    for (int e = start + warp; e < end; e += LSE_WARPS) {
        const int blk = cand_blocks[e];
        const long long page = block_tables[(long long)b * max_blocks + blk];
        const long long key = page * num_kv_heads + kh;
        const int slot = slot_of != nullptr ? slot_of[key] : -1;
        const bf16_t* run = slot >= 0 ? cache_pool + (long long)slot * KV_RUN : kv_pages + key * KV_RUN;
        const int valid = min(BLOCK_TOKENS, seq_len - blk * BLOCK_TOKENS);
        uint4 kr[SLOTS];
#pragma unroll
        for (int i = 0; i < SLOTS; ++i) {
            const int t = i * ROWS_PER_LOAD + sub;
            kr[i] = t < valid ? __ldcs(reinterpret_cast<const uint4*>(run + t * HEAD_DIM + ch))
                              : make_uint4(0u, 0u, 0u, 0u);
        }
        // one query head at a time (unrolled over the group, GROUP = 8 spilled)
#pragma unroll 1
        for (int g = 0; g < GROUP; ++g) {
            float qg[8];
            const float4 qa = *reinterpret_cast<const float4*>(&sm_q[g][ch]);
            const float4 qb = *reinterpret_cast<const float4*>(&sm_q[g][ch + 4]);
            qg[0] = qa.x; qg[1] = qa.y; qg[2] = qa.z; qg[3] = qa.w;
            qg[4] = qb.x; qg[5] = qb.y; qg[6] = qb.z; qg[7] = qb.w;
            float s[SLOTS];
            float bmax = FLUX_NEG_INF;
#pragma unroll
            for (int i = 0; i < SLOTS; ++i) {
                float kf[8];
                unpack_bf16x8(kr[i], kf);
                float acc = 0.f;
#pragma unroll
                for (int c = 0; c < 8; ++c) acc = fmaf(qg[c], kf[c], acc);
                acc = group_sum<ROW_LANES>(acc);
                s[i] = (i * ROWS_PER_LOAD + sub < valid) ? acc : FLUX_NEG_INF;
                bmax = fmaxf(bmax, s[i]);
            }
            bmax = across_groups_max<ROW_LANES>(bmax);  // finite: a candidate has a valid token
            float sum = 0.f;  // this lane's token rows; the ROW_LANES lanes of a row hold the same
#pragma unroll
            for (int i = 0; i < SLOTS; ++i) sum += exp2f(s[i] - bmax);
            sum = across_groups_sum<ROW_LANES>(sum);
            if (lane == 0) lse_out[(long long)e * GROUP + g] = (bmax + log2f(sum)) * FLUX_LN2;
        }
    }
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, off));
    return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(FULL_MASK, v, off);
    return v;
}

__global__ void __launch_bounds__(SCORE_THREADS) candidate_scores(
    const float* __restrict__ lse,           // [nnz, GROUP]
    const int* __restrict__ cand_indptr,     // [B*heads + 1]
    const int* __restrict__ cand_blocks,     // [nnz]
    const int* __restrict__ seq_lens,        // [B]
    float* __restrict__ out,                 // [B, heads, n_stride]
    int heads, int n_stride, int sink_blocks, int recent_blocks)
{
    __shared__ float red[SCORE_WARPS][GROUP];
    __shared__ float z[GROUP];
    const int row = blockIdx.x, tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int nb = min((seq_lens[row / heads] + BLOCK_TOKENS - 1) / BLOCK_TOKENS, n_stride);
    float* const orow = out + (long long)row * n_stride;
    for (int i = tid; i < n_stride; i += SCORE_THREADS) orow[i] = FLUX_NEG_INF;
    const int lo = cand_indptr[row], hi = cand_indptr[row + 1];

    // Z_g: the row's log-sum-exp per query head, a max pass then a sum pass
    float acc[GROUP];
#pragma unroll
    for (int g = 0; g < GROUP; ++g) acc[g] = FLUX_NEG_INF;
    for (int e = lo + tid; e < hi; e += SCORE_THREADS)
#pragma unroll
        for (int g = 0; g < GROUP; ++g) acc[g] = fmaxf(acc[g], lse[(long long)e * GROUP + g]);
#pragma unroll
    for (int g = 0; g < GROUP; ++g) {
        acc[g] = warp_max(acc[g]);
        if (lane == 0) red[warp][g] = acc[g];
    }
    __syncthreads();
    if (tid < GROUP) {
        float m = FLUX_NEG_INF;
        for (int w = 0; w < SCORE_WARPS; ++w) m = fmaxf(m, red[w][tid]);
        z[tid] = m;
    }
    __syncthreads();
    float zmax[GROUP];
#pragma unroll
    for (int g = 0; g < GROUP; ++g) { zmax[g] = z[g]; acc[g] = 0.f; }
    for (int e = lo + tid; e < hi; e += SCORE_THREADS)
#pragma unroll
        for (int g = 0; g < GROUP; ++g) acc[g] += expf(lse[(long long)e * GROUP + g] - zmax[g]);
    __syncthreads();  // every thread has read z before it is rewritten
#pragma unroll
    for (int g = 0; g < GROUP; ++g) {
        acc[g] = warp_sum(acc[g]);
        if (lane == 0) red[warp][g] = acc[g];
    }
    __syncthreads();
    if (tid < GROUP) {
        float s = 0.f;
        for (int w = 0; w < SCORE_WARPS; ++w) s += red[w][tid];
        z[tid] = zmax[tid] + logf(s);
    }
    // the barrier also orders the -inf fill above before the writes below (any thread's)
    __syncthreads();

    for (int e = lo + tid; e < hi; e += SCORE_THREADS) {
        const int blk = cand_blocks[e];
        float x[GROUP], xm = FLUX_NEG_INF;
#pragma unroll
        for (int g = 0; g < GROUP; ++g) {
            x[g] = lse[(long long)e * GROUP + g] - z[g];
            xm = fmaxf(xm, x[g]);
        }
        float s = 0.f;
#pragma unroll
        for (int g = 0; g < GROUP; ++g) s += expf(x[g] - xm);
        const bool kept = blk < sink_blocks || blk >= nb - recent_blocks;
        orow[blk] = kept ? FORCED_SCORE : xm + logf(s);
    }
}
