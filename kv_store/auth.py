"""The deployment's shared secret and the frame tags (HMAC-SHA256) it proves.

Every control frame carries a tag over the channel it travels on (the 64-bit UCX tag), its
index on that channel (frames of a channel arrive in order, so both ends count them), its
fixed prefix and its body, under the deployment's secret. A frame from outside the
deployment, replayed onto another connection or direction, or replayed later on its own
channel, fails the tag check and is dropped before msgpack sees its body. Bulk messages are not tagged: they land only in pages
an authenticated OFFER reserved, at sizes the LAYER frame announced.

The secret is made once per deployment (``new_secret``), handed to the workers through Ray
as an actor argument and kept in a ``FrameKey``, which never shows it (repr, logs).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

TAG_BYTES = 32
MIN_SECRET_BYTES = 16


def new_secret() -> bytes:
    """A fresh deployment secret (32 random bytes)."""
    return secrets.token_bytes(32)


class FrameKey:
    """Computes and checks frame tags under one secret."""

    __slots__ = ("_key",)

    def __init__(self, secret: bytes) -> None:
        if type(secret) is not bytes or len(secret) < MIN_SECRET_BYTES:
            got = f"{len(secret)} bytes" if isinstance(secret, (bytes, bytearray)) else type(secret).__name__
            raise ValueError(f"KV channel secret must be at least {MIN_SECRET_BYTES} bytes; got {got}")
        self._key = secret

    def tag(self, channel: int, seq: int, *parts: bytes | memoryview) -> bytes:
        mac = hmac.new(self._key, channel.to_bytes(8, "little") + seq.to_bytes(8, "little"), hashlib.sha256)
        for part in parts:
            mac.update(part)
        return mac.digest()

    def verify(self, channel: int, seq: int, tag: bytes | memoryview, *parts: bytes | memoryview) -> bool:
        return hmac.compare_digest(self.tag(channel, seq, *parts), bytes(tag))

    def __repr__(self) -> str:
        return "FrameKey(<secret>)"

    def __reduce__(self):
        raise TypeError("a FrameKey is not serialisable: pass the secret bytes to the process that needs it")
