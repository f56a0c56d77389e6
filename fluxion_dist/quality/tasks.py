"""Long-context tasks, generated on the fly at any context length, and which model reads which.

Two families, told apart by the model's tokenizer (``TaskSuite.for_model``):

- the word-vocabulary tasks of the v1 model (``vocab.WORDS``, below): a haystack of
  filler words with facts at random depths;
- the RULER-style tasks inside natural text (``ruler_tasks``), tokenized with the
  model's byte-level BPE: the tasks of a model whose tokenizer has ``<eoa>``.

Word-vocabulary tasks:

- ``kv_retrieval``: many ``key NAME N N .`` records (multi-key: every other
  record is a distractor of the same form); ``? key NAME`` -> ``N N``.
- ``passkey``: one ``the passkey is N N N .`` in noise; ``? passkey is`` -> ``N N N``.
- ``var_tracking``: chains ``var A N N .`` ... ``var B A .`` ... ``var C B .``
  ("C is B") interleaved with distractor chains; ``? var C`` -> ``B A N N``. The
  answer spells the hops, so each decode step makes one long-range lookup (a model
  this small cannot chain three lookups inside one token's forward pass).
- ``aggregation``: candidate names scattered through the noise with different
  counts; ``? most frequent`` -> the most frequent one. Its evidence is spread over
  the whole context, so a head must attend to everything at once: the task that a
  fixed small budget reads only part of.

Every retrieval question ends with the token that the first answer token follows in
the context (a name, or ``is``), so each lookup is an induction step: find the earlier
occurrence, copy what came after it. Small models learn that circuit quickly; a
question ending in a shared word (``value``, ``=``) first needs a two-back match.

Samples start with <bos>; each answer is followed by a ``.`` outside its span.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from fluxion_dist.model.loader import SHIPPED_QUALITY_DIR
from fluxion_dist.quality import vocab as V
from fluxion_dist.quality.ruler_tasks import (RULER_AGGREGATION, RULER_RETRIEVAL, RULER_TASKS, make_ruler_sample,
                                              ruler_training_queries)
from fluxion_dist.quality.sample import ContextTooShort, Sample
from fluxion_dist.quality.text_vocab import TextVocab, is_text_tokenizer, load_text_vocab

__all__ = ["ALL_TASKS", "ContextTooShort", "RETRIEVAL_TASKS", "RULER_TASKS", "Sample", "TASKS", "TRAIN_TASKS",
           "TaskSuite", "WORD_TASKS", "make_sample", "training_queries"]

WordTask = Literal["kv_retrieval", "passkey", "var_tracking", "aggregation", "copy"]
WORD_TASKS: tuple[WordTask, ...] = ("kv_retrieval", "passkey", "var_tracking", "aggregation")
# ``copy`` (a random sequence, then the same again) is for training only: every token of
# the repeat is a long-range induction step with a loss, so the lookup circuit the other
# tasks share forms in hundreds of steps instead of stalling on their few answer tokens.
TRAIN_TASKS: tuple[WordTask, ...] = WORD_TASKS + ("copy",)
RETRIEVAL_TASKS: tuple[WordTask, ...] = ("kv_retrieval", "passkey", "var_tracking")
# every evaluable task name, for command-line choices and stable per-task seeds
ALL_TASKS: tuple[str, ...] = WORD_TASKS + RULER_TASKS
TaskName = str

_T = V.ID  # word -> id
_DOT, _Q = _T["."], _T["?"]
_UNUSED = V.VOCAB_SIZE - len(V.SPECIAL) - len(V.STRUCTURE) - len(V.NUMBERS) - len(V.NAMES) - len(V.FILLERS)


def _numbers(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` distinct number tokens: a value's second token is found by its first, so a
    first token that also occurs elsewhere in the context would make the copy ambiguous
    (with repeats allowed, every kv error of the trained model at 16k was such a repeat)."""
    return V.NUMBER_BASE + rng.choice(len(V.NUMBERS), n, replace=False)


def _names(rng: np.random.Generator, n: int) -> np.ndarray:
    return V.NAME_BASE + rng.choice(len(V.NAMES), n, replace=False)


def _assemble(task: TaskName, rng: np.random.Generator, length: int, facts: list[np.ndarray],
              questions: list[tuple[np.ndarray, np.ndarray]]) -> Sample:
    """Place ``facts`` in their given order at random depths of a filler haystack, then the
    ``(question, answer)`` pairs, so that the whole sample is exactly ``length`` tokens."""
    tail = sum(q.size + a.size + 1 for q, a in questions)
    hay_len = length - 1 - sum(f.size for f in facts) - tail
    if hay_len < 0:
        raise ContextTooShort(f"{task}: {length} tokens cannot hold {len(facts)} facts and "
                              f"{len(questions)} questions ({length - hay_len} tokens)")
    hay = V.FILLER_BASE + rng.integers(0, len(V.FILLERS), hay_len)
    cuts = np.sort(rng.integers(0, hay_len + 1, len(facts)))
    pieces = [np.array([V.BOS])]
    prev = 0
    for cut, fact in zip(cuts, facts):
        pieces += [hay[prev:cut], fact]
        prev = cut
    pieces.append(hay[prev:])
    pos = length - tail
    spans = []
    for q, a in questions:
        pieces += [q, a, np.array([_DOT])]
        spans.append((pos + q.size, pos + q.size + a.size))
        pos += q.size + a.size + 1
    tokens = np.concatenate(pieces).astype(np.int64)
    assert tokens.size == length
    return Sample(task, tokens, tuple(spans))


def kv_retrieval(rng: np.random.Generator, length: int, queries: int = 1, pairs: int | None = None) -> Sample:
    pairs = int(np.clip(length // 256, 4, 128)) if pairs is None else pairs
    if queries > pairs:
        raise ValueError(f"kv_retrieval: {queries} queries need at least as many pairs; got {pairs}")
    keys, vals = _names(rng, pairs), _numbers(rng, 2 * pairs).reshape(pairs, 2)
    facts = [np.array([_T["key"], k, *v, _DOT]) for k, v in zip(keys, vals)]
    asked = rng.choice(pairs, queries, replace=False)
    questions = [(np.array([_Q, _T["key"], keys[i]]), vals[i]) for i in asked]
    return _assemble("kv_retrieval", rng, length, facts, questions)


def passkey(rng: np.random.Generator, length: int) -> Sample:
    key = _numbers(rng, 3)
    facts = [np.array([_T["the"], _T["passkey"], _T["is"], *key, _DOT])]
    return _assemble("passkey", rng, length, facts, [(np.array([_Q, _T["passkey"], _T["is"]]), key)])


def var_tracking(rng: np.random.Generator, length: int, queries: int = 1, chains: int = 4,
                 hops: int | np.ndarray = 2) -> Sample:
    """``chains`` chains of ``hops + 1`` variables; the questions ask for the last of ``queries`` chains."""
    if queries > chains:
        raise ValueError(f"var_tracking: {queries} queries need at least as many chains; got {chains}")
    hops = np.broadcast_to(np.asarray(hops), (chains,))
    names = _names(rng, int((hops + 1).sum()))
    values = _numbers(rng, 2 * chains).reshape(chains, 2)
    statements: list[list[np.ndarray]] = []
    answers = []
    at = 0
    for c in range(chains):
        chain = names[at:at + hops[c] + 1]
        at += hops[c] + 1
        value = values[c]
        stmts = [np.array([_T["var"], chain[0], *value, _DOT])]
        stmts += [np.array([_T["var"], chain[i], chain[i - 1], _DOT]) for i in range(1, len(chain))]
        statements.append(stmts)
        answers.append((chain[-1], np.concatenate([chain[-2::-1], value])))
    # interleave the chains at random while each keeps its own order (a variable is
    # defined before it is used)
    order = rng.permutation(np.repeat(np.arange(chains), hops + 1))
    nxt = [0] * chains
    facts = []
    for c in order:
        facts.append(statements[c][nxt[c]])
        nxt[c] += 1
    asked = rng.choice(chains, queries, replace=False)
    questions = [(np.array([_Q, _T["var"], answers[i][0]]), answers[i][1]) for i in asked]
    return _assemble("var_tracking", rng, length, facts, questions)


def aggregation(rng: np.random.Generator, length: int, candidates: int = 5, density: float = 1 / 32,
                ratio: tuple[float, float] = (0.3, 0.75)) -> Sample:
    """The winner appears ``c`` times, each other candidate ``ratio`` x ``c`` (strictly fewer)."""
    names = _names(rng, candidates)
    rel = rng.uniform(*ratio, candidates - 1)
    top = max(2, int(round(length * density / (1.0 + rel.sum()))))
    counts = np.concatenate([[top], np.clip((rel * top).astype(np.int64), 1, top - 1)])
    base = _assemble("aggregation", rng, length, [], [(np.array([_Q, _T["most"], _T["frequent"]]), names[:1])])
    tokens = base.tokens.copy()
    hay_end = base.spans[0][0] - 3
    if counts.sum() > hay_end - 1:
        raise ContextTooShort(f"aggregation: {length} tokens cannot hold {counts.sum()} candidates")
    where = 1 + rng.choice(hay_end - 1, int(counts.sum()), replace=False)
    tokens[where] = np.repeat(names, counts)
    return Sample("aggregation", tokens, base.spans)


def copy(rng: np.random.Generator, length: int, chunk: int = 16, chunks: int = 4) -> Sample:
    """<bos> S S' with S' a prefix of S; answers are up to ``chunks`` random ``chunk``-token pieces of S'.

    A few pieces, not all of S': enough signal to form the lookup early, while at 16k
    the other tasks' few answer tokens are not outweighed a hundred to one.
    """
    half = length // 2
    first = V.NUMBER_BASE + rng.integers(0, V.VOCAB_SIZE - V.NUMBER_BASE - _UNUSED, half)
    tokens = np.concatenate([[V.BOS], first, first[:length - 1 - half]]).astype(np.int64)
    # S'[0] follows S's last token, which nothing predicts: pieces start after it
    starts = np.arange(half + 2, length, chunk)
    starts = np.sort(rng.choice(starts, min(chunks, starts.size), replace=False))
    return Sample("copy", tokens, tuple((int(a), min(int(a) + chunk, length)) for a in starts))


def make_sample(task: TaskName, rng: np.random.Generator, length: int, *, queries: int = 1,
                vary: bool = False, text: TextVocab | None = None) -> Sample:
    """One sample; ``vary=True`` (training) also draws the task's sizes at random.

    With ``vary=False`` the sizes are the evaluation's fixed defaults, so accuracy at
    two context lengths differs only in the haystack and the number of distractors.
    A RULER task is tokenized with ``text`` (default: the corpus' BPE, which the v2 model
    ships); the word tasks always use ``vocab``.
    """
    if task in RULER_TASKS:
        return make_ruler_sample(task, text or load_text_vocab(), rng, length, queries=queries, vary=vary)
    if task == "kv_retrieval":
        # training draws up to one pair per 16 tokens: short dense contexts teach the lookup
        pairs = int(rng.integers(queries, max(queries, min(128, length // 16)) + 1)) if vary else None
        return kv_retrieval(rng, length, queries, pairs)
    if task == "passkey":
        return passkey(rng, length)
    if task == "var_tracking":
        chains = int(rng.integers(1, min(6, max(1, length // 64)) + 1)) if vary else 4
        hops = rng.integers(1, 4, chains) if vary else 2
        return var_tracking(rng, length, min(queries, chains), chains, hops)
    if task == "copy":
        return copy(rng, length)
    if task == "aggregation":
        if vary:
            return aggregation(rng, length, int(rng.integers(3, 7)), float(rng.uniform(1 / 64, 1 / 16)))
        return aggregation(rng, length)
    raise ValueError(f"unknown task {task!r}; allowed: {ALL_TASKS + ('copy',)}")


def training_queries(task: TaskName) -> int:
    """Questions per training sample: more answers per long sequence where the task allows."""
    if task in RULER_TASKS:
        return ruler_training_queries(task)
    return {"kv_retrieval": 8, "passkey": 1, "var_tracking": 6, "aggregation": 1, "copy": 1}[task]


@dataclass(frozen=True, slots=True)
class TaskSuite:
    """The tasks one model is evaluated on, tokenized the way its own tokenizer does.

    A model directory whose tokenizer.json is a byte-level BPE with ``<eoa>`` reads the
    RULER tasks (tokenized with that file); any other (the v1 word-level tokenizer, or
    none) reads the word-vocabulary tasks.
    """

    tasks: tuple[str, ...]
    retrieval: tuple[str, ...]
    aggregation: tuple[str, ...]
    tokenizer_dir: Path | None  # the BPE's directory; None for the word-vocabulary tasks

    @classmethod
    def for_model(cls, model_dir: Path) -> "TaskSuite":
        if is_text_tokenizer(model_dir):
            return cls(RULER_TASKS, RULER_RETRIEVAL, RULER_AGGREGATION, Path(model_dir))
        return cls(WORD_TASKS, RETRIEVAL_TASKS, ("aggregation",), None)

    @property
    def text(self) -> TextVocab | None:
        """The BPE bound to the corpus (built on first use: tokenizing the corpus takes seconds)."""
        return None if self.tokenizer_dir is None else load_text_vocab(self.tokenizer_dir)

    def make_sample(self, task: TaskName, rng: np.random.Generator, length: int, *, queries: int = 1,
                    vary: bool = False) -> Sample:
        if task not in self.tasks and not (task == "copy" and self.tokenizer_dir is None):
            raise ValueError(f"task {task!r} is not one this model reads; its tasks: {self.tasks}")
        return make_sample(task, rng, length, queries=queries, vary=vary, text=self.text)

    def decode(self, ids) -> str:
        """A sample's ids as text, for reading."""
        return V.decode(ids) if self.text is None else self.text.decode(ids)


SHIPPED_SUITE = TaskSuite.for_model(SHIPPED_QUALITY_DIR)
# the tasks of the shipped model: the word tasks while the v1 model ships, the RULER tasks once v2 does
TASKS: tuple[str, ...] = SHIPPED_SUITE.tasks
