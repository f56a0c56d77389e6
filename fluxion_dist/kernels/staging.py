"""A layer call's inputs and output moved inside its CUDA graph (launchers for staging.cu).

The caller's tensors are named by address in an ``io`` block (int64 [IO_WORDS], on the
device: the graph copies it in from the pinned parameters the host wrote), so one captured
graph serves every call whatever tensors the caller passes.

Oracle: ``q_out = float32(q)``, ``k_out = k``, ``v_out = v``; the caller's output equals
``out`` cast to its dtype (bf16: round to nearest even, as torch).
"""

from __future__ import annotations

import cupy as cp
import numpy as np

from fluxion_dist.kernels import loader
from fluxion_dist.kernels.checks import BF16_BITS, expect

IO_WORDS = 6  # q, k_new, v_new, out addresses; q dtype, out dtype
DTYPE_CODES = {"float32": 0, "bfloat16": 1}
_THREADS = 256
_MAX_CTAS = 64


def io_words(q: int, k: int, v: int, out: int, q_dtype: str, out_dtype: str) -> tuple[int, ...]:
    """The io block for tensors at these addresses (dtype names as torch/NumPy spell them)."""
    return (q, k, v, out, DTYPE_CODES[q_dtype], DTYPE_CODES[out_dtype])


def _grid(n: int) -> tuple[int]:
    return (max(1, min(_MAX_CTAS, -(-n // _THREADS))),)


def stage_inputs(io: cp.ndarray, q: cp.ndarray, k_new: cp.ndarray, v_new: cp.ndarray) -> None:
    """q (float32) and k_new, v_new (bf16 bits) <- the tensors ``io`` names, same shapes."""
    expect("io", io, np.int64, (IO_WORDS,))
    expect("q", q, np.float32, (None, None, None))
    expect("k_new", k_new, BF16_BITS, (q.shape[0], None, q.shape[2]))
    expect("v_new", v_new, BF16_BITS, k_new.shape)
    n = max(q.size, k_new.size)
    loader.get_kernel("staging", "stage_inputs")(_grid(n), (_THREADS,), (
        io, q, k_new, v_new, np.int32(q.size), np.int32(k_new.size)))


def stage_output(io: cp.ndarray, out: cp.ndarray) -> None:
    """The tensor ``io`` names <- out (float32), cast to its dtype."""
    expect("io", io, np.int64, (IO_WORDS,))
    expect("out", out, np.float32, (None, None, None))
    loader.get_kernel("staging", "stage_output")(_grid(out.size), (_THREADS,), (io, out, np.int32(out.size)))
