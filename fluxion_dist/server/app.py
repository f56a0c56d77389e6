"""The OpenAI-compatible HTTP API: ``/v1/completions`` (SSE streaming or not), ``/v1/models``,
``/health``, ``/metrics``. It tokenizes, validates and streams; a :class:`Backend` does the rest."""

from __future__ import annotations

import asyncio
import json
import time
from typing import AsyncIterator, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from fluxion_dist.config.schema import ServerConfig, SparseConfig
from fluxion_dist.model.tokenizer import Tokenizer
from fluxion_dist.policy.request import RequestSparse, RequestSparseError, resolve_request_sparse
from fluxion_dist.sampling import SamplingParams, TokenLogprobs
from fluxion_dist.server.body_limit import BodyLimit
from fluxion_dist.server.detokenizer import Detokenizer
from fluxion_dist.server.errors import AdmissionRefused, WorkerFailed
from fluxion_dist.server.logprobs import LogprobsBuilder
from fluxion_dist.server.protocol import (CompletionRequest, UnsupportedParameter, completion_chunk,
                                          completion_id, error_body, usage)
from fluxion_dist.server.stream import GeneratedToken, token_id, token_logprobs

# A prompt of N tokens is rarely more than this many characters; longer text is refused before
# the tokenizer sees it (tokenizing 50 MB blocks the router's event loop for seconds).
MAX_CHARS_PER_TOKEN = 16
# Request bodies above this many bytes get 413 before they are read in full.
BODY_BYTES_PER_TOKEN = 64
MIN_BODY_LIMIT = 1 << 20

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error"}


class Backend(Protocol):
    def generate(self, request_id: str, prompt: list[int], params: SamplingParams,
                 sparse: RequestSparse | None = None) -> AsyncIterator[int | GeneratedToken]:
        """Yield the completion's tokens; raises AdmissionRefused or WorkerFailed. ``sparse``: the
        request's own decode attention (None: the deployment's)."""

    def finished(self, request_id: str) -> None:
        """The app has all it wants (a stop string matched): closing the stream next is a normal finish."""

    async def prompt_logprobs(self, request_id: str, prompt: list[int], n: int) -> list[TokenLogprobs | None]:
        """Per prompt token, its logprob given the tokens before it and the ``n`` likeliest
        alternatives there (None for the first token); raises WorkerFailed."""

    async def health(self) -> dict: ...

    def metrics_text(self) -> bytes: ...


def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
    return JSONResponse(error_body(message, kind, param, status), status_code=status)


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _SparseUsage:
    """``usage.sparse``: the decode attention a request ran with and the KV fraction it read."""

    def __init__(self, deploy: SparseConfig, requested: RequestSparse | None) -> None:
        if requested is not None:
            self.policy, self.budget = requested.policy, requested.budget
        else:
            self.policy = deploy.policy
            self.budget = 1.0 if deploy.policy == "full" else deploy.budget
        self._sum, self._steps = 0.0, 0

    def add(self, item: int | GeneratedToken) -> None:
        if isinstance(item, GeneratedToken) and item.kv_fraction_read is not None:
            self._sum += item.kv_fraction_read
            self._steps += 1

    def body(self) -> dict:
        # averaged over the decode steps; None when there were none (a one-token completion)
        read = self._sum / self._steps if self._steps else None
        return {"policy": self.policy, "budget": self.budget, "kv_fraction_read": read}


def build_app(cfg: ServerConfig, tokenizer: Tokenizer, backend: Backend,
              sparse: SparseConfig | None = None) -> BodyLimit:
    """The API as an ASGI app: FastAPI behind the body-size limit. ``sparse``: the deployment's
    decode attention, which a request's ``sparse`` field is checked against."""
    deploy_sparse = sparse or SparseConfig()
    # The schema tells a caller what the API takes: behind a key, it is not public either.
    app = FastAPI(title="fluxion-dist", docs_url=None, redoc_url=None,
                  openapi_url=None if cfg.api_key else "/openapi.json")

    @app.exception_handler(RequestValidationError)
    async def _bad_request(_: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        cause = (first.get("ctx") or {}).get("error")
        if isinstance(cause, UnsupportedParameter):
            return _error(400, str(cause), param=cause.param)
        loc = ".".join(str(p) for p in first["loc"] if p != "body")
        return _error(400, f"{loc or 'body'}: {first['msg']}", param=loc or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException):
        kind = _ERROR_TYPES.get(exc.status_code, "server_error" if exc.status_code >= 500 else
                                "invalid_request_error")
        return _error(exc.status_code, str(exc.detail), kind)

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception):
        return _error(500, f"internal error: {type(exc).__name__}", "server_error")

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

    @app.post("/v1/chat/completions")
    async def chat_completions():
        # No shipped checkpoint's tokenizer carries a chat template; guessing one would answer
        # with a format the model never saw.
        return _error(400, "/v1/chat/completions needs the checkpoint's chat template, and this one ships "
                           "none; send the conversation as a text prompt to /v1/completions", param="messages")

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        if req.model != cfg.served_model_name:
            return _error(404, f"model {req.model!r} does not exist; this server has {cfg.served_model_name!r}",
                          param="model")
        if isinstance(req.prompt, str):
            if len(req.prompt) > cfg.max_prompt_tokens * MAX_CHARS_PER_TOKEN:
                return _error(400, f"prompt has {len(req.prompt)} characters, more than {cfg.max_prompt_tokens} "
                                   f"tokens can hold; the limit is {cfg.max_prompt_tokens} tokens", param="prompt")
            try:
                req.prompt.encode("utf-8")
            except UnicodeEncodeError as e:
                return _error(400, f"prompt is not valid Unicode text (lone surrogate at {e.start})",
                              param="prompt")
            for s in req.stop_strings:
                try:
                    s.encode("utf-8")
                except UnicodeEncodeError:
                    return _error(400, "stop strings must be valid Unicode text", param="stop")
        prompt = tokenizer.encode(req.prompt) if isinstance(req.prompt, str) else list(req.prompt)
        if any(not 0 <= t < tokenizer.vocab_size for t in prompt):
            return _error(400, f"prompt token ids must be in [0, {tokenizer.vocab_size})", param="prompt")
        if len(prompt) > cfg.max_prompt_tokens:
            return _error(400, f"prompt has {len(prompt)} tokens; the limit is {cfg.max_prompt_tokens}",
                          param="prompt")
        if req.max_tokens > cfg.max_tokens:
            return _error(400, f"max_tokens {req.max_tokens} exceeds the limit {cfg.max_tokens}",
                          param="max_tokens")
        try:
            request_sparse = resolve_request_sparse(deploy_sparse, req.sparse)
        except RequestSparseError as e:
            return _error(400, str(e), param="sparse")
        sparse_usage = _SparseUsage(deploy_sparse, request_sparse)
        params = SamplingParams(req.max_tokens, req.temperature, req.top_p, req.seed, req.ignore_eos, req.logprobs)
        cid, created = completion_id(), int(time.time())
        echo = "" if not req.echo else req.prompt if isinstance(req.prompt, str) else tokenizer.decode(prompt)
        lp = LogprobsBuilder(tokenizer) if req.logprobs is not None else None
        if lp is not None and req.echo:
            try:
                for t, scored in zip(prompt, await backend.prompt_logprobs(cid, prompt, req.logprobs)):
                    lp.add(t, scored)
            except WorkerFailed as e:
                return _error(503, str(e), "server_error")
        if req.max_tokens == 0:  # echo only: the prompt scored, nothing generated
            return _echo_only(cid, req, echo, lp, created, usage(len(prompt), 0, sparse_usage.body()))
        stream = backend.generate(cid, prompt, params, request_sparse)
        detok = Detokenizer(tokenizer, req.stop_strings)
        try:  # admission and prefill failures surface before the first token, as a status code
            first = await anext(stream)
        except StopAsyncIteration:
            first = None
        except AdmissionRefused as e:
            return _error(429, str(e), "rate_limit_error")
        except WorkerFailed as e:
            return _error(503, str(e), "server_error")

        def seen(item: int | GeneratedToken) -> int:
            sparse_usage.add(item)
            if lp is not None:
                lp.add(token_id(item), token_logprobs(item))
            return token_id(item)

        async def tokens() -> AsyncIterator[int]:
            if first is not None:
                yield seen(first)
            async for item in stream:
                yield seen(item)

        def chunk(text: str, finish: str | None = None) -> bytes:
            return _sse(completion_chunk(cid, req.model, text, finish, created,
                                         lp.take() if lp is not None and finish is None else None))

        def finish_reason(n: int) -> str:
            return "stop" if detok.stopped or n < req.max_tokens else "length"

        if not req.stream:
            n = 0

            async def collect() -> None:
                nonlocal n
                async for t in tokens():
                    n += 1
                    detok.push(t)
                    if detok.stopped:
                        backend.finished(cid)
                        break

            work, gone = asyncio.create_task(collect()), asyncio.create_task(_until_disconnect(request))
            try:  # a client that hangs up aborts its request (the stream's cleanup frees its pages)
                await asyncio.wait((work, gone), return_when=asyncio.FIRST_COMPLETED)
                if not work.done():
                    work.cancel()
                    await asyncio.gather(work, return_exceptions=True)
                    return _error(499, "client closed the request", "client_abort")
                work.result()
            except WorkerFailed as e:
                return _error(503, str(e), "server_error")
            finally:
                gone.cancel()
                await stream.aclose()
            text = echo + detok.sent + detok.flush()
            body = completion_chunk(cid, req.model, text, finish_reason(n), created,
                                    lp.body() if lp is not None else None)
            body["usage"] = usage(len(prompt), n, sparse_usage.body())
            if req.return_token_ids:
                body["choices"][0]["token_ids"] = detok.ids
            return body

        async def sse() -> AsyncIterator[bytes]:
            n = 0
            try:
                if echo:
                    yield chunk(echo)
                async for t in tokens():
                    n += 1
                    delta = detok.push(t)
                    if delta:
                        yield chunk(delta)
                    if detok.stopped:
                        backend.finished(cid)
                        break
                rest = detok.flush()
                if rest or (lp is not None and lp.pending):
                    yield chunk(rest)
                yield chunk("", finish_reason(n))
                if req.stream_options and req.stream_options.include_usage:
                    tail = completion_chunk(cid, req.model, "", None, created)
                    tail["choices"], tail["usage"] = [], usage(len(prompt), n, sparse_usage.body())
                    yield _sse(tail)
            except WorkerFailed as e:
                yield _sse(error_body(str(e), "server_error", code=503))
            finally:
                await stream.aclose()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    limit = max(MIN_BODY_LIMIT, cfg.max_prompt_tokens * BODY_BYTES_PER_TOKEN)
    return BodyLimit(app, limit)


def _sse(obj: dict) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


def _echo_only(cid: str, req: CompletionRequest, echo: str, lp: LogprobsBuilder | None, created: int,
               use: dict):
    """``max_tokens: 0`` with ``echo``: the prompt (and its logprobs) as the whole completion."""
    body = completion_chunk(cid, req.model, echo, "length", created, lp.body() if lp is not None else None)
    if not req.stream:
        body["usage"] = use
        return body

    async def sse() -> AsyncIterator[bytes]:
        yield _sse(body)
        if req.stream_options and req.stream_options.include_usage:
            tail = completion_chunk(cid, req.model, "", None, created)
            tail["choices"], tail["usage"] = [], use
            yield _sse(tail)
        yield b"data: [DONE]\n\n"

    return StreamingResponse(sse(), media_type="text/event-stream")
