// Helpers shared by every kernel source.
//
// No system headers anywhere: the same text must compile under NVRTC (CuPy, at run time)
// and nvcc (the CPU-only compile check), and NVRTC has no standard library. bf16 travels
// as raw 16-bit words, so cuda_bf16.h is not needed either: bf16 -> fp32 is a shift.
// The loader pastes this file in place of its #include line (once per source).

#ifndef BLOCK_TOKENS
#error "BLOCK_TOKENS must be defined (-D), from fluxion_dist.attention.layout"
#endif

typedef unsigned short bf16_t;

#define FLUX_NEG_INF __int_as_float(0xff800000)
#define FLUX_POS_INF __int_as_float(0x7f800000)
#define FLUX_LOG2E 1.4426950408889634f
#define FLUX_LN2 0.6931471805599453f
#define FULL_MASK 0xffffffffu
// sel_slot of a selected block the CPU computes (block_table.cu): the GPU kernels skip it
#define SLOT_CPU (-2)

__device__ __forceinline__ float bf16_to_f32(bf16_t b) {
    return __uint_as_float(((unsigned int)b) << 16);
}

// Round to nearest even, as torch does; NaN stays a quiet NaN.
__device__ __forceinline__ bf16_t f32_to_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16_t)(u >> 16);
}

// Eight bf16 values packed in 16 bytes -> fp32. The low half-word of each 32-bit word is
// the lower-addressed element (little endian).
__device__ __forceinline__ void unpack_bf16x8(const uint4 w, float (&f)[8]) {
    f[0] = __uint_as_float(w.x << 16); f[1] = __uint_as_float(w.x & 0xffff0000u);
    f[2] = __uint_as_float(w.y << 16); f[3] = __uint_as_float(w.y & 0xffff0000u);
    f[4] = __uint_as_float(w.z << 16); f[5] = __uint_as_float(w.z & 0xffff0000u);
    f[6] = __uint_as_float(w.w << 16); f[7] = __uint_as_float(w.w & 0xffff0000u);
}

// Sum over aligned groups of `width` lanes (width a power of two <= 32); every lane of the
// group ends with the total. All 32 lanes must call it.
template <int WIDTH>
__device__ __forceinline__ float group_sum(float v) {
#pragma unroll
    for (int off = WIDTH / 2; off > 0; off >>= 1) v += __shfl_xor_sync(FULL_MASK, v, off);
    return v;
}

// Max across lanes that differ only in the bits from `from` upwards: combines the token
// rows of a warp that each hold a full score.
template <int FROM>
__device__ __forceinline__ float across_groups_max(float v) {
#pragma unroll
    for (int off = FROM; off < 32; off <<= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, off));
    return v;
}

template <int FROM>
__device__ __forceinline__ float across_groups_sum(float v) {
#pragma unroll
    for (int off = FROM; off < 32; off <<= 1) v += __shfl_xor_sync(FULL_MASK, v, off);
    return v;
}
