"""Shared pieces of the gpu-marked tests: the skip, fresh inputs, and a paged KV batch.

Inputs are drawn fresh for every check from an OS-random seed, which every failure message
carries so it can be replayed. Memory that a kernel must not touch (padding past a sequence
end, pages and table entries no request owns) is filled with NaN or out-of-range values, so
a stray read shows up as a wrong answer or a fault, never as a silent pass.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pytest

from fluxion_dist.attention import reference
from fluxion_dist.attention.layout import BLOCK_TOKENS, from_bf16_bits, num_blocks, to_bf16_bits
from fluxion_dist.kernels.device import gpu_unavailable_reason

AWKWARD_SEQ_LENS = (1, 15, 17, 1000, 1333)
BF16_NAN = 0x7FC0
UNMAPPED_PAGE = 1 << 30  # a block-table entry no request owns: reading it faults


def skip_unless_gpu() -> None:
    """Skip the calling test module (at import) unless CuPy can run kernels here."""
    reason = gpu_unavailable_reason()
    if reason is not None:
        pytest.skip(f"needs a CUDA device and CuPy: {reason}", allow_module_level=True)


def fresh_rng() -> tuple[np.random.Generator, int]:
    seed = int.from_bytes(os.urandom(4), "little")
    return np.random.default_rng(seed), seed


def bf16_round(x: np.ndarray) -> np.ndarray:
    """x rounded to bf16, as float32 (the values the kernels see)."""
    return from_bf16_bits(to_bf16_bits(x)).reshape(x.shape)


@dataclass(slots=True)
class PagedBatch:
    """A batch of requests' KV for one layer in the arena layout, plus its references."""

    k: list[np.ndarray]            # per request [T, Hkv, d], bf16-exact float32
    v: list[np.ndarray]
    kv_pages: np.ndarray           # uint16 [P, Hkv, 2, 16, d]
    block_tables: np.ndarray       # int32 [B, max_blocks]
    seq_lens: np.ndarray           # int32 [B]
    kmin: np.ndarray               # uint16 [P, Hkv, d]
    kmax: np.ndarray

    @property
    def num_kv_heads(self) -> int:
        return self.kv_pages.shape[1]

    def blocks(self, b: int) -> int:
        return num_blocks(int(self.seq_lens[b]))

    def pages(self, b: int) -> np.ndarray:
        return self.block_tables[b, : self.blocks(b)]


def make_paged_batch(rng: np.random.Generator, seq_lens, hkv: int, d: int,
                     spare_pages: int = 3, spare_blocks: int = 2) -> PagedBatch:
    """Requests scattered over a shuffled page pool; padding and spare pages are NaN."""
    seq_lens = np.asarray(seq_lens, dtype=np.int32)
    nbs = [num_blocks(int(t)) for t in seq_lens]
    total = sum(nbs) + spare_pages
    perm = rng.permutation(total).astype(np.int32)
    kv_pages = np.full((total, hkv, 2, BLOCK_TOKENS, d), BF16_NAN, dtype=np.uint16)
    kmin = np.full((total, hkv, d), BF16_NAN, dtype=np.uint16)
    kmax = np.full_like(kmin, BF16_NAN)
    block_tables = np.full((len(seq_lens), max(nbs) + spare_blocks), UNMAPPED_PAGE, dtype=np.int32)
    ks, vs = [], []
    at = 0
    for b, (t, nb) in enumerate(zip(seq_lens, nbs)):
        k = bf16_round(rng.standard_normal((t, hkv, d)).astype(np.float32))
        v = bf16_round(rng.standard_normal((t, hkv, d)).astype(np.float32))
        pages = perm[at: at + nb]
        at += nb
        block_tables[b, :nb] = pages
        packed = np.full((nb * BLOCK_TOKENS, hkv, 2, d), BF16_NAN, dtype=np.uint16)
        packed[:t, :, 0] = to_bf16_bits(k).reshape(t, hkv, d)
        packed[:t, :, 1] = to_bf16_bits(v).reshape(t, hkv, d)
        kv_pages[pages] = packed.reshape(nb, BLOCK_TOKENS, hkv, 2, d).transpose(0, 2, 3, 1, 4)
        lo, hi = reference.block_metadata(k)
        kmin[pages] = to_bf16_bits(lo).reshape(nb, hkv, d)
        kmax[pages] = to_bf16_bits(hi).reshape(nb, hkv, d)
        ks.append(k)
        vs.append(v)
    return PagedBatch(ks, vs, kv_pages, block_tables, seq_lens, kmin, kmax)


def expand_blocks(ids: np.ndarray, factor: int, nb: int) -> np.ndarray:
    """Coarse ids -> the base block ids they cover (clipped to the request's nb blocks)."""
    out = [np.arange(i * factor, min((i + 1) * factor, nb)) for i in np.asarray(ids, dtype=np.int64)]
    return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)


def csr_rows(indptr: np.ndarray, blocks: np.ndarray) -> list[np.ndarray]:
    """Host copy of a CSR selection, checked well-formed (monotone, rows ascending)."""
    assert indptr[0] == 0 and np.all(np.diff(indptr) >= 0), f"bad indptr {indptr}"
    assert indptr[-1] <= blocks.size, f"indptr[-1]={indptr[-1]} past capacity {blocks.size}"
    rows = [blocks[indptr[r]: indptr[r + 1]].astype(np.int64) for r in range(indptr.size - 1)]
    for r, row in enumerate(rows):
        assert np.all(np.diff(row) > 0), f"row {r} not strictly ascending: {row}"
    return rows


def rel_err(x: np.ndarray, ref: np.ndarray) -> float:
    """||x - ref|| / ||ref||; NaN anywhere fails."""
    x = np.asarray(x, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if not np.all(np.isfinite(x)):
        return float("inf")
    den = np.linalg.norm(ref)
    return float(np.linalg.norm(x - ref) / (den if den > 0 else 1.0))
