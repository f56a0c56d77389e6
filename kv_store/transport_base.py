"""What the transfer protocol needs from a network: tagged messages between endpoints.

The sender and the server (``sender.py``, ``server.py``) are written once against
these two classes; ``ucx_transport.py`` implements them with UCXX and
``fake_transport.py`` in-process for tests. Semantics follow UCX tag matching:

- a message goes to the peer's *worker* and is matched by tag, in order per tag;
- ``send`` completes once the message was taken (for bulk, once the peer received it);
- a message larger than the posted buffer fails the receive with ``MessageTruncated``;
  a shorter one completes it silently (frames carry their own length);
- ``abort`` cancels this endpoint's posted receives (``OperationCanceled``); nothing is
  told to the peer, which finds out by its heartbeat timeout.

Tags (64 bits): connection id (high 32, chosen by the sender) | channel (low 32).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Union

import numpy as np

from kv_store import wire
from kv_store.auth import FrameKey
from kv_store.errors import BadAddress
from kv_store.loop_thread import EventLoopThread

Buffer = Union[np.ndarray, bytearray, bytes]

RESERVED_CONN = 0xFFFF_FFFF
HELLO_TAG = (RESERVED_CONN << 32) | 1
"""Worker-level tag of HELLO frames: the one message a server takes from anyone."""

_CTRL, _REPLY, _DATA = 1, 2, 0x8000_0000


def valid_conn_id(conn_id: int) -> bool:
    return 0 < conn_id < RESERVED_CONN


def ctrl_tag(conn_id: int) -> int:
    """Frames sender -> server."""
    return (conn_id << 32) | _CTRL


def reply_tag(conn_id: int) -> int:
    """Frames server -> sender."""
    return (conn_id << 32) | _REPLY


def data_tag(conn_id: int, seq: int) -> int:
    """Bulk message ``seq`` of a connection (31 bits, wrapping: far more than are ever in flight)."""
    return (conn_id << 32) | _DATA | (seq & 0x7FFF_FFFF)


def is_data_tag(tag: int) -> bool:
    """Whether ``tag`` is a bulk message's (not a frame's)."""
    return bool(tag & _DATA) and (tag >> 32) != RESERVED_CONN


class Endpoint(ABC):
    """A connection to one peer's worker. Call only from the fabric's loop thread."""

    @abstractmethod
    async def send(self, buf: Buffer, tag: int) -> None: ...

    @abstractmethod
    async def recv(self, buf: Buffer, tag: int) -> None:
        """Receive into ``buf`` (contiguous, writable), canceled when this endpoint aborts."""

    @abstractmethod
    def abort(self) -> None: ...

    @property
    @abstractmethod
    def closed(self) -> bool: ...

    async def recv_frame(self, buf: bytearray, tag: int, key: FrameKey, seq: int) -> "wire.Frame":
        """Receive frame ``seq`` of channel ``tag`` into ``buf`` (``wire.MAX_FRAME_BYTES``),
        check its tag under ``key`` and decode it."""
        # A short message must not be read with the previous frame's prefix.
        buf[:wire.PREFIX.size] = bytes(wire.PREFIX.size)
        await self.recv(buf, tag)
        return wire.decode(buf, key, tag, seq)


class Fabric(ABC):
    """This process's worker: its address, endpoints to others, and its event loop."""

    loop: EventLoopThread

    @abstractmethod
    def address(self) -> bytes:
        """Bytes a peer passes to ``connect`` (exchanged out of band, e.g. through Ray)."""

    @abstractmethod
    async def connect(self, address: bytes) -> Endpoint: ...

    def check_address(self, address: bytes) -> None:
        """Raise ``BadAddress`` unless ``address`` may be handed to ``connect``: the server calls
        this on an authenticated HELLO's address before the fabric parses it."""
        if not 0 < len(address) <= wire.MAX_ADDRESS:
            raise BadAddress(f"worker address of {len(address)} bytes; allowed 1..{wire.MAX_ADDRESS}")

    @abstractmethod
    async def recv_any(self, buf: Buffer, tag: int) -> None:
        """Receive a message with ``tag`` from any peer (HELLO frames)."""
