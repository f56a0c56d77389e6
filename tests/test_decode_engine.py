"""Continuous batching over the host KV store, without Ray or UCX: the engine's tokens equal
the single-process model's (dense attention over the same bf16 KV), requests join and leave
between steps, and every page comes back."""

import pytest
import torch

from decode_worker.engine import DecodeEngine
from decode_worker.sequence_pages import SequencePages
from fluxion_dist.config.schema import SparseConfig
from fluxion_dist.hybrid import CostModel, HostArena, HybridAttention, HybridOptions
from fluxion_dist.model.generate import greedy_generate
from fluxion_dist.model.tiny import TINY_ARCH, tiny_model
from fluxion_dist.sampling import SamplingParams
from kv_store import KVGeometry, KVStore, StoreConfig, StoreFull, pack_layer


@pytest.fixture()
def pages():
    geo = KVGeometry(TINY_ARCH.num_hidden_layers, TINY_ARCH.num_key_value_heads, TINY_ARCH.head_dim)
    store = KVStore(StoreConfig(geo, 2 << 20, pin="off"))
    yield SequencePages(store, lease_s=30.0)
    assert store.stats().used_pages == 0
    store.close()


def _engine(model, sp, max_batch_size, policy="full", budget=0.05, mass_target=0.95):
    op = HybridAttention(HostArena(sp.pages, sp.kmin, sp.kmax),
                         SparseConfig(policy=policy, budget=budget, mass_target=mass_target),
                         CostModel.cpu_only(TINY_ARCH.head_dim, 10.0),
                         HybridOptions(num_layers=TINY_ARCH.num_hidden_layers, cpu_threads=2, device="cpu"))
    return DecodeEngine(model, sp, max_batch_size, op)


def _admit(model, sp, engine, rid, prompt, max_tokens):
    pre = model.prefill(torch.tensor(prompt))
    sp.admit(rid, len(prompt), max_tokens)
    sp.store.put(rid, len(prompt), [pack_layer(k, v) for k, v in zip(pre.keys, pre.values)])
    prompt_len = sp.adopt(rid)
    first = int(pre.logits[-1].argmax())
    assert engine.add(rid, prompt_len, first, SamplingParams(max_tokens=max_tokens), None) is None
    return first


@pytest.mark.parametrize("policy, budget, mass", [("full", 0.05, 0.95), ("fluxion", 1.0, 1.0), ("cpu_only", 1.0, 0.95)])
def test_batched_decode_equals_single_process_and_frees_pages(pages, policy, budget, mass):
    model = tiny_model(seed=2)
    engine = _engine(model, pages, 3, policy, budget, mass)
    prompts = {f"r{n}": [(i * 7 + n) % 256 for i in range(n)] for n in (1, 15, 16, 17, 50)}
    lengths = {rid: 10 + i * 5 for i, rid in enumerate(prompts)}
    got = {rid: [_admit(model, pages, engine, rid, p, lengths[rid])] for rid, p in list(prompts.items())[:3]}
    late = list(prompts.items())[3:]
    steps = 0
    while engine.num_active:
        for ev in engine.step():
            got[ev.request_id].append(ev.token)
            if ev.finish_reason is not None:
                assert ev.finish_reason == "length"
                pages.release(ev.request_id)
        steps += 1
        if steps == 4:  # requests join mid-flight
            for rid, p in late:
                got[rid] = [_admit(model, pages, engine, rid, p, lengths[rid])]
    for rid, p in prompts.items():
        want = greedy_generate(model, p, lengths[rid], kv_dtype=torch.bfloat16)
        assert got[rid] == want, rid


def test_abort_mid_decode_and_admission_refusal(pages):
    model = tiny_model(seed=3)
    engine = _engine(model, pages, 4)
    _admit(model, pages, engine, "a", list(range(40)), 30)
    engine.step()
    assert engine.abort("a") and not engine.abort("a")
    assert pages.release("a")
    assert engine.num_active == 0 and engine.step() == []
    with pytest.raises(StoreFull, match="new tokens"):
        pages.admit("huge", 10_000, 10_000)


def test_per_request_sparse_full_under_a_sparse_deployment(pages):
    """A deployment at a small fluxion budget: the request that asks for full attention decodes
    exactly the dense model's tokens, the one at the deployment's budget reads only part of its
    KV, and the operator reports each request's own fraction."""
    from fluxion_dist.policy.request import RequestSparse

    model = tiny_model(seed=5)
    engine = _engine(model, pages, 2, "fluxion", budget=0.1, mass_target=0.5)
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, 256, (1000,), generator=g).tolist()
    for rid, sparse in (("full", RequestSparse("full", 1.0)), ("sparse", None)):
        pre = model.prefill(torch.tensor(prompt))
        pages.admit(rid, len(prompt), 12)
        pages.store.put(rid, len(prompt), [pack_layer(k, v) for k, v in zip(pre.keys, pre.values)])
        assert engine.add(rid, pages.adopt(rid), int(pre.logits[-1].argmax()), SamplingParams(max_tokens=12),
                          None, sparse=sparse) is None
    got = {"full": [int(model.prefill(torch.tensor(prompt)).logits[-1].argmax())]}
    per_request = []
    while engine.num_active:
        hook_reports = engine.step()
        for ev in hook_reports:
            if ev.request_id == "full":
                got["full"].append(ev.token)
            if ev.finish_reason is not None:
                pages.release(ev.request_id)
        if engine.last_report is not None and len(engine.last_report.budget_per_request) == 2:
            per_request.append(engine.last_report.budget_per_request)
    assert got["full"] == greedy_generate(model, prompt, 12, kv_dtype=torch.bfloat16)
    assert per_request and all(full == pytest.approx(1.0) and part < 0.5 for full, part in per_request)
