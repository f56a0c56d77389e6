"""The benchmark's read ceilings (fluxion_dist.cpu._stream) read what they claim: every word
of the buffer, or exactly the selected runs, whatever the thread count."""

from __future__ import annotations

import numpy as np
import pytest

from fluxion_dist.cpu import _stream


def _fold(words: np.ndarray) -> int:
    return int(np.bitwise_xor.reduce(words)) if words.size else 0


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_stream_read_folds_every_word(threads):
    buf = np.random.default_rng(threads).integers(0, 2**63, 1001, dtype=np.uint64)
    assert _stream.stream_read(buf, threads) == _fold(buf)


@pytest.mark.parametrize("threads", [1, 2, 5])
@pytest.mark.parametrize("runs", [0, 1, 17])
def test_scattered_read_folds_exactly_the_runs(threads, runs):
    rng = np.random.default_rng(runs * 10 + threads)
    run_words = 64
    words = rng.integers(0, 2**63, 40 * run_words, dtype=np.uint64)
    starts = rng.integers(0, 40, runs).astype(np.int64) * run_words  # repeats allowed
    want = 0
    for s in starts:
        want ^= _fold(words[s:s + run_words])
    assert _stream.scattered_read(words, starts, run_words, threads) == want
