// Exact log-sum-exp merge of any number of partial attention states.
//
// -D HEAD_DIM (a multiple of 32), -D BLOCK_TOKENS.
//
// Partials are (o unnormalised, m running max, l sum) per query-head row, stacked on a
// leading axis with arbitrary strides, so one launch merges the split-K chunks of the GPU
// kernel, or GPU and CPU partials that were written into slices of one buffer (pinned host
// memory read through UVA works too). One warp per row; a partial with m = -inf is empty and
// its o and l do not count, so their (readable) bytes may be anything.
#include "common.cuh"

#define MERGE_THREADS 128
#define VEC (HEAD_DIM / 32)

static_assert(HEAD_DIM % 32 == 0, "HEAD_DIM must be a multiple of 32");

// mode 0: merged state (o, m, l) in fp32; 1: normalised fp32 o; 2: normalised bf16 o.
__global__ void __launch_bounds__(MERGE_THREADS) merge_partials(
    const float* __restrict__ o,             // [P] x [rows, HEAD_DIM], partial stride o_stride
    const float* __restrict__ m,             // [P] x [rows], stride m_stride
    const float* __restrict__ l,             // [P] x [rows], stride l_stride
    int num_parts, long long o_stride, long long m_stride, long long l_stride, int rows,
    int mode,
    float* __restrict__ out_o,               // [rows, HEAD_DIM] (modes 0, 1)
    float* __restrict__ out_m,               // [rows] (mode 0)
    float* __restrict__ out_l,               // [rows] (mode 0)
    bf16_t* __restrict__ out_bf16)           // [rows, HEAD_DIM] (mode 2)
{
    const int row = blockIdx.x * (MERGE_THREADS / 32) + (threadIdx.x >> 5);
    if (row >= rows) return;  // whole warps leave together
    const int lane = threadIdx.x & 31;
    const int c0 = lane * VEC;

    // The max over partials, lanes in parallel; then a pass whose loads do not depend on one
    // another, so with the unroll several partials are in flight (a long serial chain of
    // dependent loads is what makes a many-partial merge slow).
    float mm = FLUX_NEG_INF;
    for (int p = lane; p < num_parts; p += 32) mm = fmaxf(mm, m[p * m_stride + row]);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) mm = fmaxf(mm, __shfl_xor_sync(FULL_MASK, mm, off));

    float acc[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] = 0.f;
    float ll = 0.f;
    if (mm != FLUX_NEG_INF) {
#pragma unroll 4
        for (int p = 0; p < num_parts; ++p) {
            const float mp = m[p * m_stride + row];
            const float lp = l[p * l_stride + row];
            const float* src = o + p * o_stride + (long long)row * HEAD_DIM + c0;
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

    if (mode == 0) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) out_o[(long long)row * HEAD_DIM + c0 + i] = acc[i];
        if (lane == 0) { out_m[row] = mm; out_l[row] = ll; }
        return;
    }
    // A row with no tokens in any partial has l = 0 and comes out NaN: the reference raises
    // there, and a kernel cannot, so the NaN is the signal.
    const float inv = 1.f / ll;
    for (int i = 0; i < VEC; ++i) {
        const float v = acc[i] * inv;
        if (mode == 1) out_o[(long long)row * HEAD_DIM + c0 + i] = v;
        else out_bf16[(long long)row * HEAD_DIM + c0 + i] = f32_to_bf16(v);
    }
}
