"""Zeroed scratch for kernels whose CTAs coordinate through global memory.

Selection and routing hand work to CTAs in the order they start (a ticket counter), place
their outputs by decoupled look-back (look_back.cuh: a status word per CTA), and end with one
CTA that knows every other is done (an arrival counter): it sets the counters and the status
words back to zero. That saves a second kernel launch but needs zeroed scratch at launch
time. (A last-CTA merge of split-K attention chunks was tried and dropped: one CTA folding
tens of partials is a serial chain of loads, slower than merge.cu's separate, parallel launch.)

The scratch is kept per (device, stream): launches on one stream never overlap, and every
launch leaves its words at zero, so the buffer is always ready for the next launch on
that stream, including replays of a CUDA graph captured on it. Launches on different
streams get different buffers.
"""

from __future__ import annotations

import cupy as cp

_buffers: dict[tuple[int, int], cp.ndarray] = {}
_retired: list[cp.ndarray] = []  # outgrown buffers: a captured graph may still point at one


def stream_counters(count: int) -> cp.ndarray:
    """At least ``count`` zeroed uint32 words for the current device and stream."""
    key = (cp.cuda.runtime.getDevice(), cp.cuda.get_current_stream().ptr)
    buf = _buffers.get(key)
    if buf is None or buf.size < count:
        # Allocated (and zeroed) on the current stream, so it is ordered before the launch.
        if buf is not None:
            _retired.append(buf)
        buf = cp.zeros(max(count, 256, 2 * (buf.size if buf is not None else 0)), cp.uint32)
        _buffers[key] = buf
    return buf


def look_back_scratch(ctas: int, extra_words: int = 0) -> tuple[cp.ndarray, cp.ndarray, cp.ndarray]:
    """Zeroed scratch of a look-back launch of ``ctas`` CTAs: the (ticket, arrivals) counters,
    the CTAs' uint64 status words (8-byte aligned at word 2), and ``extra_words`` int32 more."""
    buf = stream_counters(2 + 2 * ctas + extra_words)
    end = 2 + 2 * ctas
    return buf[:2], buf[2:end].view(cp.uint64), buf[end:end + extra_words].view(cp.int32)
