// The int8 mirror of the Quest metadata, built on the GPU from the bf16 rows of chosen pages
// (compact_metadata.py is the reference and says why it bounds; this is bit for bit the same).
//
// -D HEAD_DIM, -D BLOCK_TOKENS (unused). One warp per (page, head) row: the lanes stride over
// the channels, reduce max|corner| with shuffles, pick the least bf16 scale s with
// 127 * s >= max|corner|, and write floor(min / s) and ceil(max / s), each corrected by one
// step where the float division rounded across an integer (q * s is exact in float32: 7- and
// 8-bit significands). CuPy compiles with -ftz=true: subnormal corners are moved outward to 0 or
// +-2^-126 on their bits before any float operation, and the scale is at least 2^-126.
#include "common.cuh"

#define QUANT_WARPS 4  // the launcher's _WARPS
#define QMAX 127

static_assert(HEAD_DIM % 8 == 0, "HEAD_DIM must be a multiple of 8");

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, off));
    return v;
}

#define LEAST_NORMAL_BITS 0x0080u  // bf16 bits of 2^-126

// A corner as float32, a subnormal one moved outward (up: towards +inf) to 0 or +-2^-126.
__device__ __forceinline__ float outward_corner(bf16_t b, bool up) {
    if ((b & 0x7f80u) != 0u || (b & 0x7fu) == 0u) return bf16_to_f32(b);  // normal, zero, inf/NaN
    const bool neg = (b & 0x8000u) != 0u;
    if (up) return neg ? 0.f : __uint_as_float(0x00800000u);
    return neg ? -__uint_as_float(0x00800000u) : 0.f;
}

// The least bf16 s >= 2^-126 with QMAX * s >= amax (amax finite, >= 0, zero or normal).
__device__ __forceinline__ bf16_t least_scale(float amax) {
    const unsigned int u = __float_as_uint(__fdiv_ru(amax, (float)QMAX));
    unsigned int bits = (u >> 16) + ((u & 0xffffu) != 0u);  // round up to bf16 (positive)
    if (bits < LEAST_NORMAL_BITS) bits = LEAST_NORMAL_BITS;
    while (bf16_to_f32((bf16_t)bits) * (float)QMAX < amax) ++bits;
    // The least: one step down must fall short (it can only after the round-up above).
    while (bits > LEAST_NORMAL_BITS && bf16_to_f32((bf16_t)(bits - 1u)) * (float)QMAX >= amax) --bits;
    return (bf16_t)bits;
}

__global__ void __launch_bounds__(QUANT_WARPS * 32) quantize_metadata(
    const bf16_t* __restrict__ kmin,    // [P, Hkv, HEAD_DIM]
    const bf16_t* __restrict__ kmax,    // [P, Hkv, HEAD_DIM]
    const int* __restrict__ pages,      // [n]: the pages to (re)build
    int n, int num_kv_heads,
    signed char* __restrict__ values,   // [P, Hkv, HEAD_DIM/8, 2, 8]
    bf16_t* __restrict__ scales)        // [P, Hkv]
{
    const int lane = threadIdx.x & 31;
    const long long item = (long long)blockIdx.x * QUANT_WARPS + threadIdx.x / 32;
    if (item >= (long long)n * num_kv_heads) return;  // whole warps leave together
    const long long row = (long long)pages[item / num_kv_heads] * num_kv_heads + item % num_kv_heads;
    const bf16_t* lo = kmin + row * HEAD_DIM;
    const bf16_t* hi = kmax + row * HEAD_DIM;

    float amax = 0.f;
    for (int c = lane; c < HEAD_DIM; c += 32)
        amax = fmaxf(amax, fmaxf(fabsf(outward_corner(lo[c], false)), fabsf(outward_corner(hi[c], true))));
    amax = warp_max(amax);
    const bf16_t sb = least_scale(amax);
    const float s = bf16_to_f32(sb);
    signed char* out = values + row * (2 * HEAD_DIM);
    for (int c = lane; c < HEAD_DIM; c += 32) {
        const float a = outward_corner(lo[c], false), b = outward_corner(hi[c], true);
        float ql = floorf(a / s), qh = ceilf(b / s);
        if (ql * s > a) ql -= 1.f;
        if (qh * s < b) qh += 1.f;
        const int at = (c / 8) * 16 + c % 8;
        out[at] = (signed char)(int)ql;
        out[at + 8] = (signed char)(int)qh;
    }
    if (lane == 0) scales[row] = sb;
}
