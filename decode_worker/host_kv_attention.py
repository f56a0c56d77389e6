"""The decode attention hook over KV pages that live in the host KV store.

For each layer of a decode step it writes the new token's K/V (bf16) into its slot of the
sequence's last page, keeps that page's Quest min/max metadata current, and attends over
the sequence's pages in place. With policy ``full`` every block is read; sparse policies
plug in through the same hook when the Fluxion operator lands.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fluxion_dist.attention.layout import BLOCK_TOKENS


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


def _pages_to_kv(pages: np.ndarray, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[nb, Hkv, 2, 16, d]`` bf16 bits -> fp32 ``k, v [Hkv, n, d]``."""
    t = torch.from_numpy(pages.view(np.int16)).view(torch.bfloat16).float()
    nb, hkv, _, bt, d = t.shape
    kv = t.permute(2, 1, 0, 3, 4).reshape(2, hkv, nb * bt, d)[:, :, :n]
    return kv[0], kv[1]


class HostKVAttention:
    """An ``AttentionHook`` over a batch of :class:`PagedSequence` in one arena."""

    def __init__(self, pages: np.ndarray, kmin: np.ndarray, kmax: np.ndarray,
                 batch: list[PagedSequence]) -> None:
        if pages.ndim != 5 or pages.dtype != np.uint16 or pages.shape[2:4] != (2, BLOCK_TOKENS):
            raise ValueError(f"arena must be uint16 [P, Hkv, 2, {BLOCK_TOKENS}, d]; got {pages.dtype} {pages.shape}")
        self.pages, self.kmin, self.kmax, self.batch = pages, kmin, kmax, batch

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
        outs = []
        for b, seq in enumerate(self.batch):
            self._append(layer, seq, k[b], v[b])
            n = seq.seq_len + 1
            table = seq.block_tables[layer][:seq.pages_needed(n)]
            kk, vv = _pages_to_kv(self.pages[table], n)
            g = q.shape[1] // kk.shape[0]
            o = F.scaled_dot_product_attention(
                q[b].float()[:, None], kk.repeat_interleave(g, 0), vv.repeat_interleave(g, 0))
            outs.append(o[:, 0])
        return torch.stack(outs).to(q.dtype)
