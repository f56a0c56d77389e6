"""Top-k / top-p block selection on the GPU (launcher for selection.cu).

Oracle: :func:`fluxion_dist.attention.reference.select_topk` and
:func:`~fluxion_dist.attention.reference.select_topp`, per row of a score tensor. The result
is the CSR selection of KERNEL_API.md in base-block ids, ready for
:func:`fluxion_dist.kernels.attention.sparse_partial_attention`. One launch, no host round
trip: the counts of top-p rows are known only on the device, so the CSR arrays are sized by
a host-side bound and ``indptr[-1]`` tells the real length.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import cupy as cp
import numpy as np

from fluxion_dist.kernels import loader
from fluxion_dist.kernels.checks import expect
from fluxion_dist.kernels.counters import look_back_scratch

_SELECT_THREADS = 1024
_MAX_DYNAMIC_SMEM = 188 * 1024  # under the 227 KiB an sm_90 CTA may have, beside ~29 KiB static


@dataclass(frozen=True, slots=True)
class Selection:
    """Per (request, head) sorted lists of logical base-block ids, CSR."""

    indptr: cp.ndarray
    """int32 [R + 1]; row ``r = b * H + h``."""
    blocks: cp.ndarray
    """int32 [capacity]; entries past ``indptr[-1]`` are unused."""
    max_row_blocks: int
    """Host-known bound on any row's length: it sizes the split-K grid of the attention."""


@dataclass(frozen=True, slots=True)
class SelectBuffers:
    """Preallocated outputs and scratch of one selection launch (a CUDA graph replays into
    the same memory): see :func:`select_buffers`."""

    indptr: cp.ndarray  # int32 [R + 1]
    blocks: cp.ndarray  # int32 [R * cap]


def select_buffers(rows: int, row_bound: int) -> SelectBuffers:
    """Buffers for ``rows`` rows of at most ``row_bound`` base blocks each."""
    cap = max(row_bound, 1)
    return SelectBuffers(cp.empty((rows + 1,), cp.int32), cp.empty((rows * cap,), cp.int32))


def select_topk(scores: cp.ndarray, seq_lens: cp.ndarray, k: int | cp.ndarray, *,
                factor: int = 1, max_k: int | None = None, buffers: SelectBuffers | None = None) -> Selection:
    """Per row of ``scores`` (float32 [B, H, n], at ``factor`` x 16 tokens), the ``k``
    highest-scoring entries (ties to the lower id), expanded to base blocks.

    ``k`` is one int for all rows or int32 [B, H] on the device (per-head budgets), then
    ``max_k``, a host-known bound on it, sizes the lists (default: n). A row only
    considers its request's own entries (from ``seq_lens``); k above that takes all.
    """
    bsz, heads, n = _check(scores, seq_lens, factor)
    if isinstance(k, cp.ndarray):
        expect("k", k, np.int32, (bsz, heads))
        k_rows, k_all = k, 0
        bound = n if max_k is None else max(0, min(int(max_k), n))
    else:
        k_rows, k_all, bound = None, int(k), max(0, min(int(k), n))
    return _select(scores, seq_lens, factor, by_mass=False, k_rows=k_rows, k_all=k_all,
                   p_rows=None, p_all=0.0, row_bound=bound * factor, buffers=buffers)


def select_topp(scores: cp.ndarray, seq_lens: cp.ndarray, p: float | cp.ndarray, *,
                factor: int = 1, buffers: SelectBuffers | None = None) -> Selection:
    """Per row, the fewest highest-scoring entries whose estimated softmax mass (softmax of
    the scores over the row's own entries) reaches ``p``, expanded to base blocks.

    ``p`` is one float in (0, 1] or float32 [B, H] on the device.
    """
    bsz, heads, n = _check(scores, seq_lens, factor)
    if isinstance(p, cp.ndarray):
        expect("p", p, np.float32, (bsz, heads))
        p_rows, p_all = p, 0.0
    else:
        if not 0.0 < p <= 1.0:
            raise ValueError(f"top-p mass must be in (0, 1]; got {p}")
        p_rows, p_all = None, float(p)
    return _select(scores, seq_lens, factor, by_mass=True, k_rows=None, k_all=0,
                   p_rows=p_rows, p_all=p_all, row_bound=n * factor, buffers=buffers)


@functools.cache
def _kernel(by_mass: bool) -> cp.RawKernel:
    kernel = loader.get_kernel("selection", "select_blocks", SELECT_THREADS=_SELECT_THREADS, BY_MASS=int(by_mass))
    # its static shared memory (~13 KiB top-k, ~29 KiB top-p) plus a row's keys pass the default
    # 48 KiB: opt in once
    kernel.max_dynamic_shared_size_bytes = _MAX_DYNAMIC_SMEM
    return kernel


def _check(scores: cp.ndarray, seq_lens: cp.ndarray, factor: int) -> tuple[int, int, int]:
    expect("scores", scores, np.float32, (None, None, None))
    expect("seq_lens", seq_lens, np.int32, (scores.shape[0],))
    if factor < 1:
        raise ValueError(f"factor must be >= 1; got {factor}")
    return scores.shape


def _select(scores: cp.ndarray, seq_lens: cp.ndarray, factor: int, *, by_mass: bool,
            k_rows: cp.ndarray | None, k_all: int, p_rows: cp.ndarray | None, p_all: float,
            row_bound: int, buffers: SelectBuffers | None) -> Selection:
    bsz, heads, n = scores.shape
    rows = bsz * heads
    cap = max(row_bound, 1)  # zero-size buffers have a null pointer
    if buffers is None:
        buffers = select_buffers(rows, row_bound)
    if buffers.blocks.shape != (rows * cap,) or buffers.indptr.shape != (rows + 1,):
        raise ValueError(f"selection buffers are for {buffers.indptr.shape[0] - 1} rows and {buffers.blocks.shape[0]} "
                         f"blocks; this launch needs {rows} rows x {cap}")
    indptr, blocks = buffers.indptr, buffers.blocks
    if rows == 0:
        indptr.fill(0)
        return Selection(indptr, blocks, row_bound)
    smem = 4 * max(n, 1)  # a row's keys
    if smem > _MAX_DYNAMIC_SMEM:
        raise ValueError(f"selection keeps a row's {n} scores in shared memory: {smem} bytes is over "
                         f"{_MAX_DYNAMIC_SMEM}; select at a coarser factor")
    kernel = _kernel(by_mass)
    counters, status, _ = look_back_scratch(rows)
    null = np.uint64(0)
    kernel((rows,), (_SELECT_THREADS,), (
        scores, np.int32(heads), np.int32(n), seq_lens, np.int32(factor),
        k_rows if k_rows is not None else null, np.int32(k_all),
        p_rows if p_rows is not None else null, np.float32(p_all),
        np.int32(cap), status, indptr, blocks, counters), shared_mem=smem)
    return Selection(indptr, blocks, row_bound)
