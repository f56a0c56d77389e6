/* AVX2+FMA body of the block attention step (see block_attention.h).
 *
 * Needs d % 16 == 0. q and the chunk's o are split in 16-channel groups
 * (bf16_simd.h), so converting 16 bf16 costs one load and two single-uop ops.
 * Heads are processed in tiles of G <= 8 with G a compile-time constant, so
 * the accumulators of a tile unroll into registers (16 ymm: at most 8).
 */
#ifndef FX_ATTENTION_AVX2_H
#define FX_ATTENTION_AVX2_H

#include "bf16_simd.h"

#define FX_BT 16 /* tokens per block */

#if FX_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma")

/* st[(i + t) * G + h] = q_h . K[row i + t] for T tokens and G heads at once:
 * each K load feeds G heads. With room (2*T*G <= 8) even and odd channels
 * accumulate apart, two chains per dot product to hide FMA latency. */
static inline __attribute__((always_inline)) void
fx_qk_step(const float *q, const uint16_t *const *krow, int d, float *st, const int G,
           const int T) {
    const int A = 2 * T * G <= 8 ? 2 : 1;
    __m256 acc[8];
#pragma GCC unroll 8
    for (int j = 0; j < T * G * A; j++) acc[j] = _mm256_setzero_ps();
    for (int c = 0; c < d; c += 16) {
#pragma GCC unroll 8
        for (int t = 0; t < T; t++) {
            __m256i w = fx_load16(krow[t] + c);
            __m256 ke = fx_even16(w), ko = fx_odd16(w);
#pragma GCC unroll 8
            for (int h = 0; h < G; h++) {
                __m256 *a = acc + (t * G + h) * A;
                a[0] = _mm256_fmadd_ps(_mm256_loadu_ps(q + h * d + c), ke, a[0]);
                a[A - 1] = _mm256_fmadd_ps(_mm256_loadu_ps(q + h * d + c + 8), ko, a[A - 1]);
            }
        }
    }
    if (A == 2) {
#pragma GCC unroll 8
        for (int j = 0; j < T * G; j++) acc[j] = _mm256_add_ps(acc[2 * j], acc[2 * j + 1]);
    }
    fx_hsums(acc, st, T * G);
}


/* Prefetch share [a, b) of n of the `lines` cache lines at p. A block's
 * prefetches are spread over all of its compute (K lines over the QK steps, V
 * lines over the PV passes): issued in one burst, they fill the miss buffers
 * and the block's own loads queue behind them, so memory and compute take
 * turns instead of overlapping (measured: ~20% slower per block from DRAM). */
#define FX_PF_SLICE(p, lines, a, b, n)                                                        \
    for (int j_ = (lines) * (a) / (n); j_ < (lines) * (b) / (n); j_++)                         \
    _mm_prefetch((p) + 64 * j_, _MM_HINT_T0)

/* The PV passes over d channels, W lanes a register: NG registers a pass while
 * they fit, then one, each pass prefetching its share of the next V lines.
 * Both ISA bodies' tiles use it with p, vrow, d, nt, o, pf, pf_lines, G in scope. */
#define FX_PV_SWEEP(PASS, W, NG)                                                               \
    do {                                                                                       \
        int c_ = 0;                                                                            \
        for (; c_ + (W) * (NG) <= d; c_ += (W) * (NG)) {                                       \
            if (pf) FX_PF_SLICE(pf, pf_lines, c_, c_ + (W) * (NG), d);                         \
            PASS(p, vrow, d, c_, nt, o, G, NG);                                                \
        }                                                                                      \
        for (; c_ < d; c_ += (W)) {                                                            \
            if (pf) FX_PF_SLICE(pf, pf_lines, c_, c_ + (W), d);                                \
            PASS(p, vrow, d, c_, nt, o, G, 1);                                                 \
        }                                                                                      \
    } while (0)

/* Tokens per QK step: as many as keep T*G <= 8 accumulators. */
#define FX_QK_T(G) (G == 1 ? 8 : G == 2 ? 4 : G <= 4 ? 2 : 1)

/* Scores of a tile of G (<= 8) heads, token-major: st[i * G + h], while
 * prefetching `pf_lines` lines at `pf` (NULL: none). */
static inline __attribute__((always_inline)) void
fx_qk_tile(const float *q, const uint16_t *const *krow, int d, int nt, float *st, const char *pf,
           int pf_lines, const int G) {
    const int T = FX_QK_T(G);
    int i = 0;
    for (; i < nt; i += T) {
        if (pf) FX_PF_SLICE(pf, pf_lines, i, i + T < nt ? i + T : nt, nt);
        if (i + T > nt) break;
        fx_qk_step(q, krow + i, d, st + i * G, G, T);
    }
    for (; i < nt; i++) fx_qk_step(q, krow + i, d, st + i * G, G, 1);
}

/* o[h][c, c + 16*NG) += sum_i p[h][i] * V[row i] for G <= 4 heads: 2*G*NG <= 8
 * accumulators, each p broadcast feeding 2*NG FMAs. */
static inline __attribute__((always_inline)) void
fx_pv_pass(const float *p, const uint16_t *const *vrow, int d, int c, int nt, float *o,
           const int G, const int NG) {
    __m256 acc[8], v[8];
#pragma GCC unroll 8
    for (int h = 0; h < G; h++)
#pragma GCC unroll 8
        for (int j = 0; j < 2 * NG; j++) acc[h * 2 * NG + j] = _mm256_loadu_ps(o + h * d + c + 8 * j);
    for (int i = 0; i < nt; i++) {
#pragma GCC unroll 4
        for (int k = 0; k < NG; k++) {
            __m256i w = fx_load16(vrow[i] + c + 16 * k);
            v[2 * k] = fx_even16(w);
            v[2 * k + 1] = fx_odd16(w);
        }
#pragma GCC unroll 8
        for (int h = 0; h < G; h++) {
            __m256 pb = _mm256_broadcast_ss(p + h * FX_BT + i);
#pragma GCC unroll 8
            for (int j = 0; j < 2 * NG; j++)
                acc[h * 2 * NG + j] = _mm256_fmadd_ps(pb, v[j], acc[h * 2 * NG + j]);
        }
    }
#pragma GCC unroll 8
    for (int h = 0; h < G; h++)
#pragma GCC unroll 8
        for (int j = 0; j < 2 * NG; j++) _mm256_storeu_ps(o + h * d + c + 8 * j, acc[h * 2 * NG + j]);
}

/* The same for 5..8 heads, one parity (even/odd half of a 16-channel group) per pass. */
static inline __attribute__((always_inline)) void
fx_pv_half(const float *p, const uint16_t *const *vrow, int d, int c, int nt, float *o,
           const int G, const int ODD) {
    __m256 acc[8];
#pragma GCC unroll 8
    for (int h = 0; h < G; h++) acc[h] = _mm256_loadu_ps(o + h * d + c + 8 * ODD);
    for (int i = 0; i < nt; i++) {
        __m256i w = fx_load16(vrow[i] + c);
        __m256 v = ODD ? fx_odd16(w) : fx_even16(w);
#pragma GCC unroll 8
        for (int h = 0; h < G; h++)
            acc[h] = _mm256_fmadd_ps(_mm256_broadcast_ss(p + h * FX_BT + i), v, acc[h]);
    }
#pragma GCC unroll 8
    for (int h = 0; h < G; h++) _mm256_storeu_ps(o + h * d + c + 8 * ODD, acc[h]);
}

static inline __attribute__((always_inline)) void
fx_pv_tile(const float *p, const uint16_t *const *vrow, int d, int nt, float *o, const char *pf,
           int pf_lines, const int G) {
    if (G <= 4) {
        const int NG = G == 1 ? 4 : G == 2 ? 2 : 1;
        FX_PV_SWEEP(fx_pv_pass, 16, NG);
    } else {
        for (int c = 0; c < d; c += 16) {
            if (pf) FX_PF_SLICE(pf, pf_lines, c, c + 16, d);
            fx_pv_half(p, vrow, d, c, nt, o, G, 0);
            fx_pv_half(p, vrow, d, c, nt, o, G, 1);
        }
    }
}

static void fx_scores_avx2(const float *q, const uint16_t *K, int d, int g, const int8_t *tok,
                           int nt, float *s, const char *pf, int pf_lines) {
    const uint16_t *krow[FX_BT];
    float st[FX_BT * 8];
    for (int i = 0; i < nt; i++) krow[i] = K + (int64_t)tok[i] * d;
    for (int h0 = 0; h0 < g; h0 += 8) {
        int tile = g - h0 < 8 ? g - h0 : 8;
#define FX_QK(G) fx_qk_tile(q + h0 * d, krow, d, nt, st, h0 ? NULL : pf, pf_lines, G)
        FX_TILES(tile, FX_QK)
#undef FX_QK
        for (int h = 0; h < tile; h++)
            for (int i = 0; i < nt; i++) s[(h0 + h) * FX_BT + i] = st[i * tile + h];
    }
}

/* One block into the running partial of g heads (log2 units): scores, online
 * softmax update, then o += p V. `sp` holds g*16 scores, then probabilities. */
static void fx_block_avx2(const float *q2, const uint16_t *K, const uint16_t *V, int d, int g,
                          const int8_t *tok, int nt, float *o, float *m2, float *l, float *sp,
                          const char *pf) {
    fx_scores_avx2(q2, K, d, g, tok, nt, sp, pf, d / 2 /* K: 16*d bf16 = d/2 lines */);
    for (int h = 0; h < g; h++) {
        float *s = sp + h * FX_BT;
        for (int i = nt; i < FX_BT; i++) s[i] = -INFINITY;
        __m256 a = _mm256_loadu_ps(s), b = _mm256_loadu_ps(s + 8);
        float bm = fx_hmax8(_mm256_max_ps(a, b));
        if (bm > m2[h]) {
            __m256 alpha = _mm256_set1_ps(exp2f(m2[h] - bm));
            for (int c = 0; c < d; c += 8)
                _mm256_storeu_ps(o + h * d + c, _mm256_mul_ps(_mm256_loadu_ps(o + h * d + c), alpha));
            l[h] *= _mm256_cvtss_f32(alpha);
            m2[h] = bm;
        }
        __m256 mm = _mm256_set1_ps(m2[h]);
        a = fx_exp2_8(_mm256_sub_ps(a, mm));
        b = fx_exp2_8(_mm256_sub_ps(b, mm));
        _mm256_storeu_ps(s, a);
        _mm256_storeu_ps(s + 8, b);
        l[h] += fx_hsum8(_mm256_add_ps(a, b));
    }
    const uint16_t *vrow[FX_BT];
    for (int i = 0; i < nt; i++) vrow[i] = V + (int64_t)tok[i] * d;
    for (int h0 = 0; h0 < g; h0 += 8) {
        int tile = g - h0 < 8 ? g - h0 : 8;
#define FX_PV(G)                                                                           \
    fx_pv_tile(sp + h0 * FX_BT, vrow, d, nt, o + h0 * d, h0 || !pf ? NULL : pf + 32 * d, d / 2, G)
        FX_TILES(tile, FX_PV)
#undef FX_PV
    }
}

#pragma GCC pop_options
#endif

#endif
