"""AsyncTLS hierarchical selection: token scores, token masks the kernels take, where refining pays."""

import numpy as np
import pytest

from fluxion_dist.attention import reference as ref
from fluxion_dist.attention.layout import BLOCK_TOKENS, num_blocks
from fluxion_dist.attention.synthetic import make_synthetic_kv
from fluxion_dist.config.schema import SparseConfig
from fluxion_dist.sparse import (SparseInputError, forced_blocks, hierarchical_select, pyramid_from_kv,
                                 refine_tokens, selected_tokens, selection_from_mask, token_scores)


def _attend(q, k, v, tokens):
    """The oracle over per-KV-head token lists: reference decode attention on the gathered tokens."""
    hkv = k.shape[1]
    g = q.shape[0] // hkv
    return np.concatenate([ref.decode_attention(q[h * g:(h + 1) * g], k[tokens[h], h:h + 1], v[tokens[h], h:h + 1],
                                                scale=1.0 / np.sqrt(q.shape[1])) for h in range(hkv)])


def _rel_err(o, want):
    return np.linalg.norm(o - want, axis=1) / np.linalg.norm(want, axis=1)


@pytest.mark.parametrize("t", [1, 17, 1000])
@pytest.mark.parametrize("g", [1, 4, 8])
def test_token_scores_are_group_max_and_pad_is_minus_inf(t, g):
    rng = np.random.default_rng(t + g)
    q, k = rng.standard_normal((2 * g, 16)), rng.standard_normal((t, 2, 16))
    mask = rng.random((2, num_blocks(t))) < 0.6
    mask[:, -1] = True
    sel = selection_from_mask(mask)
    got = token_scores(q, k, sel)
    assert got.shape == (sel.sel_blocks.size, BLOCK_TOKENS) and got.dtype == np.float32
    rows = np.repeat(np.arange(2), sel.blocks_per_row())
    for i, (h, b) in enumerate(zip(rows, sel.sel_blocks)):
        tok = np.arange(b * 16, min(b * 16 + 16, t))
        want = (q[h * g:(h + 1) * g] @ k[tok, h].T).max(axis=0) / 4.0
        np.testing.assert_allclose(got[i, :tok.size], want, rtol=1e-5, atol=1e-5)
        assert np.all(np.isneginf(got[i, tok.size:]))


@pytest.mark.parametrize("t", [15, 1000, 2049])
def test_keeping_all_mass_is_block_attention(t):
    rng = np.random.default_rng(t)
    q, k, v = rng.standard_normal((8, 16)), rng.standard_normal((t, 2, 16)), rng.standard_normal((t, 2, 16))
    mask = rng.random((2, num_blocks(t))) < 0.5
    mask[:, 0] = True
    sel = selection_from_mask(mask)
    out = refine_tokens(sel, token_scores(q, k, sel), t, token_mass=1.0, max_keep_fraction=1.0)
    assert out.selection.sel_masks.dtype == np.uint16
    want = ref.merge_partials([ref.partial_attention(q, k, v, sel.head_lists())])
    np.testing.assert_allclose(_attend(q, k, v, selected_tokens(out.selection, t)), want, rtol=1e-10, atol=1e-12)
    assert out.tokens_kept.tolist() == sel.tokens_per_row(t).tolist()


@pytest.mark.parametrize("g", [1, 4, 8])
def test_hierarchical_keeps_needle_tokens_within_the_token_budget(g):
    t = 5003
    kv = make_synthetic_kv(t, ["needle", "uniform", "sink_local"], group_size=g, seed=21 + g)
    cfg = SparseConfig(policy="fluxion", budget=0.05)
    out = hierarchical_select(kv.q, kv.k, pyramid_from_kv(kv.k), cfg, scale=kv.scale)
    tokens = selected_tokens(out.selection, t)
    assert np.all(np.isin(kv.needle_tokens[0], tokens[0]))
    forced = forced_blocks(t, cfg.sink_tokens, cfg.recent_tokens)
    forced_tok = np.minimum(16, t - np.flatnonzero(forced) * 16).sum()
    # sinks and window whole, the rest within the token budget
    assert np.all(out.tokens_kept <= max(int(np.ceil(0.05 * t)), forced_tok))
    assert out.tokens_kept[1] == int(np.ceil(0.05 * t))
    assert [len(x) for x in tokens] == out.tokens_kept.tolist()
    full = ref.decode_attention(kv.q, kv.k, kv.v)
    err = _rel_err(_attend(kv.q, kv.k, kv.v, tokens), full).reshape(3, g).mean(axis=1)
    assert err[0] < 0.06 and err[2] < 0.03, err
    # every selected block keeps at least one token, and masks stay within the block's valid tokens
    assert np.all(out.selection.sel_masks != 0)


def test_refine_only_where_it_pays():
    t = 4000
    kv = make_synthetic_kv(t, ["needle", "uniform"], group_size=4, seed=3)
    forced = forced_blocks(t, 16, 128)
    mask = np.zeros((2, num_blocks(t)), bool)
    mask[:, forced] = True
    mask[0, kv.needle_blocks[0]] = True
    mask[0, 40:60] = True
    mask[1, 40:80] = True
    sel = selection_from_mask(mask)
    whole = forced[sel.sel_blocks]
    out = refine_tokens(sel, token_scores(kv.q, kv.k, sel, kv.scale), t, keep_whole=whole, token_mass=0.9,
                        max_keep_fraction=0.5)
    # the needle head keeps a few tokens of its candidates; the dense one would keep most: whole blocks
    assert out.refined.tolist() == [True, False]
    assert out.selection.row(0, 1).tolist() == sel.row(0, 1).tolist()
    assert np.all(out.selection.sel_masks[out.selection.sel_indptr[1]:] == 0xFFFF)
    assert np.all(np.isin(kv.needle_tokens[0], selected_tokens(out.selection, t)[0]))
    assert out.tokens_kept[0] < sel.tokens_per_row(t)[0] / 2
    with pytest.raises(SparseInputError, match="token scores"):
        refine_tokens(sel, np.zeros((3, 16)), t)
