"""Build a host arena and paged sequences from dense K/V: tests, the tiny-model runs, the benchmark.

Pages are handed out in shuffled order (a non-trivial block table, as the KV store does)
with room reserved for decode tokens, and each (request, layer) gets pages of its own,
so the block cache's per-layer partitions never see a page twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from fluxion_dist.attention.layout import BLOCK_TOKENS, num_blocks, pack_kv_blocks, to_bf16_bits
from fluxion_dist.hybrid.operator import HostArena


@dataclass(slots=True)
class BuiltSequence:
    """Fits ``operator.PagedSequenceView`` (and mirrors ``decode_worker``'s ``PagedSequence``)."""

    block_tables: list[list[int]]
    seq_len: int


def allocate_arena(num_pages: int, num_kv_heads: int, head_dim: int,
                   *, pinned: np.ndarray | None = None) -> HostArena:
    """An empty arena; ``pinned`` (uint16, at least the arena's size) is used as its memory when given."""
    shape = (num_pages, num_kv_heads, 2, BLOCK_TOKENS, head_dim)
    size = int(np.prod(shape))
    if pinned is None:
        kv = np.zeros(shape, dtype=np.uint16)
    else:
        if pinned.dtype != np.uint16 or pinned.size < size or not pinned.flags.c_contiguous:
            raise ValueError(f"pinned memory must be contiguous uint16 with >= {size} elements")
        kv = pinned.reshape(-1)[:size].reshape(shape)
    meta = (num_pages, num_kv_heads, head_dim)
    return HostArena(kv, np.zeros(meta, np.uint16), np.zeros(meta, np.uint16))


def block_boxes(k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Quest boxes of ``k [T, Hkv, d]`` (float32): per 16-token block the channel-wise min and
    max of its tokens (``reference.block_metadata``, vectorised), ``[nb, Hkv, d]`` each."""
    t = k.shape[0]
    nb = num_blocks(t)
    pad = nb * BLOCK_TOKENS - t
    # +inf / -inf padding never wins a min / max, so the short last block is exact
    lo = np.concatenate([k, np.full((pad,) + k.shape[1:], np.inf, k.dtype)]) if pad else k
    hi = np.concatenate([k, np.full((pad,) + k.shape[1:], -np.inf, k.dtype)]) if pad else k
    shape = (nb, BLOCK_TOKENS) + k.shape[1:]
    return lo.reshape(shape).min(axis=1), hi.reshape(shape).max(axis=1)


def pages_needed(seq_lens: Sequence[int], num_layers: int, reserve_tokens: int) -> int:
    return num_layers * sum(num_blocks(int(t) + reserve_tokens) for t in seq_lens)


def write_layer(arena: HostArena, pages: np.ndarray, k: np.ndarray, v: np.ndarray) -> None:
    """Pack ``k, v [T, Hkv, d]`` (float, rounded to bf16) into ``pages`` and set their Quest boxes."""
    t = k.shape[0]
    nb = num_blocks(t)
    arena.kv_pages[pages[:nb]] = pack_kv_blocks(k, v)
    kb = to_bf16_bits(k).reshape(k.shape)
    kf = (kb.astype(np.uint32) << 16).view(np.float32)
    lo, hi = block_boxes(kf)
    arena.kmin[pages[:nb]] = (lo.view(np.uint32) >> 16).astype(np.uint16)
    arena.kmax[pages[:nb]] = (hi.view(np.uint32) >> 16).astype(np.uint16)


def build_paged(arena: HostArena, kv: Sequence[Sequence[tuple[np.ndarray, np.ndarray]]], *,
                reserve_tokens: int, rng: np.random.Generator) -> list[BuiltSequence]:
    """``kv[b][layer] = (k, v)`` ([T_b, Hkv, d] each) into shuffled pages of ``arena``."""
    num_layers = len(kv[0])
    lens = [kv_b[0][0].shape[0] for kv_b in kv]
    need = pages_needed(lens, num_layers, reserve_tokens)
    if need > arena.kv_pages.shape[0]:
        raise ValueError(f"the arena has {arena.kv_pages.shape[0]} pages; these sequences need {need}")
    order = rng.permutation(arena.kv_pages.shape[0])[:need]
    at = 0
    out = []
    for b, kv_b in enumerate(kv):
        n = num_blocks(lens[b] + reserve_tokens)
        tables = []
        for layer, (k, v) in enumerate(kv_b):
            pages = order[at:at + n].astype(np.int64)
            at += n
            write_layer(arena, pages, k, v)
            tables.append([int(p) for p in pages])
        out.append(BuiltSequence(tables, lens[b]))
    return out
