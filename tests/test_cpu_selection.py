"""CPU block scoring and selection against the float64 reference.

Quest bounds (single request and paged batch), top-k / top-p with ties and
per-row budgets, and the hierarchical block -> token path end to end.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fluxion_dist.attention import reference as ref
from fluxion_dist.attention.layout import BLOCK_TOKENS, from_bf16_bits, num_blocks
from fluxion_dist.cpu.attention import sparse_partial_attention
from fluxion_dist.cpu.selection import (block_counts, candidate_lse, kv_head_max, quest_scores, quest_scores_paged,
                                        select_tokens_topk, select_topk, select_topp, token_scores)
from tests.cpu_util import ISAS
from fluxion_dist.cpu.synthetic_arena import paged_batch, random_bf16_bits, random_selection



def metadata(rng, nb, hkv, d):
    """Consistent bf16 min/max metadata (min <= max per channel)."""
    a = from_bf16_bits(random_bf16_bits(rng, (nb, hkv, d)))
    b = from_bf16_bits(random_bf16_bits(rng, (nb, hkv, d)))
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    bits = lambda x: (x.view(np.uint32) >> 16).astype(np.uint16)  # exact: values are bf16
    return bits(lo), bits(hi)


def csr_rows(sel):
    return [sel.ids[sel.indptr[r]:sel.indptr[r + 1]] for r in range(len(sel.indptr) - 1)]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("nb", [1, 3, 63, 130])
def test_quest_scores_match_reference(isa, group, nb):
    rng = np.random.default_rng([group, nb])
    hkv, d = 2, 128
    kmin, kmax = metadata(rng, nb, hkv, d)
    q = rng.standard_normal((hkv * group, d)).astype(np.float32)
    got = quest_scores(q, kmin, kmax, 0.088, num_threads=2, isa=isa)
    want = ref.quest_scores(q, from_bf16_bits(kmin), from_bf16_bits(kmax), scale=0.088)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("isa", ISAS)
def test_quest_scores_paged(isa):
    rng = np.random.default_rng(4)
    hkv, g, d, lens = 4, 2, 64, np.array([17, 1, 700], np.int32)
    nbs = block_counts(lens)
    pages = int(nbs.sum()) + 5
    kmin, kmax = metadata(rng, pages, hkv, d)
    order = rng.permutation(pages).astype(np.int32)
    table = np.full((3, nbs.max() + 2), 10_000, np.int32)  # past the sequence: never read
    starts = np.concatenate([[0], np.cumsum(nbs)])
    for b in range(3):
        table[b, :nbs[b]] = order[starts[b]:starts[b + 1]]
    q = rng.standard_normal((3, hkv * g, d)).astype(np.float32)
    got = quest_scores_paged(q, kmin, kmax, table, lens, 0.125, num_threads=3, isa=isa)
    assert got.shape == (3, hkv * g, table.shape[1])
    for b in range(3):
        ids = table[b, :nbs[b]]
        want = ref.quest_scores(q[b], from_bf16_bits(kmin[ids]), from_bf16_bits(kmax[ids]), 0.125)
        np.testing.assert_allclose(got[b, :, :nbs[b]], want, rtol=1e-5, atol=1e-4)
        assert np.all(got[b, :, nbs[b]:] == -np.inf)
    table[2, 3] = pages
    with pytest.raises(IndexError, match=f"block_tables\\[2, 3\\] = {pages} is outside"):
        quest_scores_paged(q, kmin, kmax, table, lens, 0.125, num_threads=1)


def test_quest_bound_is_an_upper_bound_of_token_scores():
    rng = np.random.default_rng(9)
    batch = paged_batch(rng, [333], 2, 4, 32)
    k, _ = batch.request_kv(0)
    kmin, kmax = ref.block_metadata(k)
    bits = lambda x: (x.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    bound = quest_scores(batch.q[0], bits(kmin), bits(kmax), 0.3, num_threads=2)
    exact = np.einsum("hd,thd->ht", batch.q[0], np.repeat(k, 4, axis=1)) * 0.3
    for j in range(num_blocks(333)):
        assert np.all(bound[:, j] >= exact[:, j * 16:(j + 1) * 16].max(axis=1) - 1e-4)


def scores_with_ties(rng, rows, n):
    return (rng.integers(-20, 20, size=(rows, n)) / 4).astype(np.float32)


@pytest.mark.parametrize("k", [0, 1, 5, 64, 100])
@pytest.mark.parametrize("threads", [1, 3])
def test_topk_matches_reference(k, threads):
    rng = np.random.default_rng([k, threads])
    s = scores_with_ties(rng, 7, 64)
    got = select_topk(s, k, num_threads=threads)
    for mine, want in zip(csr_rows(got), ref.select_topk(s, k)):
        np.testing.assert_array_equal(mine, want)


def test_topk_per_row_budgets_and_lengths():
    rng = np.random.default_rng(6)
    s = rng.standard_normal((5, 40)).astype(np.float32)
    k = np.array([0, 3, 40, 7, 1])
    lens = np.array([10, 0, 40, 5, 40])
    got = csr_rows(select_topk(s, k, row_lens=lens, num_threads=2))
    for r in range(5):
        np.testing.assert_array_equal(got[r], ref.select_topk(s[r:r + 1, :lens[r]], int(k[r]))[0])


@pytest.mark.parametrize("p", [1e-9, 0.1, 0.5, 0.9, 0.999, 1.0])
def test_topp_matches_reference(p):
    rng = np.random.default_rng(int(p * 1000))
    s = np.concatenate([scores_with_ties(rng, 4, 50), 3 * rng.standard_normal((4, 50)).astype(np.float32)])
    got = select_topp(s, p, num_threads=2)
    for mine, want in zip(csr_rows(got), ref.select_topp(s, p)):
        np.testing.assert_array_equal(mine, want)


def test_topp_per_row_and_padding():
    rng = np.random.default_rng(12)
    s = rng.standard_normal((3, 30)).astype(np.float32) * 2
    p, lens = np.array([0.3, 0.8, 1.0]), np.array([30, 7, 1])
    got = csr_rows(select_topp(s, p, row_lens=lens, num_threads=1))
    for r in range(3):
        np.testing.assert_array_equal(got[r], ref.select_topp(s[r:r + 1, :lens[r]], float(p[r]))[0])
    with pytest.raises(ValueError, match="top-p mass must be in"):
        select_topp(s, 0.0, num_threads=1)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 5), st.integers(1, 80), st.integers(0, 90), st.floats(0.01, 1.0),
       st.integers(0, 2**31))
def test_selection_property(rows, n, k, p, seed):
    s = np.random.default_rng(seed).integers(-6, 6, size=(rows, n)).astype(np.float32) * 0.7
    for mine, want in zip(csr_rows(select_topk(s, k, num_threads=2)), ref.select_topk(s, k)):
        np.testing.assert_array_equal(mine, want)
    for mine, want in zip(csr_rows(select_topp(s, p, num_threads=2)), ref.select_topp(s, p)):
        np.testing.assert_array_equal(mine, want)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("group", [1, 4, 8])
def test_token_scores_match_exact_dot_products(isa, group):
    rng = np.random.default_rng(group)
    hkv = 2
    batch = paged_batch(rng, [1000, 15], hkv, group, 128, spare_pages=3)
    indptr, blocks = random_selection(rng, batch.seq_lens, hkv, [0.3, "all", "one", "all"])
    got = token_scores(batch.q, batch.kv_pages, batch.block_tables, batch.seq_lens, indptr, blocks,
                       0.1, num_threads=2, isa=isa)
    for b in range(2):
        k, _ = batch.request_kv(b)
        exact = ref.kv_head_scores(np.einsum("hd,thd->ht", batch.q[b].astype(np.float64),
                                             np.repeat(k, group, axis=1)) * 0.1, hkv)
        for kh in range(hkv):
            r = b * hkv + kh
            for i in range(indptr[r], indptr[r + 1]):
                lo = blocks[i] * BLOCK_TOKENS
                n = min(BLOCK_TOKENS, int(batch.seq_lens[b]) - lo)
                np.testing.assert_allclose(got[i, :n], exact[kh, lo:lo + n], rtol=1e-5, atol=1e-4)
                assert np.all(got[i, n:] == -np.inf)


def test_hierarchical_block_then_token_selection():
    """Quest -> top-k blocks -> token scores -> top-k tokens -> attention over the kept tokens."""
    rng = np.random.default_rng(21)
    hkv, g, d, k_blocks, k_tokens = 4, 4, 64, 12, 50
    batch = paged_batch(rng, [900, 2000], hkv, g, d, spare_pages=6)
    b_count = len(batch.seq_lens)
    kmin = np.empty((batch.kv_pages.shape[0], hkv, d), np.uint16)
    kmax = np.empty_like(kmin)
    for b in range(b_count):
        k, _ = batch.request_kv(b)
        lo, hi = ref.block_metadata(k)
        pages = batch.block_tables[b, :num_blocks(int(batch.seq_lens[b]))]
        kmin[pages] = (lo.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
        kmax[pages] = (hi.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    scale = 1 / np.sqrt(d)
    s = quest_scores_paged(batch.q, kmin, kmax, batch.block_tables, batch.seq_lens, scale, num_threads=2)
    per_kv = np.ascontiguousarray(kv_head_max(s, hkv).reshape(b_count * hkv, -1))
    sel = select_topk(per_kv, k_blocks, row_lens=np.repeat(block_counts(batch.seq_lens), hkv),
                      num_threads=2)
    tok = token_scores(batch.q, batch.kv_pages, batch.block_tables, batch.seq_lens, sel.indptr, sel.ids,
                       scale, num_threads=2)
    masks = select_tokens_topk(tok, sel.indptr, k_tokens, num_threads=2)
    out = sparse_partial_attention(batch.q, batch.kv_pages, batch.block_tables, batch.seq_lens,
                                   sel.indptr, sel.ids, scale, sel_masks=masks, num_threads=2)
    for b in range(b_count):
        k, v = batch.request_kv(b)
        nb = num_blocks(int(batch.seq_lens[b]))
        want_blocks = ref.select_topk(ref.kv_head_scores(
            ref.quest_scores(batch.q[b], from_bf16_bits(kmin[batch.block_tables[b, :nb]]),
                             from_bf16_bits(kmax[batch.block_tables[b, :nb]]), scale), hkv), k_blocks)
        for kh in range(hkv):
            r = b * hkv + kh
            ids = sel.ids[sel.indptr[r]:sel.indptr[r + 1]]
            np.testing.assert_array_equal(ids, want_blocks[kh])
            # token level: the reference top-k over the same candidate scores (ties included)
            cand = tok[sel.indptr[r]:sel.indptr[r + 1]].ravel()
            finite = np.flatnonzero(np.isfinite(cand))
            keep = finite[ref.select_topk(cand[finite][None], k_tokens)[0]]
            m = masks[sel.indptr[r]:sel.indptr[r + 1]]
            kept = np.flatnonzero([(m[i // 16] >> (i % 16)) & 1 for i in range(cand.size)])
            np.testing.assert_array_equal(kept, keep)
            toks = ids[kept // 16].astype(np.int64) * 16 + kept % 16
            want = ref.partial_attention(batch.q[b][kh * g:(kh + 1) * g], k[:, kh:kh + 1], v[:, kh:kh + 1],
                                         [toks], block_tokens=1, scale=scale)
            rows = slice(kh * g, (kh + 1) * g)
            np.testing.assert_allclose(out.m[b, rows], want.m, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(out.o[b, rows] / out.l[b, rows, None], want.o / want.l[:, None],
                                       rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("group", [1, 4])
def test_operator_rescoring_selects_what_the_twin_does(group):
    """The CPU StepHook with ``rescore_factor``: each layer's CSR equals the twin's two-stage
    selection (``policy.select.select_layer``) on the arena after the append, and differs from
    the one-stage selection somewhere (the stage does something); quest_gpu ignores the switch."""
    import torch

    from fluxion_dist.policy import select as twin
    from tests.test_hybrid_operator import Decode, bf16

    dec = Decode([17, 1000, 1777], 2, group, d=64, layers=2, steps=3, seed=7 + group)
    ops = {p: dec.operator(p, "cpu", budget=0.05, mass=0.9, sparse=dict(rescore_factor=2.0), record_selection=True)
           for p in ("fluxion", "quest_gpu")}
    arena = dec.arena
    moved = 0
    for _ in range(3):
        hooks = {p: op.step(dec.seqs, dec.ids) for p, op in ops.items()}
        seq_lens = np.array([s.seq_len + 1 for s in dec.seqs], np.int32)
        nb = twin.block_counts(seq_lens)
        for layer in range(dec.layers):
            q, kn, vn = dec.layer_inputs(len(dec.seqs))
            tables = np.zeros((len(dec.seqs), int(nb.max())), np.int32)
            for b, s in enumerate(dec.seqs):
                tables[b, :nb[b]] = s.block_tables[layer][:nb[b]]
            for p, hook in hooks.items():  # the same token appended twice: the arena ends the same
                hook(layer, torch.from_numpy(q), torch.from_numpy(kn), torch.from_numpy(vn))
            kept = ops["fluxion"].kept
            args = (q, arena.kmin, arena.kmax, tables, seq_lens, dec.d ** -0.5)
            for p, hook in hooks.items():
                k_rows = np.minimum(hook.k_rows[layer], nb[:, None])
                factor = 2.0 if p == "fluxion" else 0.0
                want_ip, want_bl, _ = twin.select_layer(*args, k_rows, sink_blocks=kept.sink_blocks,
                                                        recent_blocks=kept.recent_blocks, rescore_factor=factor,
                                                        kv_pages=arena.kv_pages)
                got_ip, got_bl = hook.selections[layer]
                np.testing.assert_array_equal(got_ip, want_ip, err_msg=f"{p} layer {layer}")
                np.testing.assert_array_equal(got_bl, want_bl, err_msg=f"{p} layer {layer}")
            plain_ip, plain_bl, _ = twin.select_layer(*args, np.minimum(hooks["fluxion"].k_rows[layer], nb[:, None]),
                                                      sink_blocks=kept.sink_blocks, recent_blocks=kept.recent_blocks)
            moved += not np.array_equal(plain_bl, hooks["fluxion"].selections[layer][1])
        for s in dec.seqs:
            s.seq_len += 1
    assert moved > 0
    for op in ops.values():
        op.close()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("hkv,group,d", [(2, 1, 64), (2, 4, 128), (1, 8, 128), (3, 4, 64)])
def test_candidate_lse_matches_the_reference_and_the_twin(isa, hkv, group, d):
    """The rescoring stage's exact scores in Cython: per block and query head the log-sum-exp
    over its tokens (1, 15, 17, 1000, 1333 tokens: partial last blocks; padding holds 3e38)."""
    from fluxion_dist.policy import select as twin
    from tests.test_policy_select import LENS, _paged_kv, _random_csr

    rng = np.random.default_rng(hkv * 100 + group * 7 + d)
    kv, _, _, tables, lens, dense = _paged_kv(rng, LENS, hkv, d)
    q = (rng.standard_normal((len(LENS), hkv * group, d)) * 2).astype(np.float32)
    ip, bl = _random_csr(rng, LENS, hkv)
    scale = d ** -0.5
    got = candidate_lse(q, kv, np.where(tables < 0, 0, tables), lens, ip, bl, scale, num_threads=2, isa=isa)
    assert got.shape == (int(ip[-1]), group) and got.dtype == np.float32
    np.testing.assert_allclose(got, twin.candidate_lse(q, kv, tables, lens, scale, ip, bl), rtol=1e-5, atol=1e-4)
    for b in range(len(LENS)):
        rows = [bl[ip[r]:ip[r + 1]] for r in range(b * hkv, (b + 1) * hkv)]
        for h, want in enumerate(ref.block_lse(q[b], dense[b], rows, scale=scale)):
            r = b * hkv + h
            np.testing.assert_allclose(got[ip[r]:ip[r + 1]], want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("isa", ISAS)
def test_the_team_selects_as_the_openmp_drivers_do(threads, isa):
    """Scores, top-k and top-p on the operator's persistent team: the same bits and ids as the
    OpenMP drivers (the same kernels), on awkward lengths with strided block-table rows, rows of
    k 0 / k past their length / p 1, and the out-of-arena error."""
    from fluxion_dist.cpu.team import AttentionTeam

    rng = np.random.default_rng()
    hkv, g, d, lens = 2, 4, 64, np.array([1, 17, 16, 4111, 700], np.int32)
    nbs = block_counts(lens)
    pages = int(nbs.sum()) + 3
    kmin, kmax = metadata(rng, pages, hkv, d)
    wide = np.full((len(lens), 2 * (nbs.max() + 1)), 10_000, np.int32)
    table = wide[:, :nbs.max() + 1]  # strided rows
    perm, at = rng.permutation(pages).astype(np.int32), 0
    for b, n in enumerate(nbs):
        table[b, :n], at = perm[at:at + n], at + n
    q = rng.standard_normal((len(lens), hkv * g, d)).astype(np.float32)
    with AttentionTeam(threads) as team:
        want = quest_scores_paged(q, kmin, kmax, table, lens, 0.1, num_threads=threads, isa=isa)
        got = quest_scores_paged(q, kmin, kmax, table, lens, 0.1, num_threads=threads, isa=isa, team=team)
        np.testing.assert_array_equal(got, want)
        rows = np.ascontiguousarray(kv_head_max(got, hkv).reshape(-1, got.shape[2]))
        row_lens = np.repeat(nbs, hkv).astype(np.int32)
        k = rng.integers(0, 40, rows.shape[0])
        k[:2], k[-1] = 0, 10_000
        p = rng.uniform(0.3, 1.0, rows.shape[0])
        p[3] = 1.0
        for pick, arg in ((select_topk, k), (select_topp, p)):
            a = pick(rows, arg, num_threads=threads, row_lens=row_lens)
            b = pick(rows, arg, num_threads=threads, row_lens=row_lens, team=team)
            np.testing.assert_array_equal(b.indptr, a.indptr)
            np.testing.assert_array_equal(b.ids, a.ids)
        table[3, 5] = pages
        with pytest.raises(IndexError, match=f"block_tables\\[3, 5\\] = {pages} is outside"):
            quest_scores_paged(q, kmin, kmax, table, lens, 0.1, num_threads=threads, team=team)
