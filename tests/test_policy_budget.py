"""The pooled budget (policy.budget): the pool is spent exactly, its average is the budget, every
row keeps its floor, no row exceeds its blocks, local heads give their floor back, requests
without demand get the fixed rule, each request its own budget; water-filling is max-min fair."""

from __future__ import annotations

import time

import numpy as np
import pytest

from fluxion_dist.policy.budget import (BudgetError, demand_row_budgets, forced_count, kept_mask,
                                        pooled_row_budgets, share_blocks, water_fill, water_fill_rows)

OPTS = dict(sink_blocks=1, recent_blocks=9)


@pytest.mark.parametrize("seed", range(30))
def test_water_fill_is_max_min_fair(seed):
    rng = np.random.default_rng(seed)
    demand = rng.integers(0, 500, rng.integers(1, 40))
    cap = int(rng.integers(0, demand.sum() + 50))
    got = water_fill(demand, cap)
    assert np.all(got <= demand) and np.all(got >= 0)
    assert got.sum() == min(cap, demand.sum())
    short = got < demand
    if short.any():  # every short row is at the level, which nobody unsatisfied exceeds by more than 1
        assert got[short].max() - got[short].min() <= 1
        assert np.all(got[~short] <= got[short].max())


def test_water_fill_edges_and_rows():
    assert list(water_fill([0, 0, 0], -4)) == [0, 0, 0]
    assert list(water_fill([5, 1, 5], 0)) == [0, 0, 0]
    assert list(water_fill([5, 1, 5], 4)) == [2, 1, 1]  # level 1, the spare unit to the lowest index short
    assert list(water_fill([3, 4], 100)) == [3, 4]
    rows = water_fill_rows(np.array([[5, 1, 5], [3, 4, 0]]), [4, 100])
    assert rows.tolist() == [[2, 1, 1], [3, 4, 0]]


@pytest.mark.parametrize("tokens", [1, 15, 16, 17, 200, 1000, 4097])
def test_forced_count_is_the_kept_mask(tokens):
    nb = -(-tokens // 16)
    assert forced_count(nb, 1, 9) == kept_mask(nb, 1, 9).sum()
    assert forced_count(np.array([[nb, 3]]), 1, 9).shape == (1, 2)


def _random_case(rng, layers=6, hkv=4):
    nb = rng.integers(1, 3000, 3)
    nb[0] = 1  # one block: only kept blocks
    demand = np.where(rng.random((layers, 3, hkv)) < 0.3, 0, rng.integers(0, 400, (layers, 3, hkv)))
    demand[0, 2, 0] = 3000  # a row asking for far more than its request has
    return nb, demand


@pytest.mark.parametrize("predictor", [True, False])
@pytest.mark.parametrize("seed", range(15))
def test_pool_is_spent_and_rows_stay_in_bounds(seed, predictor):
    rng = np.random.default_rng(seed)
    nb, demand = _random_case(rng)
    budget = np.array([0.05, 0.02, 0.1])
    ff = float(rng.choice([0.0, 0.5, 1.0]))
    got = pooled_row_budgets(demand, nb, budget, floor_fraction=ff, head_predictor=predictor, **OPTS)
    assert got.shape == demand.shape and got.dtype == np.int64
    kept = forced_count(nb, **OPTS)
    rows = demand.shape[0] * demand.shape[2]
    for b in range(3):
        g = got[:, b]
        share = share_blocks(nb[b], budget[b])
        floor = min(max(kept[b], int(np.ceil(ff * budget[b] * nb[b] - 1e-9))), nb[b])
        assert np.all(g <= nb[b]) and np.all(g >= kept[b])
        pool = share * rows
        if pool >= rows * floor:  # the floors fit: the pool is spent exactly, the average is the budget
            assert g.sum() == pool
            assert g.mean() / nb[b] == pytest.approx(share / nb[b])
            assert abs(g.mean() / nb[b] - budget[b]) <= 1 / nb[b]
            local = demand[:, b] == 0
            if predictor:
                wanted = np.minimum(kept[b] + demand[:, b], nb[b])
                # the rest of a row's floor is held unless it is local
                assert np.all(g[~local] >= floor)
                if np.all(g >= wanted):  # every demand met: the remainder was spread evenly
                    assert g.max() - g.min() <= max(wanted.max() - kept[b], 1) + 1 or g.max() == nb[b]
            else:
                assert np.all(g >= floor)
        else:  # the kept blocks alone pass the pool (a short context): every row reads its floor
            assert np.all(g == floor)


def test_demand_is_granted_where_it_is():
    nb = np.array([1000])
    # 2 layers x 4 heads: a needle head (15 far blocks), two local heads, dense heads
    demand = np.array([[[15, 0, 0, 900]], [[400, 20, 5, 0]]])
    got = pooled_row_budgets(demand, nb, 0.05, floor_fraction=0.5, head_predictor=True, **OPTS)[:, 0]
    kept = 10
    assert got.sum() == 50 * 8
    assert got[0, 1] == got[0, 2] == got[1, 3] == kept  # local heads: only the kept blocks
    assert got[0, 0] == kept + 15 and got[1, 1] == kept + 20 and got[1, 2] == 25  # small demands in full
    assert got[0, 3] > 100 and got[1, 0] > 100 and abs(int(got[0, 3]) - int(got[1, 0])) <= 1  # dense: the rest
    off = pooled_row_budgets(demand, nb, 0.05, floor_fraction=0.5, head_predictor=False, **OPTS)[:, 0]
    assert off.sum() == 400 and off.min() >= 25  # every row holds its floor, local ones too


def test_no_demand_is_the_fixed_rule_and_budgets_are_per_request():
    nb = np.array([1000, 100, 7])
    got = pooled_row_budgets(None, nb, 0.05, num_layers=3, num_kv_heads=2, floor_fraction=0.5,
                             head_predictor=True, **OPTS)
    assert got.shape == (3, 3, 2)
    assert np.all(got[:, 0] == 50) and np.all(got[:, 1] == 10) and np.all(got[:, 2] == 7)
    # a request with an unmeasured row is fixed too; the others are pooled at their own budgets
    demand = np.full((3, 3, 2), 2)
    demand[1, 1, 0] = -1
    got = pooled_row_budgets(demand, nb, [0.2, 0.05, 1.0], floor_fraction=0.5, head_predictor=True, **OPTS)
    assert got[:, 0].sum() == 200 * 6 and np.all(got[:, 1] == 10) and np.all(got[:, 2] == 7)
    full = pooled_row_budgets(demand * 0 + 5, np.array([500]).repeat(3), 1.0, floor_fraction=0.5,
                              head_predictor=True, **OPTS)
    assert np.all(full == 500)


def test_a_quality_target_reads_each_rows_demand_under_the_cap():
    """Under max_output_error every row reads its kept blocks plus its demand, whatever the
    average comes to, until the request's rows together ask for more than the cap: then the
    demand is water-filled (needles whole, dense rows cut); every row keeps its floor;
    unmeasured or full requests keep the fixed rule at their budget."""
    nb = np.array([1000, 1000, 500])
    demand = np.zeros((2, 3, 2), np.int64)
    demand[:, 0] = [[3, 0], [40, 7]]  # request 0: a little demand, far below 5%
    demand[:, 1] = [[5, 990], [990, 990]]  # request 1: three dense rows, over a 25% cap
    demand[0, 2, 1] = -1  # request 2: one row unmeasured
    got = demand_row_budgets(demand, nb, 0.05, 0.25, floor_fraction=0.0, **OPTS)
    kept = 10
    np.testing.assert_array_equal(got[:, 0], kept + demand[:, 0])
    assert got[:, 1].sum() == 250 * 4 and got[0, 1, 0] == kept + 5  # the cap, the needle row whole
    assert got[:, 1].max() - np.sort(got[:, 1].ravel())[1] <= 1  # the dense rows share the rest
    assert np.all(got[:, 2] == 25)  # the fixed share of 500 blocks at 5%
    assert np.all(demand_row_budgets(demand, nb, [0.05, 0.05, 1.0], 0.25, floor_fraction=0.0, **OPTS)[:, 2] == 500)
    assert np.all(got <= nb[None, :, None])
    floored = demand_row_budgets(demand, nb, 0.05, 0.25, floor_fraction=1.0, **OPTS)  # at least Quest's share
    assert np.all(floored[:, 0] == np.maximum(50, kept + demand[:, 0]))
    assert floored[:, 1].sum() == 250 * 4 and floored[0, 1, 0] == 50
    with pytest.raises(BudgetError, match="cap"):
        demand_row_budgets(demand, nb, 0.05, 0.0, floor_fraction=0.0, **OPTS)


def test_full_floors_without_the_predictor_are_the_fixed_rule():
    """floor_fraction 1 and no head predictor (the config's defaults): whatever the demand, every
    row reads the fixed share, so fluxion selects what Quest does."""
    rng = np.random.default_rng(1)
    nb, demand = _random_case(rng)
    got = pooled_row_budgets(demand, nb, 0.05, floor_fraction=1.0, head_predictor=False, **OPTS)
    fixed = pooled_row_budgets(None, nb, 0.05, num_layers=demand.shape[0], num_kv_heads=demand.shape[2],
                               floor_fraction=1.0, head_predictor=False, **OPTS)
    np.testing.assert_array_equal(got, fixed)


def test_bad_inputs_name_the_argument():
    with pytest.raises(BudgetError, match="budget"):
        pooled_row_budgets(None, [10], 0.0, num_layers=1, num_kv_heads=1, floor_fraction=0.5,
                           head_predictor=True, **OPTS)
    with pytest.raises(BudgetError, match="demand must be"):
        pooled_row_budgets(np.zeros((2, 3)), [10], 0.1, floor_fraction=0.5, head_predictor=True, **OPTS)
    with pytest.raises(BudgetError, match="num_layers"):
        pooled_row_budgets(None, [10], 0.1, floor_fraction=0.5, head_predictor=True, **OPTS)
    with pytest.raises(BudgetError, match="nb"):
        pooled_row_budgets(None, [0], 0.1, num_layers=1, num_kv_heads=1, floor_fraction=0.5,
                           head_predictor=True, **OPTS)


def test_fast_enough_for_every_step():
    rng = np.random.default_rng(0)
    demand = rng.integers(0, 300, (32, 16, 2))  # 1024 rows
    nb = rng.integers(100, 8000, 16)
    pooled_row_budgets(demand, nb, 0.05, floor_fraction=0.5, head_predictor=True, **OPTS)
    t0 = time.perf_counter()
    for _ in range(20):
        pooled_row_budgets(demand, nb, 0.05, floor_fraction=0.5, head_predictor=True, **OPTS)
    per_call = (time.perf_counter() - t0) / 20
    assert per_call < 2e-3  # a loose bound for a shared CI machine; typically well under 100 us
