"""The store: layout round trip, the two API tiers, leases, abort, occupancy, the arena."""

from __future__ import annotations

import os

import numpy as np
import pytest

from fluxion_dist.attention import reference
from fluxion_dist.attention.layout import BLOCK_TOKENS, from_bf16_bits, to_bf16_bits, unpack_kv_blocks
from kv_store import (DuplicateRequest, EntryState, IncompleteWrite, KVGeometry, KVStore, LayerKV,
                      LayoutError, PinningError, RequestNotReady, StoreConfig, StoreFull,
                      UnknownRequest, pack_layer)
from kv_store.arena import Arena
from kv_store.pinning import cuda_backend


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_store(geometry: KVGeometry, pages: int, clock=None, **kw) -> KVStore:
    cfg = StoreConfig(geometry, capacity_bytes=pages * (geometry.page_bytes + geometry.meta_page_bytes),
                      pin="off", **kw)
    return KVStore(cfg, clock=clock) if clock is not None else KVStore(cfg)


def random_layer(rng, t: int, hkv: int, d: int):
    return (rng.standard_normal((t, hkv, d)).astype(np.float32) * 3,
            rng.standard_normal((t, hkv, d)).astype(np.float32))


def bf16(x: np.ndarray) -> np.ndarray:
    return from_bf16_bits(to_bf16_bits(x))


@pytest.mark.parametrize("num_tokens", [1, 15, 16, 17, 33, 1000])
@pytest.mark.parametrize("hkv,d", [(1, 8), (4, 16), (8, 64)])
def test_layout_round_trip_and_metadata(num_tokens, hkv, d):
    g = KVGeometry(num_layers=2, num_kv_heads=hkv, head_dim=d)
    store = make_store(g, 2 * (num_tokens // BLOCK_TOKENS + 1) + 3)
    rng = np.random.default_rng(num_tokens * 7 + hkv)
    kv = [random_layer(rng, num_tokens, hkv, d) for _ in range(2)]
    store.reserve("r", num_tokens)
    for layer, (k, v) in enumerate(kv):
        store.write_layer_kv("r", layer, k, v)
    handle = store.commit("r")
    for layer, (k, v) in enumerate(kv):
        got = store.get("r", layer)
        k2, v2 = unpack_kv_blocks(got.blocks, num_tokens)
        np.testing.assert_array_equal(k2, bf16(k))
        np.testing.assert_array_equal(v2, bf16(v))
        # In place, as the kernels read it: the arena through the block table.
        table = handle.block_table(layer)
        assert table.dtype == np.int32 and table.shape == (g.blocks_for(num_tokens),)
        np.testing.assert_array_equal(store.arena.pages[table], got.blocks)
        kmin, kmax = reference.block_metadata(bf16(k))
        np.testing.assert_array_equal(from_bf16_bits(store.arena.kmin[table]), kmin)
        np.testing.assert_array_equal(from_bf16_bits(store.arena.kmax[table]), kmax)


def test_arena_layout_contract():
    g = KVGeometry(num_layers=1, num_kv_heads=8, head_dim=128)
    arena = Arena(g, 4, pin="off")
    assert arena.pages.shape == (4, 8, 2, 16, 128) and arena.pages.dtype == np.uint16
    assert arena.kmin.shape == arena.kmax.shape == (4, 8, 128)
    # K then V of one (block, head): one contiguous 8 KiB run.
    assert arena.pages.strides == (8 * 8192, 8192, 4096, 256, 2)
    assert arena.pages.ctypes.data % 4096 == 0 and arena.pages.flags.c_contiguous
    assert not arena.pinned


def _vm_flags(addr: int) -> list[str]:
    """The kernel's VmFlags of the mapping holding ``addr`` (from /proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {addr:#x}")


@pytest.mark.skipif(not os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled"),
                    reason="this kernel has no transparent huge pages")
def test_arena_is_advised_for_huge_pages():
    # Scattered (page, head) reads pay a TLB miss per 4 KiB page; "hg" is MADV_HUGEPAGE.
    arena = Arena(KVGeometry(num_layers=1, num_kv_heads=8, head_dim=128), 64, pin="off")
    assert "hg" in _vm_flags(arena.pages.ctypes.data)
    assert "hg" in _vm_flags(arena.kmax.ctypes.data)


@pytest.mark.skipif(cuda_backend() is not None, reason="a CUDA device is present: pinning works here")
def test_pin_required_without_a_gpu_is_a_typed_error():
    g = KVGeometry(num_layers=1, num_kv_heads=1, head_dim=8)
    assert not Arena(g, 2, pin="auto").pinned
    with pytest.raises(PinningError):
        Arena(g, 2, pin="required")


def test_zero_copy_tier_and_commit_checks():
    g = KVGeometry(num_layers=3, num_kv_heads=2, head_dim=8)
    store = make_store(g, 64)
    handle = store.reserve("r", 40)
    assert store.state("r") is EntryState.RESERVED
    for layer in range(2):
        for view in store.layer_views("r", layer):
            view.pages[...] = layer + 1
            view.kmin[...] = 7
            view.kmax[...] = 9
        store.mark_written("r", layer)
    with pytest.raises(IncompleteWrite):
        store.commit("r")
    with pytest.raises(RequestNotReady):
        store.get("r", 0)
    store.write_layer("r", 2, pack_layer(*random_layer(np.random.default_rng(0), 40, 2, 8)))
    store.commit("r")
    assert (store.get("r", 1).blocks == 2).all() and (store.arena.kmax[handle.block_table(0)] == 9).all()
    store.reserve("bad", 40)
    with pytest.raises(LayoutError):
        store.write_layer("bad", 0, LayerKV(np.zeros((2, 2, 2, 16, 8), np.uint16),
                                            np.zeros((2, 2, 8), np.uint16), np.zeros((2, 2, 8), np.uint16)))


def test_put_get_and_stats():
    g = KVGeometry(num_layers=2, num_kv_heads=2, head_dim=8)
    store = make_store(g, 16)
    layers = [pack_layer(*random_layer(np.random.default_rng(i), 20, 2, 8)) for i in range(2)]
    store.put("r", 20, layers)
    for layer in range(2):
        got = store.get("r", layer)
        for a, b in zip(got, layers[layer]):
            np.testing.assert_array_equal(a, b)
    s = store.stats()
    per_layer = 2 * (g.page_bytes + g.meta_page_bytes)
    assert s.used_pages == 4 and s.requests_ready == 1
    assert s.bytes_in == 2 * per_layer and s.bytes_out == 2 * per_layer
    with pytest.raises(DuplicateRequest):
        store.put("r", 20, layers)
    store.claim("r")
    store.release("r")
    assert store.stats().used_pages == 0 and "r" not in store


def test_store_full_refused_whole_and_counted():
    g = KVGeometry(num_layers=4, num_kv_heads=1, head_dim=8)
    store = make_store(g, 10)
    store.reserve("a", 32)  # 4 layers x 2 pages
    with pytest.raises(StoreFull):
        store.reserve("b", 17)  # 4 x 2 pages, 2 free
    s = store.stats()
    assert s.used_pages == 8 and s.alloc_failures == 1 and s.requests_reserved == 1
    assert "b" not in store


def test_abort_frees_in_any_state_and_occupancy_returns_to_zero():
    g = KVGeometry(num_layers=2, num_kv_heads=1, head_dim=8)
    store = make_store(g, 100)
    store.reserve("reserved", 100)
    store.put("ready", 30, [pack_layer(*random_layer(np.random.default_rng(0), 30, 1, 8))] * 2)
    store.abort("reserved")
    store.abort("ready")
    store.abort("never-there")  # cleanup path: no error
    s = store.stats()
    assert s.used_pages == 0 and s.aborts == 2 and s.free_extents == 1
    with pytest.raises(UnknownRequest):
        store.handle("ready")


def test_leases_expire_unless_claimed():
    g = KVGeometry(num_layers=1, num_kv_heads=1, head_dim=8)
    clock = FakeClock()
    store = make_store(g, 50, clock=clock, ready_ttl_s=10.0)
    store.reserve("writer-died", 16, ttl_s=5.0)
    layer = [pack_layer(*random_layer(np.random.default_rng(0), 16, 1, 8))]
    store.put("unclaimed", 16, layer)
    store.put("claimed", 16, layer)
    store.put("renewed", 16, layer)
    store.claim("claimed")
    clock.now += 6
    assert store.reap_expired() == ["writer-died"]
    store.renew("renewed", 20.0)
    clock.now += 5
    assert store.reap_expired() == ["unclaimed"]
    assert "claimed" in store and "renewed" in store
    clock.now += 100
    assert store.reap_expired() == ["renewed"]
    store.release("claimed")
    s = store.stats()
    assert s.used_pages == 0 and s.leases_expired == 3


def test_reserve_reclaims_expired_pages_before_refusing():
    g = KVGeometry(num_layers=1, num_kv_heads=1, head_dim=8)
    clock = FakeClock()
    store = make_store(g, 4, clock=clock)
    store.reserve("old", 64, ttl_s=1.0)
    clock.now += 2
    store.reserve("new", 64)  # would not fit without reaping "old"
    assert "old" not in store


def test_typed_errors_survive_pickling():
    """Ray carries errors between actors by pickle (the KV wire never does)."""
    import pickle

    from kv_store import RefusalReason, RemoteStoreFull, TransferRefused
    for err in (StoreFull(10, 3, "fragmented"), RemoteStoreFull("need 10 pages"),
                TransferRefused(RefusalReason.GEOMETRY_MISMATCH, "heads 4 != 8")):
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is type(err) and str(back) == str(err)
    assert pickle.loads(pickle.dumps(StoreFull(10, 3))).needed_pages == 10


def test_keep_ends_the_lease_of_a_reserved_entry():
    clock = [0.0]
    store = KVStore(StoreConfig(KVGeometry(2, 2, 16), 1 << 20, pin="off"), clock=lambda: clock[0])
    store.reserve("grow", 40, ttl_s=1.0)
    store.keep("grow")
    clock[0] = 100.0
    assert store.reap_expired() == [] and "grow" in store
    store.abort("grow")
    assert store.stats().used_pages == 0
