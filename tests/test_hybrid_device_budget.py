"""The GPU path's host decisions (hybrid.device_budget), on the CPU."""

from __future__ import annotations

import numpy as np
import pytest

from fluxion_dist.hybrid import CostModel
from fluxion_dist.hybrid.device_budget import (SLOT_CPU, balanced_cpu_fraction, forced_count, head_kinds,
                                               route_entries_reference, row_budget_lists, water_fill)
from fluxion_dist.sparse.head_predictor import HeadKind
from fluxion_dist.sparse.selection import forced_blocks


@pytest.mark.parametrize("seed", range(20))
def test_water_fill_is_max_min_fair(seed):
    rng = np.random.default_rng(seed)
    demand = rng.integers(0, 500, rng.integers(1, 12))
    cap = int(rng.integers(0, demand.sum() + 50))
    got = np.array(water_fill(demand.tolist(), cap))
    assert np.all(got <= demand) and np.all(got >= 0)
    assert got.sum() == min(cap, demand.sum())
    short = got < demand
    if short.any():  # every short row is at the level, which nobody unsatisfied exceeds by more than 1
        assert got[short].max() - got[short].min() <= 1
        assert np.all(got[~short] <= got[short].max())


def test_water_fill_edges():
    assert water_fill([0, 0, 0], -4) == [0, 0, 0]  # a negative cap grants nothing
    assert water_fill([5, 1, 5], 0) == [0, 0, 0]
    assert water_fill([5, 1, 5], 4) == [2, 1, 1]  # level 1, the spare unit to the lowest index short
    assert water_fill([3, 4], 100) == [3, 4]


def test_row_budget_lists_without_demand_give_every_head_the_fixed_share():
    # 5% of each request's blocks, never below the kept sink and window (10 blocks), never above
    # the request's blocks (7)
    opts = dict(budget=0.05, sink_blocks=1, recent_blocks=9)
    assert row_budget_lists(None, [1000, 100, 7], 4, **opts) == [[50] * 4, [10] * 4, [7] * 4]


@pytest.mark.parametrize("tokens", [1, 15, 16, 17, 200, 1000, 4097])
def test_forced_count_covers_sinks_and_window(tokens):
    mask = forced_blocks(tokens, 16, 128)
    nb = mask.size
    got = int(forced_count(np.array([nb]), 1, -(-128 // 16) + 1)[0])
    assert mask.sum() <= got <= mask.sum() + 1


def test_row_budgets_give_needles_all_and_share_the_rest():
    nb = np.array([1000, 100])
    demand = np.array([[3, 900, 15, 400], [2, 2, 2, 100]])
    k = np.array(row_budget_lists(demand.tolist(), nb.tolist(), 4, budget=0.05, sink_blocks=1, recent_blocks=9))
    kept = forced_count(nb, 1, 9)
    assert np.all(k >= kept[:, None])
    assert k[0, 2] == kept[0] + 15  # the retrieval head gets its whole demand, beyond the kept blocks
    assert k[0].sum() <= np.ceil(0.05 * 4 * 1000)
    assert abs(int(k[0, 1]) - int(k[0, 3])) <= 1 and k[0, 3] > kept[0] + 15  # dense heads split the rest evenly
    fixed = np.array(row_budget_lists(None, nb.tolist(), 1, budget=0.05, sink_blocks=1, recent_blocks=9))
    assert fixed.shape == (2, 1) and fixed[0, 0] == 50 and fixed[1, 0] == 10


def test_row_budgets_ask_the_demand_beyond_the_forced_blocks():
    # a needle head whose demand (3 blocks) is below the forced count (10) still gets its 3 on top
    k = row_budget_lists([[3, 0]], [1000], 2, budget=0.05, sink_blocks=1, recent_blocks=9)
    assert k == [[13, 10]]


def test_head_kinds_from_demand():
    kinds = head_kinds(np.array([[5, 14, 600]]), np.array([1000]), sink_blocks=1, recent_blocks=9)
    assert list(kinds[0]) == [HeadKind.LOCAL, HeadKind.RETRIEVAL, HeadKind.DENSE]


def test_balanced_fraction_follows_the_rates():
    fast_cpu = CostModel.from_rates(128, cpu_gb_per_s=100, uva_gb_per_s=10, cached_gb_per_s=1000)
    slow_cpu = CostModel.from_rates(128, cpu_gb_per_s=10, uva_gb_per_s=100, cached_gb_per_s=1000)
    assert balanced_cpu_fraction(fast_cpu, 0, 2000) > 0.8
    assert balanced_cpu_fraction(slow_cpu, 0, 2000) < 0.2
    assert balanced_cpu_fraction(fast_cpu, 0, 0) == 0.0
    assert balanced_cpu_fraction(CostModel.cpu_only(128, 10.0), 0, 50) == 1.0


@pytest.mark.parametrize("seed", range(40))
def test_balanced_fraction_is_the_best_integer_split(seed):
    """Against a brute force over every split, with the host round trip a split costs."""
    rng = np.random.default_rng(seed)
    cost = CostModel.from_rates(128, cpu_gb_per_s=rng.uniform(5, 100), uva_gb_per_s=rng.uniform(5, 60),
                                cached_gb_per_s=1000, cpu_overhead_s=rng.uniform(0, 2e-4))
    hits, misses, admits = (int(x) for x in rng.integers(0, 3000, 3))
    hits *= seed % 3 > 0  # no hits at all: all-CPU launches nothing on the GPU
    switch = float(rng.uniform(0, 3e-4))
    t = [cost.gpu_time(hits, misses, admits)] + [
        max(cost.cpu_time(x), cost.gpu_time(hits, misses - x, admits)) + switch for x in range(1, misses + 1)]
    got = balanced_cpu_fraction(cost, hits, misses, admits=admits, switch_s=switch)
    assert t[round(got * misses)] <= min(t) + 1e-12


def test_a_small_miss_set_stays_on_the_gpu():
    """A split has to pay for the host round trip: a few misses never go to the CPU."""
    cost = CostModel.from_rates(128, cpu_gb_per_s=100, uva_gb_per_s=50, cached_gb_per_s=1000, cpu_overhead_s=50e-6)
    assert balanced_cpu_fraction(cost, 3000, 100, switch_s=100e-6) == 0.0
    assert balanced_cpu_fraction(cost, 3000, 20000, switch_s=100e-6) > 0.5


def test_route_reference_puts_every_entry_in_one_place():
    rng = np.random.default_rng(3)
    tables = rng.permutation(64).reshape(2, 32).astype(np.int32)
    seq = np.array([500, 300], np.int32)
    rows = [np.sort(rng.choice(32 if r < 2 else 19, 10, replace=False)) for r in range(4)]
    indptr = np.concatenate([[0], np.cumsum([10] * 4)]).astype(np.int32)
    blocks = np.concatenate(rows).astype(np.int32)
    slot_of = np.where(rng.random(128) < 0.5, np.arange(128), -1).astype(np.int32)
    sel_slot, cpu_indptr, cpu_blocks, admit, counts = route_entries_reference(
        indptr, blocks, tables, seq, 2, slot_of, 0.5)
    assert counts.sum() - counts[3] == blocks.size
    assert (sel_slot == SLOT_CPU).sum() == counts[2] == cpu_blocks.size == cpu_indptr[-1]
    assert abs(counts[2] - 0.5 * (counts[1] + counts[2])) <= 1
