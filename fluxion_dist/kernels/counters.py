"""Arrival counters for kernels whose last CTA finishes the job ("last block" reduction).

A selection launch hands rows to CTAs in the order they start (a ticket counter) and ends
with one CTA that knows every other is done: each CTA bumps a counter when it finishes, and
the one that brings it to the grid's count resets the launch's scratch and sets the counters
back to zero. That saves a second kernel launch but needs zeroed counters at launch time. (A last-CTA merge of
split-K attention chunks was tried and dropped: one CTA folding tens of partials is a
serial chain of loads, slower than merge.cu's separate, parallel launch.)

Counters are kept per (device, stream): launches on one stream never overlap, and every
launch leaves its counters at zero, so the buffer is always ready for the next launch on
that stream, including replays of a CUDA graph captured on it. Launches on different
streams get different buffers.
"""

from __future__ import annotations

import cupy as cp

_buffers: dict[tuple[int, int], cp.ndarray] = {}
_retired: list[cp.ndarray] = []  # outgrown buffers: a captured graph may still point at one


def stream_counters(count: int) -> cp.ndarray:
    """At least ``count`` zeroed uint32 counters for the current device and stream."""
    key = (cp.cuda.runtime.getDevice(), cp.cuda.get_current_stream().ptr)
    buf = _buffers.get(key)
    if buf is None or buf.size < count:
        # Allocated (and zeroed) on the current stream, so it is ordered before the launch.
        if buf is not None:
            _retired.append(buf)
        buf = cp.zeros(max(count, 256, 2 * (buf.size if buf is not None else 0)), cp.uint32)
        _buffers[key] = buf
    return buf
