"""Queue a C function on a CUDA stream: a host node when the stream is being captured.

The driver's ``cuLaunchHostFunc`` takes a C function and its argument; a Python callback
(CuPy's ``launch_host_func``) would need the GIL on CUDA's callback thread and is released
after one call, so it cannot be replayed. The functions queued here are native
(``cpu/host_job.h``): they make no CUDA call and take no GIL.
"""

from __future__ import annotations

import ctypes
import functools


@functools.cache
def _driver() -> ctypes.CDLL:
    lib = ctypes.CDLL("libcuda.so.1")
    lib.cuLaunchHostFunc.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    lib.cuLaunchHostFunc.restype = ctypes.c_int
    return lib


def launch_host_func(stream: int, function: int, argument: int) -> None:
    """Queue ``function(argument)`` on the stream with handle ``stream`` (after its earlier work;
    its later work waits for the call)."""
    err = _driver().cuLaunchHostFunc(stream, function, argument)
    if err:
        raise RuntimeError(f"cuLaunchHostFunc failed with CUresult {err}")
