"""The quality model's word-level vocabulary, and the HF ``tokenizer.json`` that spells it.

One token per word keeps every task fact a few tokens long, so a 16k-token context
holds thousands of distractor tokens around a handful of facts, and a small model
learns exact retrieval in minutes instead of first learning to spell. The words are
made up but pronounceable, so prompts and answers stay readable in the demo.

The list is built from fixed rules, not a random generator: the same ids on every
machine and numpy version, forever (the shipped weights depend on them).
"""

from __future__ import annotations

import json
from pathlib import Path

SPECIAL = ("<pad>", "<unk>", "<bos>", "<eos>")
STRUCTURE = ("=", ".", "?", "key", "value", "the", "passkey", "is", "var", "most", "frequent")
NUMBERS = tuple(f"{i:03d}" for i in range(1000))

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_SYLLABLES = [c + v for c in _CONSONANTS for v in _VOWELS]  # 70


def _names(count: int) -> tuple[str, ...]:
    """CVCV words (keys, variables, candidates), strided through all 4900 so they look varied."""
    combos = [a + b for a in _SYLLABLES for b in _SYLLABLES]
    return tuple(combos[(i * 37) % len(combos)] for i in range(count))


def _fillers(count: int) -> tuple[str, ...]:
    """CVC words for the haystack: never a name, so a name in the context is always a fact."""
    combos = [s + c for s in _SYLLABLES for c in "hjwxy"]
    return tuple(combos[(i * 13) % len(combos)] for i in range(count))


NAMES = _names(512)
FILLERS = _fillers(128)

VOCAB_SIZE = 1664  # the words below padded to a multiple of 64 with unused tokens
WORDS: tuple[str, ...] = SPECIAL + STRUCTURE + NUMBERS + NAMES + FILLERS
WORDS = WORDS + tuple(f"<unused{i}>" for i in range(VOCAB_SIZE - len(WORDS)))
assert len(set(WORDS)) == VOCAB_SIZE, "vocabulary words must be unique"

ID = {w: i for i, w in enumerate(WORDS)}
PAD, UNK, BOS, EOS = (ID[w] for w in SPECIAL)
NUMBER_BASE = ID["000"]
NAME_BASE = ID[NAMES[0]]
FILLER_BASE = ID[FILLERS[0]]


def decode(ids) -> str:
    return " ".join(WORDS[int(i)] for i in ids)


def encode(text: str) -> list[int]:
    """Whitespace-split words to ids (no BOS); unknown words raise, since a silent <unk> hides typos."""
    return [ID[w] for w in text.split()]


def tokenizer_json() -> str:
    """An HF ``tokenizers`` WordLevel tokenizer over ``WORDS`` that prepends <bos>, as the model expects."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS)])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tok.add_special_tokens(list(SPECIAL))
    return tok.to_str(pretty=False)


def write_tokenizer(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.json").write_text(tokenizer_json())
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}, indent=2))
