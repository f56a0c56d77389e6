/* One sparse-attention call as a job that any set of threads can work on.
 *
 * Balance: the selected blocks of all rows are cut into chunks of at most
 * ceil(nnz / parts) blocks, so one long row is spread over every thread and
 * short rows are not split at all. Threads claim chunks from a shared counter,
 * one chunk ahead, so the current chunk's last block prefetches the next one's
 * first. A chunk of a split row writes its own scratch partial; the thread that
 * finishes a row's last chunk (a per-row countdown) merges the row by exact
 * log-sum-exp, in chunk order, so the result does not depend on which thread
 * ran what. Rows with no blocks are written by the planner. No barrier, so
 * the same job runs under an OpenMP region or on a persistent team.
 */
#ifndef FX_ATTENTION_JOB_H
#define FX_ATTENTION_JOB_H

#include <string.h>

#include "block_attention.h"

typedef struct {
    fx_arena a;
    const float *q; /* [B, hq, d] */
    const int32_t *bt;
    int64_t bt_stride; /* elements between block-table rows */
    const int32_t *seq_lens;
    const int32_t *indptr;
    const int32_t *blocks;
    const uint16_t *masks; /* NULL: every valid token */
    int64_t B, hq, hkv, rows, nnz;
    float *o, *m, *l;
    int isa, prefetch;
    /* plan (fx_job_plan) */
    int64_t nc;
    int64_t *row_c0, *row_left, *ch_row, *ch_start, *ch_len, *ch_slot, *ch_err;
    float *work, *q2, *po, *pm, *pl;
    int64_t wsize;
    int64_t counter; /* atomic: next chunk to claim */
} fx_attn_job;

/* Scratch the plan needs for `parts` parts and `members` threads: int64 and float counts
 * (the floats must start 64-byte aligned). Every row is cut into ceil(n / cs) <= n / cs + 1
 * chunks: at most rows + parts in all. */
static inline void fx_job_scratch(int64_t rows, int64_t parts, int64_t q_floats, int g, int d,
                                  int members, int64_t *n_i64, int64_t *n_f32) {
    int64_t nc = rows + parts + 1;
    *n_i64 = 2 * (rows + 1) + 5 * nc;
    *n_f32 = members * fx_work_floats(g, d) + q_floats + nc * ((int64_t)g * d + 2 * g);
}

/* -1, or the first row whose offsets fall (indptr must rise from 0 to nnz; -2: the ends). */
static inline int64_t fx_csr_bad_row(const int32_t *indptr, int64_t rows, int64_t nnz) {
    if (indptr[0] != 0 || indptr[rows] != nnz) return -2;
    for (int64_t r = 0; r < rows; r++)
        if (indptr[r + 1] < indptr[r]) return r;
    return -1;
}

static inline fx_row fx_job_row(const fx_attn_job *j, int64_t r) {
    fx_row row;
    int64_t b = r / j->hkv;
    row.bt = j->bt + b * j->bt_stride;
    row.seq_len = j->seq_lens[b];
    row.kh = (int)(r % j->hkv);
    return row;
}

/* Cut the job into chunks over scratch i64/f32 (sized by fx_job_scratch), scale q, write the
 * empty rows' outputs. Offsets must be checked (fx_csr_bad_row) first. */
static void fx_job_plan(fx_attn_job *j, int64_t parts, int members, float scale2, int64_t *i64,
                        float *f32) {
    const int g = j->a.g, d = j->a.d;
    const int64_t R = j->rows, gd = (int64_t)g * d;
    int64_t cs = (j->nnz + parts - 1) / parts, ns = 0;
    if (cs < 1) cs = 1;
    j->wsize = fx_work_floats(g, d);
    j->row_c0 = i64;
    j->row_left = i64 + R + 1;
    j->row_c0[0] = 0;
    for (int64_t r = 0; r < R; r++) {
        int64_t n = j->indptr[r + 1] - j->indptr[r], k = (n + cs - 1) / cs;
        j->row_c0[r + 1] = j->row_c0[r] + k;
        j->row_left[r] = k;
        if (k > 1) ns += k;
    }
    const int64_t nc = j->nc = j->row_c0[R];
    j->ch_row = j->row_left + R + 1;
    j->ch_start = j->ch_row + nc + 1;
    j->ch_len = j->ch_start + nc + 1;
    j->ch_slot = j->ch_len + nc + 1;
    j->ch_err = j->ch_slot + nc + 1;
    j->work = f32;
    j->q2 = f32 + members * j->wsize;
    j->po = j->q2 + j->B * j->hq * d;
    j->pm = j->po + (ns + 1) * gd;
    j->pl = j->pm + (ns + 1) * g;
    fx_prepare_q(j->q, j->q2, j->B * j->hq, d, scale2, j->isa);
    ns = 0;
    for (int64_t r = 0; r < R; r++) {
        int64_t n = j->indptr[r + 1] - j->indptr[r], k = j->row_c0[r + 1] - j->row_c0[r];
        if (k == 0) {
            memset(j->o + r * gd, 0, sizeof(float) * (size_t)gd);
            for (int h = 0; h < g; h++) {
                j->m[r * g + h] = -INFINITY;
                j->l[r * g + h] = 0.0f;
            }
        }
        for (int64_t c = j->row_c0[r]; c < j->row_c0[r + 1]; c++) {
            j->ch_row[c] = r;
            j->ch_start[c] = j->indptr[r] + (c - j->row_c0[r]) * n / k;
            j->ch_len[c] = j->indptr[r] + (c - j->row_c0[r] + 1) * n / k - j->ch_start[c];
            j->ch_slot[c] = k > 1 ? ns++ : -1;
        }
    }
    j->counter = 0;
}

static inline int64_t fx_job_claim(fx_attn_job *j) {
    return __atomic_fetch_add(&j->counter, 1, __ATOMIC_RELAXED);
}

/* The share of one thread: claim and run chunks until none are left. `member` picks the
 * thread's private scratch (0 <= member < the planned members). */
static void fx_job_work(fx_attn_job *j, int member) {
    const int g = j->a.g, d = j->a.d;
    const int64_t gd = (int64_t)g * d, nc = j->nc;
    float *work = j->work + member * j->wsize;
    int64_t c = fx_job_claim(j);
    while (c < nc) {
        int64_t cn = fx_job_claim(j);
        const char *then = NULL;
        if (j->prefetch && cn < nc && j->ch_len[cn] > 0) {
            fx_row nrow = fx_job_row(j, j->ch_row[cn]);
            then = fx_block_addr(&j->a, &nrow, j->blocks[j->ch_start[cn]]);
        }
        int64_t r = j->ch_row[c], slot = j->ch_slot[c], start = j->ch_start[c];
        float *oo = slot < 0 ? j->o + r * gd : j->po + slot * gd;
        float *mm = slot < 0 ? j->m + r * g : j->pm + slot * g;
        float *ll = slot < 0 ? j->l + r * g : j->pl + slot * g;
        fx_row row = fx_job_row(j, r);
        j->ch_err[c] = fx_attend_chunk(&j->a, &row, j->q2 + r * gd, j->blocks + start,
                                       j->masks ? j->masks + start : NULL, j->ch_len[c], oo, mm, ll,
                                       work, j->isa, j->prefetch, then);
        if (slot < 0) {
            for (int h = 0; h < g; h++) mm[h] *= FX_LN2;
        } else if (__atomic_sub_fetch(&j->row_left[r], 1, __ATOMIC_ACQ_REL) == 0) {
            int64_t first = j->ch_slot[j->row_c0[r]], k = j->row_c0[r + 1] - j->row_c0[r];
            fx_merge_chunks(j->po + first * gd, j->pm + first * g, j->pl + first * g, k, g, d,
                            j->o + r * gd, j->m + r * g, j->l + r * g);
        }
        c = cn;
    }
}

/* -1, or the index into blocks of the first invalid selected block (after every member ran). */
static int64_t fx_job_first_bad(const fx_attn_job *j) {
    for (int64_t c = 0; c < j->nc; c++)
        if (j->ch_err[c] >= 0) return j->ch_start[c] + j->ch_err[c];
    return -1;
}

#endif
