"""Append one decode token per request (launcher for append.cu).

Oracle: after the append, the cache slot and arena page hold the token at position
``seq_lens[b]``, and the page's ``kmin/kmax`` equal
:func:`fluxion_dist.attention.reference.block_metadata` over the block's tokens so far.
"""

from __future__ import annotations

import cupy as cp
import numpy as np

from fluxion_dist.attention.layout import BLOCK_TOKENS
from fluxion_dist.kernels import loader
from fluxion_dist.kernels.checks import BF16_BITS, expect

_THREADS = 1024  # APPEND_THREADS


def append_kv(k_new: cp.ndarray, v_new: cp.ndarray, seq_lens: cp.ndarray,
              block_tables: cp.ndarray, kmin: cp.ndarray, kmax: cp.ndarray, *,
              slots: cp.ndarray, cache_pool: cp.ndarray | None,
              kv_pages: cp.ndarray | None) -> None:
    """Write the new token of each request and update its block's metadata, in place.

    k_new, v_new: bf16 bits [B, Hkv, d]; seq_lens: int32 [B], incremented by one on the
    device; block_tables: int32 [B, max_blocks], which must already map the block at
    position ``seq_lens[b]``; kmin, kmax: bf16 bits [P, Hkv, d] (device). slots: int32
    [B, Hkv], the cache slot holding that block (-1: not cached); cache_pool: bf16 bits
    [S, 2, 16, d] or None; kv_pages: the arena [P, Hkv, 2, 16, d] (device, or pinned host
    through UVA) or None to leave the arena alone. A block's first token resets its
    metadata, so stale bytes in a recycled page or slot never leak into the box.
    """
    expect("k_new", k_new, BF16_BITS, (None, None, None))
    bsz, hkv, d = k_new.shape
    expect("v_new", v_new, BF16_BITS, (bsz, hkv, d))
    expect("seq_lens", seq_lens, np.int32, (bsz,))
    expect("block_tables", block_tables, np.int32, (bsz, None))
    expect("kmin", kmin, BF16_BITS, (None, hkv, d))
    expect("kmax", kmax, BF16_BITS, kmin.shape)
    expect("slots", slots, np.int32, (bsz, hkv))
    if cache_pool is not None:
        expect("cache_pool", cache_pool, BF16_BITS, (None, 2, BLOCK_TOKENS, d))
    if kv_pages is not None:
        expect("kv_pages", kv_pages, BF16_BITS, (None, hkv, 2, BLOCK_TOKENS, d))
    if bsz == 0:
        return
    null = np.uint64(0)
    loader.get_kernel("append", "append_kv", HEAD_DIM=d)((bsz,), (_THREADS,), (
        k_new, v_new, seq_lens, block_tables, slots,
        cache_pool if cache_pool is not None else null, kv_pages if kv_pages is not None else null,
        kmin, kmax, np.int32(hkv), np.int32(block_tables.shape[1])))
