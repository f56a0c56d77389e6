"""The GPU pipeline's selection equals the policy's NumPy twin (policy.select), step after step.

The operator runs fluxion on the device (awkward lengths, GQA 4, a batch of 3 whose requests
have their own budgets, demand refreshed every other step); after each layer call the test
recomputes the layer from the same inputs (q, the device's metadata mirror after the append,
the block tables) with the twin and checks: the Quest kv-head scores bit for bit (outside the
forced blocks), the far demand of the top-p pass where the layer measured it, the step's plan
(pooled budgets from the demand known at the step's start) and the selected CSR exactly.
Skipped with a reason where no GPU runs kernels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests import gpu_util

gpu_util.skip_unless_gpu()

import cupy as cp  # noqa: E402

from fluxion_dist.hybrid.far_demand import far_demand as far_demand_gpu  # noqa: E402
from fluxion_dist.policy import RequestSparse  # noqa: E402
from fluxion_dist.policy import select as twin  # noqa: E402
from fluxion_dist.policy.budget import pooled_row_budgets  # noqa: E402
from tests.test_hybrid_operator import Decode, bf16  # noqa: E402

pytestmark = pytest.mark.gpu


def test_far_demand_kernel_matches_the_twin():
    rng, seed = gpu_util.fresh_rng()
    lens = np.array([1, 17, 1000, 1333, 160], np.int32)
    heads = 3
    rows = []
    for t in lens:
        nb = -(-int(t) // 16)
        for _ in range(heads):
            rows.append(np.sort(rng.choice(nb, int(rng.integers(0, nb + 1)), replace=False)))
    indptr = np.concatenate([[0], np.cumsum([r.size for r in rows])]).astype(np.int32)
    blocks = np.concatenate(rows).astype(np.int32)
    out = cp.full(indptr.size - 1, -5, cp.int32)
    far_demand_gpu(cp.asarray(indptr), cp.asarray(blocks), cp.asarray(lens), heads=heads, sink_blocks=1,
                   recent_blocks=9, out=out)
    want = twin.far_demand(indptr, blocks, lens, heads, sink_blocks=1, recent_blocks=9).ravel()
    np.testing.assert_array_equal(cp.asnumpy(out), want, err_msg=f"seed {seed}")


@pytest.mark.parametrize("graphs", [True, False])
def test_pipeline_selection_equals_the_twin(graphs):
    dec = Decode([1000, 1777, 433], 2, 4, d=128, layers=3, steps=7, seed=21)
    # floors below the fixed share, local heads back to the pool: the plan really moves budgets
    op = dec.operator("fluxion", "gpu", budget=0.05, mass=0.9, sparse=dict(floor_fraction=0.5, head_predictor=True),
                      record_selection=True, refresh_steps=2, cuda_graphs=graphs)
    own = [None, RequestSparse("fluxion", 0.1), RequestSparse("fluxion", 0.2)]
    budgets = np.array([0.05, 0.1, 0.2])
    pipe, state, kept = op.pipeline, op.device_state, op.kept
    measured = 0
    for step in range(7):
        hook = op.step(dec.seqs, dec.ids, own)
        b = len(dec.seqs)
        seq_lens = np.array([s.seq_len + 1 for s in dec.seqs], np.int32)
        nb = twin.block_counts(seq_lens)
        for layer in range(dec.layers):
            q = dec.rng.standard_normal((b, dec.hq, dec.d)).astype(np.float32)
            kn = bf16(dec.rng.standard_normal((b, dec.hkv, dec.d)).astype(np.float32))
            vn = bf16(dec.rng.standard_normal((b, dec.hkv, dec.d)).astype(np.float32))
            hook(layer, torch.from_numpy(q), torch.from_numpy(kn), torch.from_numpy(vn))  # CPU in: done on return
            if layer == 0:  # the step's plan: the pooled budgets of the demand known at its start
                want_plan = pooled_row_budgets(hook.demand, nb, budgets, sink_blocks=kept.sink_blocks,
                                               recent_blocks=kept.recent_blocks,
                                               floor_fraction=op.config.floor_fraction,
                                               head_predictor=op.config.head_predictor)
                np.testing.assert_array_equal(hook.k_rows, want_plan)
                if step > 0:
                    assert np.all(hook.demand >= 0)
            tables = hook.tables_host[layer]
            kmin, kmax = cp.asnumpy(pipe.kmin), cp.asnumpy(pipe.kmax)  # the mirror, the new token's box in
            scores = twin.quest_kv_scores(q, kmin, kmax, tables, seq_lens, 1.0 / np.sqrt(dec.d))
            outcome = state.unread[layer][0]
            got_scores = cp.asnumpy(outcome.state.kv_scores)  # after forcing, in place
            forced = got_scores == twin.FORCED_SCORE
            live = np.arange(tables.shape[1])[None, None, :] < nb[:, None, None]
            np.testing.assert_array_equal(np.where(forced | ~live, 0, got_scores),
                                          np.where(forced | ~live, 0, scores),
                                          err_msg=f"step {step} layer {layer}: Quest scores")
            counts = pipe.counts(layer, outcome)
            if counts.demand is not None:
                measured += 1
                ip, bl = twin.topp_sets(scores, seq_lens, op.config.mass_target)
                want = twin.far_demand(ip, bl, seq_lens, dec.hkv, sink_blocks=kept.sink_blocks,
                                       recent_blocks=kept.recent_blocks)
                np.testing.assert_array_equal(counts.demand, want, err_msg=f"step {step} layer {layer}: demand")
            k_rows = np.minimum(hook.k_rows[layer], nb[:, None])
            twin.force_kept(scores, seq_lens, sink_blocks=kept.sink_blocks, recent_blocks=kept.recent_blocks)
            want_ip, want_bl = twin.topk_csr(scores, seq_lens, k_rows)
            got_ip, got_bl = hook.selections[layer]
            np.testing.assert_array_equal(got_ip, want_ip, err_msg=f"step {step} layer {layer}: indptr")
            np.testing.assert_array_equal(got_bl, want_bl, err_msg=f"step {step} layer {layer}: blocks")
        report = hook.report()
        assert len(report.budget_per_request) == 3
        for s in dec.seqs:
            s.seq_len += 1
    assert measured == dec.layers + 9  # every layer on the first step, then each layer every other step
    op.close()
