// Append one decode token per request: its K/V into the recent block on the GPU (a slot of
// the block cache) and, optionally, into the request's arena page (host memory through UVA,
// so the CPU path sees the token too); the page's Quest metadata is updated in place.
//
// -D HEAD_DIM, -D BLOCK_TOKENS.
//
// One CTA per request, so the CTA that writes the token is the one that bumps seq_lens
// after a barrier: no other CTA reads that request's length. The token lands at position
// seq_lens[b] (before the bump); the caller has already mapped the block that holds it
// (block_tables) and, when it starts a new block, given it a cache slot.
#include "common.cuh"

#define APPEND_THREADS 1024  // one (head, channel) per thread at Hkv x d = 1024: no serial chain of loads

__global__ void __launch_bounds__(APPEND_THREADS) append_kv(
    const bf16_t* __restrict__ k_new,        // [B, Hkv, HEAD_DIM]
    const bf16_t* __restrict__ v_new,        // [B, Hkv, HEAD_DIM]
    int* __restrict__ seq_lens,              // [B], incremented by one
    const int* __restrict__ block_tables,    // [B, max_blocks]
    const int* __restrict__ slots,           // [B, Hkv] cache slot of the receiving block, -1: none
    bf16_t* __restrict__ cache_pool,         // [S, 2, BLOCK_TOKENS, HEAD_DIM], or null
    bf16_t* __restrict__ kv_pages,           // [P, Hkv, 2, BLOCK_TOKENS, HEAD_DIM], or null
    bf16_t* __restrict__ kmin,               // [P, Hkv, HEAD_DIM]
    bf16_t* __restrict__ kmax,               // [P, Hkv, HEAD_DIM]
    int num_kv_heads, int max_blocks)
{
    const int b = blockIdx.x;
    const int pos = seq_lens[b];
    const int blk = pos / BLOCK_TOKENS, off = pos % BLOCK_TOKENS;
    const long long page = block_tables[(long long)b * max_blocks + blk];

    for (int idx = threadIdx.x; idx < num_kv_heads * HEAD_DIM; idx += APPEND_THREADS) {
        const int kh = idx / HEAD_DIM, c = idx % HEAD_DIM;
        const long long src = ((long long)b * num_kv_heads + kh) * HEAD_DIM + c;
        const bf16_t kb = k_new[src], vb = v_new[src];

        const int slot = slots[b * num_kv_heads + kh];
        if (cache_pool != nullptr && slot >= 0) {
            bf16_t* run = cache_pool + (long long)slot * 2 * BLOCK_TOKENS * HEAD_DIM;
            run[off * HEAD_DIM + c] = kb;
            run[(BLOCK_TOKENS + off) * HEAD_DIM + c] = vb;
        }
        if (kv_pages != nullptr) {
            bf16_t* run = kv_pages + (page * num_kv_heads + kh) * 2 * BLOCK_TOKENS * HEAD_DIM;
            run[off * HEAD_DIM + c] = kb;
            run[(BLOCK_TOKENS + off) * HEAD_DIM + c] = vb;
        }

        // The first token of a block resets its box; later ones widen it. min/max of bf16
        // values are exact in bf16, so the bits are copied, never rounded.
        const long long meta = (page * num_kv_heads + kh) * HEAD_DIM + c;
        if (off == 0) {
            kmin[meta] = kb;
            kmax[meta] = kb;
        } else {
            const float kf = bf16_to_f32(kb);
            if (kf < bf16_to_f32(kmin[meta])) kmin[meta] = kb;
            if (kf > bf16_to_f32(kmax[meta])) kmax[meta] = kb;
        }
    }
    __syncthreads();
    if (threadIdx.x == 0) seq_lens[b] = pos + 1;
}
