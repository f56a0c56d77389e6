"""Argument checks the launchers run before a kernel sees a pointer.

A kernel trusts shapes, dtypes and strides blindly, and a wrong one reads or writes someone
else's memory without a word. Each check raises ValueError naming the argument; nothing here
reads device memory, so no check costs a host round trip.
"""

from __future__ import annotations

from typing import Sequence

import cupy as cp
import numpy as np

BF16_BITS = np.dtype(np.uint16)
"""bf16 travels as its raw bits: CuPy has no bf16 dtype."""


def expect(name: str, a: cp.ndarray, dtype: np.dtype | type, shape: Sequence[int | None],
           *, contiguous: bool = True) -> None:
    """``a`` has ``dtype`` and ``shape`` (None matches any extent) and, by default, is C-contiguous."""
    if not isinstance(a, cp.ndarray):
        raise ValueError(f"{name} must be a cupy.ndarray, got {type(a).__name__}")
    if a.dtype != np.dtype(dtype):
        raise ValueError(f"{name} must be {np.dtype(dtype)}, got {a.dtype}")
    if a.ndim != len(shape) or any(w is not None and w != s for w, s in zip(shape, a.shape)):
        want = "[" + ", ".join("*" if w is None else str(w) for w in shape) + "]"
        raise ValueError(f"{name} must have shape {want}, got {list(a.shape)}")
    if contiguous and not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (strides {a.strides})")


def expect_inner_contiguous(name: str, a: cp.ndarray) -> int:
    """All axes but the first are C-contiguous; returns the first axis' stride in elements."""
    item = a.dtype.itemsize
    inner = item
    for extent, stride in zip(reversed(a.shape[1:]), reversed(a.strides[1:])):
        if extent > 1 and stride != inner:
            raise ValueError(f"{name}: all axes but the first must be C-contiguous (strides {a.strides})")
        inner *= extent
    if a.strides[0] % item:
        raise ValueError(f"{name}: the first axis' stride {a.strides[0]} is not a whole number of elements")
    return a.strides[0] // item


def expect_aligned(name: str, a: cp.ndarray, alignment: int = 16) -> None:
    """The kernels read 16 bytes per lane: the base pointer must allow it."""
    if a.data.ptr % alignment:
        raise ValueError(f"{name} must be {alignment}-byte aligned (pointer {a.data.ptr:#x})")


def positive_scale(scale: float) -> float:
    if not scale > 0.0:
        raise ValueError(f"scale must be > 0 (it is folded into q); got {scale}")
    return float(scale)
