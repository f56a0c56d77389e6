"""Top-k / top-p selection on the GPU against the float64 reference."""

from __future__ import annotations

import numpy as np
import pytest

from tests import gpu_util

gpu_util.skip_unless_gpu()

import cupy as cp  # noqa: E402

from fluxion_dist.attention import reference  # noqa: E402
from fluxion_dist.attention.layout import num_blocks  # noqa: E402
from fluxion_dist.kernels.block_table import force_blocks  # noqa: E402
from fluxion_dist.kernels.selection import Selection, select_topk, select_topp  # noqa: E402

pytestmark = pytest.mark.gpu

SEQ_LENS = (1, 15, 17, 1000, 1333, 40_000)


def _scores(rng, seq_lens, heads, factor, spread=1.0, ties=False):
    """Scores [B, H, n] with +inf past each request's entries: selecting one is a bug."""
    nbs = [num_blocks(t) for t in seq_lens]
    n = -(-max(nbs) // factor) + 3
    s = rng.standard_normal((len(seq_lens), heads, n)).astype(np.float32) * spread
    if ties:
        s = rng.integers(0, 4, size=s.shape).astype(np.float32)
    for b, nb in enumerate(nbs):
        s[b, :, -(-nb // factor):] = np.inf
    return s


def _rows(sel: Selection) -> list[np.ndarray]:
    return gpu_util.csr_rows(cp.asnumpy(sel.indptr), cp.asnumpy(sel.blocks))


def _valid(s_row: np.ndarray, nb: int, factor: int) -> np.ndarray:
    return s_row[: -(-nb // factor)]


@pytest.mark.parametrize("factor", [1, 4, 16])
@pytest.mark.parametrize("k", [1, 3, 50, 100_000])
@pytest.mark.parametrize("ties", [False, True])
def test_topk_matches_reference(factor: int, k: int, ties: bool):
    rng, seed = gpu_util.fresh_rng()
    heads = 3
    s = _scores(rng, SEQ_LENS, heads, factor, ties=ties)
    sel = select_topk(cp.asarray(s), cp.asarray(np.array(SEQ_LENS, np.int32)), k, factor=factor)
    rows = _rows(sel)
    for b, t in enumerate(SEQ_LENS):
        nb = num_blocks(t)
        for h in range(heads):
            ref = reference.select_topk(_valid(s[b, h], nb, factor)[None], k)[0]
            want = gpu_util.expand_blocks(ref, factor, nb)
            np.testing.assert_array_equal(rows[b * heads + h], want, err_msg=f"seed={seed} b={b} h={h}")
    assert sel.max_row_blocks >= max(r.size for r in rows)


def test_topk_per_row_budgets():
    rng, seed = gpu_util.fresh_rng()
    heads = 4
    s = _scores(rng, SEQ_LENS, heads, 1)
    ks = rng.integers(0, 300, size=(len(SEQ_LENS), heads)).astype(np.int32)
    sel = select_topk(cp.asarray(s), cp.asarray(np.array(SEQ_LENS, np.int32)), cp.asarray(ks))
    rows = _rows(sel)
    for b, t in enumerate(SEQ_LENS):
        for h in range(heads):
            ref = reference.select_topk(_valid(s[b, h], num_blocks(t), 1)[None], int(ks[b, h]))[0]
            np.testing.assert_array_equal(rows[b * heads + h], ref, err_msg=f"seed={seed} b={b} h={h}")


def _check_topp_row(got: np.ndarray, s_row: np.ndarray, p: float, msg: str) -> None:
    """Equal to the reference, except that where the reference's cumulative mass lies
    within float32 rounding of p at the cut, one block more or less is also right."""
    ref = reference.select_topp(s_row[None], p)[0]
    if np.array_equal(got, ref):
        return
    mass = reference.estimated_mass(s_row[None])[0]
    order = np.argsort(-s_row.astype(np.float64), kind="stable")
    csum = np.cumsum(mass[order])
    n_ref, n_got = ref.size, got.size
    assert abs(n_got - n_ref) == 1, f"{msg}: {n_got} blocks, reference {n_ref}"
    cut = csum[min(n_got, n_ref) - 1]
    assert abs(cut - p * (1 - 1e-12)) < 1e-5, f"{msg}: sizes differ away from a rounding tie (mass {cut} vs p {p})"
    chosen = np.zeros(s_row.size, bool)
    chosen[got] = True
    if chosen.all() or not chosen.any():
        return
    assert s_row[chosen].min() >= s_row[~chosen].max(), f"{msg}: not the highest-scoring blocks"


@pytest.mark.parametrize("factor", [1, 4])
@pytest.mark.parametrize("p", [0.3, 0.9, 0.99, 1.0])
@pytest.mark.parametrize("spread", [1.0, 4.0])
def test_topp_matches_reference(factor: int, p: float, spread: float):
    rng, seed = gpu_util.fresh_rng()
    heads = 2
    s = _scores(rng, SEQ_LENS, heads, factor, spread=spread)
    sel = select_topp(cp.asarray(s), cp.asarray(np.array(SEQ_LENS, np.int32)), p, factor=factor)
    rows = _rows(sel)
    for b, t in enumerate(SEQ_LENS):
        nb = num_blocks(t)
        for h in range(heads):
            got = rows[b * heads + h]
            coarse = np.unique(got // factor)
            np.testing.assert_array_equal(got, gpu_util.expand_blocks(coarse, factor, nb))
            _check_topp_row(coarse, _valid(s[b, h], nb, factor).astype(np.float64), p,
                            f"seed={seed} b={b} h={h} p={p}")


def test_topp_one_takes_every_block():
    """p = 1 takes all of a row, even entries whose mass is far below the kernel's 2^-40
    fixed-point unit (scores spread over ~100 nats)."""
    rng, seed = gpu_util.fresh_rng()
    s = _scores(rng, SEQ_LENS, 2, 1, spread=16.0)
    rows = _rows(select_topp(cp.asarray(s), cp.asarray(np.array(SEQ_LENS, np.int32)), 1.0))
    for b, t in enumerate(SEQ_LENS):
        for h in range(2):
            np.testing.assert_array_equal(rows[b * 2 + h], np.arange(num_blocks(t)), err_msg=f"seed={seed} b={b}")


def test_topp_per_row_mass_and_ties():
    rng, seed = gpu_util.fresh_rng()
    heads = 3
    s = _scores(rng, SEQ_LENS, heads, 1, ties=True)
    ps = rng.uniform(0.05, 1.0, size=(len(SEQ_LENS), heads)).astype(np.float32)
    sel = select_topp(cp.asarray(s), cp.asarray(np.array(SEQ_LENS, np.int32)), cp.asarray(ps))
    rows = _rows(sel)
    for b, t in enumerate(SEQ_LENS):
        for h in range(heads):
            _check_topp_row(rows[b * heads + h], _valid(s[b, h], num_blocks(t), 1).astype(np.float64),
                            float(ps[b, h]), f"seed={seed} b={b} h={h}")


def test_zero_budget_gives_empty_rows():
    s = cp.asarray(np.random.default_rng().standard_normal((2, 2, 10)).astype(np.float32))
    sel = select_topk(s, cp.asarray(np.array([100, 7], np.int32)), 0)
    assert cp.asnumpy(sel.indptr).tolist() == [0, 0, 0, 0, 0]


def test_many_rows_pack_in_one_launch():
    """More rows than the packing CTA has threads: the CSR offsets are scanned in pieces."""
    rng, seed = gpu_util.fresh_rng()
    heads = 4
    seq_lens = rng.integers(1, 400, size=300).astype(np.int32)
    s = _scores(rng, seq_lens.tolist(), heads, 1)
    sel = select_topk(cp.asarray(s), cp.asarray(seq_lens), 3)
    rows = _rows(sel)
    for b, t in enumerate(seq_lens):
        for h in range(heads):
            ref = reference.select_topk(_valid(s[b, h], num_blocks(int(t)), 1)[None], 3)[0]
            np.testing.assert_array_equal(rows[b * heads + h], ref, err_msg=f"seed={seed} b={b} h={h}")


@pytest.mark.parametrize("by_mass", [False, True])
def test_long_rows_use_large_shared_memory(by_mass: bool):
    """15000 entries (240k tokens at 16): the keys need the kernel's shared-memory opt-in."""
    rng, seed = gpu_util.fresh_rng()
    seq_lens = [15_000 * 16, 9_999]
    s = _scores(rng, seq_lens, 2, 1, spread=3.0)
    lens = cp.asarray(np.array(seq_lens, np.int32))
    sel = select_topp(cp.asarray(s), lens, 0.5) if by_mass else select_topk(cp.asarray(s), lens, 700)
    rows = _rows(sel)
    for b, t in enumerate(seq_lens):
        for h in range(2):
            row = _valid(s[b, h], num_blocks(t), 1).astype(np.float64)
            msg = f"seed={seed} b={b} h={h}"
            if by_mass:
                _check_topp_row(rows[b * 2 + h], row, 0.5, msg)
            else:
                np.testing.assert_array_equal(rows[b * 2 + h], reference.select_topk(row[None], 700)[0], msg)


@pytest.mark.parametrize("by_mass", [False, True])
@pytest.mark.parametrize("kind", ["narrow", "equal"])
def test_crowded_threshold_bins(by_mass: bool, kind: str):
    """Thousands of keys in the threshold's radix bin: scores within 1e-4 of each other take
    several passes before the candidates are few enough to rank; one score repeated 9,000
    times never gets there and is settled by ids."""
    rng, seed = gpu_util.fresh_rng()
    t = 9_000 * 16
    if kind == "narrow":
        s = (1.0 + 1e-4 * rng.standard_normal((1, 2, 9_000))).astype(np.float32)
    else:
        s = np.full((1, 2, 9_000), 0.75, np.float32)
    lens = cp.asarray(np.array([t], np.int32))
    sel = select_topp(cp.asarray(s), lens, 0.37) if by_mass else select_topk(cp.asarray(s), lens, 1234)
    rows = _rows(sel)
    for h in range(2):
        row = s[0, h].astype(np.float64)
        msg = f"seed={seed} h={h}"
        if by_mass:
            _check_topp_row(rows[h], row, 0.37, msg)
        else:
            np.testing.assert_array_equal(rows[h], reference.select_topk(row[None], 1234)[0], msg)


@pytest.mark.parametrize("k", [1, 3, 5, 6, 400, 100_000])
@pytest.mark.parametrize("narrow", [False, True])
def test_topk_with_forced_blocks(k: int, narrow: bool):
    """Sinks and the recent window at force_blocks' 3e38 (5 a row here), as the hybrid selects:
    they stretch the key range, so the first radix digit lumps the real scores (narrow:
    within 1e-4) into one bin. They are taken first, lowest ids first when k is below their
    count. One row holds an inf, which outranks them."""
    rng, seed = gpu_util.fresh_rng()
    seq_lens = (17, 1000, 40_000, 131_072)
    s = _scores(rng, seq_lens, 2, 1, spread=1.0)
    if narrow:
        s = np.where(np.isinf(s), s, 1.0 + 1e-4 * s).astype(np.float32)
    lens = cp.asarray(np.array(seq_lens, np.int32))
    dev = cp.asarray(s)
    force_blocks(dev, lens, sink_blocks=1, recent_blocks=4)
    forced = cp.asnumpy(dev)
    nb_big = num_blocks(seq_lens[2])
    forced[2, 1, nb_big // 2] = np.inf
    dev = cp.asarray(forced)
    rows = _rows(select_topk(dev, lens, k))
    for b, t in enumerate(seq_lens):
        nb = num_blocks(t)
        for h in range(2):
            want = reference.select_topk(forced[b, h, :nb][None], k)[0]
            np.testing.assert_array_equal(rows[b * 2 + h], want, err_msg=f"seed={seed} b={b} h={h} k={k}")


def test_repeated_launches_agree():
    """Back-to-back launches on one stream reuse the arrival counter: it must be left at zero."""
    rng, _ = gpu_util.fresh_rng()
    s = cp.asarray(_scores(rng, SEQ_LENS, 2, 1, spread=3.0))
    lens = cp.asarray(np.array(SEQ_LENS, np.int32))
    first = [cp.asnumpy(a) for a in (lambda x: (x.indptr, x.blocks))(select_topp(s, lens, 0.9))]
    for _ in range(3):
        again = select_topp(s, lens, 0.9)
        n = int(first[0][-1])
        np.testing.assert_array_equal(cp.asnumpy(again.indptr), first[0])
        np.testing.assert_array_equal(cp.asnumpy(again.blocks)[:n], first[1][:n])
