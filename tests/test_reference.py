"""The float64 reference against itself: partial + merge over any split equals full attention."""

import numpy as np
import pytest

from fluxion_dist.attention import reference as ref
from fluxion_dist.attention.layout import num_blocks, pack_kv_blocks, unpack_kv_blocks, to_bf16_bits, from_bf16_bits


def _qkv(rng, t, hq, hkv, d=16):
    return (rng.standard_normal((hq, d)), rng.standard_normal((t, hkv, d)), rng.standard_normal((t, hkv, d)))


@pytest.mark.parametrize("t", [1, 15, 17, 1000])
@pytest.mark.parametrize("hq,hkv", [(2, 2), (8, 2), (8, 1)])
def test_any_partition_of_blocks_merges_to_full_attention(t, hq, hkv):
    rng = np.random.default_rng(t * 31 + hq)
    q, k, v = _qkv(rng, t, hq, hkv)
    nb = num_blocks(t)
    want = ref.decode_attention(q, k, v)
    for _ in range(5):
        parts = rng.integers(0, 3, size=(hkv, nb))  # each (head, block) to one of 3 partials
        partials = [ref.partial_attention(q, k, v, [np.flatnonzero(parts[h] == p) for h in range(hkv)])
                    for p in range(3)]
        np.testing.assert_allclose(ref.merge_partials(partials), want, rtol=1e-12, atol=1e-12)


def test_selecting_every_block_is_full_attention():
    rng = np.random.default_rng(0)
    q, k, v = _qkv(rng, 100, 8, 2)
    allb = [np.arange(num_blocks(100))] * 2
    got = ref.merge_partials([ref.partial_attention(q, k, v, allb)])
    np.testing.assert_allclose(got, ref.decode_attention(q, k, v), rtol=1e-12)
    kmin, kmax = ref.block_metadata(k)
    assert [len(s) for s in ref.select_topk(ref.kv_head_scores(ref.quest_scores(q, kmin, kmax), 2), 999)] == [7, 7]


def test_empty_partial_is_neutral_in_a_merge():
    rng = np.random.default_rng(1)
    q, k, v = _qkv(rng, 40, 4, 2)
    empty = ref.partial_attention(q, k, v, [np.array([], int)] * 2)
    assert np.all(np.isneginf(empty.m)) and np.all(empty.l == 0)
    full = ref.partial_attention(q, k, v, [np.arange(3)] * 2)
    np.testing.assert_allclose(ref.merge_partials([empty, full]), ref.decode_attention(q, k, v), rtol=1e-12)
    with pytest.raises(ValueError, match="no tokens"):
        ref.merge_partials([empty])


def test_quest_score_bounds_every_token_score():
    rng = np.random.default_rng(2)
    q, k, _ = _qkv(rng, 77, 8, 2)
    kmin, kmax = ref.block_metadata(k)
    s = ref.quest_scores(q, kmin, kmax)
    tok = np.einsum("hd,thd->ht", q, np.repeat(k, 4, axis=1)) / np.sqrt(16)
    for b in range(num_blocks(77)):
        assert np.all(s[:, b] >= tok[:, b * 16:(b + 1) * 16].max(axis=1) - 1e-12)


def test_coarse_metadata_is_min_of_mins():
    rng = np.random.default_rng(3)
    k = rng.standard_normal((300, 2, 8))
    kmin, kmax = ref.block_metadata(k)
    cmin, cmax = ref.coarsen_metadata(kmin, kmax, 4)
    dmin, dmax = ref.block_metadata(k, block_tokens=64)
    np.testing.assert_array_equal(cmin, dmin)
    np.testing.assert_array_equal(cmax, dmax)


@pytest.mark.parametrize("p", [0.5, 0.9, 0.99, 1.0])
def test_topp_keeps_at_least_the_requested_mass_with_fewest_blocks(p):
    rng = np.random.default_rng(4)
    scores = rng.standard_normal((6, 50)) * 3
    mass = ref.estimated_mass(scores)
    for row, sel in enumerate(ref.select_topp(scores, p)):
        kept = mass[row, sel].sum()
        assert kept >= p - 1e-9
        # dropping the smallest kept block would fall below p: the set is minimal
        assert kept - mass[row, sel].min() < p


def test_topk_ties_go_to_lower_id():
    assert ref.select_topk(np.array([[1.0, 2.0, 2.0, 0.0]]), 2)[0].tolist() == [1, 2]
    assert ref.select_topk(np.array([[3.0, 3.0, 3.0]]), 2)[0].tolist() == [0, 1]


@pytest.mark.parametrize("t", [1, 15, 16, 17, 33])
def test_paged_layout_round_trips(t):
    rng = np.random.default_rng(t)
    k, v = rng.standard_normal((t, 3, 8)), rng.standard_normal((t, 3, 8))
    pages = pack_kv_blocks(k, v)
    assert pages.shape == (num_blocks(t), 3, 2, 16, 8) and pages.dtype == np.uint16
    k2, v2 = unpack_kv_blocks(pages, t)
    np.testing.assert_array_equal(k2, from_bf16_bits(to_bf16_bits(k)))
    np.testing.assert_array_equal(v2, from_bf16_bits(to_bf16_bits(v)))
    # K and V of one (block, head) are one contiguous run
    assert pages[0, 1].flags.c_contiguous
    np.testing.assert_array_equal(from_bf16_bits(pages[0, 1, 0, :min(t, 16)]), from_bf16_bits(to_bf16_bits(k[:16, 1])))
