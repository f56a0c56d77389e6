"""Trainer v2: the LM-plus-answer loss, its batches and training haystacks (recombined,
perturbed, never the held-out paragraphs), and a CPU smoke run that checkpoints, resumes its
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
from fluxion_dist.quality.corpus import CORPUS_DIR
from fluxion_dist.quality.model import TEXT_ARCH, TINY_TEXT_ARCH, init_model, load_quality_model
from fluxion_dist.quality.ruler_tasks import RULER_TASKS, make_ruler_sample, ruler_training_queries
from fluxion_dist.quality.tasks import TaskSuite
from fluxion_dist.quality.text_vocab import load_text_vocab
from fluxion_dist.quality.train_batches import make_batch
from fluxion_dist.quality.train_forward import hidden_states, lm_loss, text_loss
from fluxion_dist.quality.train_haystack import HaystackMix, boundaries, haystack_positions, text_windows

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import train_quality_model  # noqa: E402


def _samples(length=301):
    tv = load_text_vocab()
    rng = np.random.default_rng(0)
    return [make_ruler_sample(t, tv, rng, length, queries=2, vary=True) for t in ("niah_multikey", "qa_facts", "cwe")]


def test_lm_loss_mixes_text_and_answer_means_at_the_share():
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
    cpu = torch.device("cpu")
    with torch.no_grad():
        text_only, answers_only = lm_loss(model, samples, cpu, 0.0), lm_loss(model, samples, cpu, 1.0)
        mixed = lm_loss(model, samples, cpu, 0.3)
    torch.testing.assert_close(text_only.loss, ce[~mask].mean(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(answers_only.loss, ce[mask].mean(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed.loss, 0.7 * ce[~mask].mean() + 0.3 * ce[mask].mean(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed.lm_loss, ce[~mask].mean(), rtol=1e-5, atol=1e-5)
    assert len(mixed.span_task) == mixed.span_loss.numel() == sum(len(s.spans) for s in samples)
    for s_ in range(len(mixed.span_task)):  # each span's mean, in the samples' order
        r, (a, b) = [(r, sp) for r, x in enumerate(samples) for sp in x.spans][s_]
        torch.testing.assert_close(mixed.span_loss[s_], ce[r, a - 1:b - 1].mean(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="answer_share"):
        lm_loss(model, samples, cpu, 1.5)
    with torch.no_grad():
        torch.testing.assert_close(torch.tensor(text_loss(model, tokens)), ce.mean(), rtol=1e-5, atol=1e-5)


def test_lm_loss_backpropagates_to_every_parameter():
    model = init_model(TINY_TEXT_ARCH, 0)
    res = lm_loss(model, _samples(257), torch.device("cpu"), 0.5)
    res.loss.backward()
    assert torch.isfinite(res.loss) and all(p.grad is not None for p in model.parameters())


def test_batches_are_a_function_of_seed_step_and_spec():
    tok = Path(load_text_vocab().source).parent
    a, b = make_batch(tok, 0, 7, 600, 5, 0.4), make_batch(tok, 0, 7, 600, 5, 0.4)
    assert all((x.tokens == y.tokens).all() for x, y in zip(a, b))
    assert not (make_batch(tok, 0, 8, 600, 5, 0.4)[0].tokens == a[0].tokens).all()
    assert {s.task for s in make_batch(tok, 0, 0, 512, 12)} == set(RULER_TASKS)
    plain = make_batch(tok, 0, 7, 600, 5, 0.4, mix=None)  # corpus spans: the same tasks, other haystacks
    assert [s.task for s in plain] == [s.task for s in a] and not (plain[0].tokens == a[0].tokens).all()


def _para_of(tv, pos):
    return np.searchsorted(tv.paragraph_starts, pos, side="right") - 1


def _shared_ngrams(rows, n):
    seen: dict[bytes, int] = {}
    shared = 0
    for r, row in enumerate(rows):
        grams = {w.tobytes() for w in np.lib.stride_tricks.sliding_window_view(row, n)}
        for g in grams:
            shared += seen.setdefault(g, r) != r
    return shared


def test_training_haystacks_share_no_long_verbatim_span():
    """32 haystacks of 2048 tokens (7% of the corpus) overlap in many places; perturbed,
    no 48-token run is in two of them, and no run of corpus text holds max_gap words."""
    tv = load_text_vocab()
    mix = HaystackMix(max_gap=12)  # repeats of its own passages too: they stay inside one haystack
    rng = np.random.default_rng(17)
    pos = [haystack_positions(tv, rng, 2048, mix) for _ in range(32)]
    assert all(p.shape == (2048,) for p in pos)
    assert _shared_ngrams([tv.corpus[p] for p in pos], 48) == 0  # counts n-grams of other rows only
    # the same drawing without replaced words: the overlap is there to be broken
    spans = [tv.corpus[haystack_positions(tv, np.random.default_rng(s), 2048, HaystackMix(max_gap=10**9, repeat=0))]
             for s in range(32)]
    assert _shared_ngrams(spans, 48) > 0
    for p in pos:
        run_starts = np.flatnonzero(np.diff(p, prepend=-2) != 1)  # maximal runs of consecutive corpus positions
        words = np.add.reduceat(tv.spaced[tv.corpus[p]].astype(int), run_starts)
        assert words.max() <= mix.max_gap
        assert not tv.heldout[_para_of(tv, p)].any()


def test_training_haystacks_repeat_their_own_passages_only_when_asked():
    tv = load_text_vocab()
    def self_repeats(mix, seed):
        row = tv.corpus[haystack_positions(tv, np.random.default_rng(seed), 4096, mix)]
        grams = [w.tobytes() for w in np.lib.stride_tricks.sliding_window_view(row, 40)]
        return len(grams) - len(set(grams))
    assert all(self_repeats(HaystackMix(repeat=0.0), s) == 0 for s in range(4))
    assert all(self_repeats(HaystackMix(repeat=0.2), s) > 0 for s in range(4))
    with pytest.raises(ValueError, match="repeat"):
        HaystackMix(repeat=1.0)


def test_training_haystack_boundaries_match_the_corpus_ones():
    tv = load_text_vocab()
    a, b = 51234, 51234 + 3000
    hay = tv.corpus[a:b]
    for where, pool in (("sentence", tv.sentence_starts), ("word", tv.word_starts)):
        want = pool[(pool > a) & (pool < b)] - a
        assert (boundaries(tv, hay, where) == want).all()
    s = make_ruler_sample("qa_facts", tv, np.random.default_rng(3), 1500, queries=8, vary=True, mix=HaystackMix())
    assert s.tokens.size == 1500 and len(s.spans) >= 2


def test_text_windows_split_held_out_from_trained_paragraphs():
    tv = load_text_vocab()
    assert 0.01 < tv.heldout.mean() < 0.03
    held, seen = (text_windows(tv, heldout=h, length=333, count=5) for h in (True, False))
    assert held.shape == seen.shape == (5, 333) and (held[:, 0] == tv.bos).all()
    ho_text = np.concatenate([tv.corpus[tv.paragraph_starts[i]:tv.paragraph_starts[i + 1]]
                              for i in np.flatnonzero(tv.heldout)])
    assert (held[:, 1:].reshape(-1) == ho_text[:5 * 332]).all()
    assert not (seen[:, 1:] == held[:, 1:]).all()
    with pytest.raises(ValueError, match="cannot fill"):
        text_windows(tv, heldout=True, length=4096, count=64)
    with pytest.raises(ValueError, match="max_gap"):
        HaystackMix(max_gap=1)


def test_training_tasks_are_dense_and_variable_tracking_starts_at_one_hop():
    tv = load_text_vocab()
    rng = np.random.default_rng(8)
    mix = HaystackMix()
    def draw(task, level, length=1024):
        return make_ruler_sample(task, tv, rng, length, queries=ruler_training_queries(task), vary=True,
                                 level=level, mix=mix)
    for task, least in (("niah_multikey", 4), ("qa_facts", 4), ("vt_chains", 2)):  # several questions a sample
        assert np.mean([len(draw(task, 1.0).spans) for _ in range(48)]) >= least
    easy = [draw("vt_chains", 0.0, 2048) for _ in range(24)]
    assert all(len(a.split()) == 2 for s in easy for _, a in s.texts)  # the value's variable and one hop
    hard = [draw("vt_chains", 1.0, 2048) for _ in range(24)]
    assert max(len(a.split()) for s in hard for _, a in s.texts) > 3
    # the CPU's short contexts too: at least two chains asked, never a lone chain to list
    assert all(len(draw("vt_chains", level, 256).spans) >= 2 for level in (0.0, 1.0) for _ in range(16))


def test_smoke_run_resumes_and_leaves_a_model_directory(tmp_path, capsys):
    assert train_quality_model.main(["--smoke", "--out", str(tmp_path)]) == 0
    ckpt = tmp_path / "checkpoint"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 3
    w1 = load_quality_model(ckpt).state_dict()
    assert train_quality_model.main(["--smoke", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "resumed" in out and "at step 3" in out and "tok/s" in out and "qa " in out and "held-out" in out
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
        ref = lm_loss(model, samples, dev, 0.5).loss
    with torch.autocast("cuda", dtype=torch.bfloat16):
        res = lm_loss(model, samples, dev, 0.5)
    res.loss.backward()
    torch.testing.assert_close(res.loss.float(), ref, rtol=2e-2, atol=2e-2)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_the_gate_opens_only_once_the_tasks_are_full_size(tmp_path, capsys):
    """A gate any accuracy passes (``--gate 0``): still shut while the curriculum is short of
    level 1 (codes of a digit or two say nothing of five-digit retrieval), open at level 1."""
    assert train_quality_model.main(["--smoke", "--out", str(tmp_path / "ramping"), "--gate", "0",
                                     "--ramp", "1"]) == 0
    assert "phase 2 at step" not in capsys.readouterr().out
    assert train_quality_model.main(["--smoke", "--out", str(tmp_path / "full"), "--gate", "0", "--ramp", "0"]) == 0
    assert "phase 2 at step 1:" in capsys.readouterr().out


def test_the_code_tasks_earn_the_curriculum_a_step_at_a_time(tmp_path, capsys):
    """``--level-gate 0`` passes every log window (12 rows a batch: every task in each): a step
    a window, kept across a resume; a gate no accuracy reaches leaves the level at the (here
    negligible) time ramp's."""
    shape = ["--short", "512x12", "--stages", "0:512x12"]
    args = ["--smoke", "--out", str(tmp_path / "earned"), "--level-gate", "0", "--ramp", "100", *shape]
    assert train_quality_model.main(args) == 0
    out = capsys.readouterr().out
    assert [line.split(":")[0] for line in out.splitlines() if line.startswith("curriculum level")] == [
        "curriculum level 0.33 at step 1", "curriculum level 0.67 at step 2", "curriculum level 1.00 at step 3"]
    # variable tracking earns its own level the same way, from its own accuracy
    assert [line.split(":")[0] for line in out.splitlines() if line.startswith("vt_chains level")] == [
        "vt_chains level 0.33 at step 1", "vt_chains level 0.67 at step 2", "vt_chains level 1.00 at step 3"]
    state = json.loads((tmp_path / "earned" / "checkpoint" / "trainer_state.json").read_text())
    assert state["level"] == 1.0 and state["vt_level"] == 1.0
    assert train_quality_model.main(args) == 0
    out = capsys.readouterr().out
    assert "curriculum level" not in out and "lv 1.00" in out
    assert train_quality_model.main(["--smoke", "--out", str(tmp_path / "held"), "--level-gate", "1.01",
                                     "--ramp", "100", *shape]) == 0
    out = capsys.readouterr().out
    assert "curriculum level" not in out and "lv 0.00 vt 0.00" in out


def test_variable_tracking_grows_with_its_own_level():
    """A batch at the needles' full level but variable tracking's first: its samples still
    ask for one hop under one-letter names; the other tasks are at full size."""
    batch = make_batch(CORPUS_DIR, 0, 1, 2048, 12, level=1.0, vt_level=0.0)
    vt = [a for smp in batch if smp.task == "vt_chains" for _, a in smp.texts]
    assert vt and all(len(a.split()) == 2 and all(len(n) == 1 for n in a.split()) for a in vt)
    codes = [a for smp in batch if smp.task == "niah_single" for _, a in smp.texts]
    assert codes and all(len(c) == 5 for c in codes)
    shared = make_batch(CORPUS_DIR, 0, 1, 2048, 12, level=1.0)  # vt_level None: the shared level
    i = next(i for i, smp in enumerate(shared) if smp.task == "vt_chains")
    assert shared[i].texts == make_batch(CORPUS_DIR, 0, 1, 2048, 12, level=1.0, vt_level=1.0)[i].texts
