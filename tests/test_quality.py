"""The quality harness: task generators, training forward, policies, the shipped model, the eval script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fluxion_dist.attention import reference
from fluxion_dist.model.tokenizer import load_tokenizer
from fluxion_dist.quality import vocab
from fluxion_dist.quality.decode_hook import block_minmax
from fluxion_dist.quality.harness import dense_prefill, full_attention_correct
from fluxion_dist.quality.model import SHIPPED_DIR, TINY_QUALITY_ARCH, init_model, load_quality_model
from fluxion_dist.quality.policies import OracleTopK, QuestFixed, StepView
from fluxion_dist.quality.tasks import RETRIEVAL_TASKS, TASKS, TRAIN_TASKS, make_sample
from fluxion_dist.quality.train_forward import answer_loss, hidden_states

ROOT = Path(__file__).resolve().parent.parent


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


def _view(t=1000, hq=8, hkv=2, d=16, seed=0):
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((t, hkv, d)).astype(np.float32)
    q = rng.standard_normal((hq, d)).astype(np.float32)
    kmin, kmax = reference.block_metadata(k)
    nb = kmin.shape[0]
    mass = rng.dirichlet(np.ones(nb), hkv)
    return StepView(0, q, t, kmin.astype(np.float32), kmax.astype(np.float32), 0.25, mass)


def test_fixed_budget_policies_keep_to_their_budget():
    v = _view(t=16 * 400)
    oracle = OracleTopK(0.05).select(v)
    assert oracle.sum(1).tolist() == [20, 20]
    # the oracle takes the heaviest blocks
    assert np.isclose(v.true_block_mass[0][oracle[0]].sum(), np.sort(v.true_block_mass[0])[-20:].sum())
    quest = QuestFixed(0.05, sink_tokens=16, recent_tokens=128).select(v)
    assert quest.sum(1).tolist() == [20, 20] and quest[:, 0].all() and quest[:, -8:].all()


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


def test_eval_script_runs_end_to_end(tmp_path, shipped):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "eval_quality.py"), "--device", "cpu", "--contexts", "512",
         "--samples", "1", "--out", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| context | policy |" in out.stdout
    data = json.loads((tmp_path / "quality_eval.json").read_text())
    policies = {c["policy"] for c in data["cells"]}
    assert {"full", "oracle_topk", "quest"} <= policies
    assert {c["task"] for c in data["cells"]} == set(TASKS)
    full = [c for c in data["cells"] if c["policy"] == "full"]
    assert all(np.allclose(c["per_head_recall"], 1.0) for c in full)


def test_demo_questions_are_in_the_shipped_tokenizers_vocabulary():
    from fluxion_dist.config.schema import ModelConfig
    from fluxion_dist.model.loader import load_from_config
    from fluxion_dist.quality.demo_prompts import demo_questions

    _, tok = load_from_config(ModelConfig(path="builtin:quality"))
    for q in demo_questions(context_tokens=512):
        ids = tok.encode(q.prompt)
        assert ids[0] == vocab.BOS and vocab.UNK not in ids and len(ids) == 512 - len(q.answer.split()) - 1  # all but the answer and its closing dot
