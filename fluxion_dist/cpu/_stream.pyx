# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The DRAM read ceilings the attention kernel is judged against.

A streaming fold over a buffer far larger than the caches, split into one
contiguous slice per OpenMP thread, is the best case for every prefetcher: no
scattered reads, no arithmetic to hide. The scattered read folds the attention
kernel's own (page, head) runs instead: the ceiling of its access pattern. The
folds are returned so the reads cannot be optimised away.
"""

from cython.parallel cimport prange
from libc.stdint cimport int64_t, uint64_t

cdef extern from *:
    """
    /* One run folded, a line of the next run requested per line read (as the attention
     * kernel spreads its prefetches over its work: a burst of them overflows the line-fill
     * buffers). */
    static inline uint64_t fx_fold_run(const uint64_t *p, const uint64_t *next, int64_t words) {
        uint64_t a = 0, b = 0, c = 0, d = 0;
        for (int64_t w = 0; w + 8 <= words; w += 8) {
            if (next) __builtin_prefetch(next + w, 0, 3);
            a ^= p[w] ^ p[w + 4];
            b ^= p[w + 1] ^ p[w + 5];
            c ^= p[w + 2] ^ p[w + 6];
            d ^= p[w + 3] ^ p[w + 7];
        }
        for (int64_t w = words & ~(int64_t)7; w < words; w++) a ^= p[w];
        return a ^ b ^ c ^ d;
    }
    """
    uint64_t fx_fold_run(const uint64_t *p, const uint64_t *next, int64_t words) nogil


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
    cdef int64_t t, e, lo, hi
    cdef uint64_t acc = 0, part
    for t in prange(num_threads, schedule='static', num_threads=num_threads):
        lo = n * t // num_threads
        hi = n * (t + 1) // num_threads
        if starts == NULL:
            part = fx_fold_run(words + lo, NULL, hi - lo)
        else:
            part = 0
            for e in range(lo, hi):
                part = part ^ fx_fold_run(words + starts[e], words + starts[e + 1] if e + 1 < hi else NULL,
                                          run_words)
        acc ^= part
    return acc
