"""Host memory the GPU kernels read in place, through unified virtual addressing.

The arena of the KV store is page-locked host memory; a kernel given its device pointer reads
scattered (block, head) runs over PCIe with no staging copy. These helpers give such memory
a ``cupy.ndarray`` face so launchers can check and pass it like any device array:

- :func:`pinned_empty` allocates new page-locked memory and returns a NumPy and a CuPy view
  of the same bytes;
- :func:`map_host_array` page-locks an existing NumPy array (e.g. the store's arena) and
  returns its CuPy view; the registration ends when that view (and every view of it) is gone.
"""

from __future__ import annotations

import weakref

import cupy as cp
import numpy as np
from cupy_backends.cuda.api import runtime

_HOST_REGISTER_PORTABLE = 1
_HOST_REGISTER_MAPPED = 2
_MEMORY_TYPE_HOST = 1  # cudaMemoryTypeHost: page-locked, by cudaHostAlloc or cudaHostRegister


def _device_view(host_ptr: int, shape: tuple[int, ...], dtype: np.dtype, owner: object) -> cp.ndarray:
    dev_ptr = runtime.pointerGetAttributes(host_ptr).devicePointer
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    device = cp.cuda.runtime.getDevice()
    mem = cp.cuda.UnownedMemory(dev_ptr, nbytes, owner, device)
    return cp.ndarray(shape, dtype, cp.cuda.MemoryPointer(mem, 0))


def pinned_empty(shape: tuple[int, ...], dtype: np.dtype | type) -> tuple[np.ndarray, cp.ndarray]:
    """Uninitialised page-locked host memory: ``(host view, device view)`` of the same bytes.

    With unified addressing every ``cudaHostAlloc`` allocation is mapped at the same
    address on the device, so the device view is a plain pointer into host memory.
    """
    dtype = np.dtype(dtype)
    shape = tuple(int(s) for s in shape)
    count = int(np.prod(shape, dtype=np.int64))
    mem = cp.cuda.alloc_pinned_memory(max(count * dtype.itemsize, 1))
    host = np.frombuffer(mem, dtype, count).reshape(shape)
    return host, _device_view(mem.ptr, shape, dtype, mem)


class _Registration:
    """Keeps a host array alive and page-locked while device views of it exist."""

    __slots__ = ("array", "__weakref__")

    def __init__(self, array: np.ndarray, owns: bool):
        self.array = array
        if owns:
            weakref.finalize(self, runtime.hostUnregister, array.ctypes.data)


def map_host_array(array: np.ndarray) -> cp.ndarray:
    """A CuPy view, on the current device, of a C-contiguous host array, read through UVA.

    Page-locks the array's memory unless it already is (then whoever locked it keeps
    that responsibility).
    """
    if not isinstance(array, np.ndarray) or not array.flags.c_contiguous:
        raise ValueError("map_host_array needs a C-contiguous numpy.ndarray")
    if array.nbytes == 0:
        raise ValueError("map_host_array needs a non-empty array")
    ptr = array.ctypes.data
    # Asked first, not tried and caught: a failed runtime call stays the thread's pending
    # error, and torch's next launch check raises it from an unrelated kernel.
    owns = runtime.pointerGetAttributes(ptr).type != _MEMORY_TYPE_HOST
    if owns:
        runtime.hostRegister(ptr, array.nbytes, _HOST_REGISTER_PORTABLE | _HOST_REGISTER_MAPPED)
    return _device_view(ptr, array.shape, array.dtype, _Registration(array, owns))
