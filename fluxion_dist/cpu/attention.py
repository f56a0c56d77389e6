"""Sparse partial attention on the CPU, read in place from the paged bf16 KV arena.

The CPU half of the hybrid step: for each (request, KV head) row, attention of
the GQA group's query heads over that row's selected blocks, returned as the
merge contract's unnormalised partial (KERNEL_API.md, reference.Partial), so it
merges exactly with the GPU's partial over the other blocks.

The kernel (``_attention.pyx`` + ``block_attention.h``) runs with the GIL
released from start to finish and splits the blocks over ``num_threads``
OpenMP threads in balanced chunks; this module only checks arguments.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from fluxion_dist.cpu import _attention, _checks
from fluxion_dist.cpu._checks import Isa

CHUNKS_PER_THREAD = 4
"""Chunks per thread: enough slack for dynamic scheduling to even out threads
slowed by other work on the machine, few enough that merges stay negligible."""

PREFETCH_BLOCKS = 1
"""Software prefetch distance in blocks: the next block's 8 KiB is requested
while this one computes (each block starts two cold 4 KiB hardware streams)."""


class BatchPartial(NamedTuple):
    o: np.ndarray  # f32 [B, Hq, d] unnormalised
    m: np.ndarray  # f32 [B, Hq] running max of the scaled scores (natural log units)
    l: np.ndarray  # f32 [B, Hq] sum of exp(score - m)


def sparse_partial_attention(q: np.ndarray, kv_pages: np.ndarray, block_tables: np.ndarray,
                             seq_lens: np.ndarray, sel_indptr: np.ndarray, sel_blocks: np.ndarray,
                             scale: float, *, num_threads: int, sel_masks: np.ndarray | None = None,
                             isa: Isa = "auto", prefetch: int = PREFETCH_BLOCKS,
                             chunks_per_thread: int = CHUNKS_PER_THREAD) -> BatchPartial:
    """Partial attention of ``q [B, Hq, d]`` (f32) over the selected blocks of each (request, KV head).

    ``kv_pages [P, Hkv, 2, 16, d]`` (bf16 bits as uint16), ``block_tables [B, max_blocks]``,
    ``seq_lens [B]``, and the CSR selection ``sel_indptr [B*Hkv + 1]`` / ``sel_blocks [nnz]``
    (logical block ids, row ``b*Hkv + kh``) follow KERNEL_API.md. ``sel_masks [nnz]`` (uint16),
    when given, keeps only the tokens whose bit is set in each selected block (the token level of
    hierarchical selection); unselected tokens are not read. An empty row gives ``m=-inf, l=0,
    o=0``. ``isa="auto"`` runs the widest body the CPU has and head_dim fits (AVX-512F for
    d % 32 == 0, AVX2+FMA for d % 16 == 0, else portable C); naming one forces it (tests,
    benchmark). ``prefetch`` and ``chunks_per_thread`` are tuning knobs for the benchmark.
    """
    dims = _checks.arena(q, kv_pages, block_tables, seq_lens)
    rows = dims.batch * dims.num_kv_heads
    _checks.selection(sel_indptr, sel_blocks, rows)
    if sel_masks is not None:
        _checks.contiguous("sel_masks", _checks.array("sel_masks", sel_masks, np.uint16, 1))
        _checks.shape("sel_masks", sel_masks, sel_blocks.shape)
    scale = _checks.finite_scale(scale)
    num_threads = _checks.positive_int("num_threads", num_threads)
    chunks_per_thread = _checks.positive_int("chunks_per_thread", chunks_per_thread)
    if not isinstance(prefetch, int) or prefetch < 0:
        raise ValueError(f"prefetch must be a non-negative integer; got {prefetch!r}")
    isa_code = _checks.resolve_isa(isa, dims.head_dim)

    o = np.empty((dims.batch, dims.num_q_heads, dims.head_dim), dtype=np.float32)
    m = np.empty((dims.batch, dims.num_q_heads), dtype=np.float32)
    l = np.empty((dims.batch, dims.num_q_heads), dtype=np.float32)
    bad = _attention.sparse_partial_attention(
        q, kv_pages, block_tables, seq_lens, sel_indptr, sel_blocks, sel_masks, scale,
        num_threads, isa_code, prefetch, chunks_per_thread, o, m, l)
    if bad >= 0:
        raise _checks.bad_block(sel_indptr, sel_blocks, bad, dims, block_tables, seq_lens)
    return BatchPartial(o, m, l)
