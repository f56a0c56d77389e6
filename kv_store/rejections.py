"""What a KV server refused, counted by reason: every dropped frame and refused offer is seen
here (tests, the worker's health report), never only in a log line."""

from __future__ import annotations

import enum
import threading
from collections import Counter


class Rejected(enum.Enum):
    HELLO_MALFORMED = "hello_malformed"
    """Not a well-formed HELLO (size, magic, version, checksum, msgpack, schema, kind)."""
    HELLO_AUTH = "hello_auth"
    """A HELLO whose tag does not verify: its address never reaches UCX."""
    HELLO_ADDRESS = "hello_address"
    """An authenticated HELLO whose address the fabric will not parse."""
    HELLO_UNREACHABLE = "hello_unreachable"
    """An authenticated HELLO whose address could not be connected to."""
    HELLO_REFUSED = "hello_refused"
    """A bad or already used connection id, or the server shutting down."""
    FRAME_MALFORMED = "frame_malformed"
    """A frame on a connection that fails its checks: the connection is closed."""
    FRAME_AUTH = "frame_auth"
    """A frame on a connection whose tag does not verify: the connection is closed."""
    PROTOCOL = "protocol"
    """A well-formed frame that breaks the protocol: the connection is closed."""
    NOT_ADMITTED = "not_admitted"
    """An OFFER for a request id with no admission: refused, nothing reserved."""
    ADMISSION_EXPIRED = "admission_expired"
    """An admission whose OFFER did not come by its deadline: what it held is freed."""
    BULK_TAG = "bulk_tag"
    """A transfer whose bulk bytes do not match the sender's tags: failed, its pages freed."""


class Rejections:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[Rejected] = Counter()

    def count(self, reason: Rejected) -> None:
        with self._lock:
            self._counts[reason] += 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {r.value: self._counts[r] for r in Rejected}

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self._counts.values())
