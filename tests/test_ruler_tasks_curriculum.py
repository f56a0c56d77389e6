"""The RULER training curriculum on what a model copies: codes and variable names start a
digit or a letter long and reach the evaluation's sizes at level 1; evaluation samples
never change with it."""

from __future__ import annotations

import re

import numpy as np
import pytest

from fluxion_dist.quality.ruler_tasks import (CODE_DIGITS, _codes, code_digits, make_ruler_sample, name_letters,
                                              ruler_training_queries)
from fluxion_dist.quality.text_vocab import load_text_vocab
from fluxion_dist.quality.train_haystack import HaystackMix

CODE_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery")


@pytest.fixture(scope="module")
def tv():
    return load_text_vocab()


def _answer_codes(sample):
    return [c for _, a in sample.texts for c in re.findall(r"\d+", a)]


def _draw(tv, rng, task, level, length=1024, vary=True):
    return make_ruler_sample(task, tv, rng, length, queries=ruler_training_queries(task), vary=vary, level=level,
                             mix=HaystackMix())


@pytest.mark.parametrize("task", CODE_TASKS)
def test_codes_grow_from_one_or_two_digits_to_the_evaluated_five(tv, task):
    rng = np.random.default_rng(5)
    widths = {level: [len(c) for _ in range(24) for c in _answer_codes(_draw(tv, rng, task, level))]
              for level in (0.0, 0.5, 1.0)}
    assert set(widths[0.0]) <= {1, 2} and max(widths[0.0]) <= 2
    assert set(widths[0.5]) <= {3, 4}
    assert set(widths[1.0]) == {CODE_DIGITS}
    # evaluation samples keep five digits whatever level is passed
    assert {len(c) for c in _answer_codes(_draw(tv, rng, task, 0.0, vary=False))} == {CODE_DIGITS}


def test_short_codes_stay_distinct_and_appear_in_the_needles(tv):
    rng = np.random.default_rng(6)
    for _ in range(16):
        s = _draw(tv, rng, "niah_multikey", 0.0, length=4096)
        text = tv.decode(s.tokens[:s.spans[0][0]])
        needles = re.findall(r"The special code of the (\w+ \w+) is (\d+)\.", text)
        codes = [c for _, c in needles]
        assert len(set(codes)) == len(codes) >= 2
        assert all(len(c) <= 2 or 9 * 10 ** (len(c) - 2) < 2 * len(codes) for c in codes)
        assert set(_answer_codes(s)) <= set(codes)


def test_code_digits_widens_only_as_far_as_the_count_needs():
    rng = np.random.default_rng(0)
    assert {code_digits(rng, 0.0, 1) for _ in range(64)} == {1, 2}
    assert {code_digits(rng, 0.0, 24) for _ in range(64)} == {2}  # 24 from 9 one-digit codes cannot be
    assert {code_digits(rng, 1.0, 24) for _ in range(8)} == {CODE_DIGITS}
    assert [len(c) for c in _codes(rng, 9, 1)] == [1] * 9 and len(set(_codes(rng, 9, 1))) == 9
    with pytest.raises(ValueError, match="distinct codes"):
        _codes(rng, 10, 1)


def test_variable_names_grow_from_one_letter_to_three(tv):
    rng = np.random.default_rng(7)
    def names(level, vary=True):
        s = _draw(tv, rng, "vt_chains", level, length=2048, vary=vary)
        return {len(n) for _, a in s.texts for n in a.split()}
    assert set().union(*(names(0.0) for _ in range(16))) == {1}
    assert set().union(*(names(1.0) for _ in range(16))) == {3}
    assert names(0.0, vary=False) == {3}
    assert name_letters(0.0, 13) == 1 and name_letters(0.0, 14) == 2  # a draw of 14 from 26 would crowd


@pytest.mark.parametrize("length", (256, 512, 1024))
def test_variable_tracking_always_trains_among_other_chains(tv, length):
    """One chain alone is answered by listing every VAR statement's name in order, with no
    lookup at all; a training sample always interleaves another chain (its values differ),
    so the answer is the asked value's chain and only that, as in the evaluation."""
    rng = np.random.default_rng(11)
    for level in (0.0, 0.5, 1.0):
        for _ in range(24):
            s = _draw(tv, rng, "vt_chains", level, length=length)
            text = tv.decode([int(t) for t in s.tokens[:s.spans[0][0]]])
            roots = dict(re.findall(r"VAR ([A-Z]+) = (\d+)\.", text))
            names = re.findall(r"VAR ([A-Z]+) =", text)
            assert len(roots) >= 2 and len(set(roots.values())) == len(roots)
            for q, a in s.texts:
                assert 2 <= len(a.split()) < len(names)  # a strict subset of the statements' names
                assert a.split()[0] in roots and roots[a.split()[0]] in q
