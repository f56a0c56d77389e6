"""The structured synthetic KV: shapes, determinism, and that the planted mass is really there."""

import dataclasses

import numpy as np
import pytest

from fluxion_dist.attention.layout import BLOCK_TOKENS
from fluxion_dist.attention.synthetic import PRESETS, HeadMix, drifted_queries, make_synthetic_kv


def _true_mass(kv):
    """Exact softmax per query head over all tokens, float64: ``[Hq, T]``."""
    g = kv.q.shape[0] // kv.k.shape[1]
    s = np.einsum("hd,thd->ht", kv.q.astype(np.float64), np.repeat(kv.k, g, axis=1).astype(np.float64)) * kv.scale
    p = np.exp(s - s.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("t", [1, 15, 17, 1000, 3001])
@pytest.mark.parametrize("g", [1, 4, 8])
def test_shapes_dtypes_and_any_length(t, g):
    kv = make_synthetic_kv(t, ["sink_local", "needle", "uniform"], group_size=g, head_dim=32, seed=t + g)
    assert kv.q.shape == (3 * g, 32) and kv.k.shape == kv.v.shape == (t, 3, 32)
    assert kv.q.dtype == kv.k.dtype == kv.v.dtype == np.float32
    assert np.all(np.isfinite(kv.k)) and np.all(np.isfinite(kv.v)) and np.abs(kv.q).min() > 0
    assert kv.kinds == ("local", "retrieval", "dense")
    for blk, tok in zip(kv.needle_blocks, kv.needle_tokens):
        assert np.all(np.isin(tok // BLOCK_TOKENS, blk)) and np.all(tok < t)


def test_seeded_and_fresh():
    a = make_synthetic_kv(777, ["needle", "uniform"], seed=5)
    b = make_synthetic_kv(777, ["needle", "uniform"], seed=5)
    c = make_synthetic_kv(777, ["needle", "uniform"], seed=6)
    np.testing.assert_array_equal(a.k, b.k)
    np.testing.assert_array_equal(a.needle_blocks[0], b.needle_blocks[0])
    assert not np.allclose(a.k, c.k)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("g", [1, 4, 8])
def test_planted_mass_profile(seed, g):
    t = 4000 + 37 * seed
    kv = make_synthetic_kv(t, ["sink_local", "needle", "uniform"], group_size=g, seed=seed,
                           sink_tokens=4, recent_tokens=128)
    p = _true_mass(kv)
    local = p[:g, :4].sum(axis=1) + p[:g, -128:].sum(axis=1)
    assert np.all(local > 0.9), local
    needle = p[g:2 * g][:, kv.needle_tokens[1]].sum(axis=1)
    assert np.all(np.abs(needle - PRESETS["needle"].needle) < 0.1), needle
    assert kv.needle_blocks[1].size == 3
    # needles sit wholly outside the sinks and the recent window
    assert kv.needle_blocks[1].min() >= 1 and (kv.needle_blocks[1].max() + 1) * BLOCK_TOKENS <= t - 128
    # uniform: no token holds more than a few times its fair share
    assert p[2 * g:].max() < 8.0 / t


def test_mixture_and_short_context():
    mix = HeadMix(sink=0.3, needle=0.6, spread=0.1)
    assert mix.kind == "retrieval" and HeadMix(local=0.5, spread=0.5).kind in ("local", "dense")
    kv = make_synthetic_kv(2500, [mix], group_size=4, seed=3)
    p = _true_mass(kv)
    assert np.all(p[:, kv.needle_tokens[0]].sum(axis=1) > 0.45)
    # too short for a needle outside the window: none planted, the rest renormalised
    short = make_synthetic_kv(100, ["needle"], seed=1)
    assert short.needle_blocks[0].size == 0
    np.testing.assert_allclose(_true_mass(short).sum(axis=1), 1.0)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="unknown head pattern"):
        make_synthetic_kv(10, ["bogus"])
    with pytest.raises(ValueError, match="non-negative"):
        HeadMix(sink=-1.0, spread=1.0)
    with pytest.raises(ValueError, match="num_tokens"):
        make_synthetic_kv(0, ["uniform"])


def test_drifted_queries_move_scores_not_the_profile():
    kv = make_synthetic_kv(3000, ["needle"], group_size=4, seed=11)
    qs = drifted_queries(kv, steps=3, drift=0.3, seed=2)
    assert qs.shape == (3, 4, kv.q.shape[1]) and qs.dtype == np.float32
    assert not np.allclose(qs[0], qs[1])
    for q in qs:
        p = _true_mass(dataclasses.replace(kv, q=q))
        assert np.all(p[:, kv.needle_tokens[0]].sum(axis=1) > 0.5)


def test_topic_switches_hold_between_switches_and_keep_the_profile():
    kv = make_synthetic_kv(3000, ["needle"], group_size=4, seed=12)
    qs = drifted_queries(kv, steps=8, drift=0.0, seed=3, topic_every=4, topic_shift=2.0)
    np.testing.assert_array_equal(qs[0], qs[3])  # no drift: one topic, one query
    assert not np.allclose(qs[3], qs[4])  # the switch
    np.testing.assert_array_equal(qs[4], qs[7])
    u = kv.directions[0].astype(np.float64)
    np.testing.assert_allclose(qs.astype(np.float64) @ u, np.broadcast_to(kv.q @ u, (8, 4)), rtol=1e-5, atol=1e-3)
    assert np.array_equal(drifted_queries(kv, 5, drift=0.3, seed=4),
                          drifted_queries(kv, 5, drift=0.3, seed=4, topic_every=0, topic_shift=9.0))
    with pytest.raises(ValueError, match="topic_every"):
        drifted_queries(kv, 2, topic_every=-1)
