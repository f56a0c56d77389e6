"""The quality harness: task generators, training forward, the shipped model, the fidelity arithmetic,
the harness through the production operator (CPU path), the eval script."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fluxion_dist.attention import reference
from fluxion_dist.attention.layout import from_bf16_bits, pack_kv_blocks, to_bf16_bits, unpack_kv_blocks
from fluxion_dist.hybrid import CostModel
from fluxion_dist.model.tokenizer import load_tokenizer
from fluxion_dist.quality import vocab
from fluxion_dist.quality.decode_hook import block_minmax
from fluxion_dist.quality.fidelity import FidelityStats, csr_mask, mask_fidelity, true_attention
from fluxion_dist.quality.harness import (Prefilled, deployment_sparse, dense_prefill, full_attention_correct,
                                          parse_overrides)
from fluxion_dist.model.decoder import PrefillOutput
from fluxion_dist.quality.operator_decode import OperatorRunner, pack_prefill
from fluxion_dist.quality.policies import (DEFAULT_POLICIES, HARNESS_POLICIES, OracleTopK, StepView,
                                           check_policy_names, split_variant)
from fluxion_dist.quality.model import SHIPPED_DIR, TINY_QUALITY_ARCH, init_model, load_quality_model
from fluxion_dist.quality.tasks import RETRIEVAL_TASKS, TASKS, TRAIN_TASKS, make_sample
from fluxion_dist.quality.train_forward import answer_loss, hidden_states

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import eval_quality  # noqa: E402


@pytest.mark.parametrize("task", TRAIN_TASKS)
@pytest.mark.parametrize("length", [256, 1000, 4096])
def test_samples_have_exact_length_and_answers_in_context(task, length):
    rng = np.random.default_rng(7)
    for vary in (False, True):
        s = make_sample(task, rng, length, queries=1, vary=vary)
        assert s.tokens.shape == (length,) and s.tokens[0] == vocab.BOS
        assert s.tokens.max() < vocab.VOCAB_SIZE
        start, end = s.spans[0]
        assert 0 < start < end <= length
        if task in ("kv_retrieval", "passkey"):
            # the answer is copied from the haystack: it occurs earlier, right after the question's last token
            prompt, ans = s.prompt(), s.answer()
            hits = [i for i in range(1, start - len(ans)) if prompt[i - 1] == prompt[-1]
                    and (prompt[i:i + len(ans)] == ans).all()]
            assert hits


def test_aggregation_answer_is_the_most_frequent_candidate():
    rng = np.random.default_rng(3)
    for _ in range(5):
        s = make_sample("aggregation", rng, 2048)
        names = s.prompt()[(s.prompt() >= vocab.NAME_BASE) & (s.prompt() < vocab.FILLER_BASE)]
        ids, counts = np.unique(names, return_counts=True)
        assert ids[counts.argmax()] == s.answer()[0] and (counts < counts.max()).sum() == len(ids) - 1


def test_var_tracking_answer_spells_the_chain():
    s = make_sample("var_tracking", np.random.default_rng(0), 1024)
    words = vocab.decode(s.tokens).split()
    q = len(vocab.decode(s.prompt()).split())
    name, hops = words[q - 1], words[q:q + 4]
    assert len(hops) == 4
    for src in hops[:2]:  # var NAME SRC . statements, followed back to the root
        text = " ".join(words[:q - 3])
        assert f"var {name} {src} ." in text
        name = src
    assert f"var {name} {hops[2]} {hops[3]} ." in " ".join(words[:q - 3])


def test_tokenizer_round_trips_through_the_hf_file(tmp_path):
    vocab.write_tokenizer(tmp_path)
    tok = load_tokenizer(tmp_path, vocab.EOS)
    s = make_sample("passkey", np.random.default_rng(1), 64)
    text = vocab.decode(s.tokens[1:])
    assert tok.encode(text) == s.tokens.tolist()
    assert tok.decode(tok.encode(text)) == text  # <bos> is special: decode leaves it out


def test_training_forward_matches_prefill():
    model = init_model(TINY_QUALITY_ARCH, 0).eval()
    tokens = torch.randint(0, vocab.VOCAB_SIZE, (3, 70))
    with torch.no_grad():
        logits = model._logits(hidden_states(model, tokens))
    for b in range(3):
        torch.testing.assert_close(logits[b], model.prefill(tokens[b]).logits, atol=1e-4, rtol=1e-4)


def test_dense_prefill_matches_the_model_prefill():
    model = init_model(TINY_QUALITY_ARCH, 1).eval()
    tokens = torch.randint(0, vocab.VOCAB_SIZE, (45,))
    ours, theirs = dense_prefill(model, tokens), model.prefill(tokens)
    torch.testing.assert_close(ours.logits, theirs.logits)
    for a, b in zip(ours.keys + ours.values, theirs.keys + theirs.values):
        torch.testing.assert_close(a, b)


def test_answer_loss_backpropagates():
    model = init_model(TINY_QUALITY_ARCH, 0)
    rng = np.random.default_rng(0)
    samples = [make_sample(t, rng, 256, queries=2 if t == "kv_retrieval" else 1, vary=True) for t in TRAIN_TASKS]
    res = answer_loss(model, samples, torch.device("cpu"))
    res.loss.backward()
    assert torch.isfinite(res.loss) and len(res.span_task) == len(res.span_correct) >= len(samples)
    assert all(p.grad is not None for p in model.parameters())


def test_block_minmax_matches_reference():
    k = torch.randn(37, 2, 8)
    lo, hi = block_minmax(k)
    rlo, rhi = reference.block_metadata(k.numpy())
    np.testing.assert_allclose(lo.numpy(), rlo, rtol=0, atol=0)
    np.testing.assert_allclose(hi.numpy(), rhi, rtol=0, atol=0)


@pytest.fixture(scope="module")
def shipped():
    if not (SHIPPED_DIR / "model.safetensors").is_file():
        pytest.skip(f"no shipped quality model in {SHIPPED_DIR}")
    return load_quality_model()


def test_shipped_model_fits_the_device_file_limit(shipped):
    sizes = {p.name: p.stat().st_size for p in SHIPPED_DIR.iterdir()}
    assert max(sizes.values()) < 16 * 2**20 and sum(sizes.values()) < 25 * 2**20, sizes
    assert shipped.arch.vocab_size == vocab.VOCAB_SIZE and shipped.arch.gqa_group == 4


def _retrieval_accuracy(model, length: int, seqs: int) -> dict[str, float]:
    """Full attention, teacher-forced over multi-question samples: one prefill answers many questions."""
    acc = {}
    for task in RETRIEVAL_TASKS:
        # as many questions as the evaluation's sample holds facts for (kv: one pair per 256 tokens)
        queries = {"kv_retrieval": min(16, length // 256), "passkey": 1, "var_tracking": 4}[task]
        n = seqs * (4 if task == "passkey" else 1)
        ok = []
        for i in range(n):
            rng = np.random.default_rng([11, TASKS.index(task), length, i])
            s = make_sample(task, rng, length, queries=queries)
            ok += full_attention_correct(model, s)
        acc[task] = float(np.mean(ok))
    return acc


def test_shipped_model_retrieves_at_a_short_context(shipped):
    acc = _retrieval_accuracy(shipped, 2048, seqs=2)
    assert min(acc.values()) >= 0.95, acc


@pytest.mark.slow
def test_shipped_model_retrieves_at_its_training_length(shipped):
    acc = _retrieval_accuracy(shipped, 16384, seqs=1)
    assert min(acc.values()) >= 0.95, acc


def test_demo_questions_are_in_the_shipped_tokenizers_vocabulary():
    from fluxion_dist.config.schema import ModelConfig
    from fluxion_dist.model.loader import load_from_config
    from fluxion_dist.quality.demo_prompts import demo_questions

    _, tok = load_from_config(ModelConfig(path="builtin:quality"))
    for q in demo_questions(context_tokens=512):
        ids = tok.encode(q.prompt)
        assert ids[0] == vocab.BOS and vocab.UNK not in ids and len(ids) == 512 - len(q.answer.split()) - 1  # all but the answer and its closing dot


# --- the fidelity arithmetic, against the float64 reference --------------------------------

@pytest.mark.parametrize("t,hkv,group", [(1, 2, 4), (17, 1, 8), (1000, 4, 1), (1333, 2, 4)])
def test_fidelity_matches_a_float64_reference(t, hkv, group):
    rng = np.random.default_rng(t + hkv + group)
    d = 16
    k, v = rng.standard_normal((t, hkv, d)), rng.standard_normal((t, hkv, d))
    q = 2 * rng.standard_normal((hkv * group, d))
    nb = -(-t // 16)
    mask = rng.random((hkv, nb)) < 0.3
    mask[:, -1] = True  # never an empty row
    probs, full = true_attention(torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v))
    np.testing.assert_allclose(full.numpy(), reference.decode_attention(q, k, v), rtol=1e-12, atol=1e-12)
    ids = [np.flatnonzero(m) for m in mask]
    sparse = reference.merge_partials([reference.partial_attention(q, k, v, ids)])
    recall, rel_err, budget = mask_fidelity(probs, full, torch.from_numpy(sparse), mask)
    # recall: the true softmax of each query head, summed over its KV head's selected tokens
    logits = np.einsum("hd,thd->ht", q, np.repeat(k, group, 1)) / np.sqrt(d)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    tok = np.repeat(np.repeat(mask, 16, 1)[:, :t], group, 0)
    np.testing.assert_allclose(recall, (p * tok).sum(1), rtol=1e-12)
    ref_full = reference.decode_attention(q, k, v)
    np.testing.assert_allclose(rel_err, np.linalg.norm(sparse - ref_full, axis=1) / np.linalg.norm(ref_full, axis=1),
                               rtol=1e-9)
    np.testing.assert_array_equal(budget, mask.sum(1) / nb)
    assert csr_mask(np.array([0, 2, 3]), np.array([0, 4, 2]), 2, 5).tolist() == [
        [True, False, False, False, True], [False, False, True, False, False]]
    with pytest.raises(ValueError, match="block"):
        csr_mask(np.array([0, 1]), np.array([5]), 1, 5)


def test_oracle_takes_the_heaviest_blocks_at_its_budget():
    rng = np.random.default_rng(0)
    mass = rng.dirichlet(np.ones(400), 2)
    got = OracleTopK(0.05).select(StepView(0, 16 * 400, mass))
    assert got.sum(1).tolist() == [20, 20]
    for h in range(2):
        assert np.isclose(mass[h][got[h]].sum(), np.sort(mass[h])[-20:].sum())


def test_policy_names_are_the_deployments_plus_the_oracle():
    from fluxion_dist.config.schema import SparsePolicy
    import typing

    assert HARNESS_POLICIES == (*typing.get_args(SparsePolicy), "oracle_topk")
    assert check_policy_names(["fluxion", "full", "fluxion"]) == ["fluxion", "full"]
    with pytest.raises(ValueError, match="'quest'.*allowed: full, quest_gpu, cpu_only, fixed_hybrid, fluxion, oracle_topk"):
        check_policy_names(["full", "quest"])
    # a deployment policy may carry its own SparseConfig fields, so a switch is compared in one run
    both = ["fluxion", "fluxion:token_refine_factor=2,recent_tokens=64"]
    assert check_policy_names(both) == both
    assert split_variant(both[1]) == ("fluxion", ["token_refine_factor=2", "recent_tokens=64"])
    for bad in ("quest:budget=0.1", "oracle_topk:budget=0.1"):
        with pytest.raises(ValueError, match="unknown policy"):
            check_policy_names([bad])


def test_a_policy_variant_runs_with_its_own_fields():
    from fluxion_dist.errors import ConfigError
    from fluxion_dist.hybrid import CostModel
    from fluxion_dist.quality.harness import make_runners

    model = init_model(TINY_QUALITY_ARCH, 0).eval()
    cost = CostModel.cpu_only(model.arch.head_dim, 5.0)
    runners = make_runners(model, ["fluxion", "fluxion:token_refine_factor=2"], deployment_sparse(0.1, {}), cost,
                           max_tokens=256, compute=torch.device("cpu"), device="cpu", cpu_threads=1)
    try:
        assert [r.name for r in runners] == ["fluxion", "fluxion:token_refine_factor=2"]
        assert [r.runner.op.config.token_refine_factor for r in runners] == [0.0, 2.0]
    finally:
        for r in runners:
            r.close()
    with pytest.raises(ConfigError, match="token_refine_factor"):
        make_runners(model, ["fluxion:token_refine_factor=0.5"], deployment_sparse(0.1, {}), cost,
                     max_tokens=256, compute=torch.device("cpu"), device="cpu", cpu_threads=1)


def test_sparse_overrides_are_validated_as_the_deployment_yaml():
    from fluxion_dist.errors import ConfigError

    over = parse_overrides(["recent_tokens=64", "mass_target=0.9"])
    assert over == {"recent_tokens": 64, "mass_target": 0.9}
    cfg = deployment_sparse(0.03, over)
    assert (cfg.budget, cfg.recent_tokens, cfg.mass_target) == (0.03, 64, 0.9)
    with pytest.raises(ConfigError, match="recent_tokens"):
        deployment_sparse(0.05, {"recent_tokens": -1})
    with pytest.raises(ConfigError, match="recent_tokns.*recent_tokens"):
        deployment_sparse(0.05, {"recent_tokns": 64})
    with pytest.raises(ValueError, match="--budget"):
        deployment_sparse(0.05, {"budget": 0.1})
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_overrides(["recent_tokens"])


# --- the harness through the production operator (CPU path here) ---------------------------

@pytest.mark.parametrize("t", [1, 17, 1000])
def test_packed_prefill_is_the_kv_layout(t):
    rng = np.random.default_rng(t)
    keys = [torch.from_numpy(rng.standard_normal((t, 2, 8)).astype(np.float32)) for _ in range(2)]
    values = [torch.from_numpy(rng.standard_normal((t, 2, 8)).astype(np.float32)) for _ in range(2)]
    packed = pack_prefill(PrefillOutput(torch.zeros(t, 4), keys, values))
    for layer in range(2):
        k, v = keys[layer].numpy(), values[layer].numpy()
        np.testing.assert_array_equal(packed.pages[layer], pack_kv_blocks(k, v))
        lo, hi = reference.block_metadata(from_bf16_bits(to_bf16_bits(k)).reshape(k.shape))
        np.testing.assert_array_equal(from_bf16_bits(packed.kmin[layer]).reshape(lo.shape), lo)
        np.testing.assert_array_equal(from_bf16_bits(packed.kmax[layer]).reshape(hi.shape), hi)


def _runner(model, policy, budget=0.05, max_tokens=1024, **over):
    cost = CostModel.cpu_only(model.arch.head_dim, 5.0)
    sparse = dataclasses.replace(deployment_sparse(budget, over), policy=policy)
    return OperatorRunner(model.arch, sparse, cost, max_tokens=max_tokens, compute=torch.device("cpu"),
                          device="cpu", cpu_threads=1)


def test_full_through_the_operator_is_the_dense_models_greedy_decode(shipped):
    runner = _runner(shipped, "full")
    try:
        for i, (task, length) in enumerate([("kv_retrieval", 333), ("passkey", 700), ("var_tracking", 517)]):
            s = make_sample(task, np.random.default_rng([5, i]), length)
            prompt = torch.from_numpy(s.prompt())
            pre = Prefilled(shipped, prompt)
            stats = FidelityStats(shipped.arch)
            got = runner.decode(shipped, prompt, pre.packed_as(), len(s.answer()) + 1, stats)
            # teacher forcing with its own answer: the dense model predicts every token it decoded
            tokens = torch.cat([prompt, torch.tensor(got[:-1])])
            pred = dense_prefill(shipped, tokens).logits.argmax(-1)[prompt.numel() - 1:].tolist()
            assert got == pred, (task, length)
            m = stats.mean()
            assert (stats.steps == len(got)).all()
            np.testing.assert_allclose(m["recall"], 1.0, rtol=0, atol=1e-12)
            np.testing.assert_array_equal(m["budget"], 1.0)
            assert m["rel_err"].max() < 1e-5  # the operator's float32 output against float64
    finally:
        runner.close()


class _Recorder:
    """Passes a hook's calls through and keeps each layer's query and output."""

    def __init__(self, hook):
        self.hook, self.calls = hook, {}

    def __call__(self, layer, q, k, v):
        out = self.hook(layer, q, k, v)
        self.calls[layer] = (q[0].double().numpy(), k[0], v[0], out[0].double().numpy())
        return out


# quest_gpu at 0.5: above the forced sinks and window at this length, so top-k picks the rest
@pytest.mark.parametrize("policy,budget", [("quest_gpu", 0.5), ("fluxion", 0.25)])
def test_fidelity_is_read_back_from_the_operators_selection(shipped, policy, budget):
    runner = _runner(shipped, policy, budget=budget)
    arch = shipped.arch
    try:
        s = make_sample("kv_retrieval", np.random.default_rng(9), 689)
        prompt = torch.from_numpy(s.prompt())
        pre = Prefilled(shipped, prompt)
        seq, rid = runner.begin(pre.packed_as())
        stats = FidelityStats(arch)
        rec = _Recorder(runner.hook(seq, rid, stats))
        with torch.inference_mode():
            shipped.decode_step(prompt[-1:], torch.tensor([seq.seq_len]), rec)
        t = seq.seq_len + 1
        nb = -(-t // 16)
        for layer in range(arch.num_hidden_layers):
            indptr, blocks = rec.hook.inner.selections[layer]
            counts = np.diff(indptr)
            if policy == "quest_gpu":
                assert counts.tolist() == [int(np.ceil(budget * nb))] * arch.num_key_value_heads
            q, k_new, v_new, out = rec.calls[layer]
            # the arena, read independently through the block table, holds the new token as given
            pages = np.asarray(seq.block_tables[layer][:nb])
            k, v = unpack_kv_blocks(runner.arena.kv_pages[pages], t)
            np.testing.assert_array_equal(k[-1], k_new.to(torch.bfloat16).float().numpy())
            np.testing.assert_array_equal(v[-1], v_new.to(torch.bfloat16).float().numpy())
            # and the harness's mirror, which the fidelity is computed over, is the arena's K/V
            np.testing.assert_array_equal(seq.keys[layer][:t].numpy(), k)
            np.testing.assert_array_equal(seq.values[layer][:t].numpy(), v)
            ids = [blocks[indptr[h]:indptr[h + 1]] for h in range(arch.num_key_value_heads)]
            assert all((np.diff(i) > 0).all() and i[0] >= 0 and i[-1] == nb - 1 for i in ids)
            full = reference.decode_attention(q, k, v)
            # the operator attended exactly the recorded blocks
            sparse = reference.merge_partials([reference.partial_attention(q, k, v, ids)])
            np.testing.assert_allclose(out, sparse, rtol=1e-4, atol=1e-5)
            logits = np.einsum("hd,thd->ht", q, np.repeat(k.astype(np.float64), arch.gqa_group, 1)) / np.sqrt(q.shape[1])
            p = np.exp(logits - logits.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            sel = np.zeros((arch.num_key_value_heads, nb), bool)
            for h, i in enumerate(ids):
                sel[h, i] = True
            tok = np.repeat(np.repeat(sel, 16, 1)[:, :t], arch.gqa_group, 0)
            np.testing.assert_allclose(stats.recall[layer], (p * tok).sum(1), rtol=1e-10)
            np.testing.assert_allclose(stats.rel_err[layer],
                                       np.linalg.norm(out - full, axis=1) / np.linalg.norm(full, axis=1),
                                       rtol=1e-8, atol=1e-13)
            np.testing.assert_allclose(stats.budget[layer], counts / nb)
            if policy == "quest_gpu":
                assert stats.recall[layer].max() < 1.0
        runner.end(seq, rid)
    finally:
        runner.close()


def test_eval_script_smoke_run_writes_per_layer_json(tmp_path, shipped, capsys):
    assert eval_quality.main(["--device", "cpu", "--contexts", "512", "--samples", "2", "--cpu-threads", "1",
                              "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "| context | policy |" in printed and "L0 recall / err / budget" in printed
    assert "oracle_topk (oracle)" in printed
    data = json.loads((tmp_path / "quality_eval.json").read_text())
    assert data["meta"]["operator_device"] == "cpu" and data["meta"]["policies"] == [
        "full", "quest_gpu", "fluxion", "oracle_topk (oracle)"]
    assert {c["policy"] for c in data["cells"]} == set(DEFAULT_POLICIES)
    assert {c["task"] for c in data["cells"]} == set(TASKS)
    layers = shipped.arch.num_hidden_layers
    for c in data["cells"]:
        assert c["total"] == 2 and len(c["per_layer_recall"]) == len(c["per_layer_rel_err"]) == layers
        assert len(c["per_layer_budget"]) == layers and 0 < c["budget_used"] <= 1
        if c["policy"] == "full":
            assert np.allclose(c["per_layer_recall"], 1.0) and c["budget_used"] == 1.0
            assert max(c["per_layer_rel_err"]) < 1e-5
        else:
            assert c["budget_used"] < 1.0 and min(c["per_layer_recall"]) < 1.0
    assert {(s["context"], s["policy"]) for s in data["summary"]} == {(512, p) for p in DEFAULT_POLICIES}


def test_eval_script_rejects_unknown_policies_naming_the_allowed(capsys):
    with pytest.raises(SystemExit) as e:
        eval_quality.main(["--policies", "full", "quest", "--out", "/nonexistent"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "'quest'" in err and "full, quest_gpu, cpu_only, fixed_hybrid, fluxion, oracle_topk" in err
