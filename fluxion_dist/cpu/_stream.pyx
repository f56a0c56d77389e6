# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The DRAM read ceilings the attention kernel is judged against.

A streaming fold over a buffer far larger than the caches, split into one
contiguous slice per OpenMP thread, is the best case for every prefetcher: no
scattered reads, no arithmetic to hide. The scattered read folds the attention
kernel's own (page, head) runs instead: the ceiling of its access pattern. The
folds are returned so the reads cannot be optimised away. The shares are
read_fold.h's, which the worker team (_team.pyx) folds too.
"""

from cython.parallel cimport prange
from libc.stdint cimport int64_t, uint64_t

cdef extern from "read_fold.h" nogil:
    uint64_t fx_fold_share(const uint64_t *words, int64_t n, const int64_t *starts, int64_t run_words,
                           int member, int members)


def stream_read(const uint64_t[::1] buf, int num_threads):
    """XOR-fold every word of `buf` using `num_threads` threads; returns the fold."""
    cdef uint64_t acc
    if buf.shape[0] == 0:
        return 0
    with nogil:
        acc = _fold(&buf[0], buf.shape[0], NULL, 0, num_threads)
    return acc


def scattered_read(const uint64_t[::1] words, const int64_t[::1] starts, int64_t run_words, int num_threads):
    """XOR-fold the runs of `run_words` words at `starts` (in order, a contiguous share of
    them per thread, the next run prefetched): the same scattered reads as the attention
    kernel's, with no arithmetic, so the ceiling of that access pattern rather than of a
    stream."""
    cdef uint64_t acc
    if starts.shape[0] == 0:
        return 0
    with nogil:
        acc = _fold(&words[0], starts.shape[0], &starts[0], run_words, num_threads)
    return acc


cdef uint64_t _fold(const uint64_t *words, int64_t n, const int64_t *starts, int64_t run_words,
                    int num_threads) noexcept nogil:
    # n words, one contiguous slice per thread (starts NULL), or n runs, a share per thread
    cdef int t
    cdef uint64_t acc = 0
    for t in prange(num_threads, schedule='static', num_threads=num_threads):
        acc ^= fx_fold_share(words, n, starts, run_words, t, num_threads)
    return acc
