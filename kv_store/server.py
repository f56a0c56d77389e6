"""Decode side of the KV transfer: lands a prefill node's KV in this node's store.

A request's life here:

0. The decode worker ``admit``s the request id when the router places the request here
   (its prompt length, a deadline for the offer). An admission whose OFFER does not come
   by ``transport.offer_deadline_s`` is dropped and the pages it holds are freed.
1. A sender connects: HELLO (its connection id and UCX address) on the worker tag. Only a
   HELLO whose tag verifies under the deployment's secret, with an address the fabric
   accepts (``Fabric.check_address``), is acted on: the server makes an endpoint back
   and answers WELCOME. Any other HELLO is dropped and counted (``rejections``); its
   address never reaches UCX, so nothing in it can abort the process.
2. OFFER announces the request (tokens, geometry, byte counts). The frame is checked;
   a request id that is not admitted is refused (REFUSE not_admitted) and holds
   nothing; then pages for every layer are reserved at once. No room: REFUSE(store_full)
   goes back, nothing is held, and the sender has not sent a byte of bulk. Otherwise
   ACCEPT carries the run lengths of each layer's pages; poll() says TRANSFERRING.
3. Each LAYER frame lists the segments (page counts) of the three raw messages per
   segment that follow (KV pages, kmin, kmax). Receives are posted straight into the
   arena views: no staging buffer.
4. DONE carries the sender's bulk tag of each layer (``FrameKey.bulk_tag``); the server
   hashed each layer as it landed. Once every layer has landed and every tag matches, the
   request is committed (READY, ready lease started), COMMITTED goes back, poll() says
   SUCCESS; the decoder then ``claim``s it. A layer whose bytes do not match (corrupted or
   injected in transit) fails the transfer instead: its pages are freed, FAILED goes back
   with the layers named, poll() says FAILED, and the connection carries on.
5. Anything else ends the connection: a frame that fails its checks (its tag
   included: BYE names the authentication failure), a protocol breach, a peer silent
   past ``timeout_s``, BYE. Its endpoint is aborted first,
   which cancels receives still posted into pages; only then are the pages of its
   unfinished requests freed, and they poll FAILED. Other connections carry on.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict

from kv_store import wire
from kv_store.admissions import Admissions
from kv_store.auth import FrameKey
from kv_store.config import TransportConfig
from kv_store.errors import (AuthenticationFailed, BadAddress, MessageTruncated, OperationCanceled,
                             PeerLost, ProtocolError, TransferFailed, TransferTimeout, TransportError,
                             WireError)
from kv_store.handle import KVHandle
from kv_store.inbound import InboundConnection
from kv_store.rejections import Rejected, Rejections
from kv_store.store import KVStore
from kv_store.transfer import TransferState, TransferStatus
from kv_store.transport_base import HELLO_TAG, Fabric, reply_tag, valid_conn_id

log = logging.getLogger(__name__)

_HISTORY = 4096  # finished transfers remembered for poll()


class KVServer:
    """Receives KV into ``store`` from any number of senders. Sync API, any thread."""

    def __init__(self, store: KVStore, fabric: Fabric, config: TransportConfig, *, secret: bytes) -> None:
        self.store = store
        self.config = config
        self.admissions = Admissions()
        self.rejections = Rejections()
        self._key = FrameKey(secret)
        self._fabric = fabric
        self._loop = fabric.loop
        self._conns: dict[int, InboundConnection] = {}
        self._status: OrderedDict[str, TransferStatus] = OrderedDict()
        self._status_lock = threading.Lock()
        self._closing = False
        # One buffer for the life of the server: a canceled worker-level receive may still
        # reference it inside UCX.
        self._hello_buf = bytearray(wire.MAX_FRAME_BYTES)
        self._tasks = self._loop.run(self._start())

    async def _start(self) -> list[asyncio.Task]:
        return [self._loop.spawn(self._accept_loop(), "KV server accept loop"),
                self._loop.spawn(self._watchdog(), "KV server watchdog")]

    # ------------------------------------------------------------ worker-facing

    def address(self) -> bytes:
        return self._fabric.address()

    def admit(self, request_id: str, num_tokens: int, *, deadline_s: float | None = None,
              holds: tuple[str, ...] = ()) -> None:
        """Expect an OFFER of ``num_tokens`` for ``request_id`` within ``deadline_s`` (default
        ``offer_deadline_s``); if none comes, the store entries ``holds`` are freed."""
        self.admissions.admit(request_id, num_tokens,
                              self.config.offer_deadline_s if deadline_s is None else deadline_s, holds)

    def forget(self, request_id: str) -> bool:
        """Withdraw an admission whose OFFER has not come (the router gave the request up)."""
        return self.admissions.forget(request_id)

    def poll(self, request_id: str) -> TransferState:
        status = self.status(request_id)
        return TransferState.PENDING if status is None else status.poll()

    @property
    def num_connections(self) -> int:
        return len(self._conns)

    def connected(self, conn_id: int) -> bool:
        """Whether the connection ``conn_id`` is open (tests, tools)."""
        return conn_id in self._conns

    def status(self, request_id: str) -> TransferStatus | None:
        with self._status_lock:
            return self._status.get(request_id)

    def wait(self, request_id: str, timeout_s: float) -> KVHandle:
        """Block until the request is READY here (tests and tools; workers poll)."""
        deadline = time.monotonic() + timeout_s
        while (status := self.status(request_id)) is None:
            if time.monotonic() > deadline:
                raise TransferTimeout(f"no transfer of {request_id!r} announced in {timeout_s} s")
            time.sleep(0.005)
        status.wait(max(0.0, deadline - time.monotonic()))
        return self.store.handle(request_id)

    def close(self) -> None:
        self._loop.run(self._close(), timeout_s=30)

    async def _close(self) -> None:
        self._closing = True
        for conn in list(self._conns.values()):
            conn.send(wire.Bye("server shutting down"))
        await asyncio.sleep(0.05)  # let the BYEs leave before the endpoints go
        for conn in list(self._conns.values()):
            conn.fail(PeerLost("server shutting down"), graceful=True)
        for conn in list(self._conns.values()):
            if conn.task is not None:
                await asyncio.wait([conn.task], timeout=self.config.timeout_s)
        for task in self._tasks:
            task.cancel()

    # ------------------------------------------------------------ loop side

    def _forget(self, conn_id: int) -> None:
        self._conns.pop(conn_id, None)

    def _record(self, status: TransferStatus) -> None:
        with self._status_lock:
            self._status[status.request_id] = status
            self._status.move_to_end(status.request_id)
            while len(self._status) > _HISTORY:
                oldest = next(iter(self._status))
                if not self._status[oldest].done:
                    break
                del self._status[oldest]

    async def _accept_loop(self) -> None:
        buf = self._hello_buf
        while not self._closing:
            buf[:wire.PREFIX.size] = bytes(wire.PREFIX.size)
            try:
                await self._fabric.recv_any(buf, HELLO_TAG)
            except MessageTruncated:
                self.rejections.count(Rejected.HELLO_MALFORMED)
                log.warning("dropped a hello frame larger than %d bytes", wire.MAX_FRAME_BYTES)
                continue
            except OperationCanceled:
                return
            try:
                hello = wire.decode(buf, self._key, HELLO_TAG)
                if not isinstance(hello, wire.Hello):
                    raise ProtocolError(f"expected HELLO, got {type(hello).__name__}")
            except AuthenticationFailed as e:
                self.rejections.count(Rejected.HELLO_AUTH)
                log.warning("dropped a hello frame: %s", e)
                continue
            except (WireError, ProtocolError) as e:
                self.rejections.count(Rejected.HELLO_MALFORMED)
                log.warning("dropped a hello frame: %s", e)
                continue
            await self._open(hello)

    async def _open(self, hello: wire.Hello) -> None:
        try:
            self._fabric.check_address(hello.address)
        except BadAddress as e:
            self.rejections.count(Rejected.HELLO_ADDRESS)
            log.warning("dropped the hello of connection %#x: %s", hello.conn_id, e)
            return
        try:
            ep = await self._fabric.connect(hello.address)
        except TransportError as e:
            self.rejections.count(Rejected.HELLO_UNREACHABLE)
            log.warning("cannot reach the sender of connection %#x: %r", hello.conn_id, e)
            return
        if not valid_conn_id(hello.conn_id) or hello.conn_id in self._conns or self._closing:
            self.rejections.count(Rejected.HELLO_REFUSED)
            detail = "shutting down" if self._closing else f"connection id {hello.conn_id:#x} refused"
            frame = wire.encode(wire.Welcome(hello.conn_id, False, detail), self._key,
                                reply_tag(hello.conn_id))
            with_timeout = asyncio.wait_for(ep.send(frame, reply_tag(hello.conn_id)), 1.0)
            await asyncio.gather(with_timeout, return_exceptions=True)
            ep.abort()
            return
        conn = InboundConnection(self.store, self._loop, self.config, hello.conn_id, ep, self._key,
                                 admissions=self.admissions, rejections=self.rejections,
                                 record=self._record, on_closed=self._forget)
        conn.send(wire.Welcome(hello.conn_id, True, ""))  # before the watchdog's first PING
        self._conns[hello.conn_id] = conn
        conn.task = self._loop.spawn(conn.run(), f"KV connection {hello.conn_id:#x}")
        log.info("KV connection %#x open", hello.conn_id)

    async def _watchdog(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_s)
            now = time.monotonic()
            for conn in list(self._conns.values()):
                silent = now - conn.last_seen
                if silent > self.config.timeout_s:
                    conn.fail(PeerLost(f"sender silent for {silent:.1f} s"))
                else:
                    conn.send(wire.Ping())
            self.store.reap_expired()
            self._expire_admissions()

    def _expire_admissions(self) -> None:
        for adm in self.admissions.expired():
            for entry in adm.holds:
                self.store.abort(entry)
            self.rejections.count(Rejected.ADMISSION_EXPIRED)
            status = TransferStatus(adm.request_id)
            status.fail(TransferFailed(f"no KV offer for {adm.request_id!r} within its admission's "
                                       f"deadline (transport.offer_deadline_s); its reserved pages are freed"))
            self._record(status)
            log.warning("admission of %r expired without an offer", adm.request_id)
