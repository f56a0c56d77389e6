"""The policy facade: exact at budget 1, and Fluxion vs the fixed 0.05 baseline on planted heads.

What the quality test measures: for each planted KV head, the relative L2 error
``|o - o_full| / |o_full|`` of the attention output, averaged over the head's query
heads, of ``reference.partial_attention`` over the selection against
``reference.decode_attention``; Fluxion's predictor state comes from three earlier
steps of drifting queries, as in a running decode. Measured at 8k-12k tokens, GQA 4,
both at a 5.0% average budget: local heads ~0.010-0.012 for both; the needle head
~0.03 for both (the planted 10% spread mass is what is missing); the dense head
0.023-0.025 for Fluxion (14-16% of its KV) vs 0.040-0.045 for fixed 0.05.
"""

import numpy as np
import pytest

from fluxion_dist.attention import reference as ref
from fluxion_dist.attention.layout import num_blocks
from fluxion_dist.attention.synthetic import drifted_queries, make_synthetic_kv
from fluxion_dist.config.schema import SparseConfig
from fluxion_dist.sparse import HeadKind, SparseInputError, concat_selections, decide, pyramid_from_kv

POLICIES = ("full", "quest_gpu", "cpu_only", "fixed_hybrid", "fluxion")


def _out(q, k, v, selection, request=0):
    return ref.merge_partials([ref.partial_attention(q, k, v, selection.head_lists(request))])


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("t,g", [(1, 1), (17, 4), (1000, 8), (2051, 4)])
def test_budget_one_is_full_attention(policy, t, g):
    rng = np.random.default_rng(t * 3 + g)
    q, k, v = rng.standard_normal((2 * g, 32)), rng.standard_normal((t, 2, 32)), rng.standard_normal((t, 2, 32))
    cfg = SparseConfig(policy=policy, budget=1.0, mass_target=1.0)
    d = decide(q, pyramid_from_kv(k), cfg)
    assert np.all(d.blocks_used == num_blocks(t)) and np.all(d.budget_used == 1.0)
    np.testing.assert_allclose(d.mass_kept, 1.0, rtol=1e-9)
    np.testing.assert_allclose(_out(q, k, v, d.selection), ref.decode_attention(q, k, v), rtol=1e-12, atol=1e-12)


def test_fixed_policies_select_identically_and_fluxion_carries_state():
    kv = make_synthetic_kv(3001, ["needle", "uniform"], group_size=4, seed=2)
    pyr = pyramid_from_kv(kv.k)
    sels = [decide(kv.q, pyr, SparseConfig(policy=p), scale=kv.scale).selection for p in POLICIES[1:4]]
    for s in sels[1:]:
        np.testing.assert_array_equal(s.sel_indptr, sels[0].sel_indptr)
        np.testing.assert_array_equal(s.sel_blocks, sels[0].sel_blocks)
    d = decide(kv.q, pyr, SparseConfig(policy="fluxion"), scale=kv.scale)
    assert d.state.steps == 1 and d.kinds.tolist() == [HeadKind.RETRIEVAL, HeadKind.DENSE]
    d2 = decide(kv.q, pyr, SparseConfig(policy="fluxion"), state=d.state, scale=kv.scale)
    assert d2.state.steps == 2
    with pytest.raises(SparseInputError, match="policy 'bogus'"):
        decide(kv.q, pyr, SparseConfig(policy="bogus"))  # type: ignore[arg-type]
    with pytest.raises(SparseInputError, match="q must be"):
        decide(kv.q[:3], pyr, SparseConfig())


def test_batched_rows_for_two_requests():
    a = make_synthetic_kv(700, ["needle", "uniform"], group_size=4, seed=8)
    b = make_synthetic_kv(1601, ["sink_local", "needle"], group_size=4, seed=9)
    cfg = SparseConfig(policy="fluxion", budget=0.2)
    da = decide(a.q, pyramid_from_kv(a.k), cfg, scale=a.scale)
    db = decide(b.q, pyramid_from_kv(b.k), cfg, scale=b.scale)
    both = concat_selections([da.selection, db.selection])
    assert both.num_rows == 4
    np.testing.assert_array_equal(_out(b.q, b.k, b.v, both, request=1), _out(b.q, b.k, b.v, db.selection))


def _errors(kv, selection):
    g = kv.q.shape[0] // kv.k.shape[1]
    full = ref.decode_attention(kv.q, kv.k, kv.v)
    o = _out(kv.q, kv.k, kv.v, selection)
    return (np.linalg.norm(o - full, axis=1) / np.linalg.norm(full, axis=1)).reshape(-1, g).mean(axis=1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fluxion_vs_fixed_at_five_percent(seed):
    """Planted [local, local, needle, dense] heads, 5% budget for both, 8-12k tokens, GQA 4."""
    t = [8191, 10007, 12345][seed]
    kv = make_synthetic_kv(t, ["sink_local", "sink_local", "needle", "uniform"], group_size=4, seed=seed)
    pyr = pyramid_from_kv(kv.k)
    flux_cfg = SparseConfig(policy="fluxion", budget=0.05, mass_target=0.95)
    state = None
    for q in drifted_queries(kv, 3, drift=0.3, seed=seed):
        state = decide(q, pyr, flux_cfg, state=state, scale=kv.scale).state
    flux = decide(kv.q, pyr, flux_cfg, state=state, scale=kv.scale)
    fixed = decide(kv.q, pyr, SparseConfig(policy="fixed_hybrid", budget=0.05), scale=kv.scale)
    assert flux.kinds.tolist() == [HeadKind.LOCAL, HeadKind.LOCAL, HeadKind.RETRIEVAL, HeadKind.DENSE]
    # equal average budget: both read 5% of the layer's KV (to a block)
    assert abs(flux.budget_used.mean() - 0.05) < 0.002 and abs(fixed.budget_used.mean() - 0.05) < 0.002
    # both keep the needles
    for d in (flux, fixed):
        assert np.all(np.isin(kv.needle_blocks[2], d.selection.row(0, 2)))
    e_flux, e_fixed = _errors(kv, flux.selection), _errors(kv, fixed.selection)
    # Fluxion: small error on every planted head, with most of the budget moved to the dense head
    assert np.all(e_flux < 0.05), e_flux
    assert flux.budget_used[3] > 2.5 * 0.05 and np.all(flux.budget_used[:3] < 0.05)
    # on local and needle heads Fluxion is about as good with a fraction of the blocks ...
    assert np.all(e_flux[:3] < 1.25 * e_fixed[:3] + 0.005), (e_flux, e_fixed)
    # ... and the fixed fraction is visibly worse on the dense head
    assert e_fixed[3] > 1.5 * e_flux[3], (e_flux, e_fixed)
