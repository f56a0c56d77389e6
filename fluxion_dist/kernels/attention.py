"""Sparse partial attention on the GPU (launcher for attention.cu).

Oracle: :func:`fluxion_dist.attention.reference.partial_attention`. Follows
KERNEL_API.md: the selected blocks of each (request, KV head) are read where they lie, a
slot of the GPU block cache or the request's page in the arena (device memory, or pinned
host memory through UVA: see :mod:`fluxion_dist.kernels.uva`), and the result is the
unnormalised partial ``(o, m, l)`` that :mod:`fluxion_dist.kernels.merge` combines exactly
with any other partial. Split-K chunk partials are folded by the same merge kernel.
"""

from __future__ import annotations

import math

import cupy as cp
import numpy as np

from fluxion_dist.attention.layout import BLOCK_TOKENS
from fluxion_dist.kernels import loader
from fluxion_dist.kernels.checks import BF16_BITS, expect, expect_aligned, positive_scale
from fluxion_dist.kernels.device import sm_count
from fluxion_dist.kernels.merge import merge_states

_WARPS = 4
# Grid target: one wave. ~190 registers a thread (GROUP 4, d 128) leave room for 2 CTAs per
# SM; measured on the H100 (bench --sweep), one wave beat more, smaller chunks, whose extra
# partials cost more to merge than they gained in parallelism.
_CTAS_PER_SM = 2
_MAX_CHUNK = 256


def chunk_size(rows: int, max_row_blocks: int, sms: int) -> int:
    """List entries per CTA: split long lists until the grid fills the GPU, but give each
    warp at least one block."""
    want = math.ceil(rows * max_row_blocks / (sms * _CTAS_PER_SM))
    return min(_MAX_CHUNK, max(_WARPS, -(-want // _WARPS) * _WARPS))


def num_split_chunks(rows: int, max_row_blocks: int, sms: int) -> tuple[int, int]:
    """``(chunk, num_chunks)`` the launcher picks for this grid."""
    chunk = chunk_size(rows, max_row_blocks, sms)
    return chunk, _num_chunks(max_row_blocks, chunk)


def _num_chunks(max_row_blocks: int, chunk: int) -> int:
    return max(1, -(-max_row_blocks // chunk))


def split_k_parts(num_chunks: int, bsz: int, hq: int, d: int) -> tuple[cp.ndarray, cp.ndarray, cp.ndarray]:
    return (cp.empty((num_chunks, bsz, hq, d), cp.float32), cp.empty((num_chunks, bsz, hq), cp.float32),
            cp.empty((num_chunks, bsz, hq), cp.float32))


def sparse_partial_attention(
    q: cp.ndarray, kv_pages: cp.ndarray, block_tables: cp.ndarray, seq_lens: cp.ndarray,
    sel_indptr: cp.ndarray, sel_blocks: cp.ndarray, *, scale: float, max_row_blocks: int,
    sel_slot: cp.ndarray | None = None, cache_pool: cp.ndarray | None = None,
    chunk: int | None = None,
    out: tuple[cp.ndarray, cp.ndarray, cp.ndarray] | None = None,
    parts: tuple[cp.ndarray, cp.ndarray, cp.ndarray] | None = None,
) -> tuple[cp.ndarray, cp.ndarray, cp.ndarray]:
    """Attention of ``q`` over the selected blocks only, as an unnormalised partial.

    q: float32 [B, Hq, d]; kv_pages: bf16 bits [P, Hkv, 2, 16, d], device memory or a UVA
    view of pinned host memory; block_tables: int32 [B, max_blocks]; seq_lens: int32 [B];
    sel_indptr: int32 [B*Hkv + 1] and sel_blocks: int32 [>= nnz], the CSR lists of logical
    block ids per (request, KV head), e.g. a :class:`~fluxion_dist.kernels.selection.Selection`.
    ``max_row_blocks`` bounds every list's length (host-side: it sizes the split-K grid; a
    longer list would be cut). sel_slot: int32 like sel_blocks, the block's slot in
    ``cache_pool`` (bf16 bits [S, 2, 16, d]) or -1 to read the arena; None reads the arena
    for all. ``chunk`` forces the list entries per CTA (tests).

    Returns ``(o float32 [B, Hq, d], m float32 [B, Hq], l float32 [B, Hq])``; an empty list
    gives ``m = -inf, l = 0, o = 0``. ``out`` may be slices of a stacked partials buffer
    (inner axes contiguous), so GPU and CPU partials merge without a copy. ``parts``: the
    split-K scratch, ``[num_chunks, B, Hq, (d)]`` (:func:`split_k_parts`), for launches that
    must not allocate (CUDA graph capture).
    """
    expect("q", q, np.float32, (None, None, None))
    bsz, hq, d = q.shape
    expect("kv_pages", kv_pages, BF16_BITS, (None, None, 2, BLOCK_TOKENS, d))
    hkv = kv_pages.shape[1]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    expect("block_tables", block_tables, np.int32, (bsz, None))
    expect("seq_lens", seq_lens, np.int32, (bsz,))
    expect("sel_indptr", sel_indptr, np.int32, (bsz * hkv + 1,))
    expect("sel_blocks", sel_blocks, np.int32, (None,))
    if (sel_slot is None) != (cache_pool is None):
        raise ValueError("sel_slot and cache_pool come together (or neither)")
    if sel_slot is not None:
        expect("sel_slot", sel_slot, np.int32, sel_blocks.shape)
        expect("cache_pool", cache_pool, BF16_BITS, (None, 2, BLOCK_TOKENS, d))
        expect_aligned("cache_pool", cache_pool)
    expect_aligned("q", q)
    expect_aligned("kv_pages", kv_pages)
    if max_row_blocks < 0:
        raise ValueError(f"max_row_blocks must be >= 0; got {max_row_blocks}")

    if out is None:
        out = (cp.empty((bsz, hq, d), cp.float32), cp.empty((bsz, hq), cp.float32),
               cp.empty((bsz, hq), cp.float32))
    o, m, l = out
    expect("out o", o, np.float32, (bsz, hq, d))
    expect("out m", m, np.float32, (bsz, hq))
    expect("out l", l, np.float32, (bsz, hq))
    if bsz == 0:
        return o, m, l

    rows = bsz * hkv
    if chunk is None:
        chunk = chunk_size(rows, max_row_blocks, sm_count(q.device.id))
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1; got {chunk}")
    num_chunks = _num_chunks(max_row_blocks, chunk)
    null = np.uint64(0)
    if num_chunks == 1:
        parts = (null, null, null)
    elif parts is None:
        parts = split_k_parts(num_chunks, bsz, hq, d)
    elif parts[0].shape != (num_chunks, bsz, hq, d):
        raise ValueError(f"split-K parts are {parts[0].shape}; this launch needs {(num_chunks, bsz, hq, d)}")
    kernel = loader.get_kernel("attention", "sparse_attention_chunks", HEAD_DIM=d, GROUP=hq // hkv)
    kernel((num_chunks, rows), (_WARPS * 32,), (
        q, kv_pages, cache_pool if cache_pool is not None else null, block_tables, seq_lens,
        sel_indptr, sel_blocks, sel_slot if sel_slot is not None else null,
        o, m, l, *parts,
        np.int32(bsz), np.int32(hkv), np.int32(block_tables.shape[1]), np.int32(chunk),
        np.int32(num_chunks), np.float32(positive_scale(scale) * math.log2(math.e))))
    if num_chunks > 1:
        merge_states(*parts, out=(o, m, l))
    return o, m, l
