"""The hybrid operator on the GPU (device pipeline: GPU scoring, selection and routing, UVA
reads, block cache, CPU share, GPU merge) against the float64 reference, and routings and
cache states against each other: the same selection must give the same output whatever
runs where. Skipped with a reason where no GPU runs kernels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests import gpu_util

gpu_util.skip_unless_gpu()

from fluxion_dist.hybrid import CostModel, calibrate  # noqa: E402
from tests.test_hybrid_operator import POLICIES, Decode  # noqa: E402

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("hkv,group,d", [(2, 1, 128), (2, 4, 128), (1, 8, 128), (2, 4, 64)])
@pytest.mark.parametrize("policy", POLICIES)
def test_budget_one_is_full_attention_on_the_gpu(policy, hkv, group, d):
    dec = Decode([1, 15, 17, 1000, 1333], hkv, group, d=d, seed=hkv * 10 + group + d, steps=4)
    op = dec.operator(policy, "gpu")
    for step in range(4):
        outs, report = dec.step(op)
        for got, ref in outs:
            np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-4)
        assert report.budget_used == pytest.approx(1.0)
        assert report.measured_gpu_idle_fraction is not None
        if policy == "fluxion" and step >= 1:
            assert report.gpu_cached_blocks > 0
        if policy == "cpu_only":
            assert report.gpu_blocks == 0
        if policy == "quest_gpu":
            assert report.cpu_blocks == 0
    op.close()


def _outputs(policy, steps=6, **kw):
    dec = Decode([3000, 777, 2049], 2, 4, d=128, seed=5, steps=steps, slots=kw.pop("slots", 4096))
    op = dec.operator(policy, "gpu", budget=0.1, mass=0.9, **kw)
    outs, reports = [], []
    for _ in range(steps):
        got, report = dec.step(op)
        outs.append([g for g, _ in got])
        reports.append(report)
    op.close()
    return outs, reports


def test_where_a_block_runs_does_not_change_the_output():
    """One fixed-budget selection, routed all-GPU, all-CPU and split 3 ways: equal outputs."""
    base, _ = _outputs("quest_gpu")
    for policy, kw in (("cpu_only", {}), ("fixed_hybrid", {"static_cpu_fraction": 0.5}),
                       ("fixed_hybrid", {"static_cpu_fraction": 0.13})):
        outs, reports = _outputs(policy, **kw)
        assert sum(r.cpu_blocks for r in reports) > 0
        for a, b in zip(base, outs):
            for x, y in zip(a, b):
                np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


def test_cache_never_serves_a_stale_block():
    """Fluxion with and without the block cache: same inputs, same predictor, same selection;
    appends cross block boundaries, so a stale slot would show as a different output."""
    cached, reports = _outputs("fluxion", steps=20)
    uncached, reports0 = _outputs("fluxion", steps=20, slots=0)
    assert sum(r.gpu_cached_blocks for r in reports[2:]) > 0
    assert all(r.gpu_cached_blocks == 0 for r in reports0)
    for a, b in zip(cached, uncached):
        for x, y in zip(a, b):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


def test_admission_by_reuse_changes_no_output():
    """Admitting only the misses selected on the step before as well: the same outputs as
    every-miss admission and as no cache; fewer copies, and still hits after a few steps."""
    every, reports = _outputs("fluxion", steps=20)
    reused, reports_r = _outputs("fluxion", steps=20, sparse={"cache_admission": "reused"})
    assert all(x.cache_copies == 0 for x in reports_r[0].layers)  # nothing was selected before the first step
    assert sum(r.gpu_cached_blocks for r in reports_r[2:]) > 0
    copies = [sum(x.cache_copies for rep in rs for x in rep.layers) for rs in (reports, reports_r)]
    assert copies[1] < copies[0]
    for a, b in zip(every, reused):
        for x, y in zip(a, b):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


def test_cuda_tensors_in_and_out():
    """A CUDA tensor in gives a CUDA tensor out, equal to the CPU-tensor call of a twin operator."""
    got = {}
    for where in ("cuda", "cpu"):
        dec = Decode([500, 1200], 2, 4, d=128, seed=9, steps=2)
        op = dec.operator("fluxion", "gpu", budget=0.2, mass=0.9)
        gen = torch.Generator().manual_seed(4)
        q = torch.randn(2, 8, 128, generator=gen)
        k, v = torch.randn(2, 2, 128, generator=gen).bfloat16(), torch.randn(2, 2, 128, generator=gen).bfloat16()
        out = op.step(dec.seqs, dec.ids)(0, q.to(where), k.to(where), v.to(where))
        assert out.device.type == where and out.dtype == torch.float32
        got[where] = out.cpu().numpy()
        op.close()
    np.testing.assert_allclose(got["cuda"], got["cpu"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("form", ["bf16", "fp16", "strided"])
def test_cuda_inputs_of_any_dtype_and_layout(form):
    """bf16 and fp16 q (the model's dtype), and non-contiguous q/k/v views, give what the
    float32 call of a twin operator gives, in the caller's dtype."""
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(2, 8, 128, generator=gen)
    k, v = torch.randn(2, 2, 128, generator=gen), torch.randn(2, 2, 128, generator=gen)
    if form in ("bf16", "fp16"):
        q = q.to(torch.bfloat16 if form == "bf16" else torch.float16)
    q32, k16, v16 = q.float(), k.bfloat16(), v.bfloat16()
    got = {}
    for name, args in (("ref", (q32, k16, v16)), ("form", (q, k, v))):
        dec = Decode([500, 1200], 2, 4, d=128, seed=9, steps=5)
        op = dec.operator("fluxion", "gpu", budget=0.2, mass=0.9)
        args = [a.cuda() for a in args]
        if form == "strided":  # every other head of a wider tensor: views with gaps
            args = [torch.stack([a, a], 2).flatten(1, 2)[:, ::2] for a in args]
            assert not args[0].is_contiguous()
        got[name] = []
        for _ in range(4):  # eager, captured and replayed graphs alike
            hook = op.step(dec.seqs, dec.ids)
            got[name] += [hook(layer, *args) for layer in range(dec.layers)]
            hook.report()
            for seq in dec.seqs:
                seq.seq_len += 1
        op.close()
    for ref, out in zip(got["ref"], got["form"]):
        assert out.dtype == (torch.float32 if form == "strided" else q.dtype)
        np.testing.assert_allclose(out.float().cpu().numpy(), ref.to(out.dtype).float().cpu().numpy(),
                                   rtol=1e-5, atol=1e-6)


def test_the_split_learns_the_cpu_rate_it_measures():
    """Fluxion's split, planned with a start-up model that overrates the CPU a thousandfold:
    the step's CPU calls are timed, the live model's CPU rate falls toward what they took, and
    each split layer's report carries the measured time beside the predicted one."""
    dec = Decode([3000, 777, 2049], 2, 4, d=128, seed=5, steps=8, slots=0)
    start = CostModel.from_rates(128, cpu_gb_per_s=5000.0, uva_gb_per_s=5.0, cached_gb_per_s=50.0)
    op = dec.operator("fluxion", "gpu", budget=0.3, mass=0.9, cost=start)
    reports = [dec.step(op)[1] for _ in range(8)]
    live = op.device_state.cost
    op.close()
    split = [r for rep in reports for r in rep.layers if r.cpu_blocks]
    assert split and all(r.measured_cpu_s > 0 for r in split)
    assert live.cpu_bytes_per_s < 0.5 * start.cpu_bytes_per_s
    assert (live.uva_bytes_per_s, live.cached_bytes_per_s) == (start.uva_bytes_per_s, start.cached_bytes_per_s)


def test_calibration_measures_gpu_rates():
    cost = calibrate(128, 8, 4, num_threads=2, blocks_per_row=256)
    assert cost.has_gpu and cost.uva_bytes_per_s > 1e9 and cost.cached_bytes_per_s > cost.uva_bytes_per_s
    assert cost.copy_bytes_per_s > 1e9


def test_graph_replays_equal_eager_launches():
    """CUDA-graph replays (parameters written in place, inputs copied in) against eager
    launches, over enough steps for predictor refreshes, budget changes and cache hits."""
    graphs, reports = _outputs("fluxion", steps=12)
    eager, _ = _outputs("fluxion", steps=12, cuda_graphs=False)
    assert sum(r.gpu_cached_blocks for r in reports[2:]) > 0
    for a, b in zip(graphs, eager):
        for x, y in zip(a, b):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
