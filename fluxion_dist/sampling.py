"""Next-token choice: greedy at temperature 0, else temperature + top-p with a per-request seed."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# torch.Generator.manual_seed takes a 64-bit value; the API keeps seeds non-negative and signed-safe.
MAX_SEED = 2**63 - 1
# Below this, logits / temperature overflows float32 and softmax gives inf/nan.
MIN_TEMPERATURE = 1e-2
# OpenAI's completions API allows at most this many alternatives per token.
MAX_LOGPROBS = 5


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; n >= 0: the chosen token's and the n likeliest


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    """The model's log-probability of a chosen token and its ``n`` likeliest alternatives, from
    the raw logits (before temperature and top-p, as OpenAI and vLLM report them)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token, logprob), likeliest first


def token_logprobs(logits: torch.Tensor, token: int, n: int) -> TokenLogprobs:
    logp = torch.log_softmax(logits.float(), dim=-1)
    top = logp.topk(n) if n > 0 else None
    pairs = tuple(zip(top.indices.tolist(), top.values.tolist())) if top is not None else ()
    return TokenLogprobs(token, float(logp[token]), pairs)


class Sampler:
    """Holds a request's generator so a seeded request is reproducible across workers."""

    def __init__(self, params: SamplingParams) -> None:
        t = params.temperature
        if not (t == 0 or (math.isfinite(t) and t >= MIN_TEMPERATURE)):
            raise ValueError(f"temperature must be 0 or a finite value >= {MIN_TEMPERATURE}, not {t}")
        if not 0 < params.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], not {params.top_p}")
        if params.seed is not None and not 0 <= params.seed <= MAX_SEED:
            raise ValueError(f"seed must be in [0, {MAX_SEED}], not {params.seed}")
        if params.logprobs is not None and not 0 <= params.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], not {params.logprobs}")
        self.params = params
        self._gen = None
        if params.temperature > 0:
            self._gen = torch.Generator()
            if params.seed is not None:
                self._gen.manual_seed(params.seed)
            else:
                self._gen.seed()

    def __call__(self, logits: torch.Tensor) -> int:
        p = self.params
        if p.temperature == 0:
            return int(logits.argmax())
        probs = torch.softmax(logits.float() / p.temperature, dim=-1)
        if p.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            keep = sorted_p.cumsum(0) - sorted_p < p.top_p  # always keeps the top token
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
        return int(torch.multinomial(probs, 1, generator=self._gen))
