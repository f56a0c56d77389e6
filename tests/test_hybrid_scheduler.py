"""The priority scheduler: every split covers each selected block exactly once, cached blocks
go to the GPU, masked blocks to the CPU, the balanced split is balanced by the cost model and
gives the CPU the largest rows, and any split merges to the same output (exact merge)."""

from __future__ import annotations

import numpy as np
import pytest

from fluxion_dist.attention import reference
from fluxion_dist.cpu.attention import sparse_partial_attention
from fluxion_dist.cpu.synthetic_arena import paged_batch, random_selection
from fluxion_dist.hybrid import CostModel, balanced_cpu_blocks, merge_batch_partials, split_layer
from fluxion_dist.hybrid.cost_model import CostModelError
from fluxion_dist.sparse.selection import FULL_MASK, BlockSelection, SparseInputError

MODES = ("balanced", "static", "gpu_only", "cpu_only")


def _selection(rng, rows, hkv, max_len=60, masks=False):
    counts = rng.integers(0, max_len, size=rows)
    counts[rng.integers(rows)] = 0
    lists = [np.sort(rng.choice(200, size=c, replace=False)).astype(np.int32) for c in counts]
    indptr = np.zeros(rows + 1, np.int32)
    np.cumsum(counts, out=indptr[1:])
    blocks = np.concatenate(lists).astype(np.int32)
    m = None
    if masks:
        m = np.where(rng.random(blocks.size) < 0.3, rng.integers(1, 0xFFFF, blocks.size), 0xFFFF).astype(np.uint16)
    return BlockSelection(indptr, blocks, hkv, m)


def _entries(sel: BlockSelection) -> set[tuple[int, int]]:
    rows = np.repeat(np.arange(sel.num_rows), sel.blocks_per_row())
    return set(zip(rows.tolist(), sel.sel_blocks.tolist()))


def _cost(rng) -> CostModel:
    return CostModel.from_rates(128, cpu_gb_per_s=float(rng.uniform(5, 100)), uva_gb_per_s=float(rng.uniform(10, 55)),
                                cached_gb_per_s=float(rng.uniform(500, 3000)),
                                cpu_overhead_s=float(rng.uniform(0, 1e-4)), gpu_overhead_s=float(rng.uniform(0, 1e-4)))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("masks", [False, True])
def test_split_covers_each_block_once(mode, masks):
    rng = np.random.default_rng(hash((mode, masks)) % 2**32)
    for _ in range(30):
        hkv = int(rng.choice([1, 2, 8]))
        sel = _selection(rng, hkv * int(rng.integers(1, 5)), hkv, masks=masks)
        slot = np.where(rng.random(sel.sel_blocks.size) < 0.4, rng.integers(0, 1000, sel.sel_blocks.size), -1)
        sp = split_layer(sel, _cost(rng), mode=mode, cached_slot=slot.astype(np.int32),
                         copies=int(rng.integers(0, 50)), static_cpu_fraction=float(rng.uniform()))
        cpu, gpu = _entries(sp.cpu), _entries(sp.gpu)
        assert not cpu & gpu and cpu | gpu == _entries(sel)
        assert sp.cpu_blocks == len(cpu) and sp.gpu_cached_blocks + sp.gpu_uva_blocks == len(gpu)
        for part in (sp.cpu, sp.gpu):  # rows stay ascending (the kernels' contract)
            for r in range(part.num_rows):
                row = part.sel_blocks[part.sel_indptr[r]:part.sel_indptr[r + 1]]
                assert np.all(np.diff(row) > 0)
        # slots follow their blocks; masks stay with theirs, and partial masks never reach the GPU
        key = {e: s for e, s in zip(sorted(_entries(sel)), slot[np.lexsort((sel.sel_blocks, np.repeat(
            np.arange(sel.num_rows), sel.blocks_per_row())))])}
        g_rows = np.repeat(np.arange(sp.gpu.num_rows), sp.gpu.blocks_per_row())
        for r, b, s in zip(g_rows, sp.gpu.sel_blocks, sp.gpu_slot):
            assert s == key[(r, b)]
        if masks:
            assert sp.gpu.sel_masks is None and sp.cpu.sel_masks is not None
            partial = sel.sel_masks != FULL_MASK
            rows = np.repeat(np.arange(sel.num_rows), sel.blocks_per_row())
            assert set(zip(rows[partial].tolist(), sel.sel_blocks[partial].tolist())) <= cpu
        if mode == "cpu_only":
            assert not gpu
        elif not masks:
            cached = {e for e, s in key.items() if s >= 0}
            assert cached <= gpu  # cached blocks are read from HBM
        if mode == "gpu_only" and not masks:
            assert not cpu


def test_balanced_split_finishes_together():
    rng = np.random.default_rng(1)
    for _ in range(200):
        cost = _cost(rng)
        forced, cached, free, copies = (int(x) for x in rng.integers(0, 3000, 4))
        x = balanced_cpu_blocks(cost, forced, cached, free, copies)
        best = max(cost.cpu_time(forced + x), cost.gpu_time(cached, free - x, copies))
        # no other split of the free blocks is better (the makespan is convex in x)
        for y in {0, free, max(x - 1, 0), min(x + 1, free)}:
            assert best <= max(cost.cpu_time(forced + y), cost.gpu_time(cached, free - y, copies)) + 1e-15
        if 0 < x < free:  # an interior split: the two sides differ by at most one block's time
            gap = abs(cost.cpu_time(forced + x) - cost.gpu_time(cached, free - x, copies))
            assert gap <= cost.cpu_block_s + cost.uva_block_s + 1e-12


def test_balanced_gives_the_cpu_the_largest_rows_first():
    cost = CostModel.from_rates(128, cpu_gb_per_s=20, uva_gb_per_s=20, cached_gb_per_s=2000,
                                cpu_overhead_s=0, gpu_overhead_s=0)
    counts = np.array([5, 40, 10, 30, 1, 0, 20, 14])
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    blocks = np.concatenate([np.arange(c) for c in counts]).astype(np.int32)
    sp = split_layer(BlockSelection(indptr, blocks, 8), cost, mode="balanced")
    cpu_rows = sp.cpu.blocks_per_row()
    assert sp.cpu_blocks == 60  # equal rates: half of 120
    assert cpu_rows[1] == 40 and cpu_rows[3] == 20 and cpu_rows.sum() == 60  # 40 whole, then 20 of the 30-row
    assert cpu_rows[[0, 2, 4, 6, 7]].sum() == 0


def test_no_gpu_means_cpu_everything():
    rng = np.random.default_rng(2)
    sel = _selection(rng, 8, 2)
    cost = CostModel.cpu_only(128, 10.0)
    for mode in MODES:
        sp = split_layer(sel, cost, mode=mode, cached_slot=np.zeros(sel.sel_blocks.size, np.int32))
        assert sp.cpu_blocks == sel.sel_blocks.size and sp.gpu.sel_blocks.size == 0 and sp.gpu_s == 0


def test_bad_arguments():
    sel = BlockSelection(np.array([0, 2], np.int32), np.array([0, 1], np.int32), 1)
    cost = CostModel.cpu_only(64, 1.0)
    with pytest.raises(SparseInputError, match="mode"):
        split_layer(sel, cost, mode="both")
    with pytest.raises(SparseInputError, match="cached_slot"):
        split_layer(sel, cost, mode="balanced", cached_slot=np.zeros(3, np.int32))
    with pytest.raises(CostModelError, match="uva_bytes_per_s"):
        CostModel(64, 1e9, uva_bytes_per_s=1e9)
    with pytest.raises(CostModelError, match="cpu_bytes_per_s"):
        CostModel(64, 0.0)


@pytest.mark.parametrize("hkv,group", [(2, 1), (2, 4), (1, 8)])
def test_any_split_gives_the_same_output(hkv, group):
    """CPU share + GPU share (here both run by the Cython kernel, the same contract) merged
    equals the whole selection in one call, and the reference."""
    rng = np.random.default_rng(hkv * 100 + group)
    batch = paged_batch(rng, [1, 15, 17, 1333], hkv, group, 32, spare_pages=3)
    indptr, blocks = random_selection(rng, batch.seq_lens, hkv, 0.5)
    sel = BlockSelection(indptr, blocks, hkv)
    whole = sparse_partial_attention(batch.q, batch.kv_pages, batch.block_tables, batch.seq_lens, indptr, blocks,
                                     32 ** -0.5, num_threads=1)
    want = merge_batch_partials([whole])
    for trial in range(8):
        cost = _cost(rng)
        slot = np.where(rng.random(blocks.size) < 0.3, 0, -1).astype(np.int32)
        sp = split_layer(sel, cost, mode=MODES[trial % 4], cached_slot=slot, static_cpu_fraction=rng.uniform())
        parts = [sparse_partial_attention(batch.q, batch.kv_pages, batch.block_tables, batch.seq_lens,
                                          s.sel_indptr, s.sel_blocks, 32 ** -0.5, num_threads=1)
                 for s in (sp.cpu, sp.gpu)]
        got = merge_batch_partials(parts)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    for b in range(len(batch.seq_lens)):
        k, v = batch.request_kv(b)
        ref = reference.merge_partials([reference.partial_attention(batch.q[b], k, v, sel.head_lists(b))])
        np.testing.assert_allclose(want[b], ref, rtol=2e-4, atol=2e-5)
