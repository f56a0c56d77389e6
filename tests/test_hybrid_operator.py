"""HybridAttention against the float64 reference: with budget 1.0 every policy is full
attention, on awkward lengths and GQA 1/4/8, on the CPU-only path and with the GPU's
share run by the emulated GPU path (live cache, real splits); sparse selections equal the
reference over exactly the selected blocks; reports add up."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fluxion_dist.attention import reference
from fluxion_dist.attention.layout import from_bf16_bits, to_bf16_bits
from fluxion_dist.config.schema import SparseConfig
from fluxion_dist.hybrid import CostModel, HybridAttention, HybridAttentionError, HybridOptions
from fluxion_dist.hybrid.paged_builder import allocate_arena, build_paged, pages_needed

POLICIES = ("full", "quest_gpu", "cpu_only", "fixed_hybrid", "fluxion")
# a GPU about as fast as the CPU here, so the balanced split really splits
GPU_RATES = CostModel.from_rates(32, cpu_gb_per_s=5.0, uva_gb_per_s=5.0, cached_gb_per_s=50.0)


def bf16(x: np.ndarray) -> np.ndarray:
    return from_bf16_bits(to_bf16_bits(x)).reshape(x.shape)


class Decode:
    """Random KV for a batch, its arena, and a step driver that keeps the dense truth."""

    def __init__(self, seq_lens, hkv, group, d=32, layers=2, steps=3, seed=0, slots=64):
        self.rng = np.random.default_rng(seed)
        self.hkv, self.hq, self.d, self.layers = hkv, hkv * group, d, layers
        self.k = [[bf16(self.rng.standard_normal((t, hkv, d)).astype(np.float32)) for _ in range(layers)]
                  for t in seq_lens]
        self.v = [[bf16(self.rng.standard_normal((t, hkv, d)).astype(np.float32)) for _ in range(layers)]
                  for t in seq_lens]
        self.arena = allocate_arena(pages_needed(seq_lens, layers, steps) + 5, hkv, d)
        self.seqs = build_paged(self.arena, [list(zip(ks, vs)) for ks, vs in zip(self.k, self.v)],
                                reserve_tokens=steps, rng=self.rng)
        self.ids = [f"r{b}" for b in range(len(seq_lens))]
        self.slots = slots

    def operator(self, policy, device, budget=1.0, mass=1.0, **kw):
        cfg = SparseConfig(policy=policy, budget=budget, mass_target=mass, sink_tokens=16, recent_tokens=32,
                           gpu_cache_blocks=self.slots * self.layers)
        cost = CostModel.from_rates(self.d, cpu_gb_per_s=5.0, uva_gb_per_s=5.0, cached_gb_per_s=50.0)
        return HybridAttention(self.arena, cfg, cost, HybridOptions(self.layers, cpu_threads=1, device=device, **kw))

    def step(self, op):
        """One decode step over every layer; returns per layer (output, dense reference)."""
        hook = op.step(self.seqs, self.ids)
        b = len(self.seqs)
        out = []
        for layer in range(self.layers):
            q = torch.from_numpy(self.rng.standard_normal((b, self.hq, self.d)).astype(np.float32))
            kn = bf16(self.rng.standard_normal((b, self.hkv, self.d)).astype(np.float32))
            vn = bf16(self.rng.standard_normal((b, self.hkv, self.d)).astype(np.float32))
            got = hook(layer, q, torch.from_numpy(kn), torch.from_numpy(vn)).numpy()
            ref = []
            for i in range(b):
                self.k[i][layer] = np.concatenate([self.k[i][layer], kn[i][None]])
                self.v[i][layer] = np.concatenate([self.v[i][layer], vn[i][None]])
                ref.append(reference.decode_attention(q[i].numpy(), self.k[i][layer], self.v[i][layer]))
            out.append((got, np.stack(ref)))
        for s in self.seqs:
            s.seq_len += 1
        return out, hook.report()


@pytest.mark.parametrize("hkv,group", [(2, 1), (2, 4), (1, 8)])
@pytest.mark.parametrize("device", ["cpu", "emulated"])
@pytest.mark.parametrize("policy", POLICIES)
def test_budget_one_is_full_attention(policy, device, hkv, group):
    """Three steps with appends (16 -> 17 -> 18 tokens crosses a block boundary)."""
    dec = Decode([1, 15, 17, 1000], hkv, group, seed=hkv * 10 + group)
    op = dec.operator(policy, device)
    reports = []
    for _ in range(3):
        outs, report = dec.step(op)
        for got, ref in outs:
            np.testing.assert_allclose(got, ref, rtol=2e-4, atol=2e-5)
        assert report.budget_used == pytest.approx(1.0)
        assert len(report.layers) == dec.layers
        reports.append(report)
    op.close()
    last = reports[-1]
    if device == "cpu":
        assert last.gpu_blocks == 0 and last.cpu_blocks > 0
        assert last.measured_gpu_idle_fraction is None
    elif policy == "quest_gpu":
        assert last.cpu_blocks == 0 and last.gpu_blocks > 0
    elif policy == "cpu_only":
        assert last.gpu_blocks == 0
    else:
        assert last.cpu_blocks > 0 and last.gpu_blocks > 0
    if policy == "fluxion" and device == "emulated":
        # full blocks selected again are served from the cache from the second step on
        assert last.gpu_cached_blocks > 0
    else:
        assert all(r.gpu_cached_blocks == 0 for r in reports)
    assert 0.0 <= last.predicted_gpu_idle_fraction <= 1.0


@pytest.mark.parametrize("policy", ["fixed_hybrid", "fluxion"])
def test_sparse_equals_reference_over_the_selected_blocks(policy):
    """At budget 0.1 the output is the reference over exactly the blocks the policy picked."""
    dec = Decode([1500], 2, 4, steps=2, seed=7)
    op = dec.operator(policy, "emulated", budget=0.1, mass=0.9)
    seen = []
    hook = op.step(dec.seqs, dec.ids)
    q = dec.rng.standard_normal((1, dec.hq, dec.d)).astype(np.float32)
    kn = bf16(dec.rng.standard_normal((1, dec.hkv, dec.d)).astype(np.float32))
    vn = bf16(dec.rng.standard_normal((1, dec.hkv, dec.d)).astype(np.float32))
    # the selection the operator uses, recomputed independently after the append
    got = hook(0, torch.from_numpy(q), torch.from_numpy(kn), torch.from_numpy(vn)).numpy()[0]
    k = np.concatenate([dec.k[0][0], kn]); v = np.concatenate([dec.v[0][0], vn])
    from fluxion_dist.sparse import decide, pyramid_from_kv

    cfg = op.config
    dec_ = decide(q[0], pyramid_from_kv(k), cfg)
    want = reference.merge_partials([reference.partial_attention(q[0], k, v, dec_.selection.head_lists())])
    seen.append(hook.report().layers[0].budget_used)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)
    assert 0 < seen[0] < 0.5
    op.close()


def test_bad_inputs_raise_typed_errors():
    dec = Decode([20], 1, 2, layers=1)
    with pytest.raises(HybridAttentionError, match="policy"):
        HybridAttention(dec.arena, SparseConfig(policy="nope"), GPU_RATES, HybridOptions(1, device="cpu"))
    op = dec.operator("full", "cpu")
    hook = op.step(dec.seqs, dec.ids)
    with pytest.raises(HybridAttentionError, match="q must be"):
        hook(0, torch.zeros(2, 2, 32), torch.zeros(1, 1, 32), torch.zeros(1, 1, 32))
    with pytest.raises(HybridAttentionError, match="layer"):
        hook(3, torch.zeros(1, 2, 32), torch.zeros(1, 1, 32), torch.zeros(1, 1, 32))
    with pytest.raises(HybridAttentionError, match="GPU rates"):
        HybridAttention(dec.arena, SparseConfig(), CostModel.cpu_only(32, 5.0), HybridOptions(1, device="emulated"))
    op.close()


@pytest.mark.parametrize("policy", ["quest_gpu", "fluxion"])
def test_recorded_selection_is_what_was_attended(policy):
    """record_selection: per layer the CSR of logical blocks; the output is the reference over
    exactly those blocks; a request asking for full attention reads every block."""
    from fluxion_dist.policy import RequestSparse

    dec = Decode([700, 1100, 901], 2, 4, steps=3, seed=11)
    op = dec.operator(policy, "cpu", budget=0.1, mass=0.9, record_selection=True)
    own = [None, RequestSparse("full", 1.0), RequestSparse(policy, 0.2)]
    for _ in range(2):
        hook = op.step(dec.seqs, dec.ids, own)
        b = len(dec.seqs)
        for layer in range(dec.layers):
            q = dec.rng.standard_normal((b, dec.hq, dec.d)).astype(np.float32)
            kn = bf16(dec.rng.standard_normal((b, dec.hkv, dec.d)).astype(np.float32))
            vn = bf16(dec.rng.standard_normal((b, dec.hkv, dec.d)).astype(np.float32))
            got = hook(layer, torch.from_numpy(q), torch.from_numpy(kn), torch.from_numpy(vn)).numpy()
            indptr, blocks = hook.selections[layer]
            assert indptr.dtype == np.int32 and blocks.dtype == np.int32 and indptr.size == b * dec.hkv + 1
            for i in range(b):
                dec.k[i][layer] = np.concatenate([dec.k[i][layer], kn[i][None]])
                dec.v[i][layer] = np.concatenate([dec.v[i][layer], vn[i][None]])
                nb = -(-dec.k[i][layer].shape[0] // 16)
                rows = [blocks[indptr[i * dec.hkv + h]:indptr[i * dec.hkv + h + 1]].astype(np.int64)
                        for h in range(dec.hkv)]
                for r in rows:
                    assert np.all(np.diff(r) > 0) and r[-1] == nb - 1  # ascending, the new token's block in
                if i == 1:
                    assert all(r.size == nb for r in rows)
                want = reference.merge_partials([reference.partial_attention(q[i], dec.k[i][layer],
                                                                             dec.v[i][layer], rows)])
                np.testing.assert_allclose(got[i], want, rtol=2e-4, atol=2e-5)
        for s in dec.seqs:
            s.seq_len += 1
        rep = hook.report()
        assert len(rep.budget_per_request) == 3 and rep.budget_per_request[1] == pytest.approx(1.0)
        assert rep.budget_per_request[0] < rep.budget_per_request[2] < 1.0
    op.close()
