/* Sparse partial attention over paged bf16 KV: the per-chunk work of one thread.
 *
 * A chunk is a run of selected blocks of one (request, KV head) row. The g
 * query heads of the GQA group are processed together, so each K/V block is
 * read from memory once per step. Scores live in log2 units (q is pre-scaled by
 * scale*log2(e)) so the softmax needs only exp2; the caller converts the running
 * max back to natural units when it writes the output.
 *
 * Layout (KERNEL_API.md): kv[P, Hkv, 2, 16, d]; one (page, head) is K[16, d]
 * followed by V[16, d], one contiguous 4*16*d-byte run.
 */
#ifndef FX_BLOCK_ATTENTION_H
#define FX_BLOCK_ATTENTION_H

#include "attention_avx512.h"

typedef struct {
    const uint16_t *kv; /* arena base */
    int64_t num_pages;
    int64_t page_stride; /* elements between pages: Hkv * 2 * 16 * d */
    int64_t head_stride; /* elements between KV heads of a page: 2 * 16 * d */
    int d;
    int g;
} fx_arena;

/* One (request, KV head) row of the selection. */
typedef struct {
    const int32_t *bt; /* block-table row: page of each logical block */
    int32_t seq_len;
    int kh;
} fx_row;

/* Valid (and, with a token mask, selected) token offsets of one block. */
static inline int fx_block_tokens(int32_t blk, int32_t seq_len, uint32_t mask, int8_t *tok) {
    int32_t left = seq_len - blk * FX_BT;
    int ntok = left < FX_BT ? left : FX_BT;
    mask &= (1u << ntok) - 1u; /* ntok in 1..16: the caller checked blk < nb */
    int nt = 0;
    while (mask) {
        tok[nt++] = (int8_t)__builtin_ctz(mask);
        mask &= mask - 1u;
    }
    return nt;
}

/* ---- portable body ---------------------------------------------------- */

static void fx_scores_scalar(const float *q, const uint16_t *K, int d, int g,
                             const int8_t *tok, int nt, float *s) {
    for (int h = 0; h < g; h++)
        for (int i = 0; i < nt; i++) {
            const uint16_t *kr = K + (int64_t)tok[i] * d;
            float acc = 0.0f;
            for (int c = 0; c < d; c++) acc += q[h * d + c] * fx_bf16(kr[c]);
            s[h * FX_BT + i] = acc;
        }
}

static void fx_block_scalar(const float *q2, const uint16_t *K, const uint16_t *V, int d, int g,
                            const int8_t *tok, int nt, float *o, float *m2, float *l, float *sp) {
    fx_scores_scalar(q2, K, d, g, tok, nt, sp);
    for (int h = 0; h < g; h++) {
        float *s = sp + h * FX_BT, bm = -INFINITY;
        for (int i = 0; i < nt; i++) bm = s[i] > bm ? s[i] : bm;
        if (bm > m2[h]) {
            float alpha = exp2f(m2[h] - bm);
            for (int c = 0; c < d; c++) o[h * d + c] *= alpha;
            l[h] *= alpha;
            m2[h] = bm;
        }
        for (int i = 0; i < nt; i++) {
            s[i] = exp2f(s[i] - m2[h]);
            l[h] += s[i];
        }
    }
    for (int h = 0; h < g; h++)
        for (int i = 0; i < nt; i++) {
            const uint16_t *vr = V + (int64_t)tok[i] * d;
            float p = sp[h * FX_BT + i];
            for (int c = 0; c < d; c++) o[h * d + c] += p * fx_bf16(vr[c]);
        }
}

#if !FX_X86 /* the SIMD entry points fall back to the portable body */
#define FX_PORTABLE_BLOCK                                                                 \
    {                                                                                     \
        (void)pf;                                                                         \
        fx_block_scalar(q2, K, V, d, g, tok, nt, o, m2, l, sp);                           \
    }
#define FX_PORTABLE_SCORES                                                                \
    {                                                                                     \
        (void)pf;                                                                         \
        (void)pf_lines;                                                                   \
        fx_scores_scalar(q, K, d, g, tok, nt, s);                                         \
    }
static void fx_block_avx2(const float *q2, const uint16_t *K, const uint16_t *V, int d, int g,
                          const int8_t *tok, int nt, float *o, float *m2, float *l, float *sp,
                          const char *pf) FX_PORTABLE_BLOCK
static void fx_block_avx512(const float *q2, const uint16_t *K, const uint16_t *V, int d, int g,
                            const int8_t *tok, int nt, float *o, float *m2, float *l, float *sp,
                            const char *pf) FX_PORTABLE_BLOCK
static void fx_scores_avx2(const float *q, const uint16_t *K, int d, int g, const int8_t *tok,
                           int nt, float *s, const char *pf, int pf_lines) FX_PORTABLE_SCORES
static void fx_scores_avx512(const float *q, const uint16_t *K, int d, int g, const int8_t *tok,
                             int nt, float *s, const char *pf, int pf_lines) FX_PORTABLE_SCORES
#endif

/* The query as the kernels take it: scaled, and split for the SIMD bodies. */
static void fx_prepare_q(const float *q, float *dst, int64_t heads, int d, float scale, int isa) {
    for (int64_t h = 0; h < heads; h++) fx_split(q + h * d, dst + h * d, d, scale, fx_split_width(isa));
}

static void fx_block(const float *q2, const uint16_t *K, const uint16_t *V, int d, int g,
                     const int8_t *tok, int nt, float *o, float *m2, float *l, float *sp,
                     const char *pf, int isa) {
    if (isa == FX_AVX512)
        fx_block_avx512(q2, K, V, d, g, tok, nt, o, m2, l, sp, pf);
    else if (isa == FX_AVX2)
        fx_block_avx2(q2, K, V, d, g, tok, nt, o, m2, l, sp, pf);
    else
        fx_block_scalar(q2, K, V, d, g, tok, nt, o, m2, l, sp);
}

/* ---- chunk driver -------------------------------------------------------- */

/* K of logical block `blk` of a row, or NULL when it lies outside the sequence or the arena. */
static inline const char *fx_block_addr(const fx_arena *a, const fx_row *r, int32_t blk) {
    if (blk < 0 || blk >= (r->seq_len + FX_BT - 1) / FX_BT) return NULL;
    int32_t page = r->bt[blk];
    if (page < 0 || page >= a->num_pages) return NULL;
    return (const char *)(a->kv + (int64_t)r->kh * a->head_stride + (int64_t)page * a->page_stride);
}

/* Cython emits every prange of a `with parallel` block as `omp for nowait`:
 * without this, a thread could merge a split row while another still writes
 * one of its chunks. An orphaned barrier binds to the calling team. */
static inline void fx_barrier(void) {
#pragma omp barrier
}

/* Dynamic scheduling by hand: the next chunk index, taken from a shared counter. */
static inline int64_t fx_claim(int64_t *counter) {
    return __atomic_fetch_add(counter, 1, __ATOMIC_RELAXED);
}

/* Floats of per-thread scratch fx_attend_chunk needs: the split accumulator,
 * the scores, the running max and sum, rounded up to whole cache lines. */
static inline int64_t fx_work_floats(int g, int d) { return ((int64_t)g * (d + 18) + 15) / 16 * 16; }

/* Online-softmax partial of a row over `n` selected blocks, written to
 * o[g*d] (natural channel order), m2[g] (running max in log2 units), l[g].
 * `q2` comes from fx_prepare_q with scale*log2(e); `work` is 64-byte aligned
 * scratch of fx_work_floats(g, d) floats, private to the calling thread: every
 * per-block update stays in it (outputs of neighbouring rows share cache lines,
 * and other threads write those), and o, m2, l are written once at the end.
 * Returns -1, or the offset of the first selected block that lies outside the
 * sequence or maps to a page outside the arena (nothing past it is read).
 * `prefetch` is the look-ahead distance in blocks (0: none); `then` is the
 * first block of the chunk this thread runs next (NULL: none), prefetched
 * during the last block so the next chunk does not start cold. */
static int64_t fx_attend_chunk(const fx_arena *a, const fx_row *r, const float *q2,
                               const int32_t *blocks, const uint16_t *masks, int64_t n,
                               float *o, float *m2_out, float *l_out, float *work, int isa,
                               int prefetch, const char *then) {
    const int d = a->d, g = a->g;
    const int32_t nb = (r->seq_len + FX_BT - 1) / FX_BT;
    const uint16_t *head = a->kv + (int64_t)r->kh * a->head_stride;
    float *acc = work, *sp = acc + (int64_t)g * d, *m2 = sp + g * FX_BT, *l = m2 + g;
    memset(acc, 0, sizeof(float) * (size_t)g * (size_t)d);
    for (int h = 0; h < g; h++) {
        m2[h] = -INFINITY;
        l[h] = 0.0f;
    }
    for (int64_t i = 0; i < n; i++) {
        int32_t blk = blocks[i];
        if (blk < 0 || blk >= nb) return i;
        int32_t page = r->bt[blk];
        if (page < 0 || page >= a->num_pages) return i;
        int8_t tok[FX_BT];
        int nt = fx_block_tokens(blk, r->seq_len, masks ? masks[i] : 0xFFFFu, tok);
        if (!nt) continue;
        const char *pf = NULL;
        if (prefetch && i + prefetch < n)
            pf = fx_block_addr(a, r, blocks[i + prefetch]);
        else if (prefetch && i == n - 1)
            pf = then;
        const uint16_t *K = head + (int64_t)page * a->page_stride;
        fx_block(q2, K, K + FX_BT * d, d, g, tok, nt, acc, m2, l, sp, pf, isa);
    }
    for (int h = 0; h < g; h++) {
        fx_unsplit(acc + (int64_t)h * d, o + (int64_t)h * d, d, fx_split_width(isa));
        m2_out[h] = m2[h];
        l_out[h] = l[h];
    }
    return -1;
}

/* Exact log-sum-exp merge of `nc` chunk partials (log2 units, laid out
 * [nc][g*d], [nc][g], [nc][g]) into one, with m returned in natural units. */
static void fx_merge_chunks(const float *po, const float *pm2, const float *pl, int64_t nc, int g,
                            int d, float *o, float *m, float *l) {
    for (int h = 0; h < g; h++) {
        float mx = -INFINITY;
        for (int64_t c = 0; c < nc; c++) mx = pm2[c * g + h] > mx ? pm2[c * g + h] : mx;
        float *oh = o + (int64_t)h * d, lh = 0.0f;
        memset(oh, 0, sizeof(float) * (size_t)d);
        if (mx != -INFINITY) {
            for (int64_t c = 0; c < nc; c++) {
                float w = exp2f(pm2[c * g + h] - mx); /* a chunk at -inf weighs 0 */
                const float *src = po + (c * g + h) * d;
                lh += w * pl[c * g + h];
                for (int j = 0; j < d; j++) oh[j] += w * src[j];
            }
        }
        m[h] = mx * FX_LN2;
        l[h] = lh;
    }
}

/* Scores of a block's `nt` tokens `tok` for the g query heads of `q` into `sp` [g][16],
 * on the chosen ISA. */
static inline void fx_block_scores(const float *q, const uint16_t *K, int d, int g, const int8_t *tok,
                                   int nt, float *sp, int isa) {
    if (isa == FX_AVX512)
        fx_scores_avx512(q, K, d, g, tok, nt, sp, NULL, 0);
    else if (isa == FX_AVX2)
        fx_scores_avx2(q, K, d, g, tok, nt, sp, NULL, 0);
    else
        fx_scores_scalar(q, K, d, g, tok, nt, sp);
}

/* Token-level scores inside one block for hierarchical selection: the max over
 * the group's heads of q.k*scale per token; -inf for padding. `q` comes from
 * fx_prepare_q with `scale`; `sp` is g*16 floats of scratch. */
static inline void fx_token_scores(const float *q, const uint16_t *K, int d, int g, int32_t blk,
                            int32_t seq_len, float *out, float *sp, int isa) {
    int8_t tok[FX_BT];
    int nt = fx_block_tokens(blk, seq_len, 0xFFFFu, tok);
    for (int t = 0; t < FX_BT; t++) out[t] = -INFINITY;
    if (!nt) return;
    fx_block_scores(q, K, d, g, tok, nt, sp, isa);
    for (int h = 0; h < g; h++)
        for (int i = 0; i < nt; i++)
            out[tok[i]] = sp[h * FX_BT + i] > out[tok[i]] ? sp[h * FX_BT + i] : out[tok[i]];
}

/* Exact per-head log-sum-exp of one block, for the rescoring stage of selection
 * (policy.select step 5): out[h] = ln sum_t exp(q_h.k_t * scale) over the block's
 * tokens, h < g. `q` comes from fx_prepare_q with scale*log2(e) (scores in log2
 * units); `sp` is g*16 floats of scratch. The caller checked blk < nb. */
static inline void fx_block_lse(const float *q, const uint16_t *K, int d, int g, int32_t blk,
                                int32_t seq_len, float *out, float *sp, int isa) {
    int8_t tok[FX_BT];
    int nt = fx_block_tokens(blk, seq_len, 0xFFFFu, tok);
    fx_block_scores(q, K, d, g, tok, nt, sp, isa);
    for (int h = 0; h < g; h++) {
        const float *sh = sp + h * FX_BT;
        float mx = sh[0], sum = 0.0f;
        for (int i = 1; i < nt; i++) mx = sh[i] > mx ? sh[i] : mx;
        for (int i = 0; i < nt; i++) sum += exp2f(sh[i] - mx);
        out[h] = (mx + log2f(sum)) * FX_LN2;
    }
}

#endif
