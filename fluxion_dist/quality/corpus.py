"""The shipped natural-text corpus (``data/quality_corpus``: one file per source, see its
SOURCE.md) and the BPE tokenizer trained on it."""

from __future__ import annotations

import json
import lzma
from pathlib import Path

CORPUS_DIR = Path(__file__).resolve().parents[1] / "data" / "quality_corpus"
SPECIAL = ("<pad>", "<unk>", "<bos>", "<eos>", "<eoa>")  # <eoa>: end of answer


SOURCES = (CORPUS_DIR / "austen.txt.xz", CORPUS_DIR / "kjv.txt.xz")
"""The corpus, in order: the six Austen novels, then the King James Bible."""


def load_paragraphs(paths: Path | tuple[Path, ...] = SOURCES) -> list[str]:
    """The paragraphs of one source file, or of several in order."""
    paths = (paths,) if isinstance(paths, Path) else paths
    return [line for path in paths for line in lzma.decompress(path.read_bytes()).decode("utf-8").splitlines()]


def train_tokenizer(paragraphs: list[str], vocab_size: int = 6144):
    """Byte-level BPE (HF ``tokenizers``), ids 0-4 the special tokens, <bos> prepended on encode."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(paragraphs, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return tok


def write_tokenizer(tok, path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<bos>", "eos_token": "<eoa>", "pad_token": "<pad>", "unk_token": "<unk>"}, indent=2))
