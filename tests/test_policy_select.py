"""The NumPy twin of the GPU selection stages (policy.select) against the float64 reference and
the CPU's Cython selection, on awkward sizes (1, 15, 17, 1000+ tokens; GQA 1, 4, 8) and ties."""

from __future__ import annotations

import numpy as np
import pytest

from fluxion_dist.attention import reference
from fluxion_dist.attention.layout import from_bf16_bits, to_bf16_bits
from fluxion_dist.cpu import selection as cpu_sel
from fluxion_dist.policy import select as twin
from fluxion_dist.policy.budget import forced_count

LENS = [1, 15, 17, 1000, 1333]


def _paged(rng, lens, hkv, d, extra_pages=3):
    """Random bf16 metadata in shuffled pages; returns kmin, kmax bits, block tables, seq lens."""
    nbs = [-(-t // 16) for t in lens]
    pages = sum(nbs) + extra_pages
    lo = rng.standard_normal((pages, hkv, d)).astype(np.float32)
    hi = lo + np.abs(rng.standard_normal((pages, hkv, d))).astype(np.float32)
    kmin, kmax = to_bf16_bits(lo).reshape(lo.shape), to_bf16_bits(hi).reshape(hi.shape)
    order = rng.permutation(pages)
    width = max(nbs) + 5
    tables = np.full((len(lens), width), -7, np.int32)  # junk past each row's blocks: never read
    at = 0
    for b, n in enumerate(nbs):
        tables[b, :n] = order[at:at + n]
        at += n
    return kmin, kmax, tables, np.array(lens, np.int32)


def _ref_kv_scores(q, kmin, kmax, tables, lens, scale):
    out = []
    for b, t in enumerate(lens):
        pages = tables[b, :-(-t // 16)]
        s = reference.quest_scores(q[b], from_bf16_bits(kmin[pages]).reshape(kmin[pages].shape),
                                   from_bf16_bits(kmax[pages]).reshape(kmax[pages].shape), scale)
        out.append(reference.kv_head_scores(s, kmin.shape[1]))
    return out


@pytest.mark.parametrize("hkv,group,d", [(2, 1, 64), (2, 4, 128), (1, 8, 128), (3, 4, 64)])
def test_scores_match_the_reference_and_cython(hkv, group, d):
    rng = np.random.default_rng(hkv * 100 + group * 10 + d)
    kmin, kmax, tables, lens = _paged(rng, LENS, hkv, d)
    q = rng.standard_normal((len(LENS), hkv * group, d)).astype(np.float32)
    scale = d ** -0.5
    got = twin.quest_kv_scores(q, kmin, kmax, tables, lens, scale)
    assert got.dtype == np.float32 and got.shape == (len(LENS), hkv, tables.shape[1])
    cy = cpu_sel.kv_head_max(cpu_sel.quest_scores_paged(q, kmin, kmax, np.where(tables < 0, 0, tables), lens,
                                                        scale, num_threads=1), hkv)
    for b, want in enumerate(_ref_kv_scores(q, kmin, kmax, tables, lens, scale)):
        n = want.shape[1]
        np.testing.assert_allclose(got[b, :, :n], want, rtol=2e-5, atol=2e-5)
        np.testing.assert_allclose(got[b, :, :n], cy[b, :, :n], rtol=2e-5, atol=2e-5)
        assert np.all(got[b, :, n:] == -np.inf)


def _row_lists(indptr, blocks):
    return [blocks[indptr[r]:indptr[r + 1]] for r in range(indptr.size - 1)]


@pytest.mark.parametrize("seed", range(4))
def test_topk_matches_the_reference_with_ties(seed):
    rng = np.random.default_rng(seed)
    lens = [1, 17, 300, 1025]
    width = 70
    # integer scores: many ties, which go to the lower id
    scores = rng.integers(-3, 4, (len(lens), 2, width)).astype(np.float32)
    k = rng.integers(0, 30, (len(lens), 2))
    ip, bl = twin.topk_csr(scores, np.array(lens), k)
    rows = _row_lists(ip, bl)
    for b, t in enumerate(lens):
        n = min(-(-t // 16), width)
        for h in range(2):
            want = reference.select_topk(scores[b, h:h + 1, :n], int(k[b, h]))[0]
            np.testing.assert_array_equal(rows[b * 2 + h], want)
    cy = cpu_sel.select_topk(scores.reshape(-1, width), k.ravel(), num_threads=1,
                             row_lens=np.repeat(np.minimum(cpu_sel.block_counts(lens), width), 2))
    np.testing.assert_array_equal(cy.indptr, ip)
    np.testing.assert_array_equal(cy.ids, bl)


def test_topk_ranks_negative_zero_below_zero():
    # the kernels' keys order -0.0 below +0.0; a float compare would call them equal
    scores = np.array([[[-0.0, 0.0, -1.0]]], np.float32)
    ip, bl = twin.topk_csr(scores, np.array([48]), 1)
    assert list(bl) == [1]


@pytest.mark.parametrize("p", [0.3, 0.9, 0.95, 1.0])
@pytest.mark.parametrize("seed", range(3))
def test_topp_matches_the_reference(p, seed):
    rng = np.random.default_rng(seed)
    lens = np.array([1, 15, 17, 700, 1600])
    scores = (rng.standard_normal((lens.size, 2, 100)) * rng.uniform(0.5, 4)).astype(np.float32)
    ip, bl = twin.topp_sets(scores, lens, p)
    rows = _row_lists(ip, bl)
    for b, t in enumerate(lens):
        n = -(-t // 16)
        for h in range(2):
            want = reference.select_topp(scores[b, h:h + 1, :n], p)[0]
            np.testing.assert_array_equal(rows[b * 2 + h], want)


def test_topp_of_equal_scores_takes_the_lowest_ids():
    scores = np.zeros((1, 1, 10), np.float32)
    ip, bl = twin.topp_sets(scores, np.array([160]), 0.25)
    assert list(bl) == [0, 1, 2]  # ceil of 2.5 blocks of equal mass, lowest ids first


@pytest.mark.parametrize("tokens", [1, 15, 16, 17, 200, 1000, 4097])
def test_forcing_and_far_demand(tokens):
    rng = np.random.default_rng(tokens)
    width = -(-tokens // 16) + 3
    lens = np.array([tokens, 33])
    scores = rng.standard_normal((2, 3, width)).astype(np.float32)
    forced = twin.force_kept(scores.copy(), lens, sink_blocks=1, recent_blocks=9)
    nb = twin.block_counts(lens)
    for b in range(2):
        n = (forced[b] == twin.FORCED_SCORE).sum(axis=1)
        assert np.all(n == forced_count(nb[b], 1, 9))
        assert np.all(forced[b, :, nb[b]:] == scores[b, :, nb[b]:])
    # far demand: the set's blocks outside [0, 1) and [nb - 9, nb), by brute force
    ip, bl = twin.topp_sets(scores, lens, 0.9)
    far = twin.far_demand(ip, bl, lens, 3, sink_blocks=1, recent_blocks=9)
    for r, row in enumerate(_row_lists(ip, bl)):
        n = nb[r // 3]
        assert far[r // 3, r % 3] == sum(1 for j in row if 1 <= j < n - 9)


def test_select_layer_reads_kept_plus_top_blocks():
    rng = np.random.default_rng(5)
    lens = [17, 1000, 2049]
    kmin, kmax, tables, seq = _paged(rng, lens, 2, 64)
    q = rng.standard_normal((3, 8, 64)).astype(np.float32)
    k_rows = np.array([[2, 2], [20, 13], [40, 11]])
    ip, bl, demand = twin.select_layer(q, kmin, kmax, tables, seq, 0.125, k_rows, sink_blocks=1,
                                       recent_blocks=9, mass_target=0.9)
    assert demand.shape == (3, 2)
    rows = _row_lists(ip, bl)
    for b, want in enumerate(_ref_kv_scores(q, kmin, kmax, tables, seq, 0.125)):
        n = want.shape[1]
        keep = np.zeros(n, bool)
        keep[:1] = True
        keep[max(n - 9, 0):] = True
        for h in range(2):
            row = rows[b * 2 + h]
            assert row.size == min(k_rows[b, h], n) and np.all(np.diff(row) > 0)
            assert keep[row].sum() == min(keep.sum(), row.size)  # the kept blocks first
            rest = np.setdiff1d(row, np.nonzero(keep)[0])
            if rest.size:  # then the best others, by the reference's scores
                others = np.where(keep, -np.inf, want[h])
                assert np.min(others[rest]) >= np.sort(others)[::-1][rest.size - 1] - 1e-4


def _paged_kv(rng, lens, hkv, d, extra_pages=3):
    """Random bf16 K/V in shuffled pages, their Quest boxes, tables, seq lens and the dense K per
    request; the padding past each sequence holds 3e38, which a read of it would show."""
    nbs = [-(-t // 16) for t in lens]
    pages = sum(nbs) + extra_pages
    kv = to_bf16_bits(rng.standard_normal((pages, hkv, 2, 16, d)).astype(np.float32) * 2).reshape(pages, hkv, 2, 16, d)
    order = rng.permutation(pages)
    tables = np.full((len(lens), max(nbs) + 5), -7, np.int32)
    kmin = np.zeros((pages, hkv, d), np.uint16)
    kmax = np.zeros((pages, hkv, d), np.uint16)
    dense = []
    at = 0
    for b, (t, n) in enumerate(zip(lens, nbs)):
        tables[b, :n] = order[at:at + n]
        at += n
        last = tables[b, n - 1]
        kv[last, :, :, t - (n - 1) * 16:] = to_bf16_bits(np.float32(3e38))
        k = from_bf16_bits(kv[tables[b, :n], :, 0]).reshape(n, hkv, 16, d).transpose(0, 2, 1, 3).reshape(-1, hkv, d)[:t]
        dense.append(k)
        lo, hi = reference.block_metadata(k)
        kmin[tables[b, :n]] = to_bf16_bits(lo).reshape(lo.shape)
        kmax[tables[b, :n]] = to_bf16_bits(hi).reshape(hi.shape)
    return kv, kmin, kmax, tables, np.array(lens, np.int32), dense


def _random_csr(rng, lens, hkv):
    rows = []
    for t in lens:
        nb = -(-int(t) // 16)
        for _ in range(hkv):
            rows.append(np.sort(rng.choice(nb, int(rng.integers(0, nb + 1)), replace=False)))
    indptr = np.concatenate([[0], np.cumsum([r.size for r in rows])]).astype(np.int32)
    return indptr, np.concatenate(rows).astype(np.int32)


@pytest.mark.parametrize("hkv,group,d", [(2, 1, 64), (2, 4, 128), (1, 8, 128), (3, 4, 64)])
def test_candidate_lse_and_shares_match_the_reference(hkv, group, d):
    rng = np.random.default_rng(hkv * 1000 + group * 10 + d)
    kv, _, _, tables, lens, dense = _paged_kv(rng, LENS, hkv, d)
    q = rng.standard_normal((len(LENS), hkv * group, d)).astype(np.float32)
    scale = d ** -0.5
    ip, bl = _random_csr(rng, LENS, hkv)
    lse = twin.candidate_lse(q, kv, tables, lens, scale, ip, bl)
    assert lse.dtype == np.float32 and lse.shape == (int(ip[-1]), group) and np.all(np.isfinite(lse))
    exact = twin.candidate_scores(lse, ip, bl, lens, hkv, tables.shape[1], sink_blocks=1, recent_blocks=2)
    assert exact.shape == (len(LENS), hkv, tables.shape[1])
    rows = _row_lists(ip, bl)
    for b, t in enumerate(LENS):
        want = reference.block_lse(q[b], dense[b], rows[b * hkv:(b + 1) * hkv], scale=scale)
        shares = reference.candidate_shares(want)
        nb = -(-t // 16)
        for h in range(hkv):
            r = b * hkv + h
            np.testing.assert_allclose(lse[ip[r]:ip[r + 1]], want[h], rtol=1e-5, atol=1e-4)
            row, got = rows[r], exact[b, h]
            forced = (row < 1) | (row >= nb - 2)
            assert np.all(got[row[forced]] == twin.FORCED_SCORE)
            np.testing.assert_allclose(got[row[~forced]], shares[h][~forced], rtol=1e-5, atol=2e-4)
            rest = np.setdiff1d(np.arange(tables.shape[1]), row)
            assert np.all(got[rest] == -np.inf)


@pytest.mark.parametrize("factor", [1.0, 1.5, 2.0, 4.0])
@pytest.mark.parametrize("group", [1, 4])
def test_rescored_selection_keeps_the_most_exact_mass_among_candidates(factor, group):
    """End to end against the float64 reference: the candidates are the top ceil(factor k) by
    Quest bound (kept blocks first), and of those the k with the largest group share."""
    rng = np.random.default_rng(int(factor * 10) + group)
    lens = [17, 200, 1000, 1333]
    hkv, d = 2, 64
    kv, kmin, kmax, tables, seq, dense = _paged_kv(rng, lens, hkv, d)
    q = (rng.standard_normal((len(lens), hkv * group, d)) * 2).astype(np.float32)
    k_rows = np.array([[2, 2], [13, 11], [20, 64], [30, 84]])
    ip, bl, _ = twin.select_layer(q, kmin, kmax, tables, seq, d ** -0.5, k_rows, sink_blocks=1, recent_blocks=3,
                                  rescore_factor=factor, kv_pages=kv)
    rows = _row_lists(ip, bl)
    for b, want in enumerate(_ref_kv_scores(q, kmin, kmax, tables, seq, d ** -0.5)):
        n = want.shape[1]
        keep = np.zeros(n, bool)
        keep[:1] = True
        keep[max(n - 3, 0):] = True
        for h in range(hkv):
            k = min(k_rows[b, h], n)
            cand = reference.select_topk(np.where(keep, np.inf, want[h])[None], min(int(np.ceil(factor * k)), n))[0]
            share = reference.candidate_shares(reference.block_lse(q[b, h * group:(h + 1) * group], dense[b][:, h:h + 1],
                                                                   [cand], scale=d ** -0.5))[0]
            best = cand[reference.select_topk(np.where(keep[cand], np.inf, share)[None], k)[0]]
            np.testing.assert_array_equal(rows[b * hkv + h], np.sort(best), err_msg=f"request {b} head {h}")


def test_candidate_rows():
    k = np.array([[0, 1, 5], [7, 3, 100]])
    got = twin.candidate_rows(k, np.array([16 * 10, 16 * 200]), 1.5)
    np.testing.assert_array_equal(got, [[0, 2, 8], [11, 5, 150]])
    with pytest.raises(ValueError, match="factor"):
        twin.candidate_rows(k, np.array([16, 16]), 0.5)
