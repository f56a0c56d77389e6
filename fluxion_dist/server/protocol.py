"""OpenAI-compatible request and response bodies for ``/v1/completions``.

Unknown fields are ignored (OpenAI clients send some we do not use); the fields we do use
are validated and a bad one becomes an HTTP 400 naming the field.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

from fluxion_dist.sampling import MAX_LOGPROBS, MAX_SEED, MIN_TEMPERATURE

MAX_STOP_STRINGS = 4


class StreamOptions(BaseModel):
    include_usage: bool = False


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str
    # a one-element list of token-id lists is what lm-evaluation-harness's local-completions sends
    prompt: str | list[StrictInt] | list[str] | list[list[StrictInt]]
    max_tokens: StrictInt = Field(default=16, ge=0)  # 0 only with echo: score the prompt, generate nothing
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: StrictInt | None = Field(default=None, ge=0, le=MAX_SEED)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    n: Literal[1] = 1
    ignore_eos: bool = False
    return_token_ids: bool = False  # vLLM's extension: the completion's token ids beside its text
    # This server's extension (an OpenAI client sends it as extra_body): the request's own decode
    # attention, {"policy": "full" | the deployment's, "budget": fraction of the KV}; the app
    # validates it against the deployment (policy.resolve_request_sparse) and reports it in usage.
    sparse: dict | None = None
    # the chosen token's logprob and the n likeliest alternatives, per token (raw model logits)
    logprobs: StrictInt | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False  # the prompt's text (and with logprobs, its tokens' logprobs) before the completion
    # Accepted only at their no-op values; anything else is a 400 naming the field (see _unsupported).
    best_of: int | None = None
    suffix: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict | None = None

    @field_validator("temperature")
    @classmethod
    def _temperature_floor(cls, v):
        if 0 < v < MIN_TEMPERATURE:
            raise ValueError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else v
        if stops is not None:
            if len(stops) > MAX_STOP_STRINGS:
                raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
            if any(s == "" for s in stops):
                raise ValueError("stop strings must not be empty")
        return v

    @model_validator(mode="after")
    def _unsupported(self):
        bad = {"best_of": self.best_of not in (None, 1), "suffix": bool(self.suffix),
               "presence_penalty": self.presence_penalty != 0, "frequency_penalty": self.frequency_penalty != 0,
               "logit_bias": bool(self.logit_bias)}
        for name, is_set in bad.items():
            if is_set:
                raise UnsupportedParameter(name)
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens must be at least 1 (0 only with echo, to score the prompt)")
        return self

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list) and v and isinstance(v[0], (str, list)):
            if len(v) != 1:
                raise ValueError("batched prompts are not supported; send one prompt per request")
            v = v[0]
        if isinstance(v, (str, list)) and len(v) == 0:
            raise ValueError("prompt must not be empty")
        return v

    @property
    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class UnsupportedParameter(ValueError):
    """A request field this server accepts only at its default; the app answers 400 naming it."""

    def __init__(self, param: str) -> None:
        self.param = param
        super().__init__(f"{param} is not supported by this server")


def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: int = 400) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def completion_chunk(cid: str, model: str, text: str, finish_reason: str | None,
                     created: int | None = None, logprobs: dict | None = None) -> dict:
    return {
        "id": cid, "object": "text_completion", "created": created or int(time.time()), "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}],
    }


def usage(prompt_tokens: int, completion_tokens: int, sparse: dict | None = None) -> dict:
    out = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
           "total_tokens": prompt_tokens + completion_tokens}
    if sparse is not None:
        out["sparse"] = sparse
    return out
