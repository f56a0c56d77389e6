"""A tiny OpenAI-compatible streaming server on 127.0.0.1 with known delays, for loadgen tests.

``POST /v1/completions`` with ``stream: true`` waits ``first_token_s``, then
sends ``max_tokens`` SSE chunks of one word each, ``inter_token_s`` apart,
then a usage chunk (when ``stream_options.include_usage``) and ``[DONE]``.
A prompt containing ``fail_marker`` gets an HTTP 500. It runs its own event
loop in a daemon thread, so a test can drive it from synchronous code.
"""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass, field

from aiohttp import web

MODEL = "fake-model"


@dataclass
class FakeServer:
    first_token_s: float = 0.1
    inter_token_s: float = 0.02
    fail_marker: str = "PLEASE_FAIL"
    requests: list[dict] = field(default_factory=list)
    max_in_flight: int = 0
    port: int = 0
    _in_flight: int = 0
    _loop: asyncio.AbstractEventLoop | None = None
    _runner: web.AppRunner | None = None
    _thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        if self.fail_marker in body.get("prompt", ""):
            return web.json_response({"error": {"message": "asked to fail"}}, status=500)
        self._in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self._in_flight)
        try:
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            n = int(body.get("max_tokens", 16))
            await asyncio.sleep(self.first_token_s)
            for i in range(n):
                if i:
                    await asyncio.sleep(self.inter_token_s)
                chunk = {"id": "cmpl-fake", "object": "text_completion", "model": MODEL,
                         "choices": [{"index": 0, "text": f" w{i}",
                                      "finish_reason": "length" if i == n - 1 else None}]}
                await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
            if (body.get("stream_options") or {}).get("include_usage"):
                prompt_tokens = len(body.get("prompt", "").split())
                usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n,
                         "total_tokens": prompt_tokens + n}
                await resp.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        finally:
            self._in_flight -= 1

    async def _start(self, ready: threading.Event) -> None:
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/completions", self._completions)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        ready.set()

    def start(self) -> "FakeServer":
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        def serve() -> None:
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(self._start(ready))
            self._loop.run_forever()

        self._thread = threading.Thread(target=serve, name="fake-openai", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fake server did not start")
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        self._loop = None
