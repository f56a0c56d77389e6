# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""OpenMP drivers of the sparse partial attention and token-score kernels (block_attention.h).

Call them through ``fluxion_dist.cpu.attention`` / ``.selection``: those check
dtypes, shapes and strides, so here arrays are taken as raw pointers (typed
memoryviews would cost ~1 us each per call, and calls come once per layer and
step). Values are checked here in C: sequence lengths and CSR offsets before
the kernel, block ids and pages inside it. Everything from planning to the
merge runs with the GIL released, so a GPU-launching Python thread keeps
running meanwhile.

Balance: the selected blocks of all rows are cut into chunks of at most
``ceil(nnz / (threads * chunks_per_thread))`` blocks, so one long row is spread
over every thread and short rows are not split at all. Each chunk writes its
own partial; rows cut into several chunks are merged by exact log-sum-exp.
"""

cimport numpy as cnp
from cython.parallel cimport parallel, prange, threadid
from libc.stdint cimport int32_t, int64_t, uint16_t
from libc.stdlib cimport free, malloc
from libc.string cimport memset

cnp.import_array()


cdef extern from "block_attention.h" nogil:
    ctypedef struct fx_arena:
        const uint16_t *kv
        int64_t num_pages
        int64_t page_stride
        int64_t head_stride
        int d
        int g
    ctypedef struct fx_row:
        const int32_t *bt
        int32_t seq_len
        int kh
    float FX_LOG2E
    float FX_LN2
    float INFINITY
    int fx_cpu_isa()
    void *fx_alloc(size_t bytes)
    void fx_prepare_q(const float *q, float *dst, int64_t heads, int d, float scale, int isa)
    int64_t fx_work_floats(int g, int d)
    int64_t fx_attend_chunk(const fx_arena *a, const fx_row *r, const float *q2,
                            const int32_t *blocks, const uint16_t *masks, int64_t n,
                            float *o, float *m2, float *l, float *work, int isa, int prefetch,
                            const char *then)
    const char *fx_block_addr(const fx_arena *a, const fx_row *r, int32_t blk)
    int64_t fx_claim(int64_t *counter)
    void fx_barrier()
    void fx_merge_chunks(const float *po, const float *pm2, const float *pl, int64_t nc, int g,
                         int d, float *o, float *m, float *l)
    void fx_token_scores(const float *q, const uint16_t *K, int d, int g, int32_t blk,
                         int32_t seq_len, float *out, float *sp, int isa)


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


cdef inline fx_row _row(const Batch *x, int64_t r) noexcept nogil:
    cdef fx_row row
    cdef int64_t b = r // x.hkv
    row.bt = x.bt + b * x.bt_stride
    row.seq_len = x.seq_lens[b]
    row.kh = <int>(r % x.hkv)
    return row


cdef int64_t _run_chunk(const Batch *x, const float *q2, int64_t r, const uint16_t *masks,
                        int64_t start, int64_t n, float *o, float *m2, float *l, float *work,
                        int isa, int prefetch, const char *then) noexcept nogil:
    cdef fx_row row = _row(x, r)
    if masks != NULL:
        masks = masks + start
    return fx_attend_chunk(&x.a, &row, q2 + r * x.a.g * x.a.d, x.blocks + start, masks, n,
                           o, m2, l, work, isa, prefetch, then)


def sparse_partial_attention(cnp.ndarray q, cnp.ndarray kv_pages, cnp.ndarray block_tables,
                             cnp.ndarray seq_lens, cnp.ndarray sel_indptr, cnp.ndarray sel_blocks,
                             sel_masks, float scale, int num_threads, int isa, int prefetch,
                             int chunks_per_thread, cnp.ndarray o, cnp.ndarray m, cnp.ndarray l):
    """Fill o, m, l; return -1, or the index into sel_blocks of an invalid selected block."""
    cdef Batch x = _batch(q, kv_pages, block_tables, seq_lens, sel_indptr, sel_blocks)
    cdef int g = x.a.g, d = x.a.d
    cdef int64_t R = x.rows, W = x.nnz, gd = g * d
    cdef const int32_t *indptr = x.indptr
    cdef const uint16_t *masks = NULL
    cdef float *out_o = <float *>cnp.PyArray_DATA(o)
    cdef float *out_m = <float *>cnp.PyArray_DATA(m)
    cdef float *out_l = <float *>cnp.PyArray_DATA(l)
    cdef float s2 = scale * FX_LOG2E
    cdef int64_t parts, cs, nc, ns, r, rr, c, cn, k, n, j, t, slot, counter, first_bad = -1
    cdef const char *then
    cdef fx_row nrow
    cdef bint oom
    cdef int64_t *row_c0
    cdef int64_t *ch_row
    cdef int64_t *ch_start
    cdef int64_t *ch_len
    cdef int64_t *ch_slot
    cdef int64_t *ch_err
    cdef float *q2
    cdef float *po
    cdef float *pm
    cdef float *pl
    cdef float *work
    cdef int64_t wsize = fx_work_floats(g, d)
    cdef float *oo
    cdef float *mm
    cdef float *ll
    if sel_masks is not None:
        masks = <const uint16_t *>cnp.PyArray_DATA(sel_masks)

    with nogil:
        parts = 1 if num_threads == 1 else <int64_t>num_threads * chunks_per_thread
        cs = (W + parts - 1) // parts
        if cs < 1:
            cs = 1
        # Every row is cut into ceil(n / cs) <= n / cs + 1 chunks: at most R + parts in all.
        row_c0 = <int64_t *>malloc((R + 1) * sizeof(int64_t))
        ch_row = <int64_t *>malloc((R + parts + 1) * 5 * sizeof(int64_t))
        q2 = <float *>fx_alloc((x.B * x.hq * d + (R + parts + 1) * (gd + 2 * g)) * sizeof(float))
        work = <float *>fx_alloc(num_threads * wsize * sizeof(float))
        oom = row_c0 == NULL or ch_row == NULL or q2 == NULL or work == NULL
        if not oom:
            row_c0[0] = 0
            ns = 0
            for r in range(R):
                n = indptr[r + 1] - indptr[r]
                k = (n + cs - 1) // cs
                row_c0[r + 1] = row_c0[r] + k
                if k > 1:
                    ns = ns + k
            nc = row_c0[R]
            ch_start = ch_row + nc + 1
            ch_len = ch_start + nc + 1
            ch_slot = ch_len + nc + 1
            ch_err = ch_slot + nc + 1
            po = q2 + x.B * x.hq * d
            pm = po + (ns + 1) * gd
            pl = pm + (ns + 1) * g
            fx_prepare_q(x.q, q2, x.B * x.hq, d, s2, isa)
            # Chunks of a split row write consecutive scratch slots; the others write the output.
            ns = 0
            for r in range(R):
                n = indptr[r + 1] - indptr[r]
                k = row_c0[r + 1] - row_c0[r]
                for c in range(row_c0[r], row_c0[r + 1]):
                    ch_row[c] = r
                    ch_start[c] = indptr[r] + (c - row_c0[r]) * n // k
                    ch_len[c] = indptr[r] + (c - row_c0[r] + 1) * n // k - ch_start[c]
                    ch_slot[c] = -1
                    if k > 1:
                        ch_slot[c] = ns
                        ns = ns + 1

            counter = 0
            with parallel(num_threads=num_threads):
                # Dynamic scheduling by hand, one chunk ahead: a thread claims its next chunk
                # before running the current one, so the current one's last block prefetches
                # the next one's first (a chunk is only ~13 blocks at 16 threads and 5%).
                for t in prange(num_threads, schedule='static', chunksize=1):
                    c = fx_claim(&counter)
                    while c < nc:
                        cn = fx_claim(&counter)
                        then = NULL
                        if prefetch and cn < nc and ch_len[cn] > 0:
                            nrow = _row(&x, ch_row[cn])
                            then = fx_block_addr(&x.a, &nrow, x.blocks[ch_start[cn]])
                        r = ch_row[c]
                        if ch_slot[c] < 0:
                            oo = out_o + r * gd
                            mm = out_m + r * g
                            ll = out_l + r * g
                        else:
                            oo = po + ch_slot[c] * gd
                            mm = pm + ch_slot[c] * g
                            ll = pl + ch_slot[c] * g
                        ch_err[c] = _run_chunk(&x, q2, r, masks, ch_start[c], ch_len[c], oo, mm, ll,
                                               work + threadid() * wsize, isa, prefetch, then)
                        c = cn
                # One parallel region for both loops: the barrier between them is cheaper than a
                # second region's start.
                fx_barrier()
                for rr in prange(R, schedule='dynamic'):
                    k = row_c0[rr + 1] - row_c0[rr]
                    oo = out_o + rr * gd
                    mm = out_m + rr * g
                    ll = out_l + rr * g
                    if k == 0:
                        memset(oo, 0, gd * sizeof(float))
                        for j in range(g):
                            mm[j] = -INFINITY
                            ll[j] = 0
                    elif k == 1:
                        for j in range(g):
                            mm[j] = mm[j] * FX_LN2
                    else:
                        slot = ch_slot[row_c0[rr]]
                        fx_merge_chunks(po + slot * gd, pm + slot * g, pl + slot * g, k, g, d, oo, mm, ll)

            for c in range(nc):
                if ch_err[c] >= 0:
                    first_bad = ch_start[c] + ch_err[c]
                    break
        free(work)
        free(q2)
        free(ch_row)
        free(row_c0)
    if oom:
        raise MemoryError("sparse_partial_attention: no memory for the kernel's scratch")
    return first_bad


def token_scores(cnp.ndarray q, cnp.ndarray kv_pages, cnp.ndarray block_tables,
                 cnp.ndarray seq_lens, cnp.ndarray sel_indptr, cnp.ndarray sel_blocks,
                 float scale, int num_threads, int isa, cnp.ndarray out):
    """Fill out[nnz, 16] with per-token scores of the selected blocks (max over the GQA group).

    Returns -1, or the index into sel_blocks of an invalid selected block.
    """
    cdef Batch x = _batch(q, kv_pages, block_tables, seq_lens, sel_indptr, sel_blocks)
    cdef int g = x.a.g, d = x.a.d
    cdef int64_t R = x.rows, W = x.nnz
    cdef float *res = <float *>cnp.PyArray_DATA(out)
    cdef int64_t i, r, b, lo, hi, first_bad = -1
    cdef bint oom
    cdef int32_t blk, page, nb
    cdef float *qs
    cdef float *sp
    cdef int64_t *err

    with nogil:
        qs = <float *>fx_alloc((x.B * x.hq * d + num_threads * g * 16) * sizeof(float))
        err = <int64_t *>malloc((W + 1) * sizeof(int64_t))
        oom = qs == NULL or err == NULL
        if not oom:
            sp = qs + x.B * x.hq * d
            fx_prepare_q(x.q, qs, x.B * x.hq, d, scale, isa)
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
                        fx_token_scores(qs + r * g * d,
                                        x.a.kv + page * x.a.page_stride + (r % x.hkv) * x.a.head_stride,
                                        d, g, blk, x.seq_lens[b], res + i * 16,
                                        sp + threadid() * g * 16, isa)
            for i in range(W):
                if err[i]:
                    first_bad = i
                    break
        free(err)
        free(qs)
    if oom:
        raise MemoryError("token_scores: no memory for the kernel's scratch")
    return first_bad
