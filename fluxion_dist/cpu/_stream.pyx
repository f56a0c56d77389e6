# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The DRAM read ceiling the attention kernel is judged against.

A streaming sum over a buffer far larger than the caches, split into one
contiguous slice per OpenMP thread, is the best case for every prefetcher: no
scattered reads, no arithmetic to hide. The sum is returned so the reads
cannot be optimised away.
"""

from cython.parallel cimport prange
from libc.stdint cimport int64_t, uint64_t


def stream_read(const uint64_t[::1] buf, int num_threads):
    """XOR-fold every word of `buf` using `num_threads` threads; returns the fold."""
    cdef int64_t n = buf.shape[0], t, i, lo, hi
    cdef uint64_t acc = 0, part
    with nogil:
        for t in prange(num_threads, schedule='static', num_threads=num_threads):
            lo = n * t // num_threads
            hi = n * (t + 1) // num_threads
            part = 0
            for i in range(lo, hi):
                part = part ^ buf[i]
            acc ^= part
    return acc
