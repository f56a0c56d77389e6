# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""OpenMP drivers of Quest block scoring and top-k / top-p selection (block_selection.h).

Unchecked: call them through ``fluxion_dist.cpu.selection``. Rows are
independent, so each loop is a prange over rows (or row tiles) with the GIL
released throughout. Selections come out as CSR (indptr, ids), ids ascending,
the form ``sparse_partial_attention`` takes.
"""

from cython.parallel cimport prange, threadid
from libc.stdint cimport int32_t, int64_t, uint16_t, uint32_t, uint64_t
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.math cimport fabsf

import numpy as np


cdef extern from "block_selection.h" nogil:
    ctypedef struct fx_cut:
        uint64_t threshold
        int64_t count
    float INFINITY
    void fx_quest_scalar(const float *qs, const float *qa, const uint16_t *mn,
                         const uint16_t *mx, int d, int g, float *out, int64_t out_stride)
    void fx_quest_avx2(const float *qs, const float *qa, const uint16_t *mn,
                       const uint16_t *mx, int d, int g, float *out, int64_t out_stride)
    uint64_t fx_rank_key(float x, uint32_t i)
    fx_cut fx_topk_cut(const float *x, int64_t n, int64_t k, int skip_ninf, uint64_t *keys)
    fx_cut fx_topp_cut(const float *x, int64_t n, double p, uint64_t *keys, double *w)
    int64_t fx_emit(const float *x, int64_t n, fx_cut cut, int skip_ninf, int32_t *ids)

cdef enum:
    QUEST_TILE = 64  # blocks per work item: ~64 KiB of metadata at d=128


def quest_scores(const float[:, :, ::1] q, const uint16_t[:, :, ::1] kmin,
                 const uint16_t[:, :, ::1] kmax, const int32_t[:, :] block_tables,
                 const int32_t[::1] seq_lens, float scale, int num_threads, bint avx2,
                 float[:, :, ::1] out):
    """Fill out[B, Hq, max_blocks] with Quest bounds (-inf past each sequence).

    Returns -1, or b * max_blocks + j for a block whose page lies outside the arena.
    """
    cdef int64_t B = q.shape[0], hq = q.shape[1], d = q.shape[2]
    cdef int64_t hkv = kmin.shape[1], P = kmin.shape[0], maxb = block_tables.shape[1]
    cdef int64_t g = hq // hkv, tiles = (maxb + QUEST_TILE - 1) // QUEST_TILE
    cdef int64_t it, b, kh, j, h, nb, page, first_bad = -1
    # Scratch comes from numpy, with the GIL: a failed allocation raises MemoryError.
    cdef float[::1] qs_buf = np.empty(2 * B * hq * d, dtype=np.float32)
    cdef int64_t[::1] err = np.empty(B * hkv * tiles, dtype=np.int64)
    cdef float *qs = &qs_buf[0]
    cdef const float *qp = &q[0, 0, 0]

    with nogil:
        for j in range(B * hq * d):
            qs[j] = qp[j] * scale
            qs[B * hq * d + j] = fabsf(qs[j])
        for it in prange(B * hkv * tiles, schedule='static', num_threads=num_threads):
            b = it // (hkv * tiles)
            kh = (it // tiles) % hkv
            nb = (seq_lens[b] + 15) // 16
            err[it] = -1
            for j in range((it % tiles) * QUEST_TILE, min((it % tiles + 1) * QUEST_TILE, maxb)):
                page = block_tables[b, j] if j < nb else 0
                if j >= nb:
                    for h in range(g):
                        out[b, kh * g + h, j] = -INFINITY
                elif page < 0 or page >= P:
                    if err[it] < 0:
                        err[it] = b * maxb + j
                elif avx2:
                    fx_quest_avx2(qs + (b * hq + kh * g) * d, qs + B * hq * d + (b * hq + kh * g) * d,
                                  &kmin[page, kh, 0], &kmax[page, kh, 0], <int>d, <int>g,
                                  &out[b, kh * g, j], maxb)
                else:
                    fx_quest_scalar(qs + (b * hq + kh * g) * d, qs + B * hq * d + (b * hq + kh * g) * d,
                                    &kmin[page, kh, 0], &kmax[page, kh, 0], <int>d, <int>g,
                                    &out[b, kh * g, j], maxb)
        for it in range(B * hkv * tiles):
            if err[it] >= 0:
                first_bad = err[it]
                break
    return first_bad


cdef int64_t _rows_to_csr(const float[:, ::1] x, const int32_t[::1] row_lens,
                          const int64_t[::1] k, const double[::1] p, int num_threads,
                          int32_t[::1] indptr, int32_t[::1] ids) except -1:
    cdef int64_t R = x.shape[0], n = x.shape[1], r
    cdef bint by_mass = k is None
    cdef uint64_t[::1] key_buf = np.empty(num_threads * n + 1, dtype=np.uint64)
    cdef double[::1] w_buf = np.empty(num_threads * n + 1 if by_mass else 1, dtype=np.float64)
    cdef uint64_t *keys = &key_buf[0]
    cdef double *w = &w_buf[0]
    cdef fx_cut *cuts = <fx_cut *>PyMem_Malloc((R + 1) * sizeof(fx_cut))
    cdef fx_cut cut
    if cuts == NULL:
        raise MemoryError()
    with nogil:
        for r in prange(R, schedule='dynamic', num_threads=num_threads):
            if by_mass:
                cut = fx_topp_cut(&x[r, 0], row_lens[r], p[r], keys + threadid() * n,
                                  w + threadid() * n)
            else:
                cut = fx_topk_cut(&x[r, 0], row_lens[r], k[r], 0, keys + threadid() * n)
            cuts[r] = cut
        indptr[0] = 0
        for r in range(R):
            indptr[r + 1] = <int32_t>(indptr[r] + cuts[r].count)
        for r in prange(R, schedule='dynamic', num_threads=num_threads):
            fx_emit(&x[r, 0], row_lens[r], cuts[r], 0, &ids[0] + indptr[r])
    PyMem_Free(cuts)
    return indptr[R]


def topk_rows(const float[:, ::1] x, const int32_t[::1] row_lens, const int64_t[::1] k,
              int num_threads, int32_t[::1] indptr, int32_t[::1] ids):
    """Per row r, the k[r] highest of x[r, :row_lens[r]] into CSR; returns nnz."""
    return _rows_to_csr(x, row_lens, k, None, num_threads, indptr, ids)


def topp_rows(const float[:, ::1] x, const int32_t[::1] row_lens, const double[::1] p,
              int num_threads, int32_t[::1] indptr, int32_t[::1] ids):
    """Per row r, the fewest highest of x[r, :row_lens[r]] with softmax mass >= p[r]; returns nnz."""
    return _rows_to_csr(x, row_lens, None, p, num_threads, indptr, ids)


def topk_tokens(const float[:, ::1] tok, const int32_t[::1] sel_indptr, const int64_t[::1] k,
                int num_threads, uint16_t[::1] masks):
    """Per row r, the k[r] highest finite token scores over the row's candidate blocks.

    tok[i, t] scores token t of selected block i (-inf: padding, never chosen);
    bit t of masks[i] is set for each chosen token.
    """
    cdef int64_t R = sel_indptr.shape[0] - 1, r, i, n, nmax = 0
    cdef uint64_t *keys
    cdef fx_cut cut
    cdef const float *x
    for r in range(R):
        nmax = max(nmax, 16 * (sel_indptr[r + 1] - sel_indptr[r]))
    cdef uint64_t[::1] key_buf = np.empty(num_threads * nmax + 1, dtype=np.uint64)
    keys = &key_buf[0]
    with nogil:
        for r in prange(R, schedule='dynamic', num_threads=num_threads):
            x = &tok[0, 0] + 16 * sel_indptr[r]
            n = 16 * (sel_indptr[r + 1] - sel_indptr[r])
            cut = fx_topk_cut(x, n, k[r], 1, keys + threadid() * nmax)
            for i in range(sel_indptr[r], sel_indptr[r + 1]):
                masks[i] = 0
            if cut.count > 0:
                for i in range(n):
                    if x[i] != -INFINITY and fx_rank_key(x[i], <uint32_t>i) <= cut.threshold:
                        masks[sel_indptr[r] + i // 16] |= <uint16_t>(1 << (i % 16))
