"""quest_scores on the GPU against the float64 reference (16/64/256-token levels)."""

from __future__ import annotations

import numpy as np
import pytest

from tests import gpu_util

gpu_util.skip_unless_gpu()

import cupy as cp  # noqa: E402

from fluxion_dist.attention import reference  # noqa: E402
from fluxion_dist.attention.layout import from_bf16_bits  # noqa: E402
from fluxion_dist.kernels.scoring import quest_scores  # noqa: E402

pytestmark = pytest.mark.gpu

HEADS = [(2, 1, 128), (2, 4, 128), (1, 8, 128), (2, 4, 64)]


@pytest.mark.parametrize("hkv,group,d", HEADS)
@pytest.mark.parametrize("factor", [1, 4, 16])
def test_quest_scores_match_reference(hkv: int, group: int, d: int, factor: int):
    rng, seed = gpu_util.fresh_rng()
    batch = gpu_util.make_paged_batch(rng, gpu_util.AWKWARD_SEQ_LENS, hkv, d)
    bsz, hq = len(batch.seq_lens), hkv * group
    q = rng.standard_normal((bsz, hq, d)).astype(np.float32)
    scale = float(reference.default_scale(d)) * rng.uniform(0.5, 2.0)
    nc = -(-batch.block_tables.shape[1] // factor)
    out = (cp.full((bsz, hq, nc), np.nan, cp.float32), cp.full((bsz, hkv, nc), np.nan, cp.float32))

    scores, kv_scores = quest_scores(
        cp.asarray(q), cp.asarray(batch.kmin), cp.asarray(batch.kmax), cp.asarray(batch.block_tables),
        cp.asarray(batch.seq_lens), scale=scale, factor=factor, out=out)
    scores, kv_scores = cp.asnumpy(scores), cp.asnumpy(kv_scores)

    for b in range(bsz):
        pages = batch.pages(b)
        lo = from_bf16_bits(batch.kmin[pages]).astype(np.float64)
        hi = from_bf16_bits(batch.kmax[pages]).astype(np.float64)
        if factor > 1:
            lo, hi = reference.coarsen_metadata(lo, hi, factor)
        ref = reference.quest_scores(q[b], lo, hi, scale)
        n = ref.shape[1]
        msg = f"seed={seed} request={b} seq_len={batch.seq_lens[b]}"
        np.testing.assert_allclose(scores[b, :, :n], ref, rtol=1e-5, atol=1e-4, err_msg=msg)
        np.testing.assert_allclose(kv_scores[b, :, :n], reference.kv_head_scores(ref, hkv),
                                   rtol=1e-5, atol=1e-4, err_msg=msg)
        assert np.all(scores[b, :, n:] == -np.inf), msg
        assert np.all(kv_scores[b, :, n:] == -np.inf), msg


def test_quest_scores_long_context():
    """One request of 70k tokens: many CTAs per head, GQA 4."""
    rng, seed = gpu_util.fresh_rng()
    batch = gpu_util.make_paged_batch(rng, [70_001], 2, 128)
    q = rng.standard_normal((1, 8, 128)).astype(np.float32)
    scores, _ = quest_scores(
        cp.asarray(q), cp.asarray(batch.kmin), cp.asarray(batch.kmax), cp.asarray(batch.block_tables),
        cp.asarray(batch.seq_lens), scale=0.1, factor=1)
    pages = batch.pages(0)
    ref = reference.quest_scores(q[0], from_bf16_bits(batch.kmin[pages]), from_bf16_bits(batch.kmax[pages]), 0.1)
    np.testing.assert_allclose(cp.asnumpy(scores)[0, :, : ref.shape[1]], ref, rtol=1e-5, atol=1e-4,
                               err_msg=f"seed={seed}")


def test_kv_head_scores_only():
    rng, seed = gpu_util.fresh_rng()
    batch = gpu_util.make_paged_batch(rng, [17, 1000], 2, 128)
    q = rng.standard_normal((2, 8, 128)).astype(np.float32)
    args = (cp.asarray(q), cp.asarray(batch.kmin), cp.asarray(batch.kmax), cp.asarray(batch.block_tables),
            cp.asarray(batch.seq_lens))
    none, kv_only = quest_scores(*args, scale=0.1, query_scores=False)
    _, kv_both = quest_scores(*args, scale=0.1)
    assert none is None
    np.testing.assert_array_equal(cp.asnumpy(kv_only), cp.asnumpy(kv_both), err_msg=f"seed={seed}")


def test_quest_scores_rejects_bad_shapes():
    q = cp.zeros((1, 8, 128), cp.float32)
    meta = cp.zeros((4, 3, 128), cp.uint16)  # 8 query heads over 3 KV heads
    with pytest.raises(ValueError, match="multiple of KV heads"):
        quest_scores(q, meta, meta, cp.zeros((1, 4), cp.int32), cp.ones(1, cp.int32), scale=1.0)
    with pytest.raises(ValueError, match="kmin must be uint16"):
        quest_scores(q, meta.astype(cp.float32), meta, cp.zeros((1, 4), cp.int32), cp.ones(1, cp.int32), scale=1.0)
