"""The decode attention hook over KV pages that live in the host KV store.

For each layer of a decode step it writes the new token's K/V (bf16) into its slot of the
sequence's last page, keeps that page's Quest min/max metadata current, and attends over
the sequence's pages in place with the CPU path's Cython kernel. With policy ``full`` every
block is read; sparse policies plug in through the same hook when the Fluxion operator lands.
"""

from __future__ import annotations

from dataclasses import dataclass

import math

import numpy as np
import torch

from fluxion_dist.attention.layout import BLOCK_TOKENS
from fluxion_dist.cpu.attention import sparse_partial_attention


@dataclass(slots=True)
class PagedSequence:
    """Where one sequence's KV lies in the arena: per layer, its pages in token order."""

    block_tables: list[list[int]]
    seq_len: int  # tokens whose K/V are already in the pages
    prompt_len: int = 0

    def pages_needed(self, tokens: int) -> int:
        return -(-tokens // BLOCK_TOKENS)


def _bf16(x: torch.Tensor) -> np.ndarray:
    return x.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)


class HostKVAttention:
    """An ``AttentionHook`` over a batch of :class:`PagedSequence` in one arena."""

    def __init__(self, pages: np.ndarray, kmin: np.ndarray, kmax: np.ndarray,
                 batch: list[PagedSequence], num_threads: int) -> None:
        if pages.ndim != 5 or pages.dtype != np.uint16 or pages.shape[2:4] != (2, BLOCK_TOKENS):
            raise ValueError(f"arena must be uint16 [P, Hkv, 2, {BLOCK_TOKENS}, d]; got {pages.dtype} {pages.shape}")
        self.pages, self.kmin, self.kmax, self.batch = pages, kmin, kmax, batch
        self.num_threads = num_threads

    def _append(self, layer: int, seq: PagedSequence, k: torch.Tensor, v: torch.Tensor) -> None:
        pos = seq.seq_len
        page = seq.block_tables[layer][pos // BLOCK_TOKENS]
        slot = pos % BLOCK_TOKENS
        kb, vb = _bf16(k), _bf16(v)  # [Hkv, d]
        self.pages[page, :, 0, slot] = kb
        self.pages[page, :, 1, slot] = vb
        kf = torch.from_numpy(kb.view(np.int16)).view(torch.bfloat16)
        if slot == 0:
            self.kmin[page] = kb
            self.kmax[page] = kb
        else:
            lo = torch.from_numpy(self.kmin[page].view(np.int16)).view(torch.bfloat16)
            hi = torch.from_numpy(self.kmax[page].view(np.int16)).view(torch.bfloat16)
            self.kmin[page] = _bf16(torch.minimum(lo, kf))
            self.kmax[page] = _bf16(torch.maximum(hi, kf))

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if q.shape[0] != len(self.batch):
            raise ValueError(f"batch of {q.shape[0]} queries for {len(self.batch)} sequences")
        for b, seq in enumerate(self.batch):
            self._append(layer, seq, k[b], v[b])
        seq_lens = np.array([seq.seq_len + 1 for seq in self.batch], dtype=np.int32)
        nblocks = -(-seq_lens // BLOCK_TOKENS)
        tables = np.zeros((len(self.batch), int(nblocks.max())), dtype=np.int32)
        for b, seq in enumerate(self.batch):
            tables[b, :nblocks[b]] = seq.block_tables[layer][:nblocks[b]]
        # Dense: every block of every (sequence, KV head), read in place by the CPU kernel.
        hkv = self.pages.shape[1]
        rows = np.repeat(nblocks, hkv)
        indptr = np.zeros(rows.size + 1, dtype=np.int32)
        np.cumsum(rows, out=indptr[1:])
        blocks = np.concatenate([np.arange(n, dtype=np.int32) for n in rows])
        qf = q.detach().float().contiguous().numpy()
        part = sparse_partial_attention(qf, self.pages, tables, seq_lens, indptr, blocks,
                                        1.0 / math.sqrt(q.shape[-1]), num_threads=self.num_threads)
        return torch.from_numpy(part.o / part.l[..., None]).to(q.dtype)
