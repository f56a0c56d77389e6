"""The prefill side's connection to one KV server: handshake, heartbeat, replies, bulk sends.

See ``sender.py`` for a request's life. UCX does not cancel a send to a dead peer, so
nothing here waits on one without a way out: frames are fire-and-forget, bulk sends are
awaited in tasks that the connection's failure cancels.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import threading
import time

import numpy as np

from fluxion_dist.attention.layout import BLOCK_TOKENS
from kv_store import wire
from kv_store.auth import FrameKey
from kv_store.config import TransportConfig
from kv_store.errors import (KVStoreError, MessageTruncated, OperationCanceled, PeerLost,
                             ProtocolError, RefusalReason, TransferAborted, TransferFailed,
                             TransportError, WireError, refusal)
from kv_store.segments import split_segments
from kv_store.send_transfer import SendTransfer
from kv_store.store import KVStore
from kv_store.transfer import TransferState
from kv_store.transport_base import (HELLO_TAG, RESERVED_CONN, Endpoint, Fabric, ctrl_tag,
                                     data_tag, reply_tag)

log = logging.getLogger(__name__)

_CONN_IDS: set[int] = set()
_CONN_IDS_LOCK = threading.Lock()


def _new_conn_id() -> int:
    with _CONN_IDS_LOCK:
        while True:
            conn_id = secrets.randbelow(RESERVED_CONN - 1) + 1
            if conn_id not in _CONN_IDS:
                _CONN_IDS.add(conn_id)
                return conn_id


class PeerConnection:
    """One connection to a KV server. Apart from ``alive`` and ``close``, every method runs
    on the transport's loop thread (``KVSender`` and ``SendTransfer`` hand calls over)."""

    def __init__(self, store: KVStore, fabric: Fabric, config: TransportConfig, address: bytes,
                 key: FrameKey) -> None:
        self.store = store
        self.config = config
        self.key = key
        self.fabric = fabric
        self.loop = fabric.loop
        self.address = address
        self.conn_id = _new_conn_id()
        self.ep: Endpoint | None = None
        self.error: KVStoreError | None = None
        self.last_seen = time.monotonic()
        self._transfers: dict[int, SendTransfer] = {}
        self._xfer_ids = itertools.count(1)
        self._next_seq = 0
        self._inflight: asyncio.Semaphore | None = None
        self._welcome: asyncio.Future | None = None
        self._tasks: list[asyncio.Task] = []
        self._seq_out = 0  # frames sent on the control channel (their tags cover it)
        self._seq_in = 0   # frames received on the reply channel

    @property
    def alive(self) -> bool:
        return self.error is None

    def close(self) -> None:
        self.loop.run(self._close(), timeout_s=5)

    # ------------------------------------------------------------ loop side: connection

    async def open(self) -> None:
        self._inflight = asyncio.Semaphore(self.config.layers_in_flight)
        self.ep = await self.fabric.connect(self.address)
        self._welcome = asyncio.get_running_loop().create_future()
        self._tasks.append(self.loop.spawn(self._reply_loop(), f"KV replies {self.conn_id:#x}"))
        hello = wire.encode(wire.Hello(self.conn_id, self.fabric.address()), self.key, HELLO_TAG)
        self._send_frame(hello, HELLO_TAG)
        try:
            welcome = await asyncio.wait_for(self._welcome, self.config.connect_timeout_s)
        except asyncio.TimeoutError:
            # A server answers only a HELLO that it could authenticate and reach back: it cannot
            # tell an unauthenticated sender anything without trusting its address.
            self._fail(PeerLost(
                f"no WELCOME from the KV server in {self.config.connect_timeout_s} s: its HELLO failed "
                f"authentication there (this worker has another deployment's secret), or the server "
                f"cannot reach this worker's address, or it is down"))
        else:
            if not welcome.ok:
                self._fail(TransportError(f"KV server refused the connection: {welcome.detail}"))
        if self.error is not None:
            raise self.error
        self.last_seen = time.monotonic()
        self._tasks.append(self.loop.spawn(self._heartbeat(), f"KV heartbeat {self.conn_id:#x}"))

    def _send_frame(self, frame: bytes, tag: int) -> None:
        """Fire and forget: frames leave in call order (tasks start in creation order)."""
        assert self.ep is not None
        self.loop.spawn(self.ep.send(frame, tag), "KV frame", quiet=True)

    def _encode(self, frame: wire.Frame) -> bytes:
        """The next frame of the control channel: call in the order the frames are sent."""
        data = wire.encode(frame, self.key, ctrl_tag(self.conn_id), self._seq_out)
        self._seq_out += 1
        return data

    def _ctrl(self, frame: wire.Frame) -> None:
        self._send_frame(self._encode(frame), ctrl_tag(self.conn_id))

    async def _reply_loop(self) -> None:
        assert self.ep is not None
        buf = bytearray(wire.MAX_FRAME_BYTES)
        try:
            while True:
                frame = await self.ep.recv_frame(buf, reply_tag(self.conn_id), self.key, self._seq_in)
                self._seq_in += 1
                self.last_seen = time.monotonic()
                self._on_frame(frame)
        except MessageTruncated:
            self._fail(WireError(f"reply frame larger than {wire.MAX_FRAME_BYTES} bytes"))
        except (WireError, ProtocolError) as e:
            self._fail(e)
        except (OperationCanceled, TransportError) as e:
            self._fail(PeerLost(f"connection to the KV server lost: {e}"))

    async def _heartbeat(self) -> None:
        while self.error is None:
            await asyncio.sleep(self.config.heartbeat_s)
            silent = time.monotonic() - self.last_seen
            if silent > self.config.timeout_s:
                self._fail(PeerLost(f"KV server silent for {silent:.1f} s"))
            else:
                self._ctrl(wire.Ping())

    def _fail(self, error: KVStoreError, *, graceful: bool = False) -> None:
        if self.error is not None:
            return
        self.error = error
        log.log(logging.INFO if graceful else logging.WARNING,
                "KV connection %#x to the server ends: %s", self.conn_id, error)
        if self.ep is not None:
            self.ep.abort()
        if self._welcome is not None and not self._welcome.done():
            self._welcome.cancel()
        failure = (error if isinstance(error, TransferFailed)
                   else TransferFailed(f"connection failed: {error}"))
        for transfer in self._transfers.values():
            transfer.fail(failure)
            for task in transfer.layer_tasks:
                task.cancel()  # UCX does not cancel sends to a dead peer; stop waiting for them
        self._transfers.clear()
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()

    async def _close(self) -> None:
        if self.error is None and self.ep is not None:
            self._ctrl(wire.Bye("sender closing"))
            await asyncio.sleep(0.05)  # let the BYE leave before the endpoint goes
            self._fail(PeerLost("connection closed by the sender"), graceful=True)

    # ------------------------------------------------------------ loop side: frames

    def _on_frame(self, frame: wire.Frame) -> None:
        if isinstance(frame, wire.Welcome):
            if self._welcome is not None and not self._welcome.done():
                self._welcome.set_result(frame)
            return
        if isinstance(frame, wire.Ping):
            return
        if isinstance(frame, wire.Bye):
            self._fail(PeerLost(f"KV server closed the connection: {frame.detail}"), graceful=True)
            return
        if isinstance(frame, (wire.Accept, wire.Refuse, wire.Committed, wire.Failed)):
            transfer = self._transfers.get(frame.xfer)
            if transfer is None:
                return  # aborted here meanwhile; the server was told or will be
            if isinstance(frame, wire.Accept):
                self._on_accept(transfer, frame)
            elif isinstance(frame, wire.Refuse):
                try:
                    reason = RefusalReason(frame.reason)
                except ValueError:
                    reason = RefusalReason.BAD_REQUEST
                self._end(transfer, refusal(reason, frame.detail))
            elif isinstance(frame, wire.Committed):
                transfer.advance(TransferState.SUCCESS)
                self._transfers.pop(transfer.xfer, None)
            else:
                detail = f"receiver failed {transfer.request_id!r}: {frame.detail}"
                self._end(transfer, TransferFailed(detail))
            return
        raise ProtocolError(f"unexpected {type(frame).__name__} frame from a KV server")

    def _end(self, transfer: SendTransfer, error: KVStoreError) -> None:
        transfer.fail(error)
        self._transfers.pop(transfer.xfer, None)

    def offer(self, transfer: SendTransfer) -> None:
        if self.error is not None:
            transfer.fail(PeerLost(f"connection is down: {self.error}"))
            return
        g = self.store.geometry
        transfer.xfer = next(self._xfer_ids)
        self._transfers[transfer.xfer] = transfer
        n = transfer.num_tokens
        self._ctrl(wire.Offer(transfer.xfer, transfer.request_id, n, g.num_layers, g.num_kv_heads,
                              g.head_dim, BLOCK_TOKENS, "bf16", g.kv_bytes(n), g.meta_bytes(n)))

    def _on_accept(self, transfer: SendTransfer, frame: wire.Accept) -> None:
        nb = self.store.geometry.blocks_for(transfer.num_tokens)
        if len(frame.runs) != self.store.geometry.num_layers or any(sum(r) != nb for r in frame.runs):
            raise ProtocolError(f"ACCEPT runs do not cover {nb} blocks per layer")
        transfer.remote_runs = frame.runs
        if transfer.abort_detail is not None:  # aborted while the offer was out
            self._transfers.pop(transfer.xfer, None)
            self.loop.spawn(self._send_abort(transfer), f"ABORT of {transfer.request_id!r}")
            return
        transfer.advance(TransferState.TRANSFERRING)
        for layer in transfer.queued:
            self._start_layer(transfer, layer)
        transfer.queued.clear()
        if transfer.finish_requested:
            self.loop.spawn(self._send_done(transfer), f"DONE of {transfer.request_id!r}")

    def enqueue_layer(self, transfer: SendTransfer, layer: int) -> None:
        if transfer.done:
            return
        if transfer.remote_runs is None:
            transfer.queued.append(layer)
        else:
            self._start_layer(transfer, layer)

    def enqueue_finish(self, transfer: SendTransfer) -> None:
        transfer.finish_requested = True
        if transfer.remote_runs is not None and not transfer.done:
            self.loop.spawn(self._send_done(transfer), f"DONE of {transfer.request_id!r}")

    def abort_transfer(self, transfer: SendTransfer, detail: str) -> None:
        if transfer.done:
            return
        transfer.abort_detail = detail
        transfer.fail(TransferAborted(f"{transfer.request_id!r}: {detail}"))
        if transfer.remote_runs is not None and self.error is None:
            self._transfers.pop(transfer.xfer, None)
            self.loop.spawn(self._send_abort(transfer), f"ABORT of {transfer.request_id!r}")
        # Not accepted yet: it stays listed, so an ACCEPT still in flight gets its ABORT.

    async def _send_abort(self, transfer: SendTransfer) -> None:
        # After our in-flight bulk, so the server's receives complete and it can free.
        if transfer.layer_tasks:
            await asyncio.wait(transfer.layer_tasks)
        self._ctrl(wire.Abort(transfer.xfer, transfer.abort_detail or ""))

    async def _send_done(self, transfer: SendTransfer) -> None:
        if transfer.layer_tasks:
            await asyncio.wait(transfer.layer_tasks)
        if not transfer.done and self.error is None:
            tags = [transfer.layer_tags[layer] for layer in range(self.store.geometry.num_layers)] \
                if self.config.bulk_tags else []
            self._ctrl(wire.Done(transfer.xfer, tags))

    # ------------------------------------------------------------ loop side: bulk

    def _start_layer(self, transfer: SendTransfer, layer: int) -> None:
        transfer.layer_tasks.append(
            self.loop.spawn(self._send_layer(transfer, layer), f"layer {layer} of {transfer.request_id!r}"))

    async def _send_layer(self, transfer: SendTransfer, layer: int) -> None:
        assert self._inflight is not None and self.ep is not None and transfer.remote_runs is not None
        async with self._inflight:
            if transfer.done or self.error is not None:
                return
            views = self.store.layer_views(transfer.request_id, layer)
            segments = split_segments([v.pages.shape[0] for v in views], transfer.remote_runs[layer])
            messages: list[np.ndarray] = []
            block, i = 0, 0
            for n in segments:
                while views[i].first_block + views[i].pages.shape[0] <= block:
                    i += 1
                lo = block - views[i].first_block
                view = views[i]
                messages += [view.pages[lo:lo + n], view.kmin[lo:lo + n], view.kmax[lo:lo + n]]
                block += n
            # No await from here to the gather: the sequence numbers are handed out in the
            # same order as the LAYER frames are posted, which the server checks.
            first = self._next_seq
            self._next_seq += len(messages)
            header = self._encode(wire.Layer(transfer.xfer, layer, segments, first))
            sends = [self.ep.send(header, ctrl_tag(self.conn_id))]
            sends += [self.ep.send(m, data_tag(self.conn_id, first + k)) for k, m in enumerate(messages)]
            # The layer's bulk tag is hashed on a thread while its bytes are on the wire.
            tagging = None
            if self.config.bulk_tags:
                tagging = asyncio.ensure_future(asyncio.to_thread(
                    self.key.bulk_tag, self.conn_id, transfer.xfer, layer, messages))
            try:
                await asyncio.gather(*sends)
            except (OperationCanceled, TransportError) as e:
                self._fail(PeerLost(f"bulk send of layer {layer} failed: {e}"))
                return
            finally:
                if tagging is not None:
                    await asyncio.wait([tagging])  # the thread reads the pages: done before they may go
            if tagging is not None:
                transfer.layer_tags[layer] = tagging.result()
            nbytes = sum(m.nbytes for m in messages)
            transfer.bytes_sent += nbytes
            self.store.record_out(nbytes)
