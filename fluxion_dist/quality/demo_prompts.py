"""Long-context questions for the demo, in the shipped quality model's own tokenizer.

Which questions follows from what ships in ``data/quality_model`` (``TaskSuite.for_model``):
the v1 word-vocabulary model gets kv / passkey / variable-tracking questions in its
made-up words; a v2 model (byte-level BPE with ``<eoa>``) gets RULER questions over
the corpus text, and its answers end at ``<eoa>``, the eos_token_id in its config.json,
so the server stops there. Shipping v2 is copying its checkpoint directory's
config.json, model.safetensors, tokenizer.json and tokenizer_config.json over the
shipped ones: nothing here changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fluxion_dist.quality import vocab
from fluxion_dist.quality.model import SHIPPED_DIR
from fluxion_dist.quality.tasks import TaskSuite

_WORD_QUESTIONS = ("kv_retrieval", "passkey", "var_tracking")
_TEXT_QUESTIONS = ("niah_multikey", "vt_chains", "qa_facts")


@dataclass(frozen=True, slots=True)
class DemoQuestion:
    task: str
    prompt: str  # the context and the question as text; the tokenizer adds <bos>
    answer: str


def demo_questions(context_tokens: int = 2048, seed: int = 0, model_dir: Path = SHIPPED_DIR) -> list[DemoQuestion]:
    suite = TaskSuite.for_model(model_dir)
    rng = np.random.default_rng(seed)
    out = []
    for task in (_WORD_QUESTIONS if suite.text is None else _TEXT_QUESTIONS):
        sample = suite.make_sample(task, rng, context_tokens)
        prompt = sample.prompt()[1:]  # drop <bos>: the tokenizer puts it back
        if suite.text is None:
            out.append(DemoQuestion(task, vocab.decode(prompt), vocab.decode(sample.answer())))
        else:
            out.append(DemoQuestion(task, suite.text.decode(prompt), sample.texts[0][1]))
    return out
