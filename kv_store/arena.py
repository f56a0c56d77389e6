"""The arena: one host buffer per store, holding KV pages and their block metadata.

Layout (the contract of ``fluxion_dist/attention/KERNEL_API.md``):

- ``pages: uint16 [P, Hkv, 2, 16, d]`` bf16 bits; a page is one 16-token block of one
  layer of one request, all KV heads; K and V of one (block, head) are contiguous;
- ``kmin, kmax: uint16 [P, Hkv, d]``, the Quest metadata of page ``p`` at row ``p``.

The three arrays are views of one anonymous mmap (page-aligned, so cudaHostRegister and
UCX registration take it whole, and advised for transparent huge pages: :func:`map_anonymous`).
The Cython path, the GPU kernels (through UVA when pinned) and the UCX receiver all use these
exact bytes: nothing here copies.
"""

from __future__ import annotations

import logging
import mmap

import numpy as np

from kv_store import pinning
from kv_store.config import KVGeometry, PinMode
from kv_store.errors import PinningError

log = logging.getLogger(__name__)

_OS_PAGE = mmap.PAGESIZE


def _align(n: int) -> int:
    return -(-n // _OS_PAGE) * _OS_PAGE


def map_anonymous(nbytes: int) -> mmap.mmap:
    """``nbytes`` of zeroed, page-aligned anonymous memory, advised for transparent huge pages.

    Decoding reads the arena as scattered 8 KiB (page, head) runs: with 4 KiB pages each run
    costs two TLB misses, so the CPU path reads it slower than the same bytes in 2 MiB pages
    (docs/benchmarks.md, CPU path). Where THP is "madvise" (a common
    default) an mmap gets huge pages only when asked; the advice is a no-op where THP is off.
    """
    mem = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            mem.madvise(mmap.MADV_HUGEPAGE)
        except OSError as err:  # a kernel built without THP: 4 KiB pages, still correct
            log.debug("MADV_HUGEPAGE refused (%s): the arena uses base pages", err)
    return mem


class Arena:
    """Host memory of one store. ``num_pages`` pages of ``geometry.page_shape``."""

    def __init__(self, geometry: KVGeometry, num_pages: int, *, pin: PinMode = "auto",
                 prefault: bool = True) -> None:
        if num_pages <= 0:
            raise ValueError(f"Arena needs at least one page; got num_pages={num_pages}")
        self.geometry = geometry
        self.num_pages = num_pages
        kv_bytes = _align(num_pages * geometry.page_bytes)
        meta_bytes = _align(num_pages * geometry.meta_page_bytes // 2)
        self.nbytes = kv_bytes + 2 * meta_bytes
        self._mmap = map_anonymous(self.nbytes)
        raw = np.frombuffer(self._mmap, dtype=np.uint8)
        if prefault:
            # One write per OS page maps the whole arena now rather than on the first transfer,
            # where each fault would stall a UCX receive.
            raw[::_OS_PAGE] = 0
        self.pages = raw[:num_pages * geometry.page_bytes].view(np.uint16).reshape(
            (num_pages, *geometry.page_shape))
        meta_len = num_pages * geometry.meta_page_bytes // 2
        self.kmin = raw[kv_bytes:kv_bytes + meta_len].view(np.uint16).reshape(
            (num_pages, *geometry.meta_shape))
        self.kmax = raw[kv_bytes + meta_bytes:kv_bytes + meta_bytes + meta_len].view(
            np.uint16).reshape((num_pages, *geometry.meta_shape))
        self._registration = self._pin(pin, raw)

    def _pin(self, pin: PinMode, raw: np.ndarray) -> pinning.Registration | None:
        if pin == "off":
            return None
        backend = pinning.cuda_backend()
        if backend is None:
            if pin == "required":
                raise PinningError("StoreConfig.pin='required' but no CUDA device is present")
            return None
        return pinning.register(raw.ctypes.data, self.nbytes, backend)

    @property
    def pinned(self) -> bool:
        """True when the arena is page-locked and mapped: GPU kernels may read it through UVA."""
        return self._registration is not None

    def device_pointers(self) -> tuple[int, int, int]:
        """Device addresses of ``pages``, ``kmin``, ``kmax`` (pinned arenas only)."""
        if self._registration is None:
            raise PinningError("the arena is not registered with CUDA")
        base = pinning.device_pointer(self._registration)
        host = self._registration.ptr
        return tuple(base + (a.ctypes.data - host) for a in (self.pages, self.kmin, self.kmax))

    def close(self) -> None:
        """Unregister from CUDA. The memory itself goes with the last view of it."""
        if self._registration is not None:
            pinning.unregister(self._registration)
            self._registration = None

    def __repr__(self) -> str:
        return (f"Arena(pages={self.num_pages}, page_shape={self.geometry.page_shape}, "
                f"{self.nbytes / 2**30:.2f} GiB, pinned={self.pinned})")
