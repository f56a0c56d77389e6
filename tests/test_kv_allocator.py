"""Page allocator: contiguity, all-or-nothing, fragmentation, coalescing, double free."""

from __future__ import annotations

import numpy as np
import pytest

from kv_store.allocator import AllocatorCorrupt, PageAllocator, PageRun
from kv_store.errors import StoreFull


def _pages(runs) -> list[int]:
    return [p for r in runs for p in range(r.start, r.stop)]


def test_each_layer_gets_one_contiguous_run_when_it_fits():
    a = PageAllocator(100)
    layers = a.allocate([10, 10, 10], max_runs=4)
    assert [len(r) for r in layers] == [1, 1, 1]
    assert a.free_pages == 70 and a.num_extents == 1


def test_best_fit_keeps_large_extents_whole():
    a = PageAllocator(100)
    runs = a.allocate([10] * 10, max_runs=1)
    a.free(runs[1])          # hole of 10 at 10..20
    a.free(runs[5] + runs[6])  # hole of 20 at 50..70
    (small,) = a.allocate([10], max_runs=1)
    assert small == [PageRun(10, 10)]  # the exact fit, not a piece of the 20-page hole
    assert a.largest_extent() == 20


def test_store_full_allocates_nothing():
    a = PageAllocator(50)
    a.allocate([20], max_runs=1)
    with pytest.raises(StoreFull) as e:
        a.allocate([20, 20], max_runs=4)
    assert e.value.needed_pages == 40 and e.value.free_pages == 30
    assert a.free_pages == 30 and a.num_extents == 1


def test_fragmented_layer_spreads_over_a_few_runs_largest_first():
    a = PageAllocator(64)
    runs = a.allocate([4] * 16, max_runs=1)
    for i in (1, 3, 4, 9, 12):  # free extents of 4, 8, 4, 4 pages
        a.free(runs[i])
    (layer,) = a.allocate([14], max_runs=4)
    assert sum(r.length for r in layer) == 14
    assert len(layer) == 3  # 8 + 4 + 2: the largest holes first
    assert layer == sorted(layer, key=lambda r: r.start)  # runs in logical (address) order
    assert a.free_pages == 20 - 14


def test_too_fragmented_is_refused_and_changes_nothing():
    a = PageAllocator(40)
    runs = a.allocate([2] * 20, max_runs=1)
    for i in range(0, 20, 2):
        a.free(runs[i])  # ten 2-page holes
    before = (a.free_pages, a.num_extents, a.largest_extent())
    with pytest.raises(StoreFull, match="fragmented"):
        a.allocate([3, 12], max_runs=4)  # the second layer needs 6 runs
    assert (a.free_pages, a.num_extents, a.largest_extent()) == before


def test_free_coalesces_back_to_one_extent():
    a = PageAllocator(1000)
    rng = np.random.default_rng(1)
    held = []
    for _ in range(300):
        if held and rng.random() < 0.45:
            a.free(held.pop(rng.integers(len(held))))
        else:
            try:
                held += a.allocate([int(rng.integers(1, 40))], max_runs=8)
            except StoreFull:
                pass
        pages = _pages([r for runs in held for r in runs])
        assert len(pages) == len(set(pages))  # no page handed out twice
        assert a.free_pages == 1000 - len(pages)
    for runs in held:
        a.free(runs)
    assert a.free_pages == 1000 and a.num_extents == 1 and a.largest_extent() == 1000


def test_double_free_is_caught():
    a = PageAllocator(10)
    (runs,) = a.allocate([4], max_runs=1)
    a.free(runs)
    with pytest.raises(AllocatorCorrupt):
        a.free(runs)
    with pytest.raises(AllocatorCorrupt):
        a.free([PageRun(8, 5)])  # past the end
