"""RULER-style long-context tasks inside natural text, at any context length.

Each sample is ``<bos>``, a span of the corpus (in the BPE's tokens) with fact
sentences spliced in at sentence boundaries, then one or more ``Question: ... Answer:``
lines, each followed by its answer and ``<eoa>`` (inside the answer span, so a model
learns to stop). As in RULER (Hsieh et al. 2024), the families are:

- ``niah_single``: one "The special code of the blue door is 48121." needle.
- ``niah_multikey``: that needle among same-form needles for other keys, about half
  of which share the colour or the thing with the asked key.
- ``niah_multivalue``: one key given several codes at different depths (plus other
  keys' needles); the answer lists them in order of appearance.
- ``niah_multiquery``: several keys asked in one question; their codes in asked order.
- ``vt_chains``: "VAR QXR = 48213." then "VAR ABC = VAR QXR." hops, several chains
  interleaved; "which variables are assigned the value 48213?" lists the chain in order,
  so each answer token is one long-range lookup.
- ``cwe`` (common words): word-list sentences scattered through the text; the three
  most common list words by count (aggregation over the whole context).
- ``fwe`` (frequent words): made-up "coded" words sprinkled between the novel's words
  with Zipf-like counts; the three most frequent.
- ``qa_facts``: "Elinor hid the ivory fan beneath the old oak." facts about the novels'
  characters, with distractors sharing the name or the object; "Where did Elinor hide
  the ivory fan?" is phrased unlike the fact, so the answer is not a plain copy cue.

Evaluation sizes (``vary=False``) are fixed, so two context lengths differ only in the
haystack; the aggregation tasks scale their counts with the length (their evidence is
the whole context). ``vary=True`` (training) draws sizes and asks about most facts, with
a curriculum ``level``; the trainer also passes ``mix``, which makes the haystack a
training one (``train_haystack``) rather than a span of the corpus.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from fluxion_dist.quality.sample import ContextTooShort, Sample
from fluxion_dist.quality.text_vocab import TextVocab
from fluxion_dist.quality.train_haystack import HaystackMix, boundaries, haystack

RulerTask = Literal["niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt_chains",
                    "cwe", "fwe", "qa_facts"]
RULER_TASKS: tuple[RulerTask, ...] = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery",
                                      "vt_chains", "cwe", "fwe", "qa_facts")
RULER_RETRIEVAL: tuple[RulerTask, ...] = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery",
                                          "vt_chains", "qa_facts")
RULER_AGGREGATION: tuple[RulerTask, ...] = ("cwe", "fwe")

COLOURS = ("blue", "red", "green", "yellow", "white", "black", "grey", "brown", "silver", "golden", "purple",
           "orange")
THINGS = ("door", "gate", "box", "chest", "window", "carriage", "cottage", "garden", "bridge", "tower",
          "cabinet", "trunk")
# list words and coded words that never occur in the corpus, so only the inserted ones count
LIST_WORDS = ("tiger", "lemon", "pepper", "rabbit", "cherry", "pebble", "falcon", "ladder", "onion", "parrot",
              "pumpkin", "rocket", "spider", "tomato", "trumpet", "zebra", "banjo", "cactus", "camel", "cobra",
              "eagle", "ferret", "hornet", "igloo", "jaguar", "koala", "llama", "lobster", "mango", "moose",
              "otter", "panda", "peanut", "raven", "squid", "tulip", "wombat", "yacht", "badger", "bucket")
CODED_WORDS = ("zorp", "kavix", "blimt", "quorzel", "fennik", "drubo", "yilk", "mazzer", "tupov", "grentil",
               "skov", "vorlak", "zeb", "jubrak", "nixal", "quibb", "trozen", "wumbel", "kesh", "obnik",
               "ulvar", "pazzi", "glorm", "hevix", "snerd", "yorbel", "crumk", "vexil", "dobrin", "zintra")
NAMES = ("Elinor", "Marianne", "Elizabeth", "Darcy", "Emma", "Harriet", "Anne", "Fanny", "Edmund", "Catherine",
         "Henry", "Frederick", "Jane", "Lydia", "Charlotte", "Bingley", "Knightley", "Wentworth", "Willoughby",
         "Edward")
OBJECTS = ("ivory fan", "silver locket", "green ribbon", "old letter", "brass key", "music book",
           "pearl necklace", "straw bonnet", "blue shawl", "miniature portrait", "gold watch", "lace glove")
PLACES = ("beneath the old oak", "in the library drawer", "behind the stable door", "under the parsonage stairs",
          "inside the piano stool", "in the hollow of the elm", "beside the garden well", "under the chapel pew",
          "in the attic trunk", "behind the drawing room clock", "beneath the shrubbery bench",
          "inside the hat box", "under the kitchen flagstone", "in the summer house", "behind the portrait",
          "beside the mill pond")
VERBS = (("hid", "hide"), ("buried", "bury"), ("left", "leave"), ("kept", "keep"))
_LETTERS = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"))
CODE_DIGITS = 5  # the evaluation's codes; training ones grow to this with the curriculum
# Training variable tracking always interleaves other chains (the evaluation has three): with
# one chain the answer is every VAR statement's name in order, learnt without any lookup
# (the value's statement, then each name's "= VAR name." statement), which is then useless
# on the evaluation's chains; 256-512-token contexts used to draw one chain (or two) only.
VT_MIN_CHAINS = 2


def _codes(rng: np.random.Generator, n: int, digits: int = CODE_DIGITS) -> list[str]:
    """``n`` distinct codes of ``digits`` digits (drawn and deduplicated: ``choice`` without
    replacement would shuffle all 90000 five-digit ones for every sample)."""
    if not 1 <= n <= 9 * 10 ** (digits - 1):
        raise ValueError(f"{n} distinct codes of {digits} digits do not exist")
    low = 10 ** (digits - 1)
    codes: dict[int, None] = {}
    while len(codes) < n:
        codes.update(dict.fromkeys((low + rng.integers(0, 9 * low, n - len(codes))).tolist()))
    return [str(v) for v in codes]


def code_digits(rng: np.random.Generator, level: float, codes: int) -> int:
    """Digits of a training sample's ``codes`` codes at curriculum ``level``: one or two at 0,
    a top growing to ``CODE_DIGITS`` at 1 (then exactly that, as evaluated), and enough that
    the codes can differ without the draw crowding.

    The BPE spells a code one token a digit, so an answer is a lookup (its first digit)
    then a copy of each next digit from the needle. With five digits from the start a
    model learns the lookup but never the copy: one correct digit in five barely moves the
    answer loss off chance. Short codes make the whole answer learnable, and each added
    digit is one more copy step of a circuit that already works.
    """
    top = 2 + round(float(np.clip(level, 0.0, 1.0)) * (CODE_DIGITS - 2))
    digits = top if top == CODE_DIGITS else int(rng.integers(top - 1, top + 1))
    while 9 * 10 ** (digits - 1) < 2 * codes:
        digits += 1
    return digits


def _keys(rng: np.random.Generator, n: int) -> list[tuple[str, str]]:
    """``n`` distinct (colour, thing) keys; about half of keys 1.. share an attribute with key 0."""
    target = (COLOURS[rng.integers(len(COLOURS))], THINGS[rng.integers(len(THINGS))])
    near = [(c, target[1]) for c in COLOURS if c != target[0]] + [(target[0], t) for t in THINGS if t != target[1]]
    far = [(c, t) for c in COLOURS for t in THINGS if c != target[0] and t != target[1]]
    n_near = min(len(near), (n - 1 + 1) // 2)
    picked = [near[i] for i in rng.choice(len(near), n_near, replace=False)]
    picked += [far[i] for i in rng.choice(len(far), n - 1 - n_near, replace=False)]
    rest = [picked[i] for i in rng.permutation(len(picked))]
    return [target] + rest


def _needle(key: tuple[str, str], code: str) -> str:
    return f" The special code of the {key[0]} {key[1]} is {code}."


def _list_and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _assemble(task: RulerTask, tv: TextVocab, rng: np.random.Generator, length: int, facts: list[str],
              qa: list[tuple[str, str]], *, where: Literal["sentence", "word"] = "sentence",
              ordered: bool = True, mix: HaystackMix | None = None) -> Sample:
    """Splice ``facts`` (texts, each starting with a space) into a corpus span at random
    boundaries, in the given order unless ``ordered=False``; append the (question, answer)
    pairs so the sample is exactly ``length`` tokens. ``mix``: the haystack is a training
    one (``train_haystack``: recombined passages, words replaced) instead of a corpus span."""
    memo: dict[str, np.ndarray] = {}
    fact_ids = [memo[f] if f in memo else memo.setdefault(f, tv.encode(f)) for f in facts]
    tail = []
    for q, a in qa:
        tail.append((tv.encode(f"\nQuestion: {q} Answer:"), np.append(tv.encode(" " + a), tv.eoa)))
    hay_len = length - 1 - sum(f.size for f in fact_ids) - sum(q.size + a.size for q, a in tail)
    if hay_len < 0:
        raise ContextTooShort(f"{task}: {length} tokens cannot hold {len(facts)} facts and {len(qa)} "
                              f"questions ({length - hay_len} tokens)")
    if not ordered:
        fact_ids = [fact_ids[i] for i in rng.permutation(len(fact_ids))]
    if mix is None:
        start = _span_start(tv, rng, hay_len)
        hay = tv.corpus[start:start + hay_len]
        pool = tv.sentence_starts if where == "sentence" else tv.word_starts
        lo, hi = np.searchsorted(pool, [start + 1, start + hay_len])
        slots = pool[lo:hi] - start
    else:
        hay = haystack(tv, rng, hay_len, mix)
        slots = boundaries(tv, hay, where)
    if slots.size == 0:  # a haystack of a few tokens: its ends are boundaries too
        slots = np.array([0, hay_len])
    cuts = np.sort(slots[rng.integers(0, slots.size, len(fact_ids))])
    pieces, prev = [np.array([tv.bos])], 0
    for cut, f in zip(cuts, fact_ids):
        pieces += [hay[prev:cut], f]
        prev = cut
    pieces.append(hay[prev:])
    spans, pos = [], length - sum(q.size + a.size for q, a in tail)
    for q, a in tail:
        pieces += [q, a]
        spans.append((pos + q.size, pos + q.size + a.size))
        pos += q.size + a.size
    tokens = np.concatenate(pieces).astype(np.int64)
    assert tokens.size == length
    return Sample(task, tokens, tuple(spans), tuple(qa))


def _span_start(tv: TextVocab, rng: np.random.Generator, hay_len: int) -> int:
    """A corpus position where a ``hay_len`` span both starts and ends on a pre-token boundary."""
    n = tv.corpus.size
    last = np.searchsorted(tv.span_starts, n - hay_len, side="right")
    if last == 0:
        raise ContextTooShort(f"a {hay_len}-token haystack is longer than the corpus ({n} tokens)")
    for _ in range(64):  # most boundaries qualify: a few draws find one
        s = int(tv.span_starts[rng.integers(last)])
        if tv.span_ends[s + hay_len]:
            return s
    cand = tv.span_starts[:last]
    cand = cand[tv.span_ends[cand + hay_len]]
    return int(cand[rng.integers(cand.size)])


def niah_single(tv: TextVocab, rng: np.random.Generator, length: int, *, digits: int = CODE_DIGITS,
                mix: HaystackMix | None = None) -> Sample:
    key, code = _keys(rng, 1)[0], _codes(rng, 1, digits)[0]
    return _assemble("niah_single", tv, rng, length, [_needle(key, code)],
                     [(f"What is the special code of the {key[0]} {key[1]}?", code)], mix=mix)


def niah_multikey(tv: TextVocab, rng: np.random.Generator, length: int, needles: int = 8,
                  queries: int = 1, *, digits: int = CODE_DIGITS, mix: HaystackMix | None = None) -> Sample:
    if queries > needles:
        raise ValueError(f"niah_multikey: {queries} queries need as many needles; got {needles}")
    keys, codes = _keys(rng, needles), _codes(rng, needles, digits)
    facts = [_needle(k, c) for k, c in zip(keys, codes)]
    asked = [0] + [int(i) for i in 1 + rng.choice(needles - 1, queries - 1, replace=False)]
    qa = [(f"What is the special code of the {keys[i][0]} {keys[i][1]}?", codes[i]) for i in asked]
    return _assemble("niah_multikey", tv, rng, length, facts, qa, ordered=False, mix=mix)


def niah_multivalue(tv: TextVocab, rng: np.random.Generator, length: int, values: int = 4,
                    distractors: int = 3, *, digits: int = CODE_DIGITS, mix: HaystackMix | None = None
                    ) -> Sample:
    keys = _keys(rng, 1 + distractors)
    codes = _codes(rng, values + distractors, digits)
    # the target's needles keep their order (the answer lists them as they appear); the
    # distractors go in at random depths between them
    order = rng.permutation(values + distractors)
    target_codes = iter(codes[:values])
    facts = []
    for i in order:
        facts.append(_needle(keys[0], next(target_codes)) if i < values
                     else _needle(keys[1 + i - values], codes[i]))
    return _assemble("niah_multivalue", tv, rng, length, facts,
                     [(f"What are all the special codes of the {keys[0][0]} {keys[0][1]}?",
                       ", ".join(codes[:values]))], mix=mix)


def niah_multiquery(tv: TextVocab, rng: np.random.Generator, length: int, needles: int = 8,
                    asked: int = 4, *, digits: int = CODE_DIGITS, mix: HaystackMix | None = None) -> Sample:
    if asked > needles:
        raise ValueError(f"niah_multiquery: {asked} asked keys need as many needles; got {needles}")
    keys, codes = _keys(rng, needles), _codes(rng, needles, digits)
    facts = [_needle(k, c) for k, c in zip(keys, codes)]
    which = rng.choice(needles, asked, replace=False)
    names = _list_and([f"the {keys[i][0]} {keys[i][1]}" for i in which])
    return _assemble("niah_multiquery", tv, rng, length, facts,
                     [(f"What are the special codes of {names}?", ", ".join(codes[i] for i in which))],
                     ordered=False, mix=mix)


def _var_names(rng: np.random.Generator, n: int, letters: int = 3) -> list[str]:
    if n > _LETTERS.size ** letters:
        raise ValueError(f"{n} distinct variable names of {letters} letters do not exist")
    names: dict[str, None] = {}  # insertion-ordered: a set's order varies with the hash seed
    while len(names) < n:
        names["".join(rng.choice(_LETTERS, letters))] = None
    return list(names)


def name_letters(level: float, names: int) -> int:
    """Letters of a training sample's ``names`` variable names at curriculum ``level``: one
    at 0, three (as evaluated) at 1. A name is a token a letter, copied like a code's digits
    (``code_digits``); at least two letters once there are too many names for one each."""
    letters = 1 + round(float(np.clip(level, 0.0, 1.0)) * 2)
    while _LETTERS.size ** letters < 2 * names:
        letters += 1
    return letters


def vt_chains(tv: TextVocab, rng: np.random.Generator, length: int, chains: int = 3,
              hops: int | np.ndarray = 4, queries: int = 1, *, digits: int = CODE_DIGITS, letters: int = 3,
              mix: HaystackMix | None = None) -> Sample:
    """``chains`` chains of ``hops + 1`` variables (names of ``letters`` letters), interleaved
    with each chain in order."""
    if queries > chains:
        raise ValueError(f"vt_chains: {queries} queries need as many chains; got {chains}")
    hops = np.broadcast_to(np.asarray(hops), (chains,))
    names = _var_names(rng, int((hops + 1).sum()), letters)
    codes = _codes(rng, chains, digits)
    stmts, at = [], 0
    for c in range(chains):
        chain = names[at:at + hops[c] + 1]
        at += hops[c] + 1
        stmts.append([f" VAR {chain[0]} = {codes[c]}."]
                     + [f" VAR {chain[i]} = VAR {chain[i - 1]}." for i in range(1, len(chain))])
    order = rng.permutation(np.repeat(np.arange(chains), hops + 1))
    nxt = [0] * chains
    facts = []
    for c in order:
        facts.append(stmts[c][nxt[c]])
        nxt[c] += 1
    qa = []
    for c in rng.choice(chains, queries, replace=False):
        chain = [s.split()[1] for s in stmts[c]]
        qa.append((f"Which variables are assigned the value {codes[c]}?", " ".join(chain)))
    return _assemble("vt_chains", tv, rng, length, facts, qa, mix=mix)


def _ranked_counts(rng: np.random.Generator, total: int, kinds: int, top: int = 3) -> np.ndarray:
    """``kinds`` counts summing to about ``total``: the ``top`` first strictly decreasing by
    a quarter or more, every other at most half the ``top``-th (so the ranking is clear)."""
    rest = rng.uniform(0.15, 0.5, kinds - top)
    weights = np.concatenate([1.25 ** np.arange(top)[::-1] * 1.0, rest])
    base = max(2, int(total / weights.sum()))
    counts = np.maximum(1, np.floor(weights * base)).astype(np.int64)
    for i in range(top - 1, 0, -1):
        counts[i - 1] = max(counts[i - 1], counts[i] + 1)
    counts[top:] = np.minimum(counts[top:], max(1, counts[top - 1] // 2))
    return counts


def cwe(tv: TextVocab, rng: np.random.Generator, length: int, density: float = 1 / 12,
        kinds: int | None = None, *, mix: HaystackMix | None = None) -> Sample:
    """List words, about ``density`` of the tokens, in "Words: a, b, c." sentences."""
    total = int(np.clip(length * density / 2.5, 14, 6000))
    kinds = int(np.clip(total // 5, 5, len(LIST_WORDS))) if kinds is None else kinds
    words = [LIST_WORDS[i] for i in rng.choice(len(LIST_WORDS), kinds, replace=False)]
    counts = _ranked_counts(rng, total, kinds)
    bag = np.repeat(np.arange(kinds), counts)[rng.permutation(int(counts.sum()))]
    facts, at = [], 0
    while at < bag.size:
        k = int(rng.integers(5, 11))
        facts.append(" Words: " + ", ".join(words[i] for i in bag[at:at + k]) + ".")
        at += k
    return _assemble("cwe", tv, rng, length, facts,
                     [("What are the three most common words in the word lists?", ", ".join(words[:3]))],
                     mix=mix)


def fwe(tv: TextVocab, rng: np.random.Generator, length: int, density: float = 1 / 24,
        kinds: int = 8, *, mix: HaystackMix | None = None) -> Sample:
    """Coded words, about ``density`` of the tokens, one at a time between the novel's words."""
    total = int(np.clip(length * density / 2.5, 10, 4000))
    words = [CODED_WORDS[i] for i in rng.choice(len(CODED_WORDS), kinds, replace=False)]
    counts = _ranked_counts(rng, total, kinds)
    facts = [" " + words[i] for i in np.repeat(np.arange(kinds), counts)]
    return _assemble("fwe", tv, rng, length, facts,
                     [("What are the three most frequent coded words in the text?", ", ".join(words[:3]))],
                     where="word", ordered=False, mix=mix)


def qa_facts(tv: TextVocab, rng: np.random.Generator, length: int, facts: int = 6, queries: int = 1, *,
             mix: HaystackMix | None = None) -> Sample:
    """``facts`` (name, object, place) facts; about half share the name or object of fact 0."""
    if queries > facts:
        raise ValueError(f"qa_facts: {queries} queries need as many facts; got {facts}")
    name0, obj0 = NAMES[rng.integers(len(NAMES))], OBJECTS[rng.integers(len(OBJECTS))]
    pairs = {(name0, obj0): None}  # insertion-ordered, unlike a set
    while len(pairs) < facts:
        shared = rng.random() < 0.5
        name = name0 if shared and rng.random() < 0.5 else NAMES[rng.integers(len(NAMES))]
        obj = obj0 if shared and name != name0 else OBJECTS[rng.integers(len(OBJECTS))]
        pairs[(name, obj)] = None
    pairs_l = list(pairs)
    places = [PLACES[i] for i in rng.choice(len(PLACES), facts, replace=False)]
    verbs = [VERBS[i] for i in rng.integers(0, len(VERBS), facts)]
    texts = [f" {n} {v[0]} the {o} {p}." for (n, o), v, p in zip(pairs_l, verbs, places)]
    asked = [0] + [int(i) for i in 1 + rng.choice(facts - 1, queries - 1, replace=False)]
    qa = [(f"Where did {pairs_l[i][0]} {verbs[i][1]} the {pairs_l[i][1]}?", places[i]) for i in asked]
    return _assemble("qa_facts", tv, rng, length, texts, qa, ordered=False, mix=mix)


def make_ruler_sample(task: RulerTask, tv: TextVocab, rng: np.random.Generator, length: int, *,
                      queries: int = 1, vary: bool = False, level: float = 1.0,
                      mix: HaystackMix | None = None) -> Sample:
    """One sample; ``vary=True`` (training) also draws the sizes, and up to ``queries`` questions.

    Training sizes are dense: short contexts hold many needles, chains and facts and ask
    about most of them, so every sequence carries tens of answer tokens to learn lookup
    from. ``level`` (0-1, training only) is the curriculum: codes grow from one or two
    digits at 0 to five at 1 (``code_digits``), variable names from one letter to three
    (``name_letters``), and variable tracking's chains from one hop to their full length,
    always among ``VT_MIN_CHAINS`` or more chains.
    ``mix``: a training haystack (``train_haystack``) instead of a span of the corpus.
    """
    if not vary:
        return _full_size_sample(task, tv, rng, length, queries, mix)
    if task == "niah_single":
        return niah_single(tv, rng, length, digits=code_digits(rng, level, 1), mix=mix)
    if task == "niah_multikey":
        n = int(rng.integers(2, int(np.clip(length // 96, 4, 24)) + 1))
        return niah_multikey(tv, rng, length, n, min(queries, n), digits=code_digits(rng, level, n), mix=mix)
    if task == "niah_multivalue":
        values, distractors = int(rng.integers(2, 6)), int(rng.integers(0, 5))
        return niah_multivalue(tv, rng, length, values, distractors,
                               digits=code_digits(rng, level, values + distractors), mix=mix)
    if task == "niah_multiquery":
        n = int(rng.integers(2, int(np.clip(length // 128, 4, 16)) + 1))
        return niah_multiquery(tv, rng, length, n, int(rng.integers(2, min(n, 4) + 1)),
                               digits=code_digits(rng, level, n), mix=mix)
    if task == "vt_chains":
        chains = int(rng.integers(VT_MIN_CHAINS, max(VT_MIN_CHAINS, min(6, length // 128)) + 1))
        longest = int(np.clip(length // (48 * chains), 1, 5))
        longest = 1 + int(round(float(np.clip(level, 0.0, 1.0)) * (longest - 1)))
        hops = rng.integers(1, longest + 1, chains)
        return vt_chains(tv, rng, length, chains, hops, min(queries, chains), digits=code_digits(rng, level, chains),
                         letters=name_letters(level, int((hops + 1).sum())), mix=mix)
    if task == "cwe":
        return cwe(tv, rng, length, float(rng.uniform(1 / 20, 1 / 8)), mix=mix)
    if task == "fwe":
        return fwe(tv, rng, length, float(rng.uniform(1 / 40, 1 / 16)), int(rng.integers(5, 12)), mix=mix)
    if task == "qa_facts":
        n = int(rng.integers(2, int(np.clip(length // 64, 2, 10)) + 1))
        return qa_facts(tv, rng, length, n, min(queries, n), mix=mix)
    raise ValueError(f"unknown RULER task {task!r}; allowed: {RULER_TASKS}")


def _full_size_sample(task: RulerTask, tv: TextVocab, rng: np.random.Generator, length: int, queries: int,
                      mix: HaystackMix | None) -> Sample:
    """The evaluation's fixed sizes: five-digit codes, three-letter names, chains of four hops."""
    if task == "niah_single":
        return niah_single(tv, rng, length, mix=mix)
    if task == "niah_multikey":
        return niah_multikey(tv, rng, length, 8, min(queries, 8), mix=mix)
    if task == "niah_multivalue":
        return niah_multivalue(tv, rng, length, mix=mix)
    if task == "niah_multiquery":
        return niah_multiquery(tv, rng, length, mix=mix)
    if task == "vt_chains":
        return vt_chains(tv, rng, length, mix=mix)
    if task == "cwe":
        return cwe(tv, rng, length, 1 / 12, mix=mix)
    if task == "fwe":
        return fwe(tv, rng, length, mix=mix)
    if task == "qa_facts":
        return qa_facts(tv, rng, length, 6, min(queries, 6), mix=mix)
    raise ValueError(f"unknown RULER task {task!r}; allowed: {RULER_TASKS}")


def ruler_training_queries(task: RulerTask) -> int:
    """Questions per training sample where the task holds several independent facts: most
    of them, so retrieval is supervised densely (``make_ruler_sample`` caps it by the sizes)."""
    return {"niah_multikey": 8, "vt_chains": 4, "qa_facts": 8}.get(task, 1)
