"""Exact log-sum-exp merge of partial attention states (launcher for merge.cu).

Oracle: :func:`fluxion_dist.attention.reference.merge_state` and
:func:`~fluxion_dist.attention.reference.merge_partials`. Partials are stacked on a leading
axis, ``o [P, B, Hq, d]``, ``m, l [P, B, Hq]``, with any stride along it: write each producer
(split-K chunks, the GPU kernel, the CPU path into a pinned buffer read through UVA) into its
own slice and merge once. A partial with ``m = -inf`` is empty; its ``o`` and ``l`` do not
count (their memory is still read, so it must exist).
"""

from __future__ import annotations

from typing import Literal

import cupy as cp
import numpy as np

from fluxion_dist.kernels import loader
from fluxion_dist.kernels.checks import BF16_BITS, expect, expect_inner_contiguous

_THREADS = 256  # MERGE_THREADS: one CTA per row, its warps split the partials

_STATE, _F32, _BF16 = 0, 1, 2


def merge_states(o: cp.ndarray, m: cp.ndarray, l: cp.ndarray, *,
                 out: tuple[cp.ndarray, cp.ndarray, cp.ndarray] | None = None,
                 ) -> tuple[cp.ndarray, cp.ndarray, cp.ndarray]:
    """Merge stacked partials into one partial ``(o [B, Hq, d], m [B, Hq], l [B, Hq])``, still
    unnormalised (so it can be merged again)."""
    num, bsz, hq, d = _check(o, m, l)
    if out is None:
        out = (cp.empty((bsz, hq, d), cp.float32), cp.empty((bsz, hq), cp.float32),
               cp.empty((bsz, hq), cp.float32))
    expect("out o", out[0], np.float32, (bsz, hq, d))
    expect("out m", out[1], np.float32, (bsz, hq))
    expect("out l", out[2], np.float32, (bsz, hq))
    _launch(o, m, l, _STATE, out[0], out[1], out[2], None)
    return out


def merge_attention(o: cp.ndarray, m: cp.ndarray, l: cp.ndarray, *,
                    out_dtype: Literal["bfloat16", "float32"] = "bfloat16",
                    out: cp.ndarray | None = None) -> cp.ndarray:
    """Merge stacked partials and normalise: the attention output ``[B, Hq, d]``, as bf16 bits
    (uint16) or float32. A row with no token in any partial comes out NaN (the reference
    raises there; a kernel cannot)."""
    num, bsz, hq, d = _check(o, m, l)
    if out_dtype not in ("bfloat16", "float32"):
        raise ValueError(f"out_dtype must be 'bfloat16' or 'float32'; got {out_dtype!r}")
    dtype = BF16_BITS if out_dtype == "bfloat16" else np.dtype(np.float32)
    if out is None:
        out = cp.empty((bsz, hq, d), dtype)
    expect("out", out, dtype, (bsz, hq, d))
    if out_dtype == "bfloat16":
        _launch(o, m, l, _BF16, None, None, None, out)
    else:
        _launch(o, m, l, _F32, out, None, None, None)
    return out


def _check(o: cp.ndarray, m: cp.ndarray, l: cp.ndarray) -> tuple[int, int, int, int]:
    expect("o", o, np.float32, (None, None, None, None), contiguous=False)
    num, bsz, hq, d = o.shape
    expect("m", m, np.float32, (num, bsz, hq), contiguous=False)
    expect("l", l, np.float32, (num, bsz, hq), contiguous=False)
    if num == 0:
        raise ValueError("merge needs at least one partial")
    return num, bsz, hq, d


def _launch(o, m, l, mode, out_o, out_m, out_l, out_bf16) -> None:
    num, bsz, hq, d = o.shape
    rows = bsz * hq
    if rows == 0:
        return
    null = np.uint64(0)
    kernel = loader.get_kernel("merge", "merge_partials", HEAD_DIM=d)
    kernel((rows,), (_THREADS,), (
        o, m, l, np.int32(num),
        np.int64(expect_inner_contiguous("o", o)), np.int64(expect_inner_contiguous("m", m)),
        np.int64(expect_inner_contiguous("l", l)), np.int32(mode),
        out_o if out_o is not None else null, out_m if out_m is not None else null,
        out_l if out_l is not None else null, out_bf16 if out_bf16 is not None else null))
