"""Trainer v2: the LM-plus-answer loss, and a CPU smoke run that checkpoints, resumes its
step count and leaves a model directory the loaders and the task suite read."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fluxion_dist.config.schema import ModelConfig
from fluxion_dist.model.loader import load_from_config
from fluxion_dist.quality.model import TEXT_ARCH, TINY_TEXT_ARCH, init_model, load_quality_model
from fluxion_dist.quality.ruler_tasks import RULER_TASKS, make_ruler_sample
from fluxion_dist.quality.tasks import TaskSuite
from fluxion_dist.quality.text_vocab import load_text_vocab
from fluxion_dist.quality.train_batches import make_batch
from fluxion_dist.quality.train_forward import hidden_states, lm_loss

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import train_quality_model  # noqa: E402


def _samples(length=301):
    tv = load_text_vocab()
    rng = np.random.default_rng(0)
    return [make_ruler_sample(t, tv, rng, length, queries=2, vary=True) for t in ("niah_multikey", "qa_facts", "cwe")]


def test_lm_loss_weights_answers_and_matches_plain_cross_entropy():
    model = init_model(TINY_TEXT_ARCH, 3)
    samples = _samples()
    tokens = torch.from_numpy(np.stack([s.tokens for s in samples]))
    with torch.no_grad():
        logits = model._logits(hidden_states(model, tokens))
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1), reduction="none")
    ce = ce.view(len(samples), -1)
    mask = torch.zeros_like(ce, dtype=torch.bool)
    for r, s in enumerate(samples):
        for a, b in s.spans:
            mask[r, a - 1:b - 1] = True
    with torch.no_grad():
        plain = lm_loss(model, samples, torch.device("cpu"), 1.0)
        heavy = lm_loss(model, samples, torch.device("cpu"), 5.0)
    torch.testing.assert_close(plain.loss, ce.mean(), rtol=1e-5, atol=1e-5)
    want = (ce.sum() + 4 * ce[mask].sum()) / (ce.numel() + 4 * mask.sum())
    torch.testing.assert_close(heavy.loss, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(heavy.lm_loss, ce[~mask].mean(), rtol=1e-5, atol=1e-5)
    assert len(heavy.span_task) == heavy.span_loss.numel() == sum(len(s.spans) for s in samples)


def test_lm_loss_backpropagates_to_every_parameter():
    model = init_model(TINY_TEXT_ARCH, 0)
    res = lm_loss(model, _samples(257), torch.device("cpu"), 5.0)
    res.loss.backward()
    assert torch.isfinite(res.loss) and all(p.grad is not None for p in model.parameters())


def test_batches_are_a_function_of_seed_and_step():
    tok = Path(load_text_vocab().source).parent
    a, b = make_batch(tok, 0, 7, 600, 5), make_batch(tok, 0, 7, 600, 5)
    assert all((x.tokens == y.tokens).all() for x, y in zip(a, b))
    assert not (make_batch(tok, 0, 8, 600, 5)[0].tokens == a[0].tokens).all()
    assert {s.task for s in make_batch(tok, 0, 0, 512, 12)} == set(RULER_TASKS)


def test_smoke_run_resumes_and_leaves_a_model_directory(tmp_path, capsys):
    assert train_quality_model.main(["--smoke", "--out", str(tmp_path)]) == 0
    ckpt = tmp_path / "checkpoint"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 3
    w1 = load_quality_model(ckpt).state_dict()
    assert train_quality_model.main(["--smoke", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "resumed" in out and "at step 3" in out and "tok/s" in out and "qa " in out
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 6
    model = load_quality_model(ckpt)
    assert any(not torch.equal(w1[k], v) for k, v in model.state_dict().items())  # it trained on
    # the serving loader reads it with the BPE and stops generation at <eoa>
    served, tok = load_from_config(ModelConfig(path=str(ckpt)))
    assert served.arch.eos_token_id == tok.eos_token_id == load_text_vocab().eoa
    assert TaskSuite.for_model(ckpt).tasks == RULER_TASKS


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch)")
def test_full_size_step_on_the_gpu_at_32k():
    """TEXT_ARCH under bf16 autocast at the curriculum's longest shape: the loss is the
    float32 one within bf16 rounding, and a step's gradients are finite everywhere."""
    dev = torch.device("cuda")
    model = init_model(TEXT_ARCH, 0).to(dev).train()
    tv = load_text_vocab()
    rng = np.random.default_rng(0)
    samples = [make_ruler_sample(t, tv, rng, 32768, queries=2, vary=True) for t in ("niah_multikey", "vt_chains")]
    with torch.no_grad():
        ref = lm_loss(model, samples, dev, 5.0).loss
    with torch.autocast("cuda", dtype=torch.bfloat16):
        res = lm_loss(model, samples, dev, 5.0)
    res.loss.backward()
    torch.testing.assert_close(res.loss.float(), ref, rtol=2e-2, atol=2e-2)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
