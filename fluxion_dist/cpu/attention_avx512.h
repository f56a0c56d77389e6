/* AVX-512F body of the block attention step: attention_avx2.h at twice the width.
 *
 * Needs d % 32 == 0. q and the chunk's o are split in 32-channel groups
 * (bf16_simd.h): one 64-byte load, one shift and one mask convert 32 bf16. With
 * 32 zmm registers a head tile keeps up to 16 accumulators, so each K/V load
 * and each q load feeds more FMAs than on AVX2.
 */
#ifndef FX_ATTENTION_AVX512_H
#define FX_ATTENTION_AVX512_H

#include "attention_avx2.h"

#if FX_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")

/* st[(i + t) * G + h] = q_h . K[row i + t] for T tokens and G heads; even and
 * odd channels accumulate apart when 2*T*G <= 16. */
static inline __attribute__((always_inline)) void
fx_qk_step512(const float *q, const uint16_t *const *krow, int d, float *st, const int G,
              const int T) {
    const int A = 2 * T * G <= 16 ? 2 : 1;
    __m512 acc[16];
#pragma GCC unroll 16
    for (int j = 0; j < T * G * A; j++) acc[j] = _mm512_setzero_ps();
    for (int c = 0; c < d; c += 32) {
#pragma GCC unroll 8
        for (int t = 0; t < T; t++) {
            __m512i w = fx_load32(krow[t] + c);
            __m512 ke = fx_even32(w), ko = fx_odd32(w);
#pragma GCC unroll 8
            for (int h = 0; h < G; h++) {
                __m512 *a = acc + (t * G + h) * A;
                a[0] = _mm512_fmadd_ps(_mm512_loadu_ps(q + h * d + c), ke, a[0]);
                a[A - 1] = _mm512_fmadd_ps(_mm512_loadu_ps(q + h * d + c + 16), ko, a[A - 1]);
            }
        }
    }
    __m256 f[16];
#pragma GCC unroll 16
    for (int j = 0; j < T * G; j++)
        f[j] = fx_fold16(A == 2 ? _mm512_add_ps(acc[2 * j], acc[2 * j + 1]) : acc[j]);
#pragma GCC unroll 2
    for (int j = 0; j < T * G; j += 8) fx_hsums(f + j, st + j, T * G - j < 8 ? T * G - j : 8);
}

/* Tokens per QK step: as many as keep T*G <= 16 accumulators. */
#define FX_QK_T512(G) (G == 1 ? 8 : G == 2 ? 4 : G <= 4 ? 4 : 2)

static inline __attribute__((always_inline)) void
fx_qk_tile512(const float *q, const uint16_t *const *krow, int d, int nt, float *st,
              const char *pf, int pf_lines, const int G) {
    const int T = FX_QK_T512(G);
    int i = 0;
    for (; i < nt; i += T) {
        if (pf) FX_PF_SLICE(pf, pf_lines, i, i + T < nt ? i + T : nt, nt);
        if (i + T > nt) break;
        fx_qk_step512(q, krow + i, d, st + i * G, G, T);
    }
    for (; i < nt; i++) fx_qk_step512(q, krow + i, d, st + i * G, G, 1);
}

/* o[h][c, c + 32*NG) += sum_i p[h][i] * V[row i]: 2*G*NG <= 16 accumulators. */
static inline __attribute__((always_inline)) void
fx_pv_pass512(const float *p, const uint16_t *const *vrow, int d, int c, int nt, float *o,
              const int G, const int NG) {
    __m512 acc[16], v[8];
#pragma GCC unroll 8
    for (int h = 0; h < G; h++)
#pragma GCC unroll 8
        for (int j = 0; j < 2 * NG; j++) acc[h * 2 * NG + j] = _mm512_loadu_ps(o + h * d + c + 16 * j);
    for (int i = 0; i < nt; i++) {
#pragma GCC unroll 4
        for (int k = 0; k < NG; k++) {
            __m512i w = fx_load32(vrow[i] + c + 32 * k);
            v[2 * k] = fx_even32(w);
            v[2 * k + 1] = fx_odd32(w);
        }
#pragma GCC unroll 8
        for (int h = 0; h < G; h++) {
            __m512 pb = _mm512_set1_ps(p[h * FX_BT + i]);
#pragma GCC unroll 8
            for (int j = 0; j < 2 * NG; j++)
                acc[h * 2 * NG + j] = _mm512_fmadd_ps(pb, v[j], acc[h * 2 * NG + j]);
        }
    }
#pragma GCC unroll 8
    for (int h = 0; h < G; h++)
#pragma GCC unroll 8
        for (int j = 0; j < 2 * NG; j++) _mm512_storeu_ps(o + h * d + c + 16 * j, acc[h * 2 * NG + j]);
}

static inline __attribute__((always_inline)) void
fx_pv_tile512(const float *p, const uint16_t *const *vrow, int d, int nt, float *o,
              const char *pf, int pf_lines, const int G) {
    const int NG = G <= 2 ? 4 : G <= 4 ? 2 : 1;
    FX_PV_SWEEP(fx_pv_pass512, 32, NG);
}

static void fx_scores_avx512(const float *q, const uint16_t *K, int d, int g, const int8_t *tok,
                             int nt, float *s, const char *pf, int pf_lines) {
    const uint16_t *krow[FX_BT];
    float st[FX_BT * 8];
    for (int i = 0; i < nt; i++) krow[i] = K + (int64_t)tok[i] * d;
    for (int h0 = 0; h0 < g; h0 += 8) {
        int tile = g - h0 < 8 ? g - h0 : 8;
#define FX_QK(G) fx_qk_tile512(q + h0 * d, krow, d, nt, st, h0 ? NULL : pf, pf_lines, G)
        FX_TILES(tile, FX_QK)
#undef FX_QK
        for (int h = 0; h < tile; h++)
            for (int i = 0; i < nt; i++) s[(h0 + h) * FX_BT + i] = st[i * tile + h];
    }
}

/* One block into the running partial of g heads: see fx_block_avx2. */
static void fx_block_avx512(const float *q2, const uint16_t *K, const uint16_t *V, int d, int g,
                            const int8_t *tok, int nt, float *o, float *m2, float *l, float *sp,
                            const char *pf) {
    fx_scores_avx512(q2, K, d, g, tok, nt, sp, pf, d / 2 /* K: d/2 lines */);
    for (int h = 0; h < g; h++) {
        float *s = sp + h * FX_BT;
        for (int i = nt; i < FX_BT; i++) s[i] = -INFINITY;
        __m512 a = _mm512_loadu_ps(s);
        float bm = _mm512_reduce_max_ps(a);
        if (bm > m2[h]) {
            __m512 alpha = _mm512_set1_ps(exp2f(m2[h] - bm));
            for (int c = 0; c < d; c += 16)
                _mm512_storeu_ps(o + h * d + c, _mm512_mul_ps(_mm512_loadu_ps(o + h * d + c), alpha));
            l[h] *= _mm512_cvtss_f32(alpha);
            m2[h] = bm;
        }
        a = fx_exp2_16(_mm512_sub_ps(a, _mm512_set1_ps(m2[h])));
        _mm512_storeu_ps(s, a);
        l[h] += _mm512_reduce_add_ps(a);
    }
    const uint16_t *vrow[FX_BT];
    for (int i = 0; i < nt; i++) vrow[i] = V + (int64_t)tok[i] * d;
    for (int h0 = 0; h0 < g; h0 += 8) {
        int tile = g - h0 < 8 ? g - h0 : 8;
#define FX_PV(G)                                                                           \
    fx_pv_tile512(sp + h0 * FX_BT, vrow, d, nt, o + h0 * d, h0 || !pf ? NULL : pf + 32 * d, d / 2, G)
        FX_TILES(tile, FX_PV)
#undef FX_PV
    }
}

#pragma GCC pop_options
#endif

#endif
