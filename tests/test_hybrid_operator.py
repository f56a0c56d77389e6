"""HybridAttention on the CPU against the float64 reference: with budget 1.0 every policy is
full attention, on awkward lengths and GQA 1/4/8; sparse outputs equal the reference over
exactly the recorded selection, which holds the kept blocks and the best others at the
planned counts; fluxion's plan pools the budget and follows the measured demand on the
refresh schedule; per-request overrides; reports add up; the attention runs on the
operator's persistent CPU team, bound once per step."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from fluxion_dist.attention import reference
from fluxion_dist.attention.layout import from_bf16_bits, to_bf16_bits
from fluxion_dist.config.schema import SparseConfig
from fluxion_dist.cpu.attention import sparse_partial_attention
from fluxion_dist.hybrid import CostModel, HybridAttention, HybridAttentionError, HybridOptions
from fluxion_dist.hybrid.merge import merge_batch_partials
from fluxion_dist.hybrid.paged_builder import allocate_arena, build_paged, pages_needed

POLICIES = ("full", "quest_gpu", "cpu_only", "fixed_hybrid", "fluxion")
# a cost model with GPU rates (the CPU path keeps only its CPU rate)
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

    def operator(self, policy, device, budget=1.0, mass=1.0, sparse=None, cpu_threads=1, cost=None, **kw):
        """``sparse``: more SparseConfig fields; ``kw``: HybridOptions fields."""
        cfg = SparseConfig(policy=policy, budget=budget, mass_target=mass, sink_tokens=16, recent_tokens=32,
                           gpu_cache_blocks=self.slots * self.layers, **(sparse or {}))
        if cost is None:
            cost = CostModel.from_rates(self.d, cpu_gb_per_s=5.0, uva_gb_per_s=5.0, cached_gb_per_s=50.0)
        return HybridAttention(self.arena, cfg, cost, HybridOptions(self.layers, cpu_threads=cpu_threads,
                                                                    device=device, **kw))

    def layer_inputs(self, b):
        """A layer call's random q (f32) and new K/V (bf16-exact) for ``b`` sequences."""
        q = self.rng.standard_normal((b, self.hq, self.d)).astype(np.float32)
        kn = bf16(self.rng.standard_normal((b, self.hkv, self.d)).astype(np.float32))
        vn = bf16(self.rng.standard_normal((b, self.hkv, self.d)).astype(np.float32))
        return q, kn, vn

    def step(self, op, sparse=None):
        """One decode step over every layer; returns per layer (output, dense reference)."""
        hook = op.step(self.seqs, self.ids, sparse)
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
@pytest.mark.parametrize("policy", POLICIES)
def test_budget_one_is_full_attention(policy, hkv, group):
    """Three steps with appends (16 -> 17 -> 18 tokens crosses a block boundary)."""
    dec = Decode([1, 15, 17, 1000], hkv, group, seed=hkv * 10 + group)
    op = dec.operator(policy, "cpu")
    for _ in range(3):
        outs, report = dec.step(op)
        for got, ref in outs:
            np.testing.assert_allclose(got, ref, rtol=2e-4, atol=2e-5)
        assert report.budget_used == pytest.approx(1.0)
        assert report.budget_per_request == pytest.approx((1.0,) * 4)
        assert len(report.layers) == dec.layers
        assert report.gpu_blocks == 0 and report.cpu_blocks > 0
        assert report.measured_gpu_idle_fraction is None and report.predicted_gpu_idle_fraction == 0.0
    op.close()


def _kept(nb, op):
    keep = np.zeros(nb, bool)
    keep[:op.kept.sink_blocks] = True
    keep[max(nb - op.kept.recent_blocks, 0):] = True
    return keep


@pytest.mark.parametrize("policy", ["quest_gpu", "fixed_hybrid", "fluxion"])
def test_sparse_selection_is_kept_plus_best_at_the_planned_counts(policy):
    """At budget 0.1 over 4 steps: the output is the reference over exactly the recorded
    blocks; each row holds its kept blocks and then the best others by the reference's
    scores, as many as the plan says; fixed policies plan the fixed share, fluxion pools
    the same total (the floors fit) and, once measured, follows the demand."""
    from fluxion_dist.policy.budget import pooled_row_budgets, share_blocks

    dec = Decode([1500, 777, 2100], 2, 4, layers=3, steps=4, seed=7)
    # floors below the fixed share, local heads back to the pool: budgets really move
    op = dec.operator(policy, "cpu", budget=0.1, mass=0.9, sparse=dict(floor_fraction=0.5, head_predictor=True), record_selection=True)
    for step in range(4):
        b = len(dec.seqs)
        hook = op.step(dec.seqs, dec.ids)
        nb = np.array([-(-(s.seq_len + 1) // 16) for s in dec.seqs])
        share = share_blocks(nb, 0.1)
        k_rows = hook.k_rows
        if policy != "fluxion" or step == 0:  # nothing measured yet: the fixed rule
            assert np.all(k_rows == share[None, :, None])
        else:
            assert len(op.demand) == b * dec.layers
            assert np.all(k_rows.sum(axis=(0, 2)) == share * dec.layers * dec.hkv)  # the pool, spent
            # granted by the demand known at the step's start, as the policy's own function does
            assert np.all(hook.demand >= 0)
            np.testing.assert_array_equal(k_rows, pooled_row_budgets(
                hook.demand, nb, 0.1, sink_blocks=op.kept.sink_blocks, recent_blocks=op.kept.recent_blocks,
                floor_fraction=op.config.floor_fraction, head_predictor=op.config.head_predictor))
        for layer in range(dec.layers):
            q = dec.rng.standard_normal((b, dec.hq, dec.d)).astype(np.float32)
            kn = bf16(dec.rng.standard_normal((b, dec.hkv, dec.d)).astype(np.float32))
            vn = bf16(dec.rng.standard_normal((b, dec.hkv, dec.d)).astype(np.float32))
            got = hook(layer, torch.from_numpy(q), torch.from_numpy(kn), torch.from_numpy(vn)).numpy()
            indptr, blocks = hook.selections[layer]
            for i in range(b):
                k = dec.k[i][layer] = np.concatenate([dec.k[i][layer], kn[i][None]])
                v = dec.v[i][layer] = np.concatenate([dec.v[i][layer], vn[i][None]])
                lo, hi = reference.block_metadata(k)
                ref_scores = reference.kv_head_scores(reference.quest_scores(q[i], lo, hi), dec.hkv)
                keep = _kept(nb[i], op)
                rows = []
                for h in range(dec.hkv):
                    row = blocks[indptr[i * dec.hkv + h]:indptr[i * dec.hkv + h + 1]].astype(np.int64)
                    rows.append(row)
                    assert row.size == min(k_rows[layer, i, h], nb[i])
                    assert keep[row].sum() == keep.sum()
                    others = np.where(keep, -np.inf, ref_scores[h])
                    rest = row[~keep[row]]
                    if rest.size:
                        assert others[rest].min() >= np.sort(others)[::-1][rest.size - 1] - 1e-4
                want = reference.merge_partials([reference.partial_attention(q[i], k, v, rows)])
                np.testing.assert_allclose(got[i], want, rtol=2e-4, atol=2e-5)
        for s in dec.seqs:
            s.seq_len += 1
        report = hook.report()
        assert report.budget_per_request == pytest.approx(tuple(
            np.mean([np.minimum(k_rows[layer, i], nb[i]).mean() / nb[i] for layer in range(dec.layers)])
            for i in range(b)))
        assert report.cpu_blocks == sum(int(hook.selections[layer][0][-1]) for layer in range(dec.layers))
    op.close()


def test_demand_refreshes_on_the_staggered_schedule():
    """refresh_steps=2: layer l measures on steps where (step + l) is even, and on the first
    step of every request (here a request joins at step 2)."""
    dec = Decode([900, 600], 2, 2, layers=2, steps=6, seed=3)
    op = dec.operator("fluxion", "cpu", budget=0.1, mass=0.9, sparse=dict(floor_fraction=0.5), refresh_steps=2)
    seen = []
    for step in range(5):
        ids = dec.ids if step >= 2 else dec.ids[:1]
        seqs = dec.seqs if step >= 2 else dec.seqs[:1]
        before = {key: id(val) for key, val in op.demand.items()}
        hook = op.step(seqs, ids)
        for layer in range(dec.layers):
            n = len(seqs)
            hook(layer, torch.randn(n, dec.hq, dec.d), torch.randn(n, dec.hkv, dec.d).bfloat16().float(),
                 torch.randn(n, dec.hkv, dec.d).bfloat16().float())
        for s in seqs:
            s.seq_len += 1
        seen.append({layer for (rid, layer), val in op.demand.items()
                     if rid == "r0" and before.get((rid, layer)) != id(val)})
    assert seen == [{0, 1}, {1}, {0, 1}, {1}, {0}]
    op.release("r0")
    assert not any(rid == "r0" for rid, _ in op.demand)
    # floors at the full share without the predictor (the defaults): demand moves nothing, nothing measures
    quest_like = dec.operator("fluxion", "cpu", budget=0.1, mass=0.9)
    hook = quest_like.step(dec.seqs, dec.ids)
    for layer in range(dec.layers):
        hook(layer, torch.randn(2, dec.hq, dec.d), torch.randn(2, dec.hkv, dec.d), torch.randn(2, dec.hkv, dec.d))
    assert not quest_like.demand


@pytest.mark.parametrize("policy", ["quest_gpu", "fluxion"])
def test_recorded_selection_is_what_was_attended(policy):
    """record_selection: per layer the CSR of logical blocks; the output is the reference over
    exactly those blocks; a request asking for full attention reads every block."""
    from fluxion_dist.policy import RequestSparse

    dec = Decode([700, 1100, 901], 2, 4, steps=3, seed=11)
    op = dec.operator(policy, "cpu", budget=0.1, mass=0.9, record_selection=True)
    assert op.steps == 0
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


def threads_now() -> int:
    return len(os.listdir("/proc/self/task"))


def test_cpu_path_runs_on_the_operators_team_bound_once_per_step():
    """cpu_threads=3: each layer's output has the bits of the OpenMP path (the same job, the
    same thread count) over the recorded selection; the team is bound once per step, not per
    layer; close joins its two workers and a later step's attention refuses."""
    dec = Decode([1, 17, 1000, 2100], 2, 4, layers=3, steps=3, seed=5)
    op = dec.operator("fluxion", "cpu", budget=0.2, mass=0.9, record_selection=True, cpu_threads=3)
    assert op.team.num_threads == 3
    binds, bind = [], op.team.bind
    op.team.bind = lambda *a, **k: (binds.append(a[1].copy()), bind(*a, **k))[1]
    b, scale = len(dec.seqs), 1 / np.sqrt(dec.d)
    for step in range(2):
        hook = op.step(dec.seqs, dec.ids)
        seq_lens = np.array([s.seq_len + 1 for s in dec.seqs], np.int32)
        nb = -(-seq_lens // 16)
        for layer in range(dec.layers):
            q, kn, vn = dec.layer_inputs(b)
            got = hook(layer, torch.from_numpy(q), torch.from_numpy(kn), torch.from_numpy(vn)).numpy()
            indptr, blocks = hook.selections[layer]
            tables = np.zeros((b, nb.max()), np.int32)
            for i, s in enumerate(dec.seqs):
                tables[i, :nb[i]] = s.block_tables[layer][:nb[i]]
            want = merge_batch_partials([sparse_partial_attention(q, dec.arena.kv_pages, tables, seq_lens, indptr,
                                                                  blocks, scale, num_threads=3)])
            np.testing.assert_array_equal(got, want)
        assert len(binds) == step + 1 and np.array_equal(binds[-1], seq_lens)
        for s in dec.seqs:
            s.seq_len += 1
    before = threads_now()
    op.close()
    assert threads_now() == before - 2
    hook = op.step(dec.seqs, dec.ids)
    with pytest.raises(RuntimeError, match="closed"):
        hook(0, *(torch.from_numpy(x) for x in dec.layer_inputs(b)))


def test_interleaved_steps_rebind_the_team():
    """Two hooks of one operator over different batches, their layer calls alternating: each
    call attends over its own step's lengths (the team rebinds when the other step bound)."""
    dec = Decode([33, 1000, 400], 1, 4, layers=2, steps=2, seed=9)
    op = dec.operator("full", "cpu", cpu_threads=2)
    parts = ([0], [1, 2])
    hooks = [op.step([dec.seqs[i] for i in p], [dec.ids[i] for i in p]) for p in parts]
    for layer in range(dec.layers):
        for hook, p in zip(hooks, parts):
            q, kn, vn = dec.layer_inputs(len(p))
            got = hook(layer, torch.from_numpy(q), torch.from_numpy(kn), torch.from_numpy(vn)).numpy()
            for j, i in enumerate(p):
                dec.k[i][layer] = np.concatenate([dec.k[i][layer], kn[j][None]])
                dec.v[i][layer] = np.concatenate([dec.v[i][layer], vn[j][None]])
                want = reference.decode_attention(q[j], dec.k[i][layer], dec.v[i][layer])
                np.testing.assert_allclose(got[j], want, rtol=2e-4, atol=2e-5)
    op.close()


def test_bad_inputs_raise_typed_errors():
    dec = Decode([20], 1, 2, layers=1)
    with pytest.raises(HybridAttentionError, match="policy"):
        HybridAttention(dec.arena, SparseConfig(policy="nope"), GPU_RATES, HybridOptions(1, device="cpu"))
    with pytest.raises(HybridAttentionError, match="device"):
        HybridOptions(1, device="emulated")
    op = dec.operator("full", "cpu")
    with pytest.raises(HybridAttentionError, match="one sparse setting"):
        op.step(dec.seqs, dec.ids, [None, None])
    hook = op.step(dec.seqs, dec.ids)
    with pytest.raises(HybridAttentionError, match="q must be"):
        hook(0, torch.zeros(2, 2, 32), torch.zeros(1, 1, 32), torch.zeros(1, 1, 32))
    with pytest.raises(HybridAttentionError, match="layer"):
        hook(3, torch.zeros(1, 2, 32), torch.zeros(1, 1, 32), torch.zeros(1, 1, 32))
    op.close()


def test_a_quality_target_reads_more_than_the_floor_and_no_more_than_the_cap():
    """fluxion with max_output_error: once demand is measured every row holds at least
    Quest's share (the floor) plus what its demand asks, and the request's average stays under
    max_request_budget; the selection contains the fixed budget's (top-k of the same scores)."""
    dec = Decode([3000, 2500], 2, 4, steps=4, seed=11)
    sparse = {"max_output_error": 0.001, "max_request_budget": 0.3}
    target = dec.operator("fluxion", "cpu", budget=0.05, sparse=sparse, record_selection=True)
    fixed = dec.operator("fluxion", "cpu", budget=0.05, record_selection=True)  # the same arena: both
    # append the same token to the same slot
    used = []
    for step in range(3):
        hook = target.step(dec.seqs, dec.ids)
        twin = fixed.step(dec.seqs, dec.ids)
        for layer in range(dec.layers):
            q, kn, vn = dec.layer_inputs(2)
            for h in (hook, twin):
                h(layer, torch.from_numpy(q), torch.from_numpy(kn), torch.from_numpy(vn))
            if step:
                (ip, bl), (ip0, bl0) = hook.selections[layer], twin.selections[layer]
                for r in range(ip.size - 1):
                    assert set(bl0[ip0[r]:ip0[r + 1]]) <= set(bl[ip[r]:ip[r + 1]])
        used.append(hook.report().budget_per_request)
        for s in dec.seqs:
            s.seq_len += 1
    assert all(0.05 - 1e-9 <= u <= 0.3 + 0.01 for u in used[-1]) and max(used[-1]) > 0.06
    target.close()
    fixed.close()


def test_token_refinement_attends_the_best_tokens_of_the_candidates():
    """fluxion with token_refine_factor on the CPU: per row 16 k tokens (k: the plan's blocks),
    the sinks and window whole, the rest the highest exact scores (max over the group's query
    heads of q.k) of their blocks; the output is the float64 reference over exactly those tokens."""
    dec = Decode([700, 1100, 333], 2, 4, steps=2, seed=5)
    op = dec.operator("fluxion", "cpu", budget=0.1, mass=0.9, record_selection=True,
                      sparse={"token_refine_factor": 2.0})
    hook = op.step(dec.seqs, dec.ids, [None] * 3)
    b, g = len(dec.seqs), dec.hq // dec.hkv
    for layer in range(dec.layers):
        q, kn, vn = dec.layer_inputs(b)
        got = hook(layer, torch.from_numpy(q), torch.from_numpy(kn), torch.from_numpy(vn)).numpy()
        indptr, blocks = hook.selections[layer]
        masks = hook.token_masks[layer]
        assert masks.shape == blocks.shape and np.all(masks != 0)  # blocks without a token are dropped
        for i in range(b):
            dec.k[i][layer] = np.concatenate([dec.k[i][layer], kn[i][None]])
            dec.v[i][layer] = np.concatenate([dec.v[i][layer], vn[i][None]])
            t = dec.k[i][layer].shape[0]
            nb = -(-t // 16)
            for h in range(dec.hkv):
                r = i * dec.hkv + h
                ids = blocks[indptr[r]:indptr[r + 1]].astype(np.int64)
                bits = (masks[indptr[r]:indptr[r + 1], None].astype(np.int64) >> np.arange(16)) & 1
                tok = (ids[:, None] * 16 + np.arange(16))[bits.astype(bool)]
                assert tok.max() < t
                k_row = int(hook.k_rows[layer][i, h])
                assert tok.size == min(16 * k_row, t)
                kept = np.r_[0:16, (nb - 3) * 16:t]  # sink_tokens 16; recent_tokens 32: 3 blocks (KeptBlocks)
                assert np.isin(kept, tok).all()
                qh = q[i, h * g:(h + 1) * g].astype(np.float64)
                score = (dec.k[i][layer][:, h].astype(np.float64) @ qh.T).max(axis=1)
                inside = (ids[:, None] * 16 + np.arange(16)).ravel()
                inside = inside[inside < t]
                free = np.setdiff1d(tok, kept)
                left = np.setdiff1d(inside, tok)
                if free.size and left.size:  # within the chosen blocks, no better token was left out
                    assert score[left].max() <= score[free].min() + 1e-4
                s = qh @ dec.k[i][layer][tok, h].astype(np.float64).T / np.sqrt(dec.d)
                p = np.exp(s - s.max(axis=1, keepdims=True))
                want = (p / p.sum(axis=1, keepdims=True)) @ dec.v[i][layer][tok, h].astype(np.float64)
                np.testing.assert_allclose(got[i, h * g:(h + 1) * g], want, rtol=2e-4, atol=2e-5)
    op.close()


def test_token_refinement_is_checked():
    from fluxion_dist.errors import ConfigError

    with pytest.raises(ConfigError, match="token_refine_factor"):
        SparseConfig(policy="fluxion", token_refine_factor=0.5)
    with pytest.raises(ConfigError, match="token_refine_factor.*rescore_factor"):
        SparseConfig(policy="fluxion", token_refine_factor=2.0, rescore_factor=2.0)
