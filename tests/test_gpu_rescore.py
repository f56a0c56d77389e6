"""The rescoring stage on the GPU (kernels/rescore.cu) against the float64 reference, and the
device pipeline's two-stage selection against the policy's NumPy twin, step after step.

The kernel reads K from the pinned host arena through UVA, from device memory, or from GPU
block-cache slots (``slot_of``); padding past each sequence is NaN, so a stray read shows.
Skipped with a reason where no GPU runs kernels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests import gpu_util

gpu_util.skip_unless_gpu()

import cupy as cp  # noqa: E402

from fluxion_dist.attention import reference  # noqa: E402
from fluxion_dist.kernels.rescore import candidate_lse, candidate_scores  # noqa: E402
from fluxion_dist.kernels.uva import pinned_empty  # noqa: E402
from fluxion_dist.policy import select as twin  # noqa: E402
from tests.test_hybrid_operator import Decode, bf16  # noqa: E402

pytestmark = pytest.mark.gpu

HEADS = [(2, 1, 128), (2, 4, 128), (1, 8, 128), (2, 4, 64), (3, 2, 64)]


def _candidates(rng, batch):
    """Per request and KV head a random subset of its blocks (empty and full rows included)."""
    rows = []
    for b in range(len(batch.seq_lens)):
        nb = batch.blocks(b)
        for _ in range(batch.num_kv_heads):
            kind = rng.integers(4)
            ids = (np.zeros(0, np.int64) if kind == 0 else np.arange(nb) if kind == 1
                   else np.flatnonzero(rng.random(nb) < rng.uniform(0.05, 0.6)))
            rows.append(ids)
    indptr = np.concatenate([[0], np.cumsum([r.size for r in rows])]).astype(np.int32)
    return rows, indptr, np.concatenate(rows).astype(np.int32)


@pytest.mark.parametrize("where", ["uva", "device", "cache"])
@pytest.mark.parametrize("hkv,group,d", HEADS)
def test_kernel_matches_the_reference(hkv, group, d, where):
    rng, seed = gpu_util.fresh_rng()
    batch = gpu_util.make_paged_batch(rng, gpu_util.AWKWARD_SEQ_LENS, hkv, d)
    q = rng.standard_normal((len(batch.seq_lens), hkv * group, d)).astype(np.float32) * 2
    rows, indptr, blocks = _candidates(rng, batch)
    scale = d ** -0.5
    extra = {}
    if where == "uva":
        host, arena = pinned_empty(batch.kv_pages.shape, np.uint16)
        host[...] = batch.kv_pages
    else:
        arena = cp.asarray(batch.kv_pages)
    if where == "cache":  # every other candidate's K/V from a pool slot, the arena page poisoned
        pages, heads = batch.kv_pages.shape[:2]
        slot_of = np.full(pages * heads, -1, np.int32)
        pool = []
        kv = batch.kv_pages.copy()
        for r, ids in enumerate(rows):
            b, h = divmod(r, hkv)
            for blk in ids[::2]:
                page = batch.block_tables[b, blk]
                slot_of[page * heads + h] = len(pool)
                pool.append(kv[page, h].copy())
                kv[page, h] = gpu_util.BF16_NAN
        arena = cp.asarray(kv)
        pool = np.stack(pool) if pool else np.zeros((1, 2, 16, d), np.uint16)
        extra = dict(slot_of=cp.asarray(slot_of), cache_pool=cp.asarray(pool))
    seq = cp.asarray(batch.seq_lens)
    ip, bl = cp.asarray(indptr), cp.asarray(blocks)
    bound = max(r.size for r in rows)
    lse = candidate_lse(cp.asarray(q), arena, cp.asarray(batch.block_tables), seq, ip, bl, scale=scale,
                        max_row_blocks=bound, **extra)
    width = batch.block_tables.shape[1]
    out = cp.full((len(batch.seq_lens), hkv, width), 7.0, cp.float32)  # every entry is rewritten
    candidate_scores(lse, ip, bl, seq, out, sink_blocks=1, recent_blocks=2, head_dim=d)
    lse, out = cp.asnumpy(lse), cp.asnumpy(out)
    for b in range(len(batch.seq_lens)):
        want = reference.block_lse(q[b], batch.k[b], rows[b * hkv:(b + 1) * hkv], scale=scale)
        shares = reference.candidate_shares(want)
        nb = batch.blocks(b)
        for h in range(hkv):
            r = b * hkv + h
            msg = f"seed {seed} request {b} head {h} ({where})"
            np.testing.assert_allclose(lse[indptr[r]:indptr[r + 1]], want[h], rtol=1e-5, atol=1e-4, err_msg=msg)
            ids = rows[r]
            kept = (ids < 1) | (ids >= nb - 2)
            assert np.all(out[b, h, ids[kept]] == twin.FORCED_SCORE), msg
            np.testing.assert_allclose(out[b, h, ids[~kept]], shares[h][~kept], rtol=1e-5, atol=2e-4, err_msg=msg)
            assert np.all(out[b, h, np.setdiff1d(np.arange(width), ids)] == -np.inf), msg


def _near_tie_only(got: np.ndarray, want: np.ndarray, exact: np.ndarray, k: int, tol: float = 1e-4) -> bool:
    """Whether two k-subsets of a row differ only in blocks whose exact score lies within
    ``tol`` of the row's k-th best (float32 rounding may rank those either way)."""
    diff = np.setxor1d(got, want)
    if diff.size == 0:
        return True
    kth = np.sort(exact)[::-1][k - 1]
    return bool(np.all(np.abs(exact[diff] - kth) <= tol))


@pytest.mark.parametrize("graphs", [True, False])
def test_pipeline_rescoring_equals_the_twin(graphs):
    """fluxion with ``rescore_factor`` on the device: per layer call the candidate CSR equals the
    twin's exactly (top-k of bit-equal forced Quest scores), the exact scores match the twin's
    to float32 rounding, and the final CSR equals the twin's except across near ties."""
    dec = Decode([1000, 1777, 433], 2, 4, d=128, layers=3, steps=6, seed=23)
    op = dec.operator("fluxion", "gpu", budget=0.1, mass=0.9, sparse=dict(rescore_factor=2.0),
                      record_selection=True, cuda_graphs=graphs)
    kept = op.kept
    moved = 0
    for step in range(6):
        hook = op.step(dec.seqs, dec.ids)
        b = len(dec.seqs)
        seq_lens = np.array([s.seq_len + 1 for s in dec.seqs], np.int32)
        nb = twin.block_counts(seq_lens)
        for layer in range(dec.layers):
            q = dec.rng.standard_normal((b, dec.hq, dec.d)).astype(np.float32)
            kn = bf16(dec.rng.standard_normal((b, dec.hkv, dec.d)).astype(np.float32))
            vn = bf16(dec.rng.standard_normal((b, dec.hkv, dec.d)).astype(np.float32))
            hook(layer, torch.from_numpy(q), torch.from_numpy(kn), torch.from_numpy(vn))
            tables = hook.tables_host[layer]
            st = hook.state.unread[layer][0].state
            assert st.cand is not None
            kmin, kmax = cp.asnumpy(op.pipeline.kmin), cp.asnumpy(op.pipeline.kmax)
            scores = twin.quest_kv_scores(q, kmin, kmax, tables, seq_lens, 1.0 / np.sqrt(dec.d))
            twin.force_kept(scores, seq_lens, sink_blocks=kept.sink_blocks, recent_blocks=kept.recent_blocks)
            k_rows = np.minimum(hook.k_rows[layer], nb[:, None])
            cand_ip, cand_bl = twin.topk_csr(scores, seq_lens, twin.candidate_rows(k_rows, seq_lens, 2.0))
            got_cip = cp.asnumpy(st.cand.indptr)
            where = f"step {step} layer {layer}"
            np.testing.assert_array_equal(got_cip, cand_ip, err_msg=f"{where}: candidates indptr")
            np.testing.assert_array_equal(cp.asnumpy(st.cand.blocks[:int(got_cip[-1])]), cand_bl,
                                          err_msg=f"{where}: candidates")
            lse = twin.candidate_lse(q, dec.arena.kv_pages, tables, seq_lens, 1.0 / np.sqrt(dec.d), cand_ip, cand_bl)
            exact = twin.candidate_scores(lse, cand_ip, cand_bl, seq_lens, dec.hkv, tables.shape[1],
                                          sink_blocks=kept.sink_blocks, recent_blocks=kept.recent_blocks)
            got_exact = cp.asnumpy(st.exact)
            finite = np.isfinite(exact) & (exact != twin.FORCED_SCORE)
            np.testing.assert_array_equal(np.where(finite, 0, got_exact), np.where(finite, 0, exact),
                                          err_msg=f"{where}: forced and non-candidates")
            np.testing.assert_allclose(got_exact[finite], exact[finite], rtol=1e-5, atol=1e-4,
                                       err_msg=f"{where}: exact scores")
            want_ip, want_bl = twin.topk_csr(exact, seq_lens, k_rows)
            got_ip, got_bl = hook.selections[layer]
            np.testing.assert_array_equal(got_ip, want_ip, err_msg=f"{where}: indptr")
            got_rows, want_rows = gpu_util.csr_rows(got_ip, got_bl), gpu_util.csr_rows(want_ip, want_bl)
            for r, (g, w) in enumerate(zip(got_rows, want_rows)):
                bb, h = divmod(r, dec.hkv)
                assert _near_tie_only(g, w, exact[bb, h], int(k_rows[bb, h])), f"{where} row {r}: {g} vs {w}"
            plain_ip, plain_bl = twin.topk_csr(scores, seq_lens, k_rows)
            moved += not np.array_equal(plain_bl, got_bl)
        hook.report()
        for s in dec.seqs:
            s.seq_len += 1
    assert moved > 0  # the stage changed some selection
    op.close()
