"""The ``logprobs`` object of an OpenAI (legacy) completion choice, built token by token.

``{"tokens": [...], "token_logprobs": [...], "top_logprobs": [{text: logprob}, ...],
"text_offset": [...]}``: one entry per token, prompt tokens first under ``echo`` (the first
prompt token has no logprob: null, as OpenAI answers). ``top_logprobs`` holds the ``n``
likeliest tokens and the chosen one (vLLM's convention), keyed by their text; two tokens with
the same text (incomplete UTF-8 bytes, say) share a key and the likelier stays.
"""

from __future__ import annotations

from fluxion_dist.model.tokenizer import Tokenizer
from fluxion_dist.sampling import TokenLogprobs


class LogprobsBuilder:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tok = tokenizer
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top_logprobs: list[dict[str, float] | None] = []
        self.text_offset: list[int] = []
        self._offset = 0
        self._taken = 0

    def add(self, token: int, lp: TokenLogprobs | None) -> None:
        text = self.tok.decode([token])
        self.tokens.append(text)
        self.text_offset.append(self._offset)
        self._offset += len(text)
        self.token_logprobs.append(lp.logprob if lp is not None else None)
        if lp is None:
            self.top_logprobs.append(None)
            return
        top: dict[str, float] = {}
        for t, v in ((token, lp.logprob), *lp.top):
            key = self.tok.decode([t])
            top[key] = max(v, top.get(key, v))
        self.top_logprobs.append(dict(sorted(top.items(), key=lambda kv: -kv[1])))

    def body(self, start: int = 0) -> dict:
        return {"tokens": self.tokens[start:], "token_logprobs": self.token_logprobs[start:],
                "top_logprobs": self.top_logprobs[start:], "text_offset": self.text_offset[start:]}

    @property
    def pending(self) -> bool:
        return self._taken < len(self.tokens)

    def take(self) -> dict:
        """The entries since the last ``take`` (a streamed chunk's share)."""
        out, self._taken = self.body(self._taken), len(self.tokens)
        return out
