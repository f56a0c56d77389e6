"""The int8 Quest-metadata mirror (NumPy reference): outward rounding, exact dequantisation, and
the upper-bound property of the scores computed from it, on random and awkward boxes."""

from __future__ import annotations

import numpy as np
import pytest

from fluxion_dist.attention import reference
from fluxion_dist.attention.layout import from_bf16_bits, to_bf16_bits
from fluxion_dist.kernels.compact_metadata import (MAX_MAGNITUDE, QMAX, CompactMetadata, dequantize,
                                                   mirror_boxes, nbytes_per_row, outward_bf16, quantize)


def boxes(rng, p, hkv, d, spread=1.0):
    """bf16-exact random boxes: the min and max of 16 Gaussian keys per (page, head, channel)."""
    k = rng.standard_normal((p, 16, hkv, d)).astype(np.float32) * np.float32(spread)
    lo, hi = k.min(axis=1), k.max(axis=1)
    return to_bf16_bits(lo).reshape(lo.shape), to_bf16_bits(hi).reshape(hi.shape)


def f32(bits):
    return from_bf16_bits(bits).reshape(bits.shape)


def assert_outward(kmin, kmax, meta):
    lo, hi = dequantize(meta)
    assert lo.dtype == hi.dtype == np.float32
    assert np.all(lo <= f32(kmin)), "a mirrored min above the bf16 min"
    assert np.all(hi >= f32(kmax)), "a mirrored max below the bf16 max"
    assert np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))
    s = f32(meta.scales).astype(np.float64)[..., None]
    assert np.all(s > 0)
    # tight: at most one step outward
    assert np.all(f32(kmin) - lo.astype(np.float64) <= s) and np.all(hi - f32(kmax).astype(np.float64) <= s)
    assert np.all(np.abs(meta.values.astype(np.int64)) <= QMAX)
    return lo, hi


@pytest.mark.parametrize("p,hkv,d", [(1, 1, 8), (17, 2, 64), (300, 8, 128), (5, 3, 256)])
@pytest.mark.parametrize("spread", [1e-3, 1.0, 40.0])
def test_random_boxes_round_outward(p, hkv, d, spread):
    rng = np.random.default_rng([p, hkv, d, int(spread * 1000)])
    kmin, kmax = boxes(rng, p, hkv, d, spread)
    meta = quantize(kmin, kmax)
    assert meta.values.shape == (p, hkv, 2 * d) and meta.values.dtype == np.int8
    assert meta.scales.shape == (p, hkv) and meta.scales.dtype == np.uint16
    assert_outward(kmin, kmax, meta)


def test_awkward_boxes():
    rng = np.random.default_rng(9)
    d = 32
    rows = []
    rows.append(np.zeros((2, d)))  # all zero
    rows.append(np.full((2, d), 3.0))  # all equal, positive
    rows.append(np.full((2, d), -0.7))  # all equal, negative
    rows.append(np.stack([np.full(d, -1e30), np.full(d, 1e30)]))  # +-large
    rows.append(np.stack([np.full(d, -1.7e38), np.full(d, 1.6e38)]))  # near the top of the range
    tiny = np.float32(2.0 ** -133)  # the least bf16 subnormal
    rows.append(np.stack([np.full(d, -tiny), np.full(d, tiny * 3)]))  # denormals only
    rows.append(np.stack([np.full(d, -5 * tiny), np.full(d, 1e3)]))  # denormal beside a large one
    rows.append(np.stack([np.linspace(-2, 1, d), np.linspace(-2, 1, d)]))  # zero-width boxes
    x = rng.standard_normal(d) * 10.0 ** rng.integers(-30, 30, d)  # mixed magnitudes in one row
    rows.append(np.stack([np.minimum(x, 0) - 1e-20, np.abs(x)]))
    m = np.stack(rows)  # [rows, 2, d]
    kmin = to_bf16_bits(m[:, 0].astype(np.float32)).reshape(len(rows), 1, d)
    kmax = to_bf16_bits(m[:, 1].astype(np.float32)).reshape(len(rows), 1, d)
    assert np.all(f32(kmin) <= f32(kmax))
    meta = quantize(kmin, kmax)
    lo, hi = assert_outward(kmin, kmax, meta)
    assert np.all(lo[0] == 0) and np.all(hi[0] == 0), "a zero box stays exact"
    amax = np.maximum(np.abs(f32(kmin)), np.abs(f32(kmax))).max(axis=-1).astype(np.float64)
    down = meta.scales > 0x0080  # the least scale (2^-126) has no smaller one to try
    smaller = f32((meta.scales - 1).astype(np.uint16)).astype(np.float64)
    assert np.all(QMAX * smaller[down] < amax[down]), "the scale must be the least bf16 that holds the row"


def test_scale_is_exact_at_the_limits():
    """127 * s is exact, so a corner equal to +-max|row| maps to +-127 exactly or within a step."""
    rng = np.random.default_rng(4)
    kmin, kmax = boxes(rng, 200, 4, 16)
    meta = quantize(kmin, kmax)
    lo, hi = dequantize(meta)
    amax = np.maximum(np.abs(f32(kmin)), np.abs(f32(kmax))).max(axis=-1)
    s = f32(meta.scales).astype(np.float64)
    assert np.all(QMAX * s >= amax)
    smaller = f32((meta.scales - 1).astype(np.uint16)).astype(np.float64)
    assert np.all(QMAX * smaller < amax), "the scale must be the least bf16 that holds the row"


@pytest.mark.parametrize("group", [1, 4, 8])
def test_bound_from_the_mirror_is_an_upper_bound(group):
    rng = np.random.default_rng(group)
    hkv, d, nb = 2, 128, 150
    k = to_bf16_bits(rng.standard_normal((nb * 16, hkv, d)).astype(np.float32) * 2)
    keys = f32(k).reshape(nb * 16, hkv, d)
    lo_b, hi_b = reference.block_metadata(keys)
    kmin = to_bf16_bits(lo_b).reshape(lo_b.shape)
    kmax = to_bf16_bits(hi_b).reshape(hi_b.shape)
    meta = quantize(kmin, kmax)
    lo, hi = dequantize(meta)
    for trial in range(5):
        q = rng.standard_normal((hkv * group, d)).astype(np.float32)
        exact = reference.quest_scores(q, f32(kmin), f32(kmax), 0.1)
        mirror = reference.quest_scores(q, lo, hi, 0.1)
        assert np.all(mirror >= exact), f"trial {trial}"
        # and of every token's true score
        dots = np.einsum("hd,bthd->hbt", np.repeat(q, 1, 0).astype(np.float64),
                         np.repeat(keys.reshape(nb, 16, hkv, d), group, axis=2).astype(np.float64)) * 0.1
        assert np.all(mirror >= dots.max(axis=-1) - 1e-9)
        # loose by a bounded amount: at most one scale step per channel, weighted by |q|
        s = f32(meta.scales).astype(np.float64)  # [nb, hkv]
        slack = np.abs(q).sum(axis=1)[:, None] * np.repeat(s.T, group, axis=0) * 0.1
        assert np.all(mirror - exact <= slack + 1e-9)
    for coarse in (4, 16):  # coarse levels fold the mirror's boxes: still bounds
        q = rng.standard_normal((hkv * group, d)).astype(np.float32)
        exact = reference.quest_scores(q, *reference.coarsen_metadata(f32(kmin), f32(kmax), coarse), 0.1)
        mirror = reference.quest_scores(q, *reference.coarsen_metadata(lo, hi, coarse), 0.1)
        assert np.all(mirror >= exact)


def test_layout_and_bytes():
    rng = np.random.default_rng(2)
    kmin, kmax = boxes(rng, 3, 2, 16)
    meta = quantize(kmin, kmax)
    v = meta.values.reshape(3, 2, 2, 2, 8)  # [P, Hkv, d/8, (min, max), 8]
    lo, hi = dequantize(meta)
    s = f32(meta.scales)[..., None]
    np.testing.assert_array_equal(v[..., 0, :].reshape(3, 2, 16) * s, lo)
    np.testing.assert_array_equal(v[..., 1, :].reshape(3, 2, 16) * s, hi)
    bf16, mirror = nbytes_per_row(128)
    assert (bf16, mirror) == (512, 258)
    assert meta.values.nbytes + meta.scales.nbytes == 3 * 2 * nbytes_per_row(16)[1]


def test_rejects_what_it_cannot_mirror():
    ok = to_bf16_bits(np.zeros((2, 1, 8), np.float32)).reshape(2, 1, 8)
    nan = ok.copy()
    nan[1, 0, 3] = 0x7FC0
    with pytest.raises(ValueError, match=r"kmin\[1, 0, 3\] = nan cannot be mirrored"):
        quantize(nan, ok)
    inf = ok.copy()
    inf[0, 0, 0] = 0x7F80
    with pytest.raises(ValueError, match="kmax.*cannot be mirrored"):
        quantize(ok, inf)
    big = to_bf16_bits(np.full((2, 1, 8), MAX_MAGNITUDE * 1.5, np.float32)).reshape(2, 1, 8)
    with pytest.raises(ValueError, match="cannot be mirrored"):
        quantize(ok, big)
    one = to_bf16_bits(np.ones((2, 1, 8), np.float32)).reshape(2, 1, 8)
    with pytest.raises(ValueError, match="exceeds kmax"):
        quantize(one, ok)
    with pytest.raises(ValueError, match="multiple of 8"):
        quantize(ok[..., :6].copy(), ok[..., :6].copy())
    with pytest.raises(TypeError, match="uint16"):
        quantize(ok.astype(np.float32), ok)
    with pytest.raises(ValueError, match="shape"):
        quantize(ok, ok[:1])
    assert isinstance(quantize(ok, one), CompactMetadata)


@pytest.mark.parametrize("spread", [1e-3, 1.0, 40.0])
def test_mirror_boxes_contain_the_mirror_within_one_bf16_step(spread):
    """The bf16 boxes a bf16 scorer reads to emulate the mirror (the quality harness's int8
    variant): each contains the mirror's box, which contains the bf16 box, and is at most one
    bf16 step wider than the mirror's on each side."""
    rng = np.random.default_rng()
    kmin, kmax = boxes(rng, 40, 4, 64, spread)
    lo, hi = dequantize(quantize(kmin, kmax))
    mlo_bits, mhi_bits = mirror_boxes(kmin, kmax)
    mlo, mhi = f32(mlo_bits), f32(mhi_bits)
    assert mlo_bits.dtype == mhi_bits.dtype == np.uint16
    assert np.all(mlo <= lo) and np.all(mhi >= hi), "the bf16 box must contain the mirror's"
    assert np.all(mlo <= f32(kmin)) and np.all(mhi >= f32(kmax))
    # one bf16 step: 2^-7 of the magnitude (the significand's 8 bits)
    assert np.all(lo - mlo <= np.abs(lo) * 2.0 ** -7) and np.all(mhi - hi <= np.abs(hi) * 2.0 ** -7)
    exact = to_bf16_bits(lo).reshape(lo.shape)  # a mirror value that is bf16 already stays
    same = f32(exact) == lo
    assert np.array_equal(mlo_bits[same], exact[same])


def test_outward_bf16_directions():
    x = np.array([1.0 + 2.0 ** -10, -(1.0 + 2.0 ** -10), 0.0, -0.0, 2.0, -3.0], np.float32)
    lo_bits, hi_bits = outward_bf16(x, x)
    lo, hi = f32(lo_bits), f32(hi_bits)
    assert lo.tolist() == [1.0, -(1.0 + 2.0 ** -7), 0.0, 0.0, 2.0, -3.0]
    assert hi.tolist() == [1.0 + 2.0 ** -7, -1.0, 0.0, 0.0, 2.0, -3.0]
