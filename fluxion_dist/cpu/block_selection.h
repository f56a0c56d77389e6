/* Block scoring from Quest metadata and per-row top-k / top-p selection.
 *
 * Ranking follows reference.select_topk/select_topp exactly: descending score,
 * ties to the lower index. Each value is turned into one unique 64-bit key
 * (ascending key = descending score, then ascending index), so selection is a
 * plain quickselect on integers and the chosen set is "every key <= the
 * threshold key", emitted by one ascending scan (ids come out sorted).
 */
#ifndef FX_BLOCK_SELECTION_H
#define FX_BLOCK_SELECTION_H

#include "bf16_simd.h"

/* ---- Quest upper bound -------------------------------------------------- */

/* max(q*lo, q*hi) == q*(lo+hi)/2 + |q|*(hi-lo)/2 for lo <= hi: two FMAs per
 * channel, and the midpoint/radius are shared by the g heads of the group.
 * `qs` is the group's query pre-scaled by scale (> 0), `qa` its absolute
 * value; out[h * out_stride] receives head h's bound. */
static void fx_quest_scalar(const float *qs, const float *qa, const uint16_t *mn,
                            const uint16_t *mx, int d, int g, float *out, int64_t out_stride) {
    for (int h = 0; h < g; h++) {
        float acc = 0.0f;
        for (int c = 0; c < d; c++) {
            float lo = fx_bf16(mn[c]), hi = fx_bf16(mx[c]);
            acc += qs[h * d + c] * (0.5f * (lo + hi)) + qa[h * d + c] * (0.5f * (hi - lo));
        }
        out[h * out_stride] = acc;
    }
}

#if FX_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma")
static inline __attribute__((always_inline)) void
fx_quest_tile(const float *qs, const float *qa, const uint16_t *mn, const uint16_t *mx, int d,
              float *out, int64_t out_stride, const int G) {
    const __m256 half = _mm256_set1_ps(0.5f);
    __m256 acc[8];
#pragma GCC unroll 8
    for (int h = 0; h < G; h++) acc[h] = _mm256_setzero_ps();
    for (int c = 0; c < d; c += 8) {
        __m256 lo = fx_cvt8(mn + c), hi = fx_cvt8(mx + c);
        __m256 mid = _mm256_mul_ps(_mm256_add_ps(lo, hi), half);
        __m256 rad = _mm256_mul_ps(_mm256_sub_ps(hi, lo), half);
#pragma GCC unroll 8
        for (int h = 0; h < G; h++) {
            acc[h] = _mm256_fmadd_ps(_mm256_loadu_ps(qs + h * d + c), mid, acc[h]);
            acc[h] = _mm256_fmadd_ps(_mm256_loadu_ps(qa + h * d + c), rad, acc[h]);
        }
    }
#pragma GCC unroll 8
    for (int h = 0; h < G; h++) out[h * out_stride] = fx_hsum8(acc[h]);
}

static void fx_quest_avx2(const float *qs, const float *qa, const uint16_t *mn, const uint16_t *mx,
                          int d, int g, float *out, int64_t out_stride) {
    for (int h0 = 0; h0 < g; h0 += 8) {
        int tile = g - h0 < 8 ? g - h0 : 8;
#define FX_Q(G) fx_quest_tile(qs + h0 * d, qa + h0 * d, mn, mx, d, out + h0 * out_stride, out_stride, G)
        FX_TILES(tile, FX_Q)
#undef FX_Q
    }
}
#pragma GCC pop_options
#else
static void fx_quest_avx2(const float *qs, const float *qa, const uint16_t *mn, const uint16_t *mx,
                          int d, int g, float *out, int64_t out_stride) {
    fx_quest_scalar(qs, qa, mn, mx, d, g, out, out_stride);
}
#endif

/* ---- ranking keys ---------------------------------------------------------- */

static inline uint64_t fx_rank_key(float x, uint32_t i) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    if (x != x)
        u = 0; /* NaN ranks below -inf, as in numpy's argsort */
    else
        u = (u & 0x80000000u) ? ~u : (u | 0x80000000u); /* monotone float -> uint */
    return ((uint64_t)(~u) << 32) | i;
}

static inline void fx_swap(uint64_t *a, int64_t i, int64_t j) {
    uint64_t t = a[i];
    a[i] = a[j];
    a[j] = t;
}

static void fx_insertion_sort(uint64_t *a, int64_t lo, int64_t hi) { /* [lo, hi) */
    for (int64_t i = lo + 1; i < hi; i++) {
        uint64_t v = a[i];
        int64_t j = i - 1;
        while (j >= lo && a[j] > v) {
            a[j + 1] = a[j];
            j--;
        }
        a[j + 1] = v;
    }
}

/* Median-of-three Lomuto partition of [lo, hi) (keys are unique); returns the
 * pivot's final position. */
static int64_t fx_partition(uint64_t *a, int64_t lo, int64_t hi) {
    int64_t mid = lo + (hi - lo) / 2, last = hi - 1;
    if (a[mid] < a[lo]) fx_swap(a, mid, lo);
    if (a[last] < a[lo]) fx_swap(a, last, lo);
    if (a[mid] < a[last]) fx_swap(a, mid, last); /* median now at `last` */
    uint64_t pivot = a[last];
    int64_t store = lo;
    for (int64_t i = lo; i < last; i++)
        if (a[i] < pivot) fx_swap(a, i, store++);
    fx_swap(a, store, last);
    return store;
}

/* The k-th smallest key (0-based) of a[0..n). */
static uint64_t fx_kth_key(uint64_t *a, int64_t n, int64_t k) {
    int64_t lo = 0, hi = n;
    while (hi - lo > 16) {
        int64_t pos = fx_partition(a, lo, hi);
        if (k == pos) return a[k];
        if (k < pos) hi = pos;
        else lo = pos + 1;
    }
    fx_insertion_sort(a, lo, hi);
    return a[k];
}

/* The key at which the mass of the smallest keys first reaches `need`: keys
 * ascending by rank, w[index] the mass of each. Everything up to it is kept. */
static uint64_t fx_mass_key(uint64_t *a, int64_t n, const double *w, double need) {
    int64_t lo = 0, hi = n;
    while (hi - lo > 16) {
        int64_t pos = fx_partition(a, lo, hi);
        double below = 0.0;
        for (int64_t i = lo; i < pos; i++) below += w[(uint32_t)a[i]];
        if (below >= need) {
            hi = pos;
            continue;
        }
        need -= below;
        double wp = w[(uint32_t)a[pos]];
        if (wp >= need) return a[pos];
        need -= wp;
        lo = pos + 1;
    }
    fx_insertion_sort(a, lo, hi);
    for (int64_t i = lo; i < hi; i++) {
        need -= w[(uint32_t)a[i]];
        if (need <= 0.0) return a[i];
    }
    return a[hi - 1]; /* rounding left the mass just short: keep the whole range */
}

/* ---- one row ------------------------------------------------------------------- */

typedef struct {
    uint64_t threshold; /* keep every eligible value whose key <= threshold */
    int64_t count;
} fx_cut;

static inline int fx_eligible(float x, int skip_ninf) { return !(skip_ninf && x == -INFINITY); }

/* Top-k of x[0..n): the k highest (all eligible values when fewer). With
 * `skip_ninf`, -inf marks padding and is never chosen. `keys`: n scratch. */
static fx_cut fx_topk_cut(const float *x, int64_t n, int64_t k, int skip_ninf, uint64_t *keys) {
    int64_t m = 0;
    for (int64_t i = 0; i < n; i++)
        if (fx_eligible(x[i], skip_ninf)) keys[m++] = fx_rank_key(x[i], (uint32_t)i);
    fx_cut cut = {UINT64_MAX, m};
    if (k <= 0) {
        cut.threshold = 0; /* no key is 0: the top bits hold ~u, which is never 0 */
        cut.count = 0;
    } else if (k < m) {
        cut.threshold = fx_kth_key(keys, m, k - 1);
        cut.count = k;
    }
    return cut;
}

/* Top-p of x[0..n): the fewest highest values whose softmax mass (over the
 * row) reaches p, as reference.select_topp. `keys`, `w`: n scratch each. */
static fx_cut fx_topp_cut(const float *x, int64_t n, double p, uint64_t *keys, double *w) {
    fx_cut cut = {0, 0};
    if (n == 0) return cut;
    if (p >= 1.0) { /* every value, as the reference */
        cut.threshold = UINT64_MAX;
        cut.count = n;
        return cut;
    }
    double mx = -INFINITY, total = 0.0;
    for (int64_t i = 0; i < n; i++) mx = x[i] > mx ? x[i] : mx;
    for (int64_t i = 0; i < n; i++) {
        /* a row of -inf has no mass anywhere: rank order alone decides */
        w[i] = mx == -INFINITY ? 1.0 : exp((double)x[i] - mx);
        total += w[i];
        keys[i] = fx_rank_key(x[i], (uint32_t)i);
    }
    for (int64_t i = 0; i < n; i++) w[i] /= total;
    cut.threshold = fx_mass_key(keys, n, w, p * (1.0 - 1e-12));
    for (int64_t i = 0; i < n; i++) cut.count += fx_rank_key(x[i], (uint32_t)i) <= cut.threshold;
    return cut;
}

/* Ascending indices of the kept values of one row; returns how many. */
static int64_t fx_emit(const float *x, int64_t n, fx_cut cut, int skip_ninf, int32_t *ids) {
    int64_t c = 0;
    if (cut.count == 0) return 0;
    for (int64_t i = 0; i < n; i++)
        if (fx_eligible(x[i], skip_ninf) && fx_rank_key(x[i], (uint32_t)i) <= cut.threshold)
            ids[c++] = (int32_t)i;
    return c;
}

#endif
