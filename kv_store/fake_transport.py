"""An in-process network with UCX's tag semantics, for unit tests of the protocol.

Every fabric of one ``FakeHub`` shares the hub's loop thread, so matching needs no lock.
``FakeFabric.kill`` plays a process dying: its endpoints and posted operations vanish
without a word to anyone (as with UCX error handling off), and messages to it are
never taken, so its peers must notice through their heartbeat timeout.
``FakeFabric.flip_bulk_byte`` plays a payload corrupted (or replaced) in transit: one bulk
message this fabric sends arrives with one byte changed, the sender's memory untouched.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from dataclasses import dataclass, field

from kv_store.errors import MessageTruncated, OperationCanceled, TransportError
from kv_store.loop_thread import EventLoopThread
from kv_store.transport_base import Buffer, Endpoint, Fabric, is_data_tag


def _bytes_view(buf: Buffer) -> memoryview:
    return memoryview(buf).cast("B")


@dataclass(slots=True)
class _Send:
    data: memoryview
    done: asyncio.Future
    endpoint: "FakeEndpoint"


@dataclass(slots=True)
class _Recv:
    into: memoryview
    done: asyncio.Future
    endpoint: "FakeEndpoint | None"


@dataclass(slots=True)
class _Queues:
    unexpected: deque = field(default_factory=deque)   # sends waiting for a receive
    posted: deque = field(default_factory=deque)       # receives waiting for a send


def _settle(fut: asyncio.Future, error: Exception | None = None) -> None:
    if not fut.done():
        if error is None:
            fut.set_result(None)
        else:
            fut.set_exception(error)


def _match(send: _Send, recv: _Recv) -> None:
    n = len(send.data)
    if n > len(recv.into):
        _settle(recv.done, MessageTruncated(f"message of {n} bytes into a {len(recv.into)}-byte buffer"))
    else:
        recv.into[:n] = send.data
        _settle(recv.done)
    _settle(send.done)


class FakeHub:
    """The 'network': fabrics by address, one loop thread for all of them."""

    def __init__(self) -> None:
        self.loop = EventLoopThread("fake-kv-fabric")
        self._fabrics: dict[bytes, FakeFabric] = {}
        self._ids = itertools.count(1)

    def fabric(self) -> "FakeFabric":
        fab = FakeFabric(self, f"fake-worker-{next(self._ids)}".encode())
        self._fabrics[fab.address()] = fab
        return fab

    def lookup(self, address: bytes) -> "FakeFabric":
        fab = self._fabrics.get(address)
        if fab is None:
            raise TransportError(f"no fake worker at address {address!r}")
        return fab

    def close(self) -> None:
        self.loop.stop()


class FakeFabric(Fabric):
    def __init__(self, hub: FakeHub, address: bytes) -> None:
        self.hub = hub
        self.loop = hub.loop
        self._address = address
        self._tags: dict[int, _Queues] = {}
        self.dead = False
        self._bulk_sent = 0
        self._flips: dict[int, int] = {}  # bulk message index -> byte offset to flip

    def address(self) -> bytes:
        return self._address

    async def connect(self, address: bytes) -> "FakeEndpoint":
        if self.dead:
            raise TransportError("this fake worker is dead")
        return FakeEndpoint(self, self.hub.lookup(address))

    async def recv_any(self, buf: Buffer, tag: int) -> None:
        await self._post_recv(buf, tag, None)

    def flip_bulk_byte(self, message: int, offset: int) -> None:
        """The ``message``-th bulk message (counted from 0 over this fabric's life) arrives with
        byte ``offset`` (modulo its size) inverted."""
        self._flips[message] = offset

    def _in_transit(self, buf: Buffer, tag: int) -> memoryview:
        data = _bytes_view(buf)
        if is_data_tag(tag):
            offset = self._flips.pop(self._bulk_sent, None)
            self._bulk_sent += 1
            if offset is not None:
                copy = bytearray(data)
                copy[offset % len(copy)] ^= 0xFF
                data = memoryview(copy)
        return data

    def kill(self) -> None:
        """Die silently: drop everything, answer nothing from now on."""
        self.dead = True
        self._tags.clear()

    def _queues(self, tag: int) -> _Queues:
        return self._tags.setdefault(tag, _Queues())

    def _deliver(self, send: _Send, tag: int) -> None:
        if self.dead:
            return  # the send never completes, as with a peer process that is gone
        q = self._queues(tag)
        if q.posted:
            _match(send, q.posted.popleft())
        else:
            q.unexpected.append(send)

    async def _post_recv(self, buf: Buffer, tag: int, endpoint: "FakeEndpoint | None") -> None:
        if self.dead:
            raise OperationCanceled("this fake worker is dead")
        recv = _Recv(_bytes_view(buf), asyncio.get_running_loop().create_future(), endpoint)
        q = self._queues(tag)
        if q.unexpected:
            _match(q.unexpected.popleft(), recv)
        else:
            q.posted.append(recv)
        await recv.done

    def _cancel(self, endpoint: "FakeEndpoint") -> None:
        for q in self._tags.values():
            for recv in [r for r in q.posted if r.endpoint is endpoint]:
                q.posted.remove(recv)
                _settle(recv.done, OperationCanceled("endpoint closed"))


class FakeEndpoint(Endpoint):
    def __init__(self, local: FakeFabric, remote: FakeFabric) -> None:
        self._local = local
        self._remote = remote
        self._closed = False

    async def send(self, buf: Buffer, tag: int) -> None:
        if self._closed or self._local.dead:
            raise OperationCanceled("endpoint closed")
        send = _Send(self._local._in_transit(buf, tag), asyncio.get_running_loop().create_future(), self)
        self._remote._deliver(send, tag)
        await send.done

    async def recv(self, buf: Buffer, tag: int) -> None:
        if self._closed:
            raise OperationCanceled("endpoint closed")
        await self._local._post_recv(buf, tag, self)

    def abort(self) -> None:
        if not self._closed:
            self._closed = True
            self._local._cancel(self)

    @property
    def closed(self) -> bool:
        return self._closed
