"""What to send: prompts of a chosen length and the number of tokens to ask for.

Lengths are fixed (``128``) or uniform in a closed range (``64:256``), or
come from a JSONL file. Without the server's tokenizer a prompt length can
only be approximate, so the unit is chosen with ``--tokenizer``:

* ``words``: N common English words, each about one token in BPE vocabularies;
* ``bytes``: N ASCII characters, exact for byte-level tokenizers (the tiny
  demo model);
* a ``tokenizer.json`` path: N token ids decoded and re-encoded, exact as far
  as the tokenizer round-trips (a few top-ups where it merges tokens).

The server's ``usage.prompt_tokens``, when it reports one, replaces the
estimate in the results.
"""

from __future__ import annotations

import json
import random
import string
from dataclasses import dataclass
from pathlib import Path

_WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from "
    "or one had by word but not what all were we when your can said there use an each which "
    "she do how their if will up other about out many then them these so some her would make "
    "like him into time has look two more write go see number no way could people my than first "
    "water been call who oil its now find long down day did get come made may part over new "
    "sound take only little work know place year live me back give most very after thing our "
    "just name good sentence man think say great where help through much before line right too "
    "mean old any same tell boy follow came want show also around form three small set put end "
    "does another well large must big even such because turn here why ask went men read need "
    "land different home us move try kind hand picture again change off play spell air away"
).split()
MAX_LENGTH = 1_000_000


class WorkloadError(ValueError):
    """A length spec, tokenizer or JSONL file that cannot be used."""


@dataclass(frozen=True, slots=True)
class RequestSpec:
    prompt: str
    prompt_len: int  # in the chosen unit; the server's count replaces it when reported
    output_len: int  # max_tokens sent with the request


@dataclass(frozen=True, slots=True)
class LengthSpec:
    """A fixed length or a closed uniform range, parsed from ``N`` or ``LOW:HIGH``."""

    low: int
    high: int

    @classmethod
    def parse(cls, text: str) -> "LengthSpec":
        parts = text.split(":")
        try:
            low, high = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (None, None)
        except ValueError:
            low = high = None
        if low is None or high is None or not 1 <= low <= high <= MAX_LENGTH:
            raise WorkloadError(f"length {text!r}: expected N or LOW:HIGH with 1 <= LOW <= HIGH <= {MAX_LENGTH}")
        return cls(low, high)

    def sample(self, rng: random.Random) -> int:
        return self.low if self.low == self.high else rng.randint(self.low, self.high)


class PromptMaker:
    """Builds a prompt of a given length in one of the units described above."""

    def __init__(self, unit: str):
        self.unit = unit
        self._tokenizer = None
        if unit not in ("words", "bytes"):
            path = Path(unit)
            if not path.is_file():
                raise WorkloadError(f"--tokenizer {unit!r}: not 'words', 'bytes' or a tokenizer.json file")
            try:
                from tokenizers import Tokenizer
            except ImportError as e:
                raise WorkloadError("--tokenizer FILE needs the 'tokenizers' package") from e
            self._tokenizer = Tokenizer.from_file(str(path))

    def make(self, length: int, rng: random.Random) -> str:
        if self.unit == "words":
            return " ".join(rng.choice(_WORDS) for _ in range(length))
        if self.unit == "bytes":
            alphabet = string.ascii_lowercase + " "
            return "".join(rng.choice(alphabet) for _ in range(length))
        vocab = self._tokenizer.get_vocab_size()
        ids: list[int] = []
        # Decoding then re-encoding can merge tokens: top up and retry a few times.
        for _ in range(10):
            ids += [rng.randrange(vocab) for _ in range(length - len(ids))]
            text = self._tokenizer.decode(ids)
            ids = self._tokenizer.encode(text, add_special_tokens=False).ids[:length]
            if len(ids) == length:
                break
        return self._tokenizer.decode(ids)

    def count(self, prompt: str) -> int:
        if self.unit == "words":
            return len(prompt.split())
        if self.unit == "bytes":
            return len(prompt.encode())
        return len(self._tokenizer.encode(prompt, add_special_tokens=False).ids)


def synthetic_requests(n: int, input_len: LengthSpec, output_len: LengthSpec,
                       maker: PromptMaker, seed: int) -> list[RequestSpec]:
    rng = random.Random(seed)
    specs = []
    for _ in range(n):
        length = input_len.sample(rng)
        specs.append(RequestSpec(maker.make(length, rng), length, output_len.sample(rng)))
    return specs


_OUTPUT_KEYS = ("output_len", "max_tokens", "output_tokens")


def jsonl_requests(path: Path, n: int, output_len: LengthSpec, maker: PromptMaker,
                   seed: int) -> list[RequestSpec]:
    """``{"prompt": str, "output_len"|"max_tokens"|"output_tokens": int}`` per line, cycled to n."""
    rng = random.Random(seed)
    rows = []
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise WorkloadError(f"{path}:{lineno}: not JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"]:
                raise WorkloadError(f"{path}:{lineno}: needs a non-empty string 'prompt'")
            out = next((row[k] for k in _OUTPUT_KEYS if k in row), None)
            if out is not None and (not isinstance(out, int) or out < 1):
                raise WorkloadError(f"{path}:{lineno}: output length must be a positive integer, got {out!r}")
            rows.append((row["prompt"], out))
    if not rows:
        raise WorkloadError(f"{path}: no requests")
    specs = []
    for i in range(n):
        prompt, out = rows[i % len(rows)]
        specs.append(RequestSpec(prompt, maker.count(prompt), out or output_len.sample(rng)))
    return specs
