"""The head-property predictor labels planted synthetic heads, and its EMA smooths over steps."""

import numpy as np
import pytest

from fluxion_dist.attention.synthetic import HeadMix, drifted_queries, make_synthetic_kv
from fluxion_dist.sparse import (HeadKind, PredictorConfig, SparseInputError, estimated_mass, forced_blocks,
                                 predict_heads, pyramid_from_kv, quest_scores, unit_tokens)
from fluxion_dist.sparse.head_predictor import blend, measure_features


def _mass(kv, q=None):
    pyr = pyramid_from_kv(kv.k)
    s = quest_scores(kv.q if q is None else q, pyr.kmin[0], pyr.kmax[0], kv.scale)
    return estimated_mass(s, unit_tokens(kv.num_tokens, 1), kv.k.shape[1])


def _expected(kv):
    return np.array([HeadKind[k.upper()] for k in kv.kinds], np.int8)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("g", [1, 4, 8])
def test_labels_planted_heads(seed, g):
    t = [3001, 4099, 6007, 9000][seed]
    heads = ["uniform", "sink_local", "needle", HeadMix(sink=0.3, needle=0.6, spread=0.1)]
    kv = make_synthetic_kv(t, heads, group_size=g, head_dim=64, seed=100 + seed)
    forced = forced_blocks(t, 16, 128)
    pred = predict_heads(_mass(kv), forced)
    np.testing.assert_array_equal(pred.kinds, _expected(kv))
    assert pred.kinds.dtype == np.int8 and pred.features.steps == 1
    # over a few steps of drifting queries the EMA keeps the same labels
    state = pred.features
    for q in drifted_queries(kv, 3, drift=0.3, seed=seed):
        pred = predict_heads(_mass(kv, q), forced, state)
        state = pred.features
    np.testing.assert_array_equal(pred.kinds, _expected(kv))
    assert state.steps == 4


def test_ema_needs_several_steps_to_flip_a_label():
    t = 4000
    a = make_synthetic_kv(t, ["uniform", "needle"], group_size=4, seed=7)
    b = make_synthetic_kv(t, ["needle", "uniform"], group_size=4, seed=7)
    forced = forced_blocks(t, 16, 128)
    cfg = PredictorConfig(decay=0.7)
    state = None
    for _ in range(5):
        state = predict_heads(_mass(a), forced, state, cfg).features
    first = predict_heads(_mass(b), forced, state, cfg)
    # one step of the other profile moves the features, not yet the labels
    assert first.kinds.tolist() == [HeadKind.DENSE, HeadKind.RETRIEVAL]
    state = first.features
    for _ in range(4):
        pred = predict_heads(_mass(b), forced, state, cfg)
        state = pred.features
    assert pred.kinds.tolist() == [HeadKind.RETRIEVAL, HeadKind.DENSE]
    # the EMA is the plain weighted mean
    m = measure_features(_mass(b), forced, cfg)
    mixed = blend(m, m, 0.7)
    np.testing.assert_allclose(mixed.entropy, m.entropy)


def test_features_on_hand_made_profiles():
    nb = 200
    forced = np.zeros(nb, bool)
    forced[[0, nb - 1]] = True
    flat = np.full(nb, 1.0 / nb)
    needle = np.full(nb, 0.02 / nb)
    needle[[50, 120]] = 0.49
    local = np.full(nb, 0.05 / nb)
    local[[0, nb - 1]] += 0.475
    f = measure_features(np.stack([flat, needle / needle.sum(), local / local.sum()]), forced, PredictorConfig())
    assert f.concentration[0] < 0.05 and f.entropy[0] > 0.99
    assert f.concentration[1] > 0.9 and f.entropy[1] < 0.3
    assert f.locality[2] > 0.9
    # every block kept: nothing to tell apart, the head is local
    short = predict_heads(np.full((2, 5), 0.2), np.ones(5, bool))
    assert short.kinds.tolist() == [HeadKind.LOCAL, HeadKind.LOCAL]


def test_bad_inputs_are_named():
    with pytest.raises(SparseInputError, match="decay"):
        PredictorConfig(decay=1.5)
    with pytest.raises(SparseInputError, match="forced"):
        predict_heads(np.full((2, 5), 0.2), np.ones(4, bool))
    state = predict_heads(np.full((2, 5), 0.2), np.zeros(5, bool)).features
    with pytest.raises(SparseInputError, match="heads"):
        predict_heads(np.full((3, 5), 0.2), np.zeros(5, bool), state)
