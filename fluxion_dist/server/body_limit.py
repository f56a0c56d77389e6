"""The request body's size limit, enforced before the body is read in full (HTTP 413)."""

from __future__ import annotations

import json

from fluxion_dist.server.protocol import error_body


class BodyLimit:
    """ASGI wrapper: 413 for a body over ``limit`` bytes, by Content-Length or while it streams in."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await _send_413(send, self.limit)
        seen, started = 0, False

        async def send_tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _BodyTooLarge
            return message

        try:
            await self.app(scope, limited_receive, send_tracked)
        except _BodyTooLarge:
            if not started:
                await _send_413(send, self.limit)


class _BodyTooLarge(Exception):
    pass


async def _send_413(send, limit: int) -> None:
    body = json.dumps(error_body(f"request body exceeds {limit} bytes", "invalid_request_error", None,
                                 413)).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
