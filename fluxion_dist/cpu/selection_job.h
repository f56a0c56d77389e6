/* Quest scoring and per-row top-k / top-p selection as jobs for the worker team (worker_team.h).
 *
 * The same kernels as the OpenMP drivers in _selection.pyx (block_selection.h), so both give
 * the same bits; here members claim work items from a counter instead of an OpenMP
 * schedule, so a call never starts or joins an OpenMP region: under OMP_WAIT_POLICY=PASSIVE,
 * the decode workers' setting, each region pays its threads' wake-up.
 */
#ifndef FX_SELECTION_JOB_H
#define FX_SELECTION_JOB_H

#include "block_selection.h"

#define FX_QUEST_TILE 64 /* blocks per work item: ~64 KiB of metadata at d=128 */

typedef struct {
    const float *qs, *qa; /* q * scale and its absolute value, [B, hq, d] each */
    const uint16_t *kmin, *kmax; /* [P, hkv, d] bf16 bits */
    const int32_t *bt;
    int64_t bt_s0, bt_s1; /* block-table strides, in elements */
    const int32_t *seq_lens;
    float *out; /* [B, hq, maxb] */
    int64_t P, hkv, hq, d, maxb, tiles, items;
    int avx2;
    int64_t next; /* atomic: the next item */
    int64_t *err; /* [items]: -1, or b * maxb + j of a block whose page lies outside the arena */
} fx_quest_job;

static void fx_quest_work(void *arg, int member) {
    fx_quest_job *j = (fx_quest_job *)arg;
    (void)member;
    const int64_t g = j->hq / j->hkv, d = j->d;
    for (int64_t it; (it = __atomic_fetch_add(&j->next, 1, __ATOMIC_RELAXED)) < j->items;) {
        const int64_t b = it / (j->hkv * j->tiles), kh = (it / j->tiles) % j->hkv, tile = it % j->tiles;
        const int64_t nb = (j->seq_lens[b] + 15) / 16;
        const int64_t hi = (tile + 1) * FX_QUEST_TILE < j->maxb ? (tile + 1) * FX_QUEST_TILE : j->maxb;
        const float *qs = j->qs + (b * j->hq + kh * g) * d, *qa = j->qa + (b * j->hq + kh * g) * d;
        float *row = j->out + (b * j->hq + kh * g) * j->maxb;
        j->err[it] = -1;
        for (int64_t blk = tile * FX_QUEST_TILE; blk < hi; blk++) {
            if (blk >= nb) {
                for (int64_t h = 0; h < g; h++) row[h * j->maxb + blk] = -INFINITY;
                continue;
            }
            const int64_t page = j->bt[b * j->bt_s0 + blk * j->bt_s1];
            if (page < 0 || page >= j->P) {
                if (j->err[it] < 0) j->err[it] = b * j->maxb + blk;
                continue;
            }
            const uint16_t *mn = j->kmin + (page * j->hkv + kh) * d, *mx = j->kmax + (page * j->hkv + kh) * d;
            if (j->avx2)
                fx_quest_avx2(qs, qa, mn, mx, (int)d, (int)g, row + blk, j->maxb);
            else
                fx_quest_scalar(qs, qa, mn, mx, (int)d, (int)g, row + blk, j->maxb);
        }
    }
}

/* Per row of x [R, n]: phase 0 finds the row's cut (k[r] highest, or the fewest whose mass
 * reaches p[r] when p is set), phase 1 emits the chosen ids at ids + indptr[r] (the caller
 * sums the counts into indptr between the two). */
typedef struct {
    const float *x;
    int64_t n, R;
    const int32_t *row_lens;
    const int64_t *k;
    const double *p;  /* NULL: top-k */
    uint64_t *keys;   /* [members, n] */
    double *w;        /* [members, n], top-p only */
    fx_cut *cuts;     /* [R] */
    const int32_t *indptr;
    int32_t *ids;
    int phase;
    int64_t next; /* atomic: the next row */
} fx_rows_job;

static void fx_rows_work(void *arg, int member) {
    fx_rows_job *j = (fx_rows_job *)arg;
    for (int64_t r; (r = __atomic_fetch_add(&j->next, 1, __ATOMIC_RELAXED)) < j->R;) {
        const float *x = j->x + r * j->n;
        if (j->phase == 1)
            fx_emit(x, j->row_lens[r], j->cuts[r], 0, j->ids + j->indptr[r]);
        else if (j->p)
            j->cuts[r] = fx_topp_cut(x, j->row_lens[r], j->p[r], j->keys + member * j->n, j->w + member * j->n);
        else
            j->cuts[r] = fx_topk_cut(x, j->row_lens[r], j->k[r], 0, j->keys + member * j->n);
    }
}

#endif
