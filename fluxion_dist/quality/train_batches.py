"""Training batches of RULER samples, made ahead of the GPU in worker processes.

A batch is a pure function of (seed, step, shape): a resumed run draws the same
samples for the same step. Making a 128-sample batch of short contexts takes about as
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

# rows of a batch cycle through this: multi-key retrieval, variable tracking and the
# fact questions twice, since they carry the most independent answers per sample
CYCLE = ("niah_multikey", "vt_chains", "qa_facts", "niah_single", "cwe", "niah_multivalue",
         "niah_multikey", "vt_chains", "qa_facts", "niah_multiquery", "fwe", "cwe")


def make_batch(tokenizer_dir: Path, seed: int, step: int, length: int, batch: int) -> list[Sample]:
    tv = load_text_vocab(Path(tokenizer_dir))
    rng = np.random.default_rng([seed, step])
    tasks = [CYCLE[(step + i) % len(CYCLE)] for i in range(batch)]
    return [make_ruler_sample(t, tv, rng, length, queries=ruler_training_queries(t), vary=True) for t in tasks]


class BatchMaker:
    """``get(step, shape)``: the batch of ``step``; with ``workers`` > 0 the next ``depth``
    steps are made ahead, at the shape asked for when they were queued."""

    def __init__(self, tokenizer_dir: Path, seed: int, workers: int, depth: int = 4) -> None:
        self.tokenizer_dir, self.seed, self.depth = Path(tokenizer_dir), seed, depth
        self.pool = (ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
                     if workers > 0 else None)
        self.queue: deque[tuple[int, tuple[int, int], Future]] = deque()

    def get(self, step: int, shape_of) -> tuple[tuple[int, int], list[Sample]]:
        """``shape_of(step)`` -> (length, batch) for that step under the current schedule."""
        if self.pool is None:
            shape = shape_of(step)
            return shape, make_batch(self.tokenizer_dir, self.seed, step, *shape)
        while self.queue and self.queue[0][0] != step:  # a stale queue (never after a plain step)
            self.queue.popleft()[2].cancel()
        nxt = self.queue[-1][0] + 1 if self.queue else step
        while len(self.queue) < self.depth:
            shape = shape_of(nxt)
            self.queue.append((nxt, shape, self.pool.submit(make_batch, self.tokenizer_dir, self.seed, nxt, *shape)))
            nxt += 1
        _, shape, fut = self.queue.popleft()
        return shape, fut.result()

    def close(self) -> None:
        if self.pool is not None:
            for _, _, fut in self.queue:
                fut.cancel()
            self.pool.shutdown(wait=False, cancel_futures=True)
