// Exact log-sum-exp merge of any number of partial attention states.
//
// -D HEAD_DIM (a multiple of 32), -D BLOCK_TOKENS.
//
// Partials are (o unnormalised, m running max, l sum) per query-head row, stacked on a
// leading axis with arbitrary strides, so one launch merges the split-K chunks of the GPU
// attention, or GPU and CPU partials written into slices of one buffer (pinned host memory
// read through UVA works too). A partial with m = -inf is empty: its o and l do not count,
// so their (readable) bytes may be anything.
//
// One CTA per row; its warps take the partials round-robin and fold through shared memory.
// Every load of a pass is independent of the others, so a row with tens of partials costs
// about two memory round trips (m, then o), not one per partial.
#include "common.cuh"

#define MERGE_WARPS 8
#define MERGE_THREADS (MERGE_WARPS * 32)
#define VEC (HEAD_DIM / 32)

static_assert(HEAD_DIM % 32 == 0, "HEAD_DIM must be a multiple of 32");

// mode 0: merged state (o, m, l) in fp32; 1: normalised fp32 o; 2: normalised bf16 o.
__global__ void __launch_bounds__(MERGE_THREADS) merge_partials(
    const float* __restrict__ o,             // [P] x [rows, HEAD_DIM], partial stride o_stride
    const float* __restrict__ m,             // [P] x [rows], stride m_stride
    const float* __restrict__ l,             // [P] x [rows], stride l_stride
    int num_parts, long long o_stride, long long m_stride, long long l_stride,
    int mode,
    float* __restrict__ out_o,               // [rows, HEAD_DIM] (modes 0, 1)
    float* __restrict__ out_m,               // [rows] (mode 0)
    float* __restrict__ out_l,               // [rows] (mode 0)
    bf16_t* __restrict__ out_bf16)           // [rows, HEAD_DIM] (mode 2)
{
    __shared__ float sm_max[MERGE_WARPS];
    __shared__ float sm_acc[MERGE_WARPS][HEAD_DIM];
    __shared__ float sm_l[MERGE_WARPS];

    const long long row = blockIdx.x;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int c0 = lane * VEC;

    float mm = FLUX_NEG_INF;
    for (int p = threadIdx.x; p < num_parts; p += MERGE_THREADS) mm = fmaxf(mm, m[p * m_stride + row]);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) mm = fmaxf(mm, __shfl_xor_sync(FULL_MASK, mm, off));
    if (lane == 0) sm_max[warp] = mm;
    __syncthreads();
#pragma unroll
    for (int w = 0; w < MERGE_WARPS; ++w) mm = fmaxf(mm, sm_max[w]);

    float acc[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] = 0.f;
    float ll = 0.f;
    if (mm != FLUX_NEG_INF) {
#pragma unroll 4
        for (int p = warp; p < num_parts; p += MERGE_WARPS) {
            const float mp = m[p * m_stride + row];
            const float lp = l[p * l_stride + row];
            const float* src = o + p * o_stride + row * HEAD_DIM + c0;
            float ov[VEC];
#pragma unroll
            for (int i = 0; i < VEC; ++i) ov[i] = src[i];
            if (mp != FLUX_NEG_INF) {  // an empty partial's o and l may be anything
                const float w = exp2f((mp - mm) * FLUX_LOG2E);
                ll = fmaf(w, lp, ll);
#pragma unroll
                for (int i = 0; i < VEC; ++i) acc[i] = fmaf(w, ov[i], acc[i]);
            }
        }
    }
#pragma unroll
    for (int i = 0; i < VEC; ++i) sm_acc[warp][c0 + i] = acc[i];
    if (lane == 0) sm_l[warp] = ll;
    __syncthreads();

    for (int c = threadIdx.x; c < HEAD_DIM; c += MERGE_THREADS) {
        float v = 0.f, lsum = 0.f;
#pragma unroll
        for (int w = 0; w < MERGE_WARPS; ++w) { v += sm_acc[w][c]; lsum += sm_l[w]; }
        if (mode == 0) {
            out_o[row * HEAD_DIM + c] = v;
            if (c == 0) { out_m[row] = mm; out_l[row] = lsum; }
        } else if (mode == 1) {
            // A row with no tokens in any partial has l = 0 and comes out NaN: the reference
            // raises there, and a kernel cannot, so the NaN is the signal.
            out_o[row * HEAD_DIM + c] = v / lsum;
        } else {
            out_bf16[row * HEAD_DIM + c] = f32_to_bf16(v / lsum);
        }
    }
}
