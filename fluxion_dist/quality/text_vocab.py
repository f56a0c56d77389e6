"""A model's BPE tokenizer bound to the natural-text corpus, as the RULER tasks use them.

The haystacks of ``ruler_tasks`` are spans of the corpus (Austen, the KJV) in token space, and
facts are spliced in between tokens. Splicing only where the byte-level
pre-tokenizer itself splits (before a token that begins with a space, after a
sentence end) keeps a sample's token ids equal to what the tokenizer makes of its
decoded text, so the demo's prompts, sent as text, reach the model as the same
tokens the evaluation measured.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fluxion_dist.quality.corpus import CORPUS_DIR, SOURCES, SPECIAL, load_paragraphs

EOA_TOKEN = "<eoa>"
_SPACE = "\u0120"  # byte-level BPE spells a leading space as this character
_NEWLINE = "\u010a"
_SENTENCE_END = (".", "!", "?", '."', '!"', '?"', ".'", "!'", "?'")
# every HELDOUT_EVERY-th paragraph (the last of each run) is never drawn into a training
# haystack, so the text loss on it measures language learnt rather than text memorised
HELDOUT_EVERY = 64


def is_text_tokenizer(model_dir: Path) -> bool:
    """Whether ``model_dir``'s tokenizer.json is a byte-level BPE with the end-of-answer token."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        return False
    spec = json.loads(path.read_text())
    return spec.get("model", {}).get("type") == "BPE" and any(
        t["content"] == EOA_TOKEN for t in spec.get("added_tokens", []))


@dataclass(frozen=True, eq=False)
class TextVocab:
    """``tokenizer`` (HF ``tokenizers.Tokenizer``) plus the corpus tokenized with it.

    ``corpus``: every paragraph's ids, joined by the newline token. ``paragraph_starts``:
    positions that begin a paragraph. ``sentence_starts``: positions whose token begins
    with a space and follows a sentence end (where a fact sentence may be spliced in).
    ``word_starts``: positions whose token begins with a space (where a word may be).
    ``spaced`` / ``ends_sentence``: per vocabulary id, whether the token begins with a
    space / ends a sentence (the same two tests on any token array, e.g. a training
    haystack). ``heldout``: per paragraph, whether training haystacks leave it out.
    """

    tokenizer: object
    source: Path
    corpus: np.ndarray
    paragraph_starts: np.ndarray
    sentence_starts: np.ndarray
    word_starts: np.ndarray
    span_starts: np.ndarray
    span_ends: np.ndarray
    spaced: np.ndarray
    ends_sentence: np.ndarray
    heldout: np.ndarray
    bos: int
    eoa: int
    newline: int

    def encode(self, text: str) -> np.ndarray:
        """Ids of ``text`` without <bos>."""
        return np.asarray(self.tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def decode(self, ids) -> str:
        """Text of ``ids``; special tokens (<bos>, <eoa>) are left out."""
        return self.tokenizer.decode([int(i) for i in ids])

    def encode_prompt(self, text: str) -> np.ndarray:
        """What the serving tokenizer makes of a prompt: <bos> and the text's ids."""
        return np.asarray(self.tokenizer.encode(text).ids, dtype=np.int64)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()


def _cache_path(tokenizer_bytes: bytes, corpus_bytes: bytes) -> Path:
    digest = hashlib.sha256(tokenizer_bytes + corpus_bytes).hexdigest()[:20]
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fluxion_dist"
    return root / f"quality_corpus_{digest}.npy"


def _tokenize_corpus(tok, tokenizer_bytes: bytes, corpus_paths: tuple[Path, ...]) -> np.ndarray:
    """The corpus' ids (uint16), cached on disk: tokenizing it takes seconds, a test run needs it often."""
    cache = _cache_path(tokenizer_bytes, b"".join(p.read_bytes() for p in corpus_paths))
    if cache.is_file():
        return np.load(cache)
    newline = tok.token_to_id(_NEWLINE)
    ids: list[int] = []
    for enc in tok.encode_batch(load_paragraphs(corpus_paths), add_special_tokens=False):
        ids += enc.ids
        ids.append(newline)
    out = np.asarray(ids, dtype=np.uint16)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(tmp, out)
        tmp.replace(cache)
    except OSError:
        pass  # a read-only home only costs the tokenization next time
    return out


def load_text_vocab(tokenizer_dir: Path = CORPUS_DIR, corpus_paths: tuple[Path, ...] = SOURCES) -> TextVocab:
    """The BPE of ``tokenizer_dir`` over the corpus; one per process and resolved paths."""
    return _load(Path(tokenizer_dir).resolve(), tuple(Path(p).resolve() for p in corpus_paths))


@functools.cache
def _load(tokenizer_dir: Path, corpus_paths: tuple[Path, ...]) -> TextVocab:
    from tokenizers import Tokenizer

    path = Path(tokenizer_dir) / "tokenizer.json"
    raw = path.read_bytes()
    tok = Tokenizer.from_str(raw.decode("utf-8"))
    ids = {s: tok.token_to_id(s) for s in SPECIAL}
    if ids[EOA_TOKEN] is None or ids["<bos>"] is None:
        raise ValueError(f"{path}: a text task tokenizer needs <bos> and {EOA_TOKEN} tokens")
    corpus = _tokenize_corpus(tok, raw, corpus_paths).astype(np.int64)
    pieces = [tok.id_to_token(i) for i in range(tok.get_vocab_size())]
    spaced = np.array([p.startswith(_SPACE) for p in pieces])
    ends = np.array([p.endswith(_SENTENCE_END) for p in pieces])
    newline = tok.token_to_id(_NEWLINE)
    after_nl = np.flatnonzero(corpus[:-1] == newline) + 1
    word = np.flatnonzero(spaced[corpus])
    word = word[word > 0]
    sentence = word[ends[corpus[word - 1]]]
    paragraphs = np.concatenate([[0], after_nl])
    span_ends = np.zeros(corpus.size + 1, dtype=bool)
    span_ends[word] = True
    span_ends[paragraphs] = True
    span_starts = np.flatnonzero(span_ends)
    span_ends[np.flatnonzero(corpus == newline)] = True  # before a paragraph break
    span_ends[corpus.size] = True
    heldout = np.arange(paragraphs.size) % HELDOUT_EVERY == HELDOUT_EVERY - 1
    return TextVocab(tok, path, corpus, paragraphs, sentence, word, span_starts, span_ends, spaced, ends,
                     heldout, ids["<bos>"], ids[EOA_TOKEN], newline)
