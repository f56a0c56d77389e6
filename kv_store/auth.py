"""The deployment's shared secret and the frame tags (HMAC-SHA256) it proves.

Every control frame carries a tag over the channel it travels on (the 64-bit UCX tag), its
index on that channel (frames of a channel arrive in order, so both ends count them), its
fixed prefix and its body, under the deployment's secret. A frame from outside the
deployment, replayed onto another connection or direction, or replayed later on its own
channel, fails the tag check and is dropped before msgpack sees its body.

Bulk messages land only in pages an authenticated OFFER reserved, at sizes the LAYER frame
announced; their bytes are tagged per layer (``bulk_tag``: HMAC-SHA256 under a key derived
from the secret for bulk alone, over the connection, the transfer, the layer and every byte
of the layer's messages in order). The sender computes it while the layer is on the wire and
sends the tags in DONE; the receiver computes its own as each layer lands, and commits the
request only if every layer's matches: a corrupted or injected payload is never READY.

The secret is made once per deployment (``new_secret``), handed to the workers through Ray
as an actor argument and kept in a ``FrameKey``, which never shows it (repr, logs).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
from typing import Iterable

import numpy as np

TAG_BYTES = 32
MIN_SECRET_BYTES = 16
_BULK_CONTEXT = b"fluxion-dist kv bulk tag v1"
_BULK_HEAD = struct.Struct("<QQQ")  # connection id, transfer id, layer


def new_secret() -> bytes:
    """A fresh deployment secret (32 random bytes)."""
    return secrets.token_bytes(32)


class FrameKey:
    """Computes and checks frame tags under one secret."""

    __slots__ = ("_key", "_bulk_key")

    def __init__(self, secret: bytes) -> None:
        if type(secret) is not bytes or len(secret) < MIN_SECRET_BYTES:
            got = f"{len(secret)} bytes" if isinstance(secret, (bytes, bytearray)) else type(secret).__name__
            raise ValueError(f"KV channel secret must be at least {MIN_SECRET_BYTES} bytes; got {got}")
        self._key = secret
        # A key of its own for bulk, so no bulk tag can ever pass for a frame tag or back.
        self._bulk_key = hmac.new(secret, _BULK_CONTEXT, hashlib.sha256).digest()

    def tag(self, channel: int, seq: int, *parts: bytes | memoryview) -> bytes:
        mac = hmac.new(self._key, channel.to_bytes(8, "little") + seq.to_bytes(8, "little"), hashlib.sha256)
        for part in parts:
            mac.update(part)
        return mac.digest()

    def verify(self, channel: int, seq: int, tag: bytes | memoryview, *parts: bytes | memoryview) -> bool:
        return hmac.compare_digest(self.tag(channel, seq, *parts), bytes(tag))

    def bulk_tag(self, conn_id: int, xfer: int, layer: int, messages: Iterable[np.ndarray]) -> bytes:
        """The tag of one layer's bulk: every byte of ``messages`` (contiguous arrays, in the
        order they go on the wire) on connection ``conn_id``, transfer ``xfer``. Releases the
        GIL while it hashes (run it off the event loop)."""
        mac = hmac.new(self._bulk_key, _BULK_HEAD.pack(conn_id, xfer, layer), hashlib.sha256)
        for m in messages:
            mac.update(m.reshape(-1).view(np.uint8))
        return mac.digest()

    def __repr__(self) -> str:
        return "FrameKey(<secret>)"

    def __reduce__(self):
        raise TypeError("a FrameKey is not serialisable: pass the secret bytes to the process that needs it")
