"""quest_scores_compact on the GPU: equal to the NumPy reference over the dequantised mirror,
and never below the bf16 metadata's scores (the mirror's boxes contain the bf16 boxes)."""

from __future__ import annotations

import numpy as np
import pytest

from tests import gpu_util

gpu_util.skip_unless_gpu()

import cupy as cp  # noqa: E402

from fluxion_dist.attention import reference  # noqa: E402
from fluxion_dist.attention.layout import to_bf16_bits  # noqa: E402
from fluxion_dist.kernels.compact_metadata import dequantize, quantize, quantize_pages  # noqa: E402
from fluxion_dist.kernels.scoring import quest_scores, quest_scores_compact  # noqa: E402

pytestmark = pytest.mark.gpu

HEADS = [(2, 1, 128), (2, 4, 128), (1, 8, 128), (2, 4, 64)]


def mirror(rng, batch):
    """The mirror of every page a request owns; the spare pages hold NaN scales and random
    values, so a stray read shows up as NaN."""
    used = np.concatenate([batch.pages(b) for b in range(len(batch.seq_lens))])
    meta = quantize(batch.kmin[used], batch.kmax[used])
    p, hkv, d = batch.kmin.shape
    values = rng.integers(-128, 128, size=(p, hkv, 2 * d), dtype=np.int8)
    scales = np.full((p, hkv), gpu_util.BF16_NAN, np.uint16)
    values[used], scales[used] = meta.values, meta.scales
    lo = np.full((p, hkv, d), np.nan, np.float32)
    hi = lo.copy()
    lo[used], hi[used] = dequantize(meta)
    return values, scales, lo, hi


def device_args(q, batch, *meta):
    return (cp.asarray(q), *(cp.asarray(m) for m in meta), cp.asarray(batch.block_tables),
            cp.asarray(batch.seq_lens))


@pytest.mark.parametrize("hkv,group,d", HEADS)
@pytest.mark.parametrize("factor", [1, 4, 16])
def test_compact_scores_match_reference_and_bound_the_bf16_scores(hkv, group, d, factor):
    rng, seed = gpu_util.fresh_rng()
    batch = gpu_util.make_paged_batch(rng, gpu_util.AWKWARD_SEQ_LENS, hkv, d)
    bsz, hq = len(batch.seq_lens), hkv * group
    q = rng.standard_normal((bsz, hq, d)).astype(np.float32)
    scale = float(reference.default_scale(d)) * rng.uniform(0.5, 2.0)
    nc = -(-batch.block_tables.shape[1] // factor)
    values, scales, lo, hi = mirror(rng, batch)
    out = (cp.full((bsz, hq, nc), np.nan, cp.float32), cp.full((bsz, hkv, nc), np.nan, cp.float32))
    scores, kv_scores = quest_scores_compact(*device_args(q, batch, values, scales), scale=scale,
                                             factor=factor, out=out)
    scores, kv_scores = cp.asnumpy(scores), cp.asnumpy(kv_scores)
    exact, _ = quest_scores(*device_args(q, batch, batch.kmin, batch.kmax), scale=scale, factor=factor)
    exact = cp.asnumpy(exact)

    for b in range(bsz):
        pages = batch.pages(b)
        blo, bhi = lo[pages].astype(np.float64), hi[pages].astype(np.float64)
        if factor > 1:
            blo, bhi = reference.coarsen_metadata(blo, bhi, factor)
        ref = reference.quest_scores(q[b], blo, bhi, scale)
        n = ref.shape[1]
        msg = f"seed={seed} request={b} seq_len={batch.seq_lens[b]}"
        np.testing.assert_allclose(scores[b, :, :n], ref, rtol=1e-5, atol=1e-4, err_msg=msg)
        np.testing.assert_allclose(kv_scores[b, :, :n], reference.kv_head_scores(ref, hkv),
                                   rtol=1e-5, atol=1e-4, err_msg=msg)
        assert np.all(scores[b, :, n:] == -np.inf) and np.all(kv_scores[b, :, n:] == -np.inf), msg
        # an upper bound of the bf16 bound, and so of every token's score
        tol = 1e-5 * np.abs(exact[b, :, :n]) + 1e-4
        assert np.all(scores[b, :, :n] >= exact[b, :, :n] - tol), msg
        k = batch.k[b].astype(np.float64)  # [T, Hkv, d]
        dots = np.einsum("hd,thd->ht", q[b].astype(np.float64), np.repeat(k, group, axis=1)) * scale
        tok = np.full((hq, n * factor * 16), -np.inf)  # n coarse blocks of factor x 16 tokens
        tok[:, :dots.shape[1]] = dots
        best = tok.reshape(hq, n, factor * 16).max(axis=-1)
        assert np.all(scores[b, :, :n] >= best - 1e-5 * np.abs(best) - 1e-4), msg


def test_compact_scores_long_context_halve_the_bytes():
    """One request of 70k tokens, GQA 4; the mirror is 2d+2 bytes per (page, head)."""
    rng, seed = gpu_util.fresh_rng()
    batch = gpu_util.make_paged_batch(rng, [70_001], 2, 128)
    q = rng.standard_normal((1, 8, 128)).astype(np.float32)
    values, scales, lo, hi = mirror(rng, batch)
    assert values.nbytes + scales.nbytes <= 0.51 * (batch.kmin.nbytes + batch.kmax.nbytes)
    scores, kv = quest_scores_compact(*device_args(q, batch, values, scales), scale=0.1)
    _, kv_only = quest_scores_compact(*device_args(q, batch, values, scales), scale=0.1, query_scores=False)
    pages = batch.pages(0)
    ref = reference.quest_scores(q[0], lo[pages], hi[pages], 0.1)
    np.testing.assert_allclose(cp.asnumpy(scores)[0, :, :ref.shape[1]], ref, rtol=1e-5, atol=1e-4,
                               err_msg=f"seed={seed}")
    np.testing.assert_array_equal(cp.asnumpy(kv), cp.asnumpy(kv_only), err_msg=f"seed={seed}")


def test_compact_scores_reject_bad_shapes():
    q = cp.zeros((1, 8, 128), cp.float32)
    values = cp.zeros((4, 2, 256), cp.int8)
    scales = cp.ones((4, 2), cp.uint16)
    tables, lens = cp.zeros((1, 4), cp.int32), cp.ones(1, cp.int32)
    with pytest.raises(ValueError, match="values must have shape"):
        quest_scores_compact(q, values[..., :128], scales, tables, lens, scale=1.0)
    with pytest.raises(ValueError, match="values must be int8"):
        quest_scores_compact(q, values.astype(cp.uint8), scales, tables, lens, scale=1.0)
    with pytest.raises(ValueError, match="scales must have shape"):
        quest_scores_compact(q, values, scales[:2], tables, lens, scale=1.0)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        quest_scores_compact(q, cp.zeros((4, 3, 256), cp.int8), cp.ones((4, 3), cp.uint16), tables, lens,
                             scale=1.0)


@pytest.mark.parametrize("d", [64, 128])
def test_gpu_quantizer_is_the_reference_bit_for_bit(d):
    rng, seed = gpu_util.fresh_rng()
    p, hkv = 1000, 8
    k = rng.standard_normal((p, 16, hkv, d)).astype(np.float32)
    k *= (10.0 ** rng.integers(-3, 4, size=(p, 1, hkv, 1))).astype(np.float32)  # magnitudes per row
    lo, hi = k.min(axis=1), k.max(axis=1)
    lo[0], hi[0] = 0.0, 0.0  # all zero
    lo[1], hi[1] = 2.5, 2.5  # all equal
    lo[2], hi[2] = -2.0 ** -133, 3 * 2.0 ** -133  # denormals only
    lo[3], hi[3] = -1e30, 1e30  # +-large
    lo[4], hi[4] = -1.7e38, 1.6e38  # near the top of the range
    kmin = to_bf16_bits(lo).reshape(lo.shape)
    kmax = to_bf16_bits(hi).reshape(hi.shape)
    want = quantize(kmin, kmax)
    pages = rng.permutation(p)[: p - 7].astype(np.int32)  # 7 pages left alone
    values = cp.full((p, hkv, 2 * d), 77, cp.int8)
    scales = cp.full((p, hkv), 0x1234, cp.uint16)
    quantize_pages(cp.asarray(kmin), cp.asarray(kmax), cp.asarray(pages), values, scales)
    got_v, got_s = cp.asnumpy(values), cp.asnumpy(scales)
    msg = f"seed={seed}"
    np.testing.assert_array_equal(got_v[pages], want.values[pages], err_msg=msg)
    np.testing.assert_array_equal(got_s[pages], want.scales[pages], err_msg=msg)
    rest = np.setdiff1d(np.arange(p), pages)
    assert np.all(got_v[rest] == 77) and np.all(got_s[rest] == 0x1234), msg
