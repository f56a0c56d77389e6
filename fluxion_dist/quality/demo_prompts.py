"""Long-context questions for the demo, in the shipped quality model's vocabulary."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fluxion_dist.quality import vocab
from fluxion_dist.quality.tasks import make_sample


@dataclass(frozen=True, slots=True)
class DemoQuestion:
    task: str
    prompt: str  # the context and the question as words; the tokenizer adds <bos>
    answer: str


def demo_questions(context_tokens: int = 2048, seed: int = 0) -> list[DemoQuestion]:
    rng = np.random.default_rng(seed)
    out = []
    for task in ("kv_retrieval", "passkey", "var_tracking"):
        sample = make_sample(task, rng, context_tokens)
        prompt = sample.prompt()[1:]  # drop <bos>: the tokenizer puts it back
        out.append(DemoQuestion(task, vocab.decode(prompt), vocab.decode(sample.answer())))
    return out
