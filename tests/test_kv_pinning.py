"""The arena page-locked and mapped for the GPU: kernels read KV pages in place through UVA."""

from __future__ import annotations

import numpy as np
import pytest

from kv_store import KVGeometry, KVStore, StoreConfig
from kv_store.arena import Arena
from kv_store.pinning import cuda_backend

pytestmark = pytest.mark.gpu

if cuda_backend() is None:
    pytest.skip("no CUDA device: the arena stays plain host memory", allow_module_level=True)
cupy = pytest.importorskip("cupy")


def _device_view(ptr: int, arr: np.ndarray, owner) -> "cupy.ndarray":
    mem = cupy.cuda.UnownedMemory(ptr, arr.nbytes, owner)
    return cupy.ndarray(arr.shape, dtype=arr.dtype, memptr=cupy.cuda.MemoryPointer(mem, 0))


def test_gpu_gathers_scattered_pages_through_uva():
    g = KVGeometry(num_layers=1, num_kv_heads=8, head_dim=128)
    arena = Arena(g, 64, pin="required")
    assert arena.pinned
    rng = np.random.default_rng(0)
    arena.pages[...] = rng.integers(0, 1 << 16, size=arena.pages.shape, dtype=np.uint16)
    arena.kmin[...] = rng.integers(0, 1 << 16, size=arena.kmin.shape, dtype=np.uint16)
    pages_ptr, kmin_ptr, _ = arena.device_pointers()
    pages = _device_view(pages_ptr, arena.pages, arena)
    kmin = _device_view(kmin_ptr, arena.kmin, arena)
    table = np.array([5, 1, 40, 2, 63], dtype=np.int32)
    np.testing.assert_array_equal(pages[cupy.asarray(table)].get(), arena.pages[table])
    np.testing.assert_array_equal(kmin[cupy.asarray(table)].get(), arena.kmin[table])
    arena.pages[7] = 12345  # a host write is what the GPU reads next: no copy in between
    assert int(pages[7].max().get()) == 12345
    arena.close()
    assert not arena.pinned


def test_store_pins_by_default_where_a_gpu_is_present():
    g = KVGeometry(num_layers=2, num_kv_heads=2, head_dim=64)
    store = KVStore(StoreConfig(g, capacity_bytes=1 << 22))
    assert store.arena.pinned
    store.close()
