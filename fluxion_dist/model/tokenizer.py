"""Tokenizers: bytes for the tiny default model, an HF ``tokenizer.json`` when a checkpoint has one."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from fluxion_dist.errors import ModelLoadError


class Tokenizer(Protocol):
    vocab_size: int
    eos_token_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; 256 is BOS and 257 is EOS."""

    BOS = 256
    EOS = 257
    vocab_size = 258
    eos_token_id = EOS

    def encode(self, text: str) -> list[int]:
        return [self.BOS, *text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    def __init__(self, path: Path, eos_token_id: int | None) -> None:
        from tokenizers import Tokenizer as _Tok

        try:
            self._tok = _Tok.from_file(str(path))
        except Exception as e:  # the tokenizers library raises a bare Exception on bad files
            raise ModelLoadError(f"{path}: unreadable tokenizer ({e})") from None
        self.vocab_size = self._tok.get_vocab_size()
        self.eos_token_id = eos_token_id

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)


def load_tokenizer(checkpoint: Path | None, eos_token_id: int | None) -> Tokenizer:
    if checkpoint is not None and (checkpoint / "tokenizer.json").is_file():
        return HFTokenizer(checkpoint / "tokenizer.json", eos_token_id)
    return ByteTokenizer()
