/* A layer's CPU share as a CUDA host node: the GPU pipeline's whole-step graph calls
 * fx_host_job_run(job) between the routing's copies to pinned memory and the copies of the
 * CPU partial back (hybrid/device_pipeline.py, DevicePipeline.capture_layer).
 *
 * Every address the call reads or writes is fixed when the job is made (the layer state's
 * pinned buffers: q, the CPU's CSR, the routing's counts, the partial's o/m/l; the step's
 * lengths and the layer's block table, rewritten in place by the host before each replay),
 * so a replayed graph needs nothing from the host but those values. The call runs on CUDA's
 * callback thread, which joins the worker team as its caller (member 0): no Python, no GIL,
 * no CUDA call. It cannot raise, so the first error is latched in the job and the host reads
 * it once the step's GPU work is done (HostJob.take_error).
 */
#ifndef FX_HOST_JOB_H
#define FX_HOST_JOB_H

#include <math.h>
#include <stdint.h>

#include "attention_job.h"
#include "worker_team.h"

enum { FX_HOST_OK = 0, FX_HOST_BUSY = 1, FX_HOST_FORKED = 2, FX_HOST_BAD_CSR = 3, FX_HOST_BAD_BLOCK = 4,
       FX_HOST_TOO_MANY = 5 };

typedef struct {
    fx_team *team;
    fx_attn_job job;        /* every field but nnz (and the plan's) fixed at creation */
    const int32_t *counts;  /* the routing's counts: [2] is the CPU's entries */
    int64_t capacity;       /* entries the CSR's blocks buffer holds */
    int64_t parts;
    int members;
    float scale2;
    int64_t *i64;
    float *f32;
    /* results, read by the host after the step */
    int64_t last_entries;
    int64_t last_ns;
    int error;        /* latched: the first error since take_error */
    int64_t detail;   /* its detail: the CSR's bad row, or the first bad entry */
} fx_host_job;

static void fx_host_job_task(void *arg, int member) { fx_job_work((fx_attn_job *)arg, member); }

static void fx_host_job_fail(fx_host_job *h, int error, int64_t detail) {
    if (h->error == FX_HOST_OK) {
        h->error = error;
        h->detail = detail;
    }
}

/* An empty partial: the merge skips a row whose m is -inf. */
static void fx_host_job_empty(fx_host_job *h) {
    const int64_t rows = h->job.B * h->job.hq;
    for (int64_t i = 0; i < rows; i++) {
        h->job.m[i] = -INFINITY;
        h->job.l[i] = 0.0f;
    }
}

static void fx_host_job_run(void *arg) {
    fx_host_job *h = (fx_host_job *)arg;
    const int64_t t0 = fx_now_ns();
    const int64_t nnz = h->counts[2];
    h->last_entries = nnz;
    if (nnz <= 0 || nnz > h->capacity) {
        if (nnz > h->capacity) fx_host_job_fail(h, FX_HOST_TOO_MANY, nnz);
        fx_host_job_empty(h);
        h->last_ns = fx_now_ns() - t0;
        return;
    }
    fx_attn_job j = h->job;
    j.nnz = nnz;
    const int64_t bad_row = fx_csr_bad_row(j.indptr, j.rows, nnz);
    if (bad_row != -1) {
        fx_host_job_fail(h, FX_HOST_BAD_CSR, bad_row);
        fx_host_job_empty(h);
    } else {
        fx_job_plan(&j, h->parts, h->members, h->scale2, h->i64, h->f32);
        const int ran = fx_team_run(h->team, fx_host_job_task, &j, j.nc - 1);
        if (ran != 0) {
            fx_host_job_fail(h, ran == -2 ? FX_HOST_FORKED : FX_HOST_BUSY, 0);
            fx_host_job_empty(h);
        } else {
            const int64_t bad = fx_job_first_bad(&j);
            if (bad >= 0) fx_host_job_fail(h, FX_HOST_BAD_BLOCK, bad);
        }
    }
    h->last_ns = fx_now_ns() - t0;
}

#endif
