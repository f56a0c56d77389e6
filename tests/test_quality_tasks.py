"""The RULER-style tasks inside natural text: exact lengths, answers recoverable from the
text, distractors unlike the answer, determinism, and which model reads which tasks."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest

from fluxion_dist.quality.model import SHIPPED_DIR, write_text_tokenizer
from fluxion_dist.quality.ruler_tasks import (CODED_WORDS, LIST_WORDS, RULER_TASKS, make_ruler_sample,
                                              ruler_training_queries)
from fluxion_dist.quality.tasks import ALL_TASKS, TASKS, WORD_TASKS, TaskSuite, make_sample
from fluxion_dist.quality.text_vocab import load_text_vocab
from fluxion_dist.quality.train_haystack import HaystackMix


@pytest.fixture(scope="module")
def tv():
    return load_text_vocab()


def _prompt_text(tv, s, q=0):
    return tv.decode(s.prompt(q)[1:])


@pytest.mark.parametrize("task", RULER_TASKS)
@pytest.mark.parametrize("length", [512, 1000, 4097])
def test_exact_length_bos_and_eoa_answers(tv, task, length):
    rng = np.random.default_rng(5)
    for vary, mix in ((False, None), (True, None), (True, HaystackMix())):
        s = make_ruler_sample(task, tv, rng, length, queries=4, vary=vary, mix=mix)
        assert s.tokens.shape == (length,) and s.tokens[0] == tv.bos
        assert s.tokens.max() < tv.vocab_size
        assert len(s.spans) == len(s.texts) >= 1
        for q, (a, b) in enumerate(s.spans):
            assert s.tokens[b - 1] == tv.eoa and (s.tokens[a:b - 1] != tv.eoa).all()
            assert tv.decode(s.answer(q)).strip() == s.texts[q][1]
            assert _prompt_text(tv, s, q).endswith(f"Question: {s.texts[q][0]} Answer:")
        assert s.spans[-1][1] == length


@pytest.mark.parametrize("task", RULER_TASKS)
def test_prompt_text_tokenizes_back_to_the_same_ids(tv, task):
    """The demo sends the prompt as text: the server's tokenizer must rebuild the evaluated ids."""
    for seed in range(3):
        s = make_ruler_sample(task, tv, np.random.default_rng(seed), 2048)
        assert tv.encode_prompt(_prompt_text(tv, s)).tolist() == s.prompt().tolist()


@pytest.mark.parametrize("task", RULER_TASKS)
def test_same_seed_same_sample_other_seed_other_sample(tv, task):
    a = make_ruler_sample(task, tv, np.random.default_rng([3, 1]), 1500, vary=True, queries=2)
    b = make_ruler_sample(task, tv, np.random.default_rng([3, 1]), 1500, vary=True, queries=2)
    c = make_ruler_sample(task, tv, np.random.default_rng([3, 2]), 1500, vary=True, queries=2)
    assert (a.tokens == b.tokens).all() and a.spans == b.spans and a.texts == b.texts
    assert not (a.tokens == c.tokens).all()


def _codes_by_key(text):
    found: dict[str, list[str]] = {}
    for key, code in re.findall(r"The special code of the (\w+ \w+) is (\d+)\.", text):
        found.setdefault(key, []).append(code)
    return found


@pytest.mark.parametrize("length", [512, 16384])
def test_needles_answer_and_distractors_differ(tv, length):
    rng = np.random.default_rng(11)
    for _ in range(3):
        s = make_ruler_sample("niah_multikey", tv, rng, length)
        key = re.match(r"What is the special code of the (\w+ \w+)\?", s.texts[0][0]).group(1)
        found = _codes_by_key(_prompt_text(tv, s))
        assert found[key] == [s.texts[0][1]] and len(found) == 8
        others = [c for k, cs in found.items() if k != key for c in cs]
        assert s.texts[0][1] not in others
        # same-form distractors: some share the colour or the thing with the asked key
        assert any(k.split()[0] == key.split()[0] or k.split()[1] == key.split()[1] for k in found if k != key)

        s = make_ruler_sample("niah_multivalue", tv, rng, length)
        key = re.match(r"What are all the special codes of the (\w+ \w+)\?", s.texts[0][0]).group(1)
        found = _codes_by_key(_prompt_text(tv, s))
        assert ", ".join(found[key]) == s.texts[0][1] and len(found[key]) == 4  # in order of appearance

        s = make_ruler_sample("niah_multiquery", tv, rng, length)
        keys = re.findall(r"the (\w+ \w+)", s.texts[0][0].removeprefix("What are the special codes of "))
        found = _codes_by_key(_prompt_text(tv, s))
        assert ", ".join(found[k][0] for k in keys) == s.texts[0][1] and len(keys) == 4

        s = make_ruler_sample("niah_single", tv, rng, length)
        assert list(_codes_by_key(_prompt_text(tv, s)).values()) == [[s.texts[0][1]]]


def test_variable_chains_follow_from_the_text(tv):
    rng = np.random.default_rng(2)
    for length in (512, 8192):
        s = make_ruler_sample("vt_chains", tv, rng, length, queries=2, vary=True)
        text = _prompt_text(tv, s)
        value = dict(re.findall(r"VAR ([A-Z]{3}) = (\d+)\.", text))
        parent = dict(re.findall(r"VAR ([A-Z]{3}) = VAR ([A-Z]{3})\.", text))
        for q, a in s.texts:
            target = re.search(r"value (\d+)\?", q).group(1)
            chain = a.split()
            assert value[chain[0]] == target and all(parent[b] == a_ for a_, b in zip(chain, chain[1:]))
            # every variable that resolves to the value is in the answer
            def root(v):
                while v in parent:
                    v = parent[v]
                return v
            assert sorted(chain) == sorted(v for v in set(value) | set(parent) if value.get(root(v)) == target)


@pytest.mark.parametrize("length", [512, 4097, 32768])
def test_aggregation_answers_are_the_top_three_by_count(tv, length):
    rng = np.random.default_rng(4)
    for task in ("cwe", "fwe"):
        s = make_ruler_sample(task, tv, rng, length)
        text = _prompt_text(tv, s)
        if task == "cwe":
            words = [w for lst in re.findall(r"Words: ([a-z, ]+)\.", text) for w in lst.split(", ")]
            assert set(words) <= set(LIST_WORDS)
        else:
            words = [w for w in re.findall(r"[a-z]+", text) if w in CODED_WORDS]
        ranked = Counter(words).most_common()
        assert ", ".join(w for w, _ in ranked[:3]) == s.texts[0][1]
        counts = [c for _, c in ranked]
        assert counts[0] > counts[1] > counts[2] > counts[3]  # a unique, ordered answer


def test_fact_question_has_one_answer_and_distractors_share_name_or_object(tv):
    rng = np.random.default_rng(9)
    for _ in range(5):
        s = make_ruler_sample("qa_facts", tv, rng, 2048)
        name, verb, obj = re.match(r"Where did (\w+) (\w+) the ([a-z ]+)\?", s.texts[0][0]).groups()
        facts = re.findall(r"([A-Z]\w+) (hid|buried|left|kept) the ([a-z ]+?) ((?:in|under|beneath|behind|inside|"
                           r"beside) [a-z ]+)\.", _prompt_text(tv, s))
        target = [f for f in facts if f[0] == name and f[2] == obj]
        assert len(target) == 1 and target[0][3] == s.texts[0][1] and len(facts) == 6
        assert all(f[3] != s.texts[0][1] for f in facts if f is not target[0])


def test_longest_context_and_training_sizes_fit(tv):
    s = make_ruler_sample("niah_multikey", tv, np.random.default_rng(0), 65536)
    assert s.tokens.size == 65536
    rng = np.random.default_rng(1)
    for length in (512, 1024, 2048):
        for task in RULER_TASKS:
            for i in range(16):  # the trainer's dense sizes, at both ends of the curriculum
                s = make_ruler_sample(task, tv, rng, length, queries=ruler_training_queries(task), vary=True,
                                      level=i % 2, mix=HaystackMix() if i % 4 < 2 else None)
                assert s.tokens.size == length


def test_suites_follow_the_models_tokenizer(tmp_path):
    assert TaskSuite.for_model(SHIPPED_DIR).tasks == WORD_TASKS == TASKS  # while v1 ships
    assert set(ALL_TASKS) == set(WORD_TASKS) | set(RULER_TASKS)
    write_text_tokenizer(tmp_path)
    suite = TaskSuite.for_model(tmp_path)
    assert suite.tasks == RULER_TASKS and suite.text is not None
    s = suite.make_sample("niah_single", np.random.default_rng(0), 700)
    assert s.tokens.size == 700 and suite.decode(s.answer()).strip() == s.texts[0][1]
    with pytest.raises(ValueError, match="not one this model reads"):
        suite.make_sample("passkey", np.random.default_rng(0), 700)
    # the word tasks stay in the v1 vocabulary whatever ships
    w = make_sample("passkey", np.random.default_rng(0), 300)
    assert w.tokens.max() < 1664 and w.texts == ()
