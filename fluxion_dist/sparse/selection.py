"""What a sparse policy hands the attention kernels: CSR block lists, optionally token masks.

The layout is ``fluxion_dist/attention/KERNEL_API.md``'s: one row per (request, KV
head), row ``b * Hkv + kh``; ``sel_blocks`` holds ascending logical block ids at the
base granularity (16 tokens) whatever granularity the policy reasoned at, so the
kernels never learn about coarse blocks. ``sel_masks`` (optional, one ``uint16`` per
selected block, bit ``i`` = token ``i`` of the block is attended) is the form the
Cython path already takes for AsyncTLS-style token selection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from fluxion_dist.attention.layout import BLOCK_TOKENS, num_blocks
from fluxion_dist.errors import FluxionError

FULL_MASK = np.uint16(0xFFFF)


class SparseInputError(FluxionError, ValueError):
    """A policy was given arrays of the wrong shape or a knob out of range; the message names it."""


@dataclass(frozen=True, slots=True)
class BlockSelection:
    """Selected base blocks per (request, KV head) row, in the kernels' CSR form."""

    sel_indptr: np.ndarray  # int32 [rows + 1]
    sel_blocks: np.ndarray  # int32 [nnz], ascending within a row
    num_kv_heads: int
    sel_masks: np.ndarray | None = None  # uint16 [nnz] token bitmask per selected block; None: whole blocks

    @property
    def num_rows(self) -> int:
        return self.sel_indptr.size - 1

    def row(self, request: int, kv_head: int) -> np.ndarray:
        r = request * self.num_kv_heads + kv_head
        return self.sel_blocks[self.sel_indptr[r]:self.sel_indptr[r + 1]]

    def head_lists(self, request: int = 0) -> list[np.ndarray]:
        """One request's rows as the list ``reference.partial_attention`` takes."""
        return [self.row(request, kh).astype(np.int64) for kh in range(self.num_kv_heads)]

    def blocks_per_row(self) -> np.ndarray:
        return np.diff(self.sel_indptr).astype(np.int64)

    def tokens_per_row(self, num_tokens: int) -> np.ndarray:
        """Tokens each row attends for a request of ``num_tokens`` (masks and the short last block counted)."""
        valid = np.minimum(BLOCK_TOKENS, num_tokens - self.sel_blocks.astype(np.int64) * BLOCK_TOKENS)
        if self.sel_masks is None:
            per = valid
        else:
            bits = np.unpackbits(self.sel_masks.astype("<u2").view(np.uint8).reshape(-1, 2),
                                 axis=1, bitorder="little")
            per = (bits[:, :BLOCK_TOKENS] * (np.arange(BLOCK_TOKENS) < valid[:, None])).sum(axis=1)
        rows = np.repeat(np.arange(self.num_rows), self.blocks_per_row())
        return np.bincount(rows, weights=per, minlength=self.num_rows).astype(np.int64)


def selection_from_mask(mask: np.ndarray) -> BlockSelection:
    """``mask [Hkv, nb]`` bool (one request) -> CSR; row-major nonzero keeps ids ascending."""
    counts = mask.sum(axis=1)
    indptr = np.zeros(mask.shape[0] + 1, dtype=np.int32)
    np.cumsum(counts, out=indptr[1:])
    return BlockSelection(indptr, np.nonzero(mask)[1].astype(np.int32), mask.shape[0])


def concat_selections(parts: Sequence[BlockSelection]) -> BlockSelection:
    """Stack per-request selections into one batch (rows ``b * Hkv + kh``)."""
    if not parts:
        raise SparseInputError("concat_selections needs at least one selection")
    hkv = parts[0].num_kv_heads
    if any(p.num_kv_heads != hkv for p in parts):
        raise SparseInputError(f"selections disagree on KV heads: {[p.num_kv_heads for p in parts]}")
    with_masks = [p.sel_masks is not None for p in parts]
    offsets = np.cumsum([0] + [p.sel_blocks.size for p in parts[:-1]])
    indptr = np.concatenate([[0]] + [p.sel_indptr[1:] + o for p, o in zip(parts, offsets)]).astype(np.int32)
    blocks = np.concatenate([p.sel_blocks for p in parts]).astype(np.int32)
    masks = None
    if any(with_masks):
        masks = np.concatenate([p.sel_masks if p.sel_masks is not None
                                else np.full(p.sel_blocks.size, FULL_MASK) for p in parts])
    return BlockSelection(indptr, blocks, hkv, masks)


def forced_blocks(num_tokens: int, sink_tokens: int, recent_tokens: int) -> np.ndarray:
    """``[nb]`` bool: base blocks always kept, those holding a sink or a recent-window token.

    They stay in the GPU block cache, so keeping them costs no transfer; they count
    against a budget all the same (the budget is a fraction of the KV read).
    """
    if num_tokens < 1 or sink_tokens < 0 or recent_tokens < 0:
        raise SparseInputError(f"need num_tokens >= 1 and non-negative sink/recent tokens; "
                               f"got {num_tokens}, {sink_tokens}, {recent_tokens}")
    nb = num_blocks(num_tokens)
    mask = np.zeros(nb, dtype=bool)
    mask[:num_blocks(min(sink_tokens, num_tokens))] = True
    if recent_tokens:
        mask[max(num_tokens - recent_tokens, 0) // BLOCK_TOKENS:] = True
    return mask


def selected_tokens(selection: BlockSelection, num_tokens: int, request: int = 0) -> list[np.ndarray]:
    """Token ids each KV head of one request attends (masks applied, padding dropped): the oracle's view."""
    out = []
    for kh in range(selection.num_kv_heads):
        r = request * selection.num_kv_heads + kh
        lo, hi = selection.sel_indptr[r], selection.sel_indptr[r + 1]
        tok = selection.sel_blocks[lo:hi].astype(np.int64)[:, None] * BLOCK_TOKENS + np.arange(BLOCK_TOKENS)
        keep = tok < num_tokens
        if selection.sel_masks is not None:
            bits = (selection.sel_masks[lo:hi].astype(np.int64)[:, None] >> np.arange(BLOCK_TOKENS)) & 1
            keep &= bits.astype(bool)
        out.append(tok[keep])
    return out
