"""Argument checks for the CPU kernels: the contract of KERNEL_API.md, enforced before any C runs.

The Cython kernels index raw pointers with bounds checks off, so every shape,
dtype and stride they rely on is checked here, with a message that names the
argument. Only O(rows) work happens here; per-block checks (block id inside
the sequence, page inside the arena) run inside the kernels, in parallel.
"""

from __future__ import annotations

import functools
import math
from typing import Literal, NamedTuple

import numpy as np

from fluxion_dist.attention.layout import BLOCK_TOKENS
from fluxion_dist.cpu import _attention

Isa = Literal["auto", "avx512", "avx2", "scalar"]
ISAS = ("auto", "avx512", "avx2", "scalar")
ISA_CODES = {"scalar": 0, "avx2": 1, "avx512": 2}
ISA_HEAD_DIM = {"scalar": 1, "avx2": 16, "avx512": 32}  # head_dim must be a multiple of this
AUTO_ORDER = ("avx512", "avx2", "scalar")  # widest first


class ArenaDims(NamedTuple):
    batch: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    num_pages: int
    max_blocks: int


def array(name: str, x, dtype, ndim: int) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray; got {type(x).__name__}")
    if x.dtype.type is not dtype:
        hint = " (bf16 tensors: .view(torch.int16).numpy().view(numpy.uint16))" if dtype is np.uint16 else ""
        raise TypeError(f"{name} must have dtype {np.dtype(dtype).name}; got {x.dtype}{hint}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions; got shape {x.shape}")
    return x


def contiguous(name: str, x: np.ndarray) -> np.ndarray:
    if not x.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous; got strides {x.strides} for shape {x.shape}")
    return x


def shape(name: str, x: np.ndarray, expected: tuple[int, ...]) -> None:
    if x.shape != expected:
        raise ValueError(f"{name} must have shape {expected}; got {x.shape}")


def positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")
    return int(value)


def finite_scale(scale) -> float:
    scale = float(scale)
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a finite positive number; got {scale}")
    return scale


@functools.cache
def _runnable() -> tuple[str, ...]:
    return AUTO_ORDER[AUTO_ORDER.index(_attention.cpu_isa()):]


@functools.cache  # per call on the decode path; a raise is not cached
def resolve_isa(isa: Isa, head_dim: int) -> int:
    """The kernel body to run, as the C code's ISA number. "auto" takes the widest one this CPU
    runs whose vector fits head_dim; a named one must be runnable, or this raises."""
    if isa not in ISAS:
        raise ValueError(f"isa must be one of {ISAS}; got {isa!r}")
    have = _runnable()
    fits = [name for name in have if head_dim % ISA_HEAD_DIM[name] == 0]
    if isa == "auto":
        return ISA_CODES[fits[0]]
    if isa not in fits:
        raise ValueError(f"isa={isa!r} needs a CPU with it (this one runs {have}) and head_dim a "
                         f"multiple of {ISA_HEAD_DIM[isa]} (got {head_dim})")
    return ISA_CODES[isa]


def arena(q, kv_pages, block_tables, seq_lens) -> ArenaDims:
    """q [B, Hq, d] f32; kv_pages [P, Hkv, 2, 16, d] u16 (pages may be strided, their insides not);
    block_tables [B, max_blocks] i32 (rows may be strided); seq_lens [B] i32 (values: in C)."""
    contiguous("q", array("q", q, np.float32, 3))
    array("kv_pages", kv_pages, np.uint16, 5)
    b, hq, d = q.shape
    _page_layout(kv_pages.shape, kv_pages.strides, d)
    p, hkv = kv_pages.shape[:2]
    if b < 1 or hkv < 1 or d < 1 or hq % hkv:
        raise ValueError(f"need B >= 1, d >= 1 and query heads ({hq}) a multiple of KV heads ({hkv})")
    max_blocks = tables(block_tables, seq_lens, b)
    return ArenaDims(b, hq, hkv, d, p, max_blocks)


@functools.lru_cache(maxsize=64)  # the decode path passes the same arena every layer
def _page_layout(shape: tuple[int, ...], strides: tuple[int, ...], d: int) -> None:
    p, hkv, two, bt, kd = shape
    if (two, bt, kd) != (2, BLOCK_TOKENS, d):
        raise ValueError(f"kv_pages must be [P, Hkv, 2, {BLOCK_TOKENS}, d={d}]; got {shape}")
    inner = (2 * BLOCK_TOKENS * d * 2, BLOCK_TOKENS * d * 2, d * 2, 2)
    # A dimension of size 1 is never stepped over, so its stride may be anything.
    bad_inner = any(n > 1 and s != want for n, s, want in zip(shape[1:], strides[1:], inner))
    page = strides[0]
    if bad_inner or (p > 1 and (page % 2 or abs(page) < hkv * inner[0])):
        raise ValueError(f"kv_pages pages must each be contiguous (strides (>= {hkv * inner[0]},) + {inner}); "
                         f"got {strides}")


def tables(block_tables, seq_lens, b: int) -> int:
    """block_tables [B, max_blocks] i32 (rows may be strided), seq_lens [B] i32; returns max_blocks.

    Structure only: the kernels check the lengths' values in C (see seq_len_values)."""
    array("block_tables", block_tables, np.int32, 2)
    if block_tables.shape[0] != b or (block_tables.shape[1] > 1 and block_tables.strides[1] != 4):
        raise ValueError(f"block_tables must be [B={b}, max_blocks] with contiguous rows; "
                         f"got shape {block_tables.shape}, strides {block_tables.strides}")
    contiguous("seq_lens", array("seq_lens", seq_lens, np.int32, 1))
    shape("seq_lens", seq_lens, (b,))
    return block_tables.shape[1]


def seq_len_values(seq_lens: np.ndarray, max_blocks: int) -> None:
    lo, hi = int(seq_lens.min()), int(seq_lens.max())
    if lo < 0 or hi > max_blocks * BLOCK_TOKENS:
        raise ValueError(f"seq_lens must lie in [0, {max_blocks * BLOCK_TOKENS}] (block_tables has "
                         f"{max_blocks} columns); got {lo}..{hi}")


def csr(name: str, indptr, rows: int, nnz: int, *, values: bool = True) -> None:
    """indptr [rows + 1] i32, rising from 0 to nnz (``values=False``: the kernel checks that)."""
    contiguous(f"{name}_indptr", array(f"{name}_indptr", indptr, np.int32, 1))
    shape(f"{name}_indptr", indptr, (rows + 1,))
    if values and (indptr[0] != 0 or indptr[-1] != nnz or (indptr[1:] < indptr[:-1]).any()):
        raise ValueError(f"{name}_indptr must rise from 0 to {nnz}; got first {indptr[0]}, last {indptr[-1]}")


def selection(sel_indptr, sel_blocks, rows: int) -> None:
    """The CSR selection: sel_indptr [rows + 1] i32 over sel_blocks [nnz] i32 (offsets are
    checked by the attention kernels in C)."""
    contiguous("sel_blocks", array("sel_blocks", sel_blocks, np.int32, 1))
    csr("sel", sel_indptr, rows, sel_blocks.shape[0], values=False)


def bad_block(indptr: np.ndarray, blocks: np.ndarray, item: int, dims: ArenaDims,
              block_tables: np.ndarray, seq_lens: np.ndarray) -> IndexError:
    """The error for a selected block that is outside its sequence or maps outside the arena."""
    row = int(np.searchsorted(indptr, item, side="right") - 1)
    b, kh = divmod(row, dims.num_kv_heads)
    blk = int(blocks[item])
    nb = -(-int(seq_lens[b]) // BLOCK_TOKENS)
    where = f"sel_blocks[{item}] = {blk} (request {b}, KV head {kh})"
    if not 0 <= blk < nb:
        return IndexError(f"{where} is outside the sequence's {nb} blocks")
    return IndexError(f"{where} maps to page {int(block_tables[b, blk])}, outside the arena's "
                      f"{dims.num_pages} pages")
