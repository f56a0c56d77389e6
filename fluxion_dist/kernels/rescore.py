"""The rescoring stage on the GPU (launchers for rescore.cu): exact scores of candidate blocks.

Oracle: :func:`fluxion_dist.attention.reference.block_lse` and
:func:`~fluxion_dist.attention.reference.candidate_shares`; NumPy twin:
:func:`fluxion_dist.policy.select.candidate_lse` and
:func:`~fluxion_dist.policy.select.candidate_scores`. The candidates are a top-k CSR
(:func:`fluxion_dist.kernels.selection.select_topk` at ``ceil(c x k)`` per row over the forced
Quest scores); top-k at k over :func:`candidate_scores`' output then picks the kept blocks and
the candidates with the most exact mass. Both launches read only device-side counts, so a CUDA
graph captures them.
"""

from __future__ import annotations

import math

import cupy as cp
import numpy as np

from fluxion_dist.attention.layout import BLOCK_TOKENS
from fluxion_dist.kernels import loader
from fluxion_dist.kernels.checks import BF16_BITS, expect, expect_aligned, positive_scale

_LSE_THREADS = 128  # LSE_THREADS in rescore.cu
_TILE = 16  # LSE_TILE in rescore.cu: candidate entries per CTA
_SCORE_THREADS = 256  # SCORE_THREADS in rescore.cu


def candidate_lse(q: cp.ndarray, kv_pages: cp.ndarray, block_tables: cp.ndarray, seq_lens: cp.ndarray,
                  cand_indptr: cp.ndarray, cand_blocks: cp.ndarray, *, scale: float, max_row_blocks: int,
                  slot_of: cp.ndarray | None = None, cache_pool: cp.ndarray | None = None,
                  out: cp.ndarray | None = None) -> cp.ndarray:
    """``float32 [>= nnz, G]``: per candidate entry and query head of its group, the block's
    log-sum-exp of ``q.k * scale`` over its tokens.

    q float32 [B, Hq, d]; kv_pages bf16 bits [P, Hkv, 2, 16, d] (device memory or a UVA view
    of pinned host memory); block_tables int32 [B, W]; seq_lens int32 [B] (the new token
    included); cand_indptr int32 [B*Hkv + 1], cand_blocks int32 [>= nnz] (logical ids); no row
    longer than ``max_row_blocks`` (host-side: it sizes the grid). With ``slot_of`` (int32
    [P * Hkv], the block cache's map) and ``cache_pool`` (bf16 bits [S, 2, 16, d]) a cached
    block is read from its slot. ``out``: preallocated, e.g. ``[B*Hkv*max_row_blocks, G]``."""
    expect("q", q, np.float32, (None, None, None))
    bsz, hq, d = q.shape
    expect("kv_pages", kv_pages, BF16_BITS, (None, None, 2, BLOCK_TOKENS, d))
    hkv = kv_pages.shape[1]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    g = hq // hkv
    expect("block_tables", block_tables, np.int32, (bsz, None))
    expect("seq_lens", seq_lens, np.int32, (bsz,))
    expect("cand_indptr", cand_indptr, np.int32, (bsz * hkv + 1,))
    expect("cand_blocks", cand_blocks, np.int32, (None,))
    if (slot_of is None) != (cache_pool is None):
        raise ValueError("slot_of and cache_pool come together (or neither)")
    if slot_of is not None:
        expect("slot_of", slot_of, np.int32, (kv_pages.shape[0] * hkv,))
        expect("cache_pool", cache_pool, BF16_BITS, (None, 2, BLOCK_TOKENS, d))
        expect_aligned("cache_pool", cache_pool)
    expect_aligned("q", q)
    expect_aligned("kv_pages", kv_pages)
    if max_row_blocks < 0:
        raise ValueError(f"max_row_blocks must be >= 0; got {max_row_blocks}")
    rows = bsz * hkv
    if out is None:
        out = cp.empty((max(rows * max_row_blocks, 1), g), cp.float32)
    expect("out", out, np.float32, (None, g))
    if out.shape[0] < rows * max_row_blocks:
        raise ValueError(f"out has {out.shape[0]} entries; {rows} rows of up to {max_row_blocks} need "
                         f"{rows * max_row_blocks}")
    tiles = -(-max_row_blocks // _TILE)
    if rows == 0 or tiles == 0:
        return out
    null = np.uint64(0)
    kernel = loader.get_kernel("rescore", "candidate_lse", HEAD_DIM=d, GROUP=g)
    kernel((tiles, rows), (_LSE_THREADS,), (
        q, kv_pages, cache_pool if cache_pool is not None else null, slot_of if slot_of is not None else null,
        block_tables, seq_lens, cand_indptr, cand_blocks, out,
        np.int32(hkv), np.int32(block_tables.shape[1]), np.float32(positive_scale(scale) * math.log2(math.e))))
    return out


def candidate_scores(lse: cp.ndarray, cand_indptr: cp.ndarray, cand_blocks: cp.ndarray, seq_lens: cp.ndarray,
                     out: cp.ndarray, *, sink_blocks: int, recent_blocks: int, head_dim: int) -> cp.ndarray:
    """Into ``out`` (float32 [B, H, W], every entry written): each candidate's share of its
    group's candidate mass, kept blocks ``FORCED_SCORE``, every other block -inf. ``lse``
    float32 [>= nnz, G] from :func:`candidate_lse`; one CTA per row. ``head_dim``: q's, only to
    reuse candidate_lse's compiled module (rescore.cu is built per HEAD_DIM and GROUP)."""
    expect("out", out, np.float32, (None, None, None))
    bsz, heads, width = out.shape
    expect("lse", lse, np.float32, (None, None))
    expect("cand_indptr", cand_indptr, np.int32, (bsz * heads + 1,))
    expect("cand_blocks", cand_blocks, np.int32, (None,))
    expect("seq_lens", seq_lens, np.int32, (bsz,))
    if sink_blocks < 0 or recent_blocks < 0:
        raise ValueError(f"sink_blocks and recent_blocks must be >= 0; got {sink_blocks}, {recent_blocks}")
    if bsz * heads == 0:
        return out
    kernel = loader.get_kernel("rescore", "candidate_scores", HEAD_DIM=head_dim, GROUP=lse.shape[1])
    kernel((bsz * heads,), (_SCORE_THREADS,), (
        lse, cand_indptr, cand_blocks, seq_lens, out, np.int32(heads), np.int32(width), np.int32(sink_blocks),
        np.int32(recent_blocks)))
    return out
