"""Page-lock host memory and map it into the GPU's address space (cudaHostRegister).

Registered with the mapped flag, the arena's host pointer is also a device pointer
(UVA), so GPU kernels read KV pages in place over PCIe with no staging copy.
CuPy imports without a GPU but raises on any device call, so every path here
first asks whether a device exists, and treats "no device" as "do not pin".
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from kv_store.errors import PinningError

log = logging.getLogger(__name__)

# cudaHostRegisterPortable | cudaHostRegisterMapped: visible to every context, mapped for UVA.
_REGISTER_FLAGS = 0x01 | 0x02

Backend = Literal["cupy", "torch"]


@dataclass(frozen=True, slots=True)
class Registration:
    """A live cudaHostRegister of ``[ptr, ptr + nbytes)``; undo with :func:`unregister`."""

    ptr: int
    nbytes: int
    backend: Backend


def _cupy_devices() -> int:
    try:
        import cupy
    except ImportError:
        return 0
    try:
        return int(cupy.cuda.runtime.getDeviceCount())
    except cupy.cuda.runtime.CUDARuntimeError:
        return 0


def _torch_devices() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def cuda_backend() -> Backend | None:
    """Which library can register host memory here, or None when no CUDA device is present."""
    if _cupy_devices() > 0:
        return "cupy"
    if _torch_devices() > 0:
        return "torch"
    return None


def register(ptr: int, nbytes: int, backend: Backend) -> Registration:
    """Page-lock and map ``nbytes`` at ``ptr``; raises :class:`PinningError` on failure."""
    if backend == "cupy":
        import cupy
        if cupy.cuda.runtime.getDeviceProperties(0).get("unifiedAddressing", 1) == 0:
            raise PinningError("the CUDA device has no unified addressing: kernels cannot read host pages")
        try:
            cupy.cuda.runtime.hostRegister(ptr, nbytes, _REGISTER_FLAGS)
        except cupy.cuda.runtime.CUDARuntimeError as e:
            raise PinningError(f"cudaHostRegister of {nbytes} bytes failed: {e}") from e
    else:
        import torch
        err = torch.cuda.cudart().cudaHostRegister(ptr, nbytes, _REGISTER_FLAGS)
        if int(err) != 0:
            raise PinningError(f"cudaHostRegister of {nbytes} bytes failed: cudaError {int(err)}")
    log.info("arena page-locked and mapped for the GPU: %.2f GiB via %s", nbytes / 2**30, backend)
    return Registration(ptr, nbytes, backend)


def unregister(reg: Registration) -> None:
    if reg.backend == "cupy":
        import cupy
        cupy.cuda.runtime.hostUnregister(reg.ptr)
    else:
        import torch
        torch.cuda.cudart().cudaHostUnregister(reg.ptr)


def device_pointer(reg: Registration) -> int:
    """The device address of the registered host range. Under unified addressing (every
    64-bit CUDA device; ``register`` checks it) a mapped host pointer is its own device
    pointer, so kernels take the numpy array's address as is."""
    return reg.ptr
