"""Random paged KV arenas and block selections, for the CPU path's tests and benchmark.

The pages of a batch are scattered through a larger arena in random order (a
non-trivial block table), the way the KV store hands them out. With
``poison=True`` every byte a kernel must not read (spare pages, the padding
after the last token, block-table columns past the sequence) holds NaN bits or
an out-of-range page id, so a kernel that reads them fails the comparison with
the reference instead of passing by luck.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from fluxion_dist.attention.layout import BLOCK_TOKENS, from_bf16_bits, num_blocks
from kv_store.arena import map_anonymous

NAN_BITS = 0x7FC0  # bf16 quiet NaN


@dataclass(frozen=True, slots=True)
class PagedBatch:
    q: np.ndarray  # f32 [B, Hq, d]
    kv_pages: np.ndarray  # u16 [P, Hkv, 2, 16, d] (bf16 bits)
    block_tables: np.ndarray  # i32 [B, max_blocks]
    seq_lens: np.ndarray  # i32 [B]

    def request_kv(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """The bf16 values of request ``b`` as float32 ``k, v [T, Hkv, d]`` (for the reference)."""
        t = int(self.seq_lens[b])
        pages = self.kv_pages[self.block_tables[b, :num_blocks(t)]]  # [nb, Hkv, 2, 16, d]
        kv = from_bf16_bits(pages).transpose(2, 0, 3, 1, 4).reshape(2, -1, *pages.shape[1:2], pages.shape[-1])
        return kv[0, :t].copy(), kv[1, :t].copy()


def page_aligned(n: int, dtype) -> np.ndarray:
    """An uninitialised 1-D array in memory mapped the way the KV store maps its arena
    (:func:`kv_store.arena.map_anonymous`: 4 KiB-aligned, advised for huge pages), so kernels
    and benchmarks read the same kind of memory the service does (numpy's own allocations are
    only 16-byte aligned, so every other 32-byte row load would straddle two cache lines)."""
    itemsize = np.dtype(dtype).itemsize
    return np.frombuffer(map_anonymous(n * itemsize), dtype=np.uint8)[:n * itemsize].view(dtype)


def random_bf16_bits(rng: np.random.Generator, shape: tuple[int, ...], std: float = 1.0,
                     chunk: int = 1 << 24) -> np.ndarray:
    """Gaussian values truncated to bf16, as bits, page-aligned; generated in chunks to bound the
    float32 temporary."""
    out = page_aligned(int(np.prod(shape)), np.uint16)
    for lo in range(0, out.size, chunk):
        x = rng.standard_normal(min(chunk, out.size - lo), dtype=np.float32) * np.float32(std)
        out[lo:lo + x.size] = (x.view(np.uint32) >> 16).astype(np.uint16)
    return out.reshape(shape)


def paged_batch(rng: np.random.Generator, seq_lens: Sequence[int], num_kv_heads: int, group: int,
                head_dim: int, *, spare_pages: int = 0, spare_columns: int = 0,
                poison: bool = True) -> PagedBatch:
    """A batch whose pages lie in random order in an arena with ``spare_pages`` unused pages."""
    lens = np.asarray(seq_lens, dtype=np.int32)
    nbs = [num_blocks(int(t)) for t in lens]
    total = sum(nbs) + spare_pages
    kv = random_bf16_bits(rng, (total, num_kv_heads, 2, BLOCK_TOKENS, head_dim))
    order = rng.permutation(total).astype(np.int32)
    width = max(max(nbs, default=0), 1) + spare_columns
    tables = np.full((len(lens), width), total + 7 if poison else 0, dtype=np.int32)
    used = 0
    for b, nb in enumerate(nbs):
        tables[b, :nb] = order[used:used + nb]
        used += nb
        tail = int(lens[b]) - (nb - 1) * BLOCK_TOKENS
        if poison and nb and tail < BLOCK_TOKENS:
            kv[tables[b, nb - 1], :, :, tail:] = NAN_BITS
    if poison:
        kv[order[used:]] = NAN_BITS
    q = rng.standard_normal((len(lens), num_kv_heads * group, head_dim)).astype(np.float32)
    return PagedBatch(q, kv, tables, lens)


def random_selection(rng: np.random.Generator, seq_lens: np.ndarray, num_kv_heads: int,
                     budget: float | Sequence[str | float]) -> tuple[np.ndarray, np.ndarray]:
    """CSR selection (indptr, blocks), ascending per row ``b*Hkv + kh``.

    ``budget`` is a fraction of each row's blocks (at least one when the row has
    any), or one entry per row: a fraction, or "empty" / "one" / "all".
    """
    rows = len(seq_lens) * num_kv_heads
    spec = [budget] * rows if np.isscalar(budget) else list(budget)
    if len(spec) != rows:
        raise ValueError(f"need one budget per row ({rows}); got {len(spec)}")
    lists = []
    for r, what in enumerate(spec):
        nb = num_blocks(int(seq_lens[r // num_kv_heads]))
        if what == "empty" or nb == 0:
            n = 0
        elif what == "one":
            n = 1
        elif what == "all":
            n = nb
        else:
            n = min(nb, max(1, int(round(float(what) * nb))))
        lists.append(np.sort(rng.choice(nb, size=n, replace=False)).astype(np.int32))
    indptr = np.zeros(rows + 1, dtype=np.int32)
    indptr[1:] = np.cumsum([len(x) for x in lists])
    blocks = np.concatenate(lists) if lists else np.zeros(0, np.int32)
    return indptr, blocks.astype(np.int32)
