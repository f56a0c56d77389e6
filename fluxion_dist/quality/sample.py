"""One task sample: the token ids a model reads, where its answers are, and their text for reading."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class ContextTooShort(ValueError):
    """The requested length cannot hold the task's facts and questions."""


@dataclass(frozen=True, slots=True)
class Sample:
    task: str
    tokens: np.ndarray  # int64 [length]
    spans: tuple[tuple[int, int], ...]  # [start, end) of each answer in ``tokens``
    # per answer, (question, answer) as text; empty for the word-vocabulary tasks, whose
    # ids spell themselves (``vocab.decode``)
    texts: tuple[tuple[str, str], ...] = ()

    def prompt(self, query: int = 0) -> np.ndarray:
        """Everything before answer ``query``: what the model is given."""
        return self.tokens[:self.spans[query][0]]

    def answer(self, query: int = 0) -> np.ndarray:
        start, end = self.spans[query]
        return self.tokens[start:end]
