# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""OpenMP drivers of the sparse partial attention and token-score kernels (attention_job.h).

Call them through ``fluxion_dist.cpu.attention`` / ``.selection``: those check
dtypes, shapes and strides, so here arrays are taken as raw pointers (typed
memoryviews would cost ~1 us each per call, and calls come once per layer and
step). Values are checked here in C: sequence lengths and CSR offsets before
the kernel, block ids and pages inside it. Everything from planning to the
merge runs with the GIL released, so a GPU-launching Python thread keeps
running meanwhile.

Each call opens one OpenMP region over the job of attention_job.h (chunking,
balance and the merge are described there); ``_team.pyx`` runs the same job
on a persistent team instead.
"""

cimport numpy as cnp
from cython.parallel cimport prange, threadid
from libc.stdint cimport int32_t, int64_t, uint16_t
from libc.stdlib cimport free, malloc

cnp.import_array()


from fluxion_dist.cpu._attention_job cimport (
    fx_arena, fx_attn_job, FX_LOG2E, fx_cpu_isa, fx_alloc, fx_prepare_q, fx_token_scores, fx_block_lse, fx_job_scratch, fx_job_plan, fx_job_work, fx_job_first_bad)


ISAS = ("scalar", "avx2", "avx512")


def cpu_isa():
    """The widest kernel body this CPU runs: "avx512", "avx2" or "scalar" (checked at run time)."""
    return ISAS[fx_cpu_isa()]


cdef struct Batch:
    fx_arena a
    const float *q
    const int32_t *bt
    int64_t bt_stride  # elements between block-table rows
    const int32_t *seq_lens
    const int32_t *indptr
    const int32_t *blocks
    int64_t B, hq, hkv, rows, nnz


cdef Batch _batch(cnp.ndarray q, cnp.ndarray kv, cnp.ndarray bt, cnp.ndarray seq_lens,
                  cnp.ndarray indptr, cnp.ndarray blocks) except *:
    """Pointers and sizes of checked arrays; raises on bad sequence lengths or CSR offsets."""
    cdef Batch x
    cdef int64_t i, max_tokens
    x.B, x.hq = q.shape[0], q.shape[1]
    x.hkv = kv.shape[1]
    x.a.kv = <const uint16_t *>cnp.PyArray_DATA(kv)
    x.a.num_pages = kv.shape[0]
    x.a.page_stride = kv.strides[0] // 2
    x.a.head_stride = kv.strides[1] // 2
    x.a.d = <int>q.shape[2]
    x.a.g = <int>(x.hq // x.hkv)
    x.q = <const float *>cnp.PyArray_DATA(q)
    x.bt = <const int32_t *>cnp.PyArray_DATA(bt)
    x.bt_stride = bt.strides[0] // 4
    x.seq_lens = <const int32_t *>cnp.PyArray_DATA(seq_lens)
    x.indptr = <const int32_t *>cnp.PyArray_DATA(indptr)
    x.blocks = <const int32_t *>cnp.PyArray_DATA(blocks)
    x.rows = x.B * x.hkv
    x.nnz = blocks.shape[0]
    max_tokens = bt.shape[1] * 16
    for i in range(x.B):
        if x.seq_lens[i] < 0 or x.seq_lens[i] > max_tokens:
            raise ValueError(f"seq_lens[{i}] = {x.seq_lens[i]} is outside [0, {max_tokens}] "
                             f"(block_tables has {bt.shape[1]} columns)")
    if x.indptr[0] != 0 or x.indptr[x.rows] != x.nnz:
        raise ValueError(f"sel_indptr must rise from 0 to len(sel_blocks)={x.nnz}; "
                         f"got first {x.indptr[0]}, last {x.indptr[x.rows]}")
    for i in range(x.rows):
        if x.indptr[i + 1] < x.indptr[i]:
            raise ValueError(f"sel_indptr must not decrease; row {i} has {x.indptr[i]} > {x.indptr[i + 1]}")
    return x


def sparse_partial_attention(cnp.ndarray q, cnp.ndarray kv_pages, cnp.ndarray block_tables,
                             cnp.ndarray seq_lens, cnp.ndarray sel_indptr, cnp.ndarray sel_blocks,
                             sel_masks, float scale, int num_threads, int isa, int prefetch,
                             int chunks_per_thread, cnp.ndarray o, cnp.ndarray m, cnp.ndarray l):
    """Fill o, m, l; return -1, or the index into sel_blocks of an invalid selected block."""
    cdef Batch x = _batch(q, kv_pages, block_tables, seq_lens, sel_indptr, sel_blocks)
    cdef fx_attn_job j
    cdef int64_t parts, n_i64, n_f32, t, first_bad = -1
    cdef int64_t *i64
    cdef float *f32
    cdef bint oom
    j.a = x.a
    j.q, j.bt, j.bt_stride, j.seq_lens = x.q, x.bt, x.bt_stride, x.seq_lens
    j.indptr, j.blocks, j.masks = x.indptr, x.blocks, NULL
    j.B, j.hq, j.hkv, j.rows, j.nnz = x.B, x.hq, x.hkv, x.rows, x.nnz
    j.o = <float *>cnp.PyArray_DATA(o)
    j.m = <float *>cnp.PyArray_DATA(m)
    j.l = <float *>cnp.PyArray_DATA(l)
    j.isa, j.prefetch = isa, prefetch
    if sel_masks is not None:
        j.masks = <const uint16_t *>cnp.PyArray_DATA(sel_masks)

    with nogil:
        parts = 1 if num_threads == 1 else <int64_t>num_threads * chunks_per_thread
        fx_job_scratch(x.rows, parts, x.B * x.hq * x.a.d, x.a.g, x.a.d, num_threads, &n_i64, &n_f32)
        i64 = <int64_t *>malloc(n_i64 * sizeof(int64_t))
        f32 = <float *>fx_alloc(n_f32 * sizeof(float))
        oom = i64 == NULL or f32 == NULL
        if not oom:
            fx_job_plan(&j, parts, num_threads, scale * FX_LOG2E, i64, f32)
            for t in prange(num_threads, schedule='static', chunksize=1, num_threads=num_threads):
                fx_job_work(&j, <int>t)
            first_bad = fx_job_first_bad(&j)
        free(f32)
        free(i64)
    if oom:
        raise MemoryError("sparse_partial_attention: no memory for the kernel's scratch")
    return first_bad


cdef int64_t _per_selected_block(Batch x, float q_scale, bint lse, float *res, int num_threads,
                                 int isa) noexcept nogil:
    """Each selected block's scores into ``res``: per token, max over the GQA group
    (``res[nnz, 16]``), or with ``lse`` per query head the block's log-sum-exp
    (``res[nnz, g]``). Returns -1, the index of the first invalid selected block, or -2 when
    the scratch could not be allocated."""
    cdef int g = x.a.g, d = x.a.d
    cdef int64_t R = x.rows, W = x.nnz
    cdef int64_t i, r, b, lo, hi, first_bad = -1
    cdef int32_t blk, page, nb
    cdef float *sp
    cdef const uint16_t *k
    cdef float *qs = <float *>fx_alloc((x.B * x.hq * d + num_threads * g * 16) * sizeof(float))
    cdef int64_t *err = <int64_t *>malloc((W + 1) * sizeof(int64_t))
    if qs == NULL or err == NULL:
        free(err)
        free(qs)
        return -2
    sp = qs + x.B * x.hq * d
    fx_prepare_q(x.q, qs, x.B * x.hq, d, q_scale, isa)
    for i in prange(W, schedule='static', num_threads=num_threads):
        # the row of item i: the last r with indptr[r] <= i
        lo = 0
        hi = R
        while hi - lo > 1:
            r = (lo + hi) // 2
            if x.indptr[r] <= i:
                lo = r
            else:
                hi = r
        r = lo
        b = r // x.hkv
        blk = x.blocks[i]
        nb = (x.seq_lens[b] + 15) // 16
        err[i] = 1
        if 0 <= blk < nb:
            page = x.bt[b * x.bt_stride + blk]
            if 0 <= page < x.a.num_pages:
                err[i] = 0
                k = x.a.kv + page * x.a.page_stride + (r % x.hkv) * x.a.head_stride
                if lse:
                    fx_block_lse(qs + r * g * d, k, d, g, blk, x.seq_lens[b], res + i * g,
                                 sp + threadid() * g * 16, isa)
                else:
                    fx_token_scores(qs + r * g * d, k, d, g, blk, x.seq_lens[b], res + i * 16,
                                    sp + threadid() * g * 16, isa)
    for i in range(W):
        if err[i]:
            first_bad = i
            break
    free(err)
    free(qs)
    return first_bad


def token_scores(cnp.ndarray q, cnp.ndarray kv_pages, cnp.ndarray block_tables,
                 cnp.ndarray seq_lens, cnp.ndarray sel_indptr, cnp.ndarray sel_blocks,
                 float scale, int num_threads, int isa, cnp.ndarray out):
    """Fill out[nnz, 16] with per-token scores of the selected blocks (max over the GQA group).

    Returns -1, or the index into sel_blocks of an invalid selected block.
    """
    cdef Batch x = _batch(q, kv_pages, block_tables, seq_lens, sel_indptr, sel_blocks)
    cdef float *res = <float *>cnp.PyArray_DATA(out)
    cdef int64_t first_bad
    with nogil:
        first_bad = _per_selected_block(x, scale, False, res, num_threads, isa)
    if first_bad == -2:
        raise MemoryError("token_scores: no memory for the kernel's scratch")
    return first_bad


def candidate_lse(cnp.ndarray q, cnp.ndarray kv_pages, cnp.ndarray block_tables,
                  cnp.ndarray seq_lens, cnp.ndarray sel_indptr, cnp.ndarray sel_blocks,
                  float scale, int num_threads, int isa, cnp.ndarray out):
    """Fill out[nnz, g] with each selected block's log-sum-exp of q.k*scale per query head of
    its group (the rescoring stage's exact scores).

    Returns -1, or the index into sel_blocks of an invalid selected block.
    """
    cdef Batch x = _batch(q, kv_pages, block_tables, seq_lens, sel_indptr, sel_blocks)
    cdef float *res = <float *>cnp.PyArray_DATA(out)
    cdef int64_t first_bad
    with nogil:
        first_bad = _per_selected_block(x, scale * FX_LOG2E, True, res, num_threads, isa)
    if first_bad == -2:
        raise MemoryError("candidate_lse: no memory for the kernel's scratch")
    return first_bad
