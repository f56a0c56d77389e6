"""The granularity-budget selector and the fixed baseline: mass target, global cap, needles, CSR form."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from fluxion_dist.attention import reference as ref
from fluxion_dist.attention.layout import num_blocks
from fluxion_dist.attention.synthetic import make_synthetic_kv
from fluxion_dist.config.schema import SparseConfig
from fluxion_dist.sparse import (HeadKind, SparseInputError, estimated_mass, fixed_budget_blocks, forced_blocks,
                                 pyramid_from_kv, quest_scores, select_budgets, select_fixed, unit_tokens)

L, R, D = HeadKind.LOCAL, HeadKind.RETRIEVAL, HeadKind.DENSE


def _setup(t, heads, g=4, seed=0):
    kv = make_synthetic_kv(t, heads, group_size=g, seed=seed)
    pyr = pyramid_from_kv(kv.k)
    scores = quest_scores(kv.q, pyr.kmin[0], pyr.kmax[0], kv.scale)
    return kv, pyr, scores, estimated_mass(scores, unit_tokens(t, 1), len(heads))


def _well_formed(sel, hkv, nb):
    assert sel.sel_indptr.dtype == np.int32 and sel.sel_blocks.dtype == np.int32
    assert sel.sel_indptr.size == hkv + 1 and sel.sel_indptr[0] == 0
    for h in range(hkv):
        row = sel.row(0, h)
        assert np.all(np.diff(row) > 0) and (row.size == 0 or (row[0] >= 0 and row[-1] < nb))


@pytest.mark.parametrize("target", [0.8, 0.95])
@pytest.mark.parametrize("seed", [0, 1])
def test_reaches_the_mass_target_with_a_minimal_set_when_the_cap_is_loose(target, seed):
    t = 3001 + seed
    kv, pyr, _, mass = _setup(t, ["needle", "uniform", "needle"], seed=seed)
    cfg = SparseConfig(policy="fluxion", budget=1.0, mass_target=target)
    kinds = np.array([R, D, R], np.int8)
    bs = select_budgets(kv.q, pyr, cfg, kinds, base_mass=mass, scale=kv.scale)
    _well_formed(bs.selection, 3, num_blocks(t))
    assert np.all(bs.mass_kept >= target - 1e-9), bs.mass_kept
    for h in range(3):
        row = bs.selection.row(0, h)
        np.testing.assert_allclose(mass[h, row].sum(), bs.mass_kept[h], rtol=1e-9)
    # retrieval heads at 16 tokens: dropping their least valuable selected block falls short
    forced = forced_blocks(t, cfg.sink_tokens, cfg.recent_tokens)
    for h in (0, 2):
        assert bs.granularity[h] == 16
        free = np.setdiff1d(bs.selection.row(0, h), np.flatnonzero(forced))
        assert free.size and bs.mass_kept[h] - mass[h, free].min() < target
    assert bs.granularity[1] in (64, 256)
    assert np.all(bs.blocks_used == bs.demand_blocks)


@pytest.mark.parametrize("g", [1, 4, 8])
def test_global_cap_and_needles_at_five_percent(g):
    t = 6007
    kv, pyr, _, mass = _setup(t, ["sink_local", "needle", "uniform", "needle"], g=g, seed=g)
    cfg = SparseConfig(policy="fluxion", budget=0.05, mass_target=0.95)
    kinds = np.array([L, R, D, R], np.int8)
    bs = select_budgets(kv.q, pyr, cfg, kinds, base_mass=mass, scale=kv.scale)
    nb = num_blocks(t)
    _well_formed(bs.selection, 4, nb)
    assert bs.cap_blocks == int(np.ceil(0.05 * 4 * nb))
    # the cap binds (the dense head wants most of the context) and is respected; the
    # leftover is less than one 256-token unit
    assert bs.demand_blocks.sum() > bs.cap_blocks
    assert bs.cap_blocks - 16 < bs.blocks_used.sum() <= bs.cap_blocks
    # the local head keeps exactly the sinks and the window
    forced = forced_blocks(t, cfg.sink_tokens, cfg.recent_tokens)
    assert bs.selection.row(0, 0).tolist() == np.flatnonzero(forced).tolist()
    # needle heads keep their needles, and give the rest of their share to the dense head
    for h in (1, 3):
        assert np.all(np.isin(kv.needle_blocks[h], bs.selection.row(0, h)))
        assert bs.budget_used[h] < 0.05
    assert bs.budget_used[2] > 0.1 and bs.granularity[2] in (64, 256)


def test_local_heads_are_labels_not_mass_but_target_one_is_exact():
    t = 2000
    kv, pyr, _, mass = _setup(t, ["needle", "uniform"], seed=4)
    kinds = np.array([L, L], np.int8)
    bs = select_budgets(kv.q, pyr, SparseConfig(policy="fluxion", budget=1.0, mass_target=0.95), kinds,
                        base_mass=mass, scale=kv.scale)
    assert np.all(bs.blocks_used == forced_blocks(t, 16, 128).sum()) and np.all(bs.mass_kept < 0.95)
    exact = select_budgets(kv.q, pyr, SparseConfig(policy="fluxion", budget=1.0, mass_target=1.0), kinds,
                           base_mass=mass, scale=kv.scale)
    assert np.all(exact.blocks_used == num_blocks(t))


def test_unlabelled_selection_and_label_checks():
    t = 2500
    kv, pyr, _, _ = _setup(t, ["needle", "uniform"], seed=5)
    bs = select_budgets(kv.q, pyr, SparseConfig(policy="fluxion", budget=0.1, mass_target=0.9), None,
                        scale=kv.scale)
    assert bs.blocks_used.sum() <= bs.cap_blocks
    assert np.all(np.isin(kv.needle_blocks[0], bs.selection.row(0, 0)))
    with pytest.raises(SparseInputError, match="one head label per KV head"):
        select_budgets(kv.q, pyr, SparseConfig(), np.zeros(3, np.int8))
    with pytest.raises(SparseInputError, match="mass_target"):
        select_budgets(kv.q, pyr, SparseConfig(mass_target=1.5), None)
    with pytest.raises(SparseInputError, match="unknown head labels"):
        select_budgets(kv.q, pyr, SparseConfig(), np.array([0, 7], np.int8))


@settings(max_examples=25, deadline=None)
@given(t=st.integers(1, 1500), budget=st.floats(0.01, 1.0), target=st.floats(0.05, 1.0),
       kinds=st.lists(st.sampled_from([None, L, R, D]), min_size=2, max_size=2), seed=st.integers(0, 10**6))
def test_invariants_on_random_inputs(t, budget, target, kinds, seed):
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((t, 2, 8)) * rng.uniform(0.2, 3.0)
    q = rng.standard_normal((4, 8)) * rng.uniform(0.2, 3.0)
    pyr = pyramid_from_kv(k)
    labels = None if None in kinds else np.array(kinds, np.int8)
    cfg = SparseConfig(policy="fluxion", budget=budget, mass_target=target, sink_tokens=int(rng.integers(0, 40)),
                       recent_tokens=int(rng.integers(0, 200)))
    bs = select_budgets(q, pyr, cfg, labels)
    nb = num_blocks(t)
    _well_formed(bs.selection, 2, nb)
    forced = forced_blocks(t, cfg.sink_tokens, cfg.recent_tokens)
    for h in range(2):
        assert np.all(np.isin(np.flatnonzero(forced), bs.selection.row(0, h)))
    assert bs.blocks_used.sum() <= max(bs.cap_blocks, 2 * forced.sum())
    assert np.all(bs.mass_kept <= 1 + 1e-9) and np.all(bs.blocks_used == bs.selection.blocks_per_row())
    if bs.blocks_used.sum() < bs.cap_blocks - 15 and labels is None:
        # the cap did not bind: every head reached the target
        assert np.all(bs.mass_kept >= min(target, 1.0) * (1 - 1e-9) - 1e-12)


@pytest.mark.parametrize("t", [17, 1000, 5003])
@pytest.mark.parametrize("g", [1, 4, 8])
def test_fixed_selection_is_forced_plus_reference_topk(t, g):
    rng = np.random.default_rng(t + g)
    q, k = rng.standard_normal((2 * g, 16)), rng.standard_normal((t, 2, 16))
    kmin, kmax = ref.block_metadata(k)
    scores = ref.quest_scores(q, kmin, kmax)
    cfg = SparseConfig(policy="quest_gpu", budget=0.05)
    sel = select_fixed(scores, t, 2, cfg)
    forced = forced_blocks(t, cfg.sink_tokens, cfg.recent_tokens)
    per_kv = ref.kv_head_scores(scores, 2)
    n = fixed_budget_blocks(t, 0.05)
    free = np.flatnonzero(~forced)
    extra = max(n - forced.sum(), 0)
    for h in range(2):
        want = set(np.flatnonzero(forced)) | set(free[ref.select_topk(per_kv[h:h + 1, free], extra)[0]]
                                                 if extra else [])
        assert sel.row(0, h).tolist() == sorted(want)
    assert np.all(sel.blocks_per_row() == max(n, forced.sum()))
    _well_formed(sel, 2, num_blocks(t))
