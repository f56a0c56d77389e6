"""Vectorised Quest metadata, scores and mass against the float64 reference; the CSR helpers."""

import numpy as np
import pytest

from fluxion_dist.attention import reference as ref
from fluxion_dist.attention.layout import num_blocks
from fluxion_dist.sparse import (BlockSelection, SparseInputError, build_pyramid, concat_selections,
                                 estimated_mass, forced_blocks, pyramid_from_kv, quest_scores, selected_tokens,
                                 selection_from_mask, unit_tokens)


@pytest.mark.parametrize("t", [1, 15, 17, 1000, 1041])
@pytest.mark.parametrize("hq,hkv", [(3, 3), (8, 2), (8, 1)])
def test_pyramid_and_scores_match_reference(t, hq, hkv):
    rng = np.random.default_rng(t * 7 + hq)
    k = rng.standard_normal((t, hkv, 24))
    q = rng.standard_normal((hq, 24))
    pyr = pyramid_from_kv(k)
    kmin, kmax = ref.block_metadata(k)
    for i, f in enumerate(pyr.factors):
        cmin, cmax = ref.coarsen_metadata(kmin, kmax, f)
        np.testing.assert_array_equal(pyr.kmin[i], cmin)
        np.testing.assert_array_equal(pyr.kmax[i], cmax)
        np.testing.assert_allclose(quest_scores(q, cmin, cmax, 0.3), ref.quest_scores(q, cmin, cmax, 0.3),
                                   rtol=1e-10, atol=1e-10)
        assert unit_tokens(t, f).sum() == t and unit_tokens(t, f).size == cmin.shape[0]
    # float32 metadata and a NumPy float64 scale still score in float32, close to the oracle
    s32 = quest_scores(q.astype(np.float32), kmin.astype(np.float32), kmax.astype(np.float32), np.float64(0.3))
    assert s32.dtype == np.float32
    np.testing.assert_allclose(s32, ref.quest_scores(q, kmin, kmax, 0.3), rtol=1e-4, atol=1e-4)


def test_estimated_mass_is_reference_mass_averaged_over_the_group():
    rng = np.random.default_rng(1)
    t, hq, hkv = 16 * 40, 8, 2  # full blocks: the token weighting is a constant
    scores = rng.standard_normal((hq, num_blocks(t))) * 3
    got = estimated_mass(scores, unit_tokens(t, 1), hkv)
    want = ref.estimated_mass(scores).reshape(hkv, hq // hkv, -1).mean(axis=1)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    np.testing.assert_allclose(got.sum(axis=1), 1.0)
    # a short last block counts its tokens only
    short = estimated_mass(np.zeros((2, 3)), unit_tokens(40, 1), 1)
    np.testing.assert_allclose(short[0], [16 / 40, 16 / 40, 8 / 40])


def test_build_pyramid_checks_shapes():
    with pytest.raises(SparseInputError, match="kmin/kmax"):
        build_pyramid(np.ones((3, 2, 4)), np.ones((3, 2, 4)), num_tokens=100)
    with pytest.raises(SparseInputError, match="granularity factor"):
        pyramid_from_kv(np.random.default_rng(0).standard_normal((50, 1, 4))).level(8)


@pytest.mark.parametrize("t,sink,recent,want", [
    (1, 16, 128, [0]),
    (100, 16, 0, [0]),
    (100, 0, 0, []),
    (1000, 16, 128, [0] + list(range(54, 63))),
    (1000, 17, 1, [0, 1, 62]),
])
def test_forced_blocks(t, sink, recent, want):
    assert np.flatnonzero(forced_blocks(t, sink, recent)).tolist() == want


def test_csr_helpers_concat_tokens_and_masks():
    a = selection_from_mask(np.array([[1, 0, 1], [0, 0, 0]], bool))
    b = BlockSelection(np.array([0, 1, 3], np.int32), np.array([2, 0, 1], np.int32), 2,
                       np.array([0b101, 0xFFFF, 0b1], np.uint16))
    assert a.sel_blocks.dtype == np.int32 and a.sel_indptr.tolist() == [0, 2, 2]
    both = concat_selections([a, b])
    assert both.num_rows == 4 and both.sel_indptr.tolist() == [0, 2, 2, 3, 5]
    assert both.row(1, 1).tolist() == [0, 1] and both.sel_masks.tolist() == [0xFFFF, 0xFFFF, 0b101, 0xFFFF, 1]
    # 40 tokens: block 2 holds 8 valid tokens
    assert [x.tolist() for x in selected_tokens(b, 40)] == [[32, 34], list(range(16)) + [16]]
    assert b.tokens_per_row(40).tolist() == [2, 17]
    assert a.tokens_per_row(40).tolist() == [24, 0]
    with pytest.raises(SparseInputError, match="KV heads"):
        concat_selections([a, selection_from_mask(np.ones((3, 3), bool))])
