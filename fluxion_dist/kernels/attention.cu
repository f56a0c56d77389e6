// Sparse partial attention over selected 16-token blocks, flash-decoding style.
//
// -D HEAD_DIM (64 or 128), -D GROUP (query heads per KV head), -D BLOCK_TOKENS.
//
// Grid: (chunk index, request * KV head). A CTA takes `chunk` consecutive entries of one
// selection list and computes one partial (o, m, l) for the GROUP query heads of that KV
// head (split-K over blocks keeps the GPU busy when a layer has few KV heads and short
// lists). With one chunk per row the partial is the output; otherwise the chunk partials
// go to scratch and merge.cu folds them (one CTA per row, warps across the partials: a
// merge inside this kernel's last CTA was a serial chain of loads, and slower).
//
// Each warp owns whole blocks. A block's K and V rows are read straight from where they lie:
// a slot of the GPU block cache, or the request's page in the arena, which may be pinned host
// memory read through its UVA device pointer. HEAD_DIM/8 lanes share a token row, each lane
// loading 16 bytes, so one warp instruction reads 512 contiguous bytes and a warp has the
// whole 2*16*HEAD_DIM*2-byte (block, head) run in flight before its first use: that is what
// lets scattered UVA reads run near memcpy speed. Tokens past the sequence end are never
// read (their bytes are padding and may hold anything). Scores are kept in log2 units with
// the softmax scale folded into q, so each exponential is one exp2.
#include "common.cuh"

#define ATTN_WARPS 4
#define ATTN_THREADS (ATTN_WARPS * 32)
#define ROW_LANES (HEAD_DIM / 8)
#define ROWS_PER_LOAD (32 / ROW_LANES)
#define SLOTS (BLOCK_TOKENS / ROWS_PER_LOAD)
#define KV_RUN (2 * BLOCK_TOKENS * HEAD_DIM)  // elements of one (block, head): K rows then V rows

static_assert(HEAD_DIM == 64 || HEAD_DIM == 128, "HEAD_DIM must be 64 or 128");
static_assert(BLOCK_TOKENS % ROWS_PER_LOAD == 0, "BLOCK_TOKENS must split evenly over a warp");
static_assert(GROUP >= 1 && GROUP <= 16, "GROUP out of range");

__device__ __forceinline__ float dot8(const float (&a)[8], const float (&b)[8]) {
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) s = fmaf(a[i], b[i], s);
    return s;
}

__global__ void __launch_bounds__(ATTN_THREADS) sparse_attention_chunks(
    const float* __restrict__ q,             // [B, Hq, HEAD_DIM]
    const bf16_t* __restrict__ kv_pages,     // [P, Hkv, 2, BLOCK_TOKENS, HEAD_DIM]
    const bf16_t* __restrict__ cache_pool,   // [S, 2, BLOCK_TOKENS, HEAD_DIM], or null
    const int* __restrict__ block_tables,    // [B, max_blocks]
    const int* __restrict__ seq_lens,        // [B]
    const int* __restrict__ sel_indptr,      // [B*Hkv + 1]
    const int* __restrict__ sel_blocks,      // [nnz] logical block ids
    const int* __restrict__ sel_slot,        // [nnz] cache slot, -1 (arena) or SLOT_CPU (skip); or null
    float* __restrict__ o_out,               // [B, Hq, HEAD_DIM]
    float* __restrict__ m_out,               // [B, Hq]
    float* __restrict__ l_out,               // [B, Hq]
    float* __restrict__ o_part,              // [num_chunks, B*Hq, HEAD_DIM] (num_chunks > 1)
    float* __restrict__ m_part,              // [num_chunks, B*Hq]
    float* __restrict__ l_part,              // [num_chunks, B*Hq]
    int batch, int num_kv_heads, int max_blocks, int chunk, int num_chunks, float scale_log2)
{
    __shared__ __align__(16) float sm_q[GROUP][HEAD_DIM];
    __shared__ float sm_o[ATTN_WARPS][GROUP][HEAD_DIM];
    __shared__ float sm_m[ATTN_WARPS][GROUP];
    __shared__ float sm_l[ATTN_WARPS][GROUP];

    const int row = blockIdx.y;
    const int b = row / num_kv_heads, kh = row % num_kv_heads;
    const int hq = num_kv_heads * GROUP;
    const long long rows_total = (long long)batch * hq;
    const long long head0 = (long long)b * hq + kh * GROUP;  // first query-head row of the group
    const bool split = num_chunks > 1;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int sub = lane / ROW_LANES;        // which token row of a load this lane reads
    const int ch = (lane % ROW_LANES) * 8;

    // q is fetched before the list bounds are known, so the two loads overlap.
    constexpr int Q_PER_THREAD = (GROUP * HEAD_DIM + ATTN_THREADS - 1) / ATTN_THREADS;
    float qv[Q_PER_THREAD];
#pragma unroll
    for (int j = 0; j < Q_PER_THREAD; ++j) {
        const int idx = threadIdx.x + j * ATTN_THREADS;
        qv[j] = idx < GROUP * HEAD_DIM ? q[head0 * HEAD_DIM + idx] : 0.f;
    }
    const int list_end = sel_indptr[row + 1];
    const int start = sel_indptr[row] + blockIdx.x * chunk;
    const int end = min(list_end, start + chunk);

    if (start < end || !split) {
        const int seq_len = seq_lens[b];
        // q lives in shared memory: in registers it would cost 8*GROUP of them per lane, and
        // the K/V runs in flight matter more (GROUP = 8 would spill).
#pragma unroll
        for (int j = 0; j < Q_PER_THREAD; ++j) {
            const int idx = threadIdx.x + j * ATTN_THREADS;
            if (idx < GROUP * HEAD_DIM) sm_q[idx / HEAD_DIM][idx % HEAD_DIM] = qv[j] * scale_log2;
        }
        __syncthreads();

        // m is uniform over the warp; l and o are this lane's share (its token rows, channels).
        float m[GROUP], l[GROUP], o[GROUP][8];
#pragma unroll
        for (int g = 0; g < GROUP; ++g) {
            m[g] = FLUX_NEG_INF; l[g] = 0.f;
#pragma unroll
            for (int i = 0; i < 8; ++i) o[g][i] = 0.f;
        }

        int e = start + warp;
        int blk = 0, slot = -1;
        if (e < end) {
            blk = sel_blocks[e];
            slot = sel_slot != nullptr ? sel_slot[e] : -1;
        }
        for (; e < end; e += ATTN_WARPS) {
            const bf16_t* run;
            if (slot >= 0) {
                run = cache_pool + (long long)slot * KV_RUN;
            } else {
                const long long page = block_tables[(long long)b * max_blocks + blk];
                run = kv_pages + (page * num_kv_heads + kh) * KV_RUN;
            }
            // An entry the CPU computes reads nothing and adds nothing (all its scores -inf).
            const int valid = slot == SLOT_CPU ? 0 : min(BLOCK_TOKENS, seq_len - blk * BLOCK_TOKENS);

            uint4 kr[SLOTS], vr[SLOTS];
#pragma unroll
            for (int i = 0; i < SLOTS; ++i) {
                const int t = i * ROWS_PER_LOAD + sub;
                if (t < valid) {
                    kr[i] = __ldcs(reinterpret_cast<const uint4*>(run + t * HEAD_DIM + ch));
                    vr[i] = __ldcs(reinterpret_cast<const uint4*>(run + (BLOCK_TOKENS + t) * HEAD_DIM + ch));
                } else {
                    kr[i] = make_uint4(0u, 0u, 0u, 0u);
                    vr[i] = make_uint4(0u, 0u, 0u, 0u);
                }
            }
            // The next entry's ids load while this block's bytes are in flight.
            const int e_next = e + ATTN_WARPS;
            if (e_next < end) {
                blk = sel_blocks[e_next];
                slot = sel_slot != nullptr ? sel_slot[e_next] : -1;
            }

#pragma unroll
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
                    const float acc = group_sum<ROW_LANES>(dot8(qg, kf));
                    s[i] = (i * ROWS_PER_LOAD + sub < valid) ? acc : FLUX_NEG_INF;
                    bmax = fmaxf(bmax, s[i]);
                }
                bmax = across_groups_max<ROW_LANES>(bmax);
                const float m_new = fmaxf(m[g], bmax);
                if (m_new == FLUX_NEG_INF) continue;  // no valid token (warp-uniform)
                const float corr = exp2f(m[g] - m_new);
                l[g] *= corr;
#pragma unroll
                for (int c = 0; c < 8; ++c) o[g][c] *= corr;
#pragma unroll
                for (int i = 0; i < SLOTS; ++i) {
                    const float p = exp2f(s[i] - m_new);
                    float vf[8];
                    unpack_bf16x8(vr[i], vf);
                    l[g] += p;
#pragma unroll
                    for (int c = 0; c < 8; ++c) o[g][c] = fmaf(p, vf[c], o[g][c]);
                }
                m[g] = m_new;
            }
        }

        // Fold the token rows of the warp, then the warps of the CTA, through shared memory.
#pragma unroll
        for (int g = 0; g < GROUP; ++g) {
            l[g] = across_groups_sum<ROW_LANES>(l[g]);
#pragma unroll
            for (int c = 0; c < 8; ++c) o[g][c] = across_groups_sum<ROW_LANES>(o[g][c]);
            if (sub == 0) {
#pragma unroll
                for (int c = 0; c < 8; ++c) sm_o[warp][g][ch + c] = o[g][c];
            }
            if (lane == 0) { sm_m[warp][g] = m[g]; sm_l[warp][g] = l[g]; }
        }
        __syncthreads();

        // Destinations are formed only now: held across the loop they cost registers.
        float* const o_dst = split ? o_part + (long long)blockIdx.x * rows_total * HEAD_DIM : o_out;
        float* const m_dst = split ? m_part + (long long)blockIdx.x * rows_total : m_out;
        float* const l_dst = split ? l_part + (long long)blockIdx.x * rows_total : l_out;
        for (int idx = threadIdx.x; idx < GROUP * HEAD_DIM; idx += ATTN_THREADS) {
            const int g = idx / HEAD_DIM, c = idx % HEAD_DIM;
            float mm = FLUX_NEG_INF;
#pragma unroll
            for (int w = 0; w < ATTN_WARPS; ++w) mm = fmaxf(mm, sm_m[w][g]);
            float acc = 0.f, ll = 0.f;
            if (mm != FLUX_NEG_INF) {
#pragma unroll
                for (int w = 0; w < ATTN_WARPS; ++w) {
                    if (sm_m[w][g] == FLUX_NEG_INF) continue;
                    const float wt = exp2f(sm_m[w][g] - mm);
                    acc += wt * sm_o[w][g][c];
                    ll += wt * sm_l[w][g];
                }
            }
            o_dst[(head0 + g) * HEAD_DIM + c] = acc;
            if (c == 0) {
                // Back to natural-log units, the merge contract.
                m_dst[head0 + g] = mm == FLUX_NEG_INF ? FLUX_NEG_INF : mm * FLUX_LN2;
                l_dst[head0 + g] = ll;
            }
        }
    } else if (threadIdx.x < GROUP) {
        // An empty chunk only marks itself empty: the merge skips m = -inf without reading o.
        m_part[blockIdx.x * rows_total + head0 + threadIdx.x] = FLUX_NEG_INF;
        l_part[blockIdx.x * rows_total + head0 + threadIdx.x] = 0.f;
    }
}
