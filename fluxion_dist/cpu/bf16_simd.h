/* bf16 loads and the few vector helpers the CPU kernels share.
 *
 * Every kernel exists as a portable scalar body and as SIMD bodies built under
 * `#pragma GCC target` (AVX2+FMA, AVX-512F), chosen at run time from
 * fx_cpu_isa(). Run-time dispatch (not -mavx2 on the command line) keeps one
 * build correct on any x86-64 (and non-x86) host: the build machine and the
 * GPU machine's Xeon differ, and a wheel may run on a third.
 *
 * The SIMD bodies read W bf16 (W = 16 for AVX2, 32 for AVX-512) as W/2 32-bit
 * words and split them into even channels (shift left 16) and odd channels
 * (mask the high half): one op per vector, no lane shuffles. So q and the
 * output accumulators are kept "split": each W-channel group stored as
 * [W/2 even channels | W/2 odd channels] (fx_split / fx_unsplit).
 */
#ifndef FX_BF16_SIMD_H
#define FX_BF16_SIMD_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define FX_LOG2E 1.4426950408889634f
#define FX_LN2 0.6931471805599453f

enum { FX_SCALAR = 0, FX_AVX2 = 1, FX_AVX512 = 2 };

/* Channels per split group of each ISA (0: not split). */
static inline int fx_split_width(int isa) { return isa == FX_AVX512 ? 32 : isa == FX_AVX2 ? 16 : 0; }

/* bf16 is the high half of an fp32 word: the conversion is a 16-bit shift. */
static inline float fx_bf16(uint16_t x) {
    uint32_t u = (uint32_t)x << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* dst = src * scale, each w-channel group reordered [even | odd] (w = 0: plain copy). */
static inline void fx_split(const float *src, float *dst, int d, float scale, int w) {
    if (!w) {
        for (int c = 0; c < d; c++) dst[c] = src[c] * scale;
        return;
    }
    for (int c = 0; c < d; c += w)
        for (int j = 0; j < w / 2; j++) {
            dst[c + j] = src[c + 2 * j] * scale;
            dst[c + w / 2 + j] = src[c + 2 * j + 1] * scale;
        }
}

/* dst = src in natural channel order (the inverse of fx_split without scale). */
static inline void fx_unsplit(const float *src, float *dst, int d, int w) {
    if (!w) {
        memcpy(dst, src, sizeof(float) * (size_t)d);
        return;
    }
    for (int c = 0; c < d; c += w)
        for (int j = 0; j < w / 2; j++) {
            dst[c + 2 * j] = src[c + j];
            dst[c + 2 * j + 1] = src[c + w / 2 + j];
        }
}

/* 64-byte aligned scratch (free() releases it): a 32-byte vector never splits a cache line. */
static inline void *fx_alloc(size_t bytes) { return aligned_alloc(64, (bytes + 63) / 64 * 64); }

#if defined(__x86_64__) || defined(__i386__)
#define FX_X86 1

/* The widest ISA this CPU (and OS) runs: __builtin_cpu_supports checks both. */
static inline int fx_cpu_isa(void) {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return FX_SCALAR;
    return __builtin_cpu_supports("avx512f") ? FX_AVX512 : FX_AVX2;
}

#pragma GCC push_options
#pragma GCC target("avx2,fma")
#include <immintrin.h>

/* 8 bf16 values -> 8 floats in natural order (zero-extend, shift). */
static inline __m256 fx_cvt8(const uint16_t *p) {
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* 16 bf16 as 8 words -> even channels / odd channels. */
static inline __m256i fx_load16(const uint16_t *p) { return _mm256_loadu_si256((const __m256i *)p); }
static inline __m256 fx_even16(__m256i w) { return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)); }
static inline __m256 fx_odd16(__m256i w) {
    return _mm256_castsi256_ps(_mm256_and_si256(w, _mm256_set1_epi32((int)0xFFFF0000u)));
}

static inline float fx_hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline float fx_hmax8(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* out[j] = sum of the lanes of v[j], j < N; hadd trees for N = 4 and 8. */
static inline __attribute__((always_inline)) void fx_hsums(const __m256 *v, float *out, const int N) {
    if (N == 8) {
        __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
        __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
        _mm256_storeu_ps(out, _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20),
                                            _mm256_permute2f128_ps(a, b, 0x31)));
    } else if (N == 4) {
        __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
        _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1)));
    } else {
#pragma GCC unroll 8
        for (int j = 0; j < N; j++) out[j] = fx_hsum8(v[j]);
    }
}

/* 2^x for x <= 0 (scores minus a running max, in log2 units); -inf and
 * anything below -126 give exactly 0. Degree-7 Taylor on [-0.5, 0.5]:
 * relative error ~5e-9, below fp32 rounding. */
static inline __m256 fx_exp2_8(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-126.0f);
    __m256 keep = _mm256_cmp_ps(x, lo, _CMP_GE_OQ);
    x = _mm256_max_ps(x, lo);
    __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 f = _mm256_sub_ps(x, n);
    __m256 p = _mm256_set1_ps(1.5252733804059840e-5f);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.5403530393381609e-4f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3333558146428443e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.6181291076284772e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.5504108664821580e-2f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.4022650695910071e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.9314718055994531e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), keep);
}

/* Instantiate CALL(G) with a compile-time tile size G in 1..8, so the
 * accumulators of a head tile unroll into registers. */
#define FX_TILES(TILE, CALL)                                                   \
    switch (TILE) {                                                            \
    case 1: CALL(1); break;                                                    \
    case 2: CALL(2); break;                                                    \
    case 3: CALL(3); break;                                                    \
    case 4: CALL(4); break;                                                    \
    case 5: CALL(5); break;                                                    \
    case 6: CALL(6); break;                                                    \
    case 7: CALL(7); break;                                                    \
    default: CALL(8); break;                                                   \
    }

#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")

/* 32 bf16 as 16 words -> even channels / odd channels. */
static inline __m512i fx_load32(const uint16_t *p) { return _mm512_loadu_si512((const void *)p); }
static inline __m512 fx_even32(__m512i w) { return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)); }
static inline __m512 fx_odd32(__m512i w) {
    return _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32((int)0xFFFF0000u)));
}

static inline __m256 fx_fold16(__m512 v) { /* lanes 0-7 + lanes 8-15 */
    return _mm256_add_ps(_mm512_castps512_ps256(v),
                         _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}

/* fx_exp2_8 on 16 lanes; scalef applies 2^n without building exponent bits. */
static inline __m512 fx_exp2_16(__m512 x) {
    const __m512 lo = _mm512_set1_ps(-126.0f);
    __mmask16 keep = _mm512_cmp_ps_mask(x, lo, _CMP_GE_OQ);
    x = _mm512_max_ps(x, lo);
    __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_sub_ps(x, n);
    __m512 p = _mm512_set1_ps(1.5252733804059840e-5f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.5403530393381609e-4f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284772e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650695910071e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718055994531e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_maskz_mov_ps(keep, _mm512_scalef_ps(p, n));
}

#pragma GCC pop_options

#else
#define FX_X86 0
static inline int fx_cpu_isa(void) { return FX_SCALAR; }
#endif

#endif
