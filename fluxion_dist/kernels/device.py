"""Device facts for the launchers, and whether the CuPy kernels can run here at all (and if
not, why: for skips and fallbacks).

CuPy may import on a machine with no usable GPU and fail only at the first device call, so
this makes one small device round trip.
"""

from __future__ import annotations

import functools


@functools.cache
def sm_count(device: int) -> int:
    """Multiprocessors of a device: the launchers size their grids by it."""
    import cupy

    return cupy.cuda.runtime.getDeviceProperties(device)["multiProcessorCount"]


@functools.cache
def gpu_unavailable_reason() -> str | None:
    """None when CuPy imports and a CUDA device runs a kernel; otherwise the reason."""
    try:
        import cupy
    except ImportError as err:
        return f"cupy is not installed ({err})"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "no CUDA device is visible"
        if int(cupy.arange(4, dtype=cupy.int32).sum()) != 6:
            return "a CuPy reduction on the device returned a wrong result"
    except Exception as err:  # CUDA errors come as several exception types; any means no GPU
        return f"no usable CUDA device ({type(err).__name__}: {err})"
    return None
