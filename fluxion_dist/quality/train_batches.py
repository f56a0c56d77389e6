"""Training batches of RULER samples, made ahead of the GPU in worker processes.

A batch is a pure function of (seed, step, spec), the spec being (length, batch,
curriculum level, variable tracking's own level): a resumed run draws the same samples for
the same step. Its haystacks are training ones (``train_haystack``: recombined passages with words
replaced) unless the run asks for plain corpus spans. Making a 128-sample batch of short contexts takes about as
long as the GPU's step on it, so ``BatchMaker`` keeps a few steps in flight in a process
pool (spawned, not forked: the parent holds a CUDA context).
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

import numpy as np

from fluxion_dist.quality.ruler_tasks import make_ruler_sample, ruler_training_queries
from fluxion_dist.quality.sample import Sample
from fluxion_dist.quality.text_vocab import load_text_vocab
from fluxion_dist.quality.train_haystack import HaystackMix

# rows of a batch cycle through this: multi-key retrieval, variable tracking and the
# fact questions twice, since they carry the most independent answers per sample
CYCLE = ("niah_multikey", "vt_chains", "qa_facts", "niah_single", "cwe", "niah_multivalue",
         "niah_multikey", "vt_chains", "qa_facts", "niah_multiquery", "fwe", "cwe")


# the task whose sizes follow a curriculum level of its own (the trainer earns it from its accuracy)
OWN_LEVEL_TASK = "vt_chains"


def make_batch(tokenizer_dir: Path, seed: int, step: int, length: int, batch: int, level: float = 1.0,
               vt_level: float | None = None, mix: HaystackMix | None = HaystackMix()) -> list[Sample]:
    """``level``: the tasks' curriculum (``make_ruler_sample``), ``vt_level`` that of
    ``OWN_LEVEL_TASK`` (None: the same); ``mix=None``: corpus-span haystacks."""
    tv = load_text_vocab(Path(tokenizer_dir))
    rng = np.random.default_rng([seed, step])
    tasks = [CYCLE[(step + i) % len(CYCLE)] for i in range(batch)]
    return [make_ruler_sample(t, tv, rng, length, queries=ruler_training_queries(t), vary=True,
                              level=vt_level if t == OWN_LEVEL_TASK and vt_level is not None else level, mix=mix)
            for t in tasks]


class BatchMaker:
    """``get(step, spec_of)``: the batch of ``step``; with ``workers`` > 0 the next ``depth``
    steps are made ahead, at the spec asked for when they were queued."""

    def __init__(self, tokenizer_dir: Path, seed: int, workers: int, depth: int = 4,
                 mix: HaystackMix | None = HaystackMix()) -> None:
        self.tokenizer_dir, self.seed, self.depth, self.mix = Path(tokenizer_dir), seed, depth, mix
        self.pool = (ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
                     if workers > 0 else None)
        self.queue: deque[tuple[int, tuple, Future]] = deque()

    def get(self, step: int, spec_of) -> tuple[tuple, list[Sample]]:
        """``spec_of(step)`` -> (length, batch, level, vt_level) for that step under the current schedule."""
        if self.pool is None:
            spec = spec_of(step)
            return spec, make_batch(self.tokenizer_dir, self.seed, step, *spec, mix=self.mix)
        while self.queue and self.queue[0][0] != step:  # a stale queue (never after a plain step)
            self.queue.popleft()[2].cancel()
        nxt = self.queue[-1][0] + 1 if self.queue else step
        while len(self.queue) < self.depth:
            spec = spec_of(nxt)
            self.queue.append((nxt, spec, self.pool.submit(make_batch, self.tokenizer_dir, self.seed, nxt, *spec,
                                                           mix=self.mix)))
            nxt += 1
        _, spec, fut = self.queue.popleft()
        return spec, fut.result()

    def close(self) -> None:
        if self.pool is not None:
            for _, _, fut in self.queue:
                fut.cancel()
            self.pool.shutdown(wait=False, cancel_futures=True)
