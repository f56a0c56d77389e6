"""The OpenAI-compatible HTTP API: ``/v1/completions`` (SSE streaming or not), ``/v1/models``,
``/health``, ``/metrics``. It tokenizes, validates and streams; a :class:`Backend` does the rest."""

from __future__ import annotations

import json
import time
from typing import AsyncIterator, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from fluxion_dist.config.schema import ServerConfig
from fluxion_dist.model.tokenizer import Tokenizer
from fluxion_dist.sampling import SamplingParams
from fluxion_dist.server.errors import AdmissionRefused, WorkerFailed
from fluxion_dist.server.protocol import (CompletionRequest, completion_chunk, completion_id, error_body,
                                          usage)


class Backend(Protocol):
    def generate(self, request_id: str, prompt: list[int], params: SamplingParams) -> AsyncIterator[int]:
        """Yield the completion's token ids; raises AdmissionRefused or WorkerFailed."""

    async def health(self) -> dict: ...

    def metrics_text(self) -> bytes: ...


class _Detokenizer:
    """Turns the token stream into text deltas and stops at a stop string (not included)."""

    def __init__(self, tok: Tokenizer, stops: list[str]) -> None:
        self.tok, self.stops, self.ids, self.sent = tok, stops, [], ""
        self.stopped = False

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        for s in self.stops:
            at = text.find(s)
            if at >= 0:
                text, self.stopped = text[:at], True
        if text.endswith("\ufffd") and not self.stopped:
            return ""  # a multi-byte character is still incomplete
        delta, self.sent = text[len(self.sent):], text
        return delta


def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
    return JSONResponse(error_body(message, kind, param, status), status_code=status)


def build_app(cfg: ServerConfig, tokenizer: Tokenizer, backend: Backend) -> FastAPI:
    app = FastAPI(title="fluxion-dist", docs_url=None, redoc_url=None)

    @app.exception_handler(RequestValidationError)
    async def _bad_request(_: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"] if p != "body")
        return _error(400, f"{loc or 'body'}: {first['msg']}", param=loc or None)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if cfg.api_key and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization") != f"Bearer {cfg.api_key}":
                return _error(401, "missing or wrong bearer token", "authentication_error")
        return await call_next(request)

    @app.get("/health")
    async def health():
        state = await backend.health()
        return JSONResponse(state, status_code=200 if state.get("healthy") else 503)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(backend.metrics_text(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": cfg.served_model_name, "object": "model",
                                            "created": 0, "owned_by": "fluxion-dist"}]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        if req.model != cfg.served_model_name:
            return _error(404, f"model {req.model!r} does not exist; this server has {cfg.served_model_name!r}",
                          param="model")
        prompt = tokenizer.encode(req.prompt) if isinstance(req.prompt, str) else list(req.prompt)
        if any(not 0 <= t < tokenizer.vocab_size for t in prompt):
            return _error(400, f"prompt token ids must be in [0, {tokenizer.vocab_size})", param="prompt")
        if len(prompt) > cfg.max_prompt_tokens:
            return _error(400, f"prompt has {len(prompt)} tokens; the limit is {cfg.max_prompt_tokens}",
                          param="prompt")
        if req.max_tokens > cfg.max_tokens:
            return _error(400, f"max_tokens {req.max_tokens} exceeds the limit {cfg.max_tokens}",
                          param="max_tokens")
        params = SamplingParams(req.max_tokens, req.temperature, req.top_p, req.seed, req.ignore_eos)
        cid, created = completion_id(), int(time.time())
        stream = backend.generate(cid, prompt, params)
        detok = _Detokenizer(tokenizer, req.stop_strings)
        try:  # admission and prefill failures surface before the first token, as a status code
            first = await anext(stream)
        except StopAsyncIteration:
            first = None
        except AdmissionRefused as e:
            return _error(429, str(e), "rate_limit_error")
        except WorkerFailed as e:
            return _error(503, str(e), "server_error")

        async def tokens() -> AsyncIterator[int]:
            if first is not None:
                yield first
            async for t in stream:
                yield t

        def finish_reason(n: int) -> str:
            return "stop" if detok.stopped or n < req.max_tokens else "length"

        if not req.stream:
            n = 0
            try:
                async for t in tokens():
                    n += 1
                    detok.push(t)
                    if detok.stopped:
                        break
            except WorkerFailed as e:
                return _error(503, str(e), "server_error")
            finally:
                await stream.aclose()
            body = completion_chunk(cid, req.model, detok.sent, finish_reason(n), created)
            body["usage"] = usage(len(prompt), n)
            if req.return_token_ids:
                body["choices"][0]["token_ids"] = detok.ids
            return body

        async def sse() -> AsyncIterator[bytes]:
            n = 0
            try:
                async for t in tokens():
                    n += 1
                    delta = detok.push(t)
                    if delta:
                        yield _sse(completion_chunk(cid, req.model, delta, None, created))
                    if detok.stopped:
                        break
                yield _sse(completion_chunk(cid, req.model, "", finish_reason(n), created))
                if req.stream_options and req.stream_options.include_usage:
                    tail = completion_chunk(cid, req.model, "", None, created)
                    tail["choices"], tail["usage"] = [], usage(len(prompt), n)
                    yield _sse(tail)
            except WorkerFailed as e:
                yield _sse(error_body(str(e), "server_error", code=503))
            finally:
                await stream.aclose()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    return app


def _sse(obj: dict) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()
