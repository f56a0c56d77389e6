"""Training haystacks: corpus passages recombined across its books, with words replaced.

The corpus is about two million tokens and a GPU run reads hundreds of millions, so a
contiguous span of it as every haystack lets the model learn the text by heart: its
text loss falls far below what the language allows while retrieval never forms. A
training haystack is instead

1. passages of a few sentences (``HaystackMix.min_passage``-``max_passage`` tokens,
   cut at sentence or paragraph boundaries) from random places anywhere in the corpus
   (the Austen novels, the King James Bible), so the context around any point differs
   from sample to sample, and
2. a word replaced by a random word of the corpus every ``max_gap // 2``-``max_gap``
   words, so no run of ``max_gap`` words is ever the corpus verbatim, and two haystacks
   share a run only as long as the random words happen to agree;
3. ``repeat`` of the passages again, as an earlier passage of the same haystack (its
   replaced words included), so the text loss also rewards looking back and copying:
   the induction circuit that retrieval answers are read with, which a model that can
   no longer recite the corpus has to learn from the context instead.

Paragraphs marked ``TextVocab.heldout`` are never drawn: ``text_windows`` cuts LM
evaluation windows from them and from as many trained paragraphs, and the gap between
the two losses is what memorisation the trainer still allows.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from fluxion_dist.quality.text_vocab import TextVocab


@dataclass(frozen=True, slots=True)
class HaystackMix:
    min_passage: int = 16  # tokens: a passage runs to the first boundary at or after its drawn length
    max_passage: int = 256
    max_gap: int = 16  # words between replaced words: drawn in [max_gap // 2, max_gap]
    repeat: float = 0.1  # chance that a passage (after the first) is an earlier one again

    def __post_init__(self) -> None:
        if not 1 <= self.min_passage <= self.max_passage:
            raise ValueError(f"HaystackMix.min_passage must be in [1, max_passage={self.max_passage}]; "
                             f"got {self.min_passage}")
        if self.max_gap < 2:
            raise ValueError(f"HaystackMix.max_gap must be at least 2 words; got {self.max_gap}")
        if not 0.0 <= self.repeat < 1.0:
            raise ValueError(f"HaystackMix.repeat must be in [0, 1); got {self.repeat}")


@dataclass(frozen=True, eq=False)
class _Tables:
    cuts: np.ndarray  # sorted: where a passage may end (sentence and paragraph starts, held-out starts, the end)
    starts: np.ndarray  # where a passage may begin: sentence starts outside held-out paragraphs
    next_heldout: np.ndarray  # per start: the first held-out paragraph start after it (or the corpus end)
    words: np.ndarray  # word or paragraph starts, then the corpus end: word i is [words[i], words[i + 1])
    pool: np.ndarray  # replacement words: indices into ``words`` of spaced words in trained paragraphs


@functools.cache
def _tables(tv: TextVocab) -> _Tables:
    n = tv.corpus.size
    para_of = lambda pos: np.searchsorted(tv.paragraph_starts, pos, side="right") - 1  # noqa: E731
    ho_starts = np.append(tv.paragraph_starts[tv.heldout], n)
    cuts = np.unique(np.concatenate([tv.sentence_starts, tv.paragraph_starts, [n]]))
    starts = tv.sentence_starts[~tv.heldout[para_of(tv.sentence_starts)]]
    next_ho = ho_starts[np.searchsorted(ho_starts, starts, side="right")]
    words = np.append(tv.span_starts, n)
    spaced = np.isin(tv.span_starts, tv.word_starts)
    pool = np.flatnonzero(spaced & ~tv.heldout[para_of(tv.span_starts)])
    return _Tables(cuts, starts, next_ho, words, pool)


def _ranges(lo: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``concatenate([arange(a, a + c) for a, c in zip(lo, counts)])``, without the loop."""
    offs = np.cumsum(counts) - counts
    return np.repeat(lo - offs, counts) + np.arange(counts.sum())


def _passage_words(tv: TextVocab, t: _Tables, mix: HaystackMix, rng: np.random.Generator,
                   need: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices into ``t.words`` of random passages, in order, covering at least ``need``
    tokens; and each passage's number of words."""
    mean = (mix.min_passage + mix.max_passage) / 2 + 16
    runs, sizes, total = [], [], 0
    while total < need:
        k = int(1.2 * (need - total) / mean) + 4
        i = rng.integers(0, t.starts.size, k)
        s = t.starts[i]
        want = s + rng.integers(mix.min_passage, mix.max_passage + 1, k)
        e = np.minimum(t.cuts[np.minimum(np.searchsorted(t.cuts, want), t.cuts.size - 1)], t.next_heldout[i])
        lo, hi = np.searchsorted(t.words, s), np.searchsorted(t.words, e)  # every s and e is in words
        runs.append(_ranges(lo, hi - lo))
        sizes.append(hi - lo)
        total += int((e - s).sum())
    return np.concatenate(runs), np.concatenate(sizes)


def _repeats(rng: np.random.Generator, sizes: np.ndarray, repeat: float) -> np.ndarray:
    """Word order after passages are replaced, with chance ``repeat``, by an earlier original."""
    src = np.arange(sizes.size)
    for i in np.flatnonzero(rng.random(sizes.size) < repeat):
        if i > 0:
            src[i] = src[rng.integers(0, i)]
    first = np.cumsum(sizes) - sizes
    return _ranges(first[src], sizes[src])


def haystack_positions(tv: TextVocab, rng: np.random.Generator, length: int, mix: HaystackMix) -> np.ndarray:
    """Corpus positions (int64 [length]) of a training haystack: ``tv.corpus[positions]``."""
    if length <= 0:
        return np.zeros(0, dtype=np.int64)
    t = _tables(tv)
    need = length + length // 4 + 64
    while True:
        w, sizes = _passage_words(tv, t, mix, rng, need)
        gaps = rng.integers(mix.max_gap // 2, mix.max_gap + 1, w.size // (mix.max_gap // 2) + 4)
        hit = np.cumsum(gaps) - rng.integers(1, gaps[0] + 1)  # the first replaced word within the first gap
        hit = hit[hit < w.size]
        starts, ends = t.words[w], t.words[w + 1]
        repl = t.pool[rng.integers(0, t.pool.size, hit.size)]
        starts[hit], ends[hit] = t.words[repl], t.words[repl + 1]
        if mix.repeat > 0:
            order = _repeats(rng, sizes, mix.repeat)
            starts, ends = starts[order], ends[order]
        lens = ends - starts
        if lens.sum() >= length:
            break
        need *= 2  # replacements this much shorter than what they replaced: (almost) never
    return _ranges(starts, lens)[:length]


def haystack(tv: TextVocab, rng: np.random.Generator, length: int, mix: HaystackMix) -> np.ndarray:
    """A training haystack's token ids (int64 [length])."""
    return tv.corpus[haystack_positions(tv, rng, length, mix)]


def boundaries(tv: TextVocab, hay: np.ndarray, where: str) -> np.ndarray:
    """Positions in ``hay`` (1 .. size - 1) before which a fact may be spliced: a token that
    begins with a space after a sentence end (``where="sentence"``), or any that begins with
    a space (``"word"``): the same tests ``TextVocab`` applies to the corpus."""
    ok = tv.spaced[hay[1:]]
    if where == "sentence":
        ok &= tv.ends_sentence[hay[:-1]]
    return np.flatnonzero(ok) + 1


def text_windows(tv: TextVocab, *, heldout: bool, length: int, count: int) -> np.ndarray:
    """``count`` windows (int64 [count, length], each <bos> then text) of the held-out
    paragraphs, or of as many trained ones (each one after a held-out paragraph), in
    corpus order: the plain text the trainer measures its LM loss on."""
    which = np.flatnonzero(tv.heldout)
    if not heldout:
        which = which[which + 1 < tv.paragraph_starts.size] + 1
    ends = np.append(tv.paragraph_starts[1:], tv.corpus.size)
    text = np.concatenate([tv.corpus[tv.paragraph_starts[i]:ends[i]] for i in which])
    per = length - 1
    if text.size < per * count:
        raise ValueError(f"text_windows: {text.size} tokens cannot fill {count} windows of {length}")
    rows = text[:per * count].reshape(count, per)
    return np.concatenate([np.full((count, 1), tv.bos), rows], axis=1).astype(np.int64)
