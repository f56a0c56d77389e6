"""One sender's connection on the decode side: its frames, its transfers, its teardown.

See ``server.py`` for a request's life; this is steps 2-5 for one connection. Everything
here runs on the transport's loop thread.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from fluxion_dist.attention.layout import BLOCK_TOKENS
from kv_store import wire
from kv_store.admissions import Admissions
from kv_store.auth import FrameKey
from kv_store.config import TransportConfig
from kv_store.errors import (AuthenticationFailed, DuplicateRequest, KVStoreError, MessageTruncated,
                             OperationCanceled, PeerLost, ProtocolError, RefusalReason, StoreFull,
                             TransferAborted, TransferFailed, TransferRefused, TransportError,
                             WireError, refusal)
from kv_store.handle import KVHandle
from kv_store.loop_thread import EventLoopThread
from kv_store.rejections import Rejected, Rejections
from kv_store.store import KVStore
from kv_store.transfer import TransferState, TransferStatus
from kv_store.transport_base import Endpoint, ctrl_tag, data_tag, reply_tag

log = logging.getLogger(__name__)


@dataclass(slots=True)
class InboundTransfer:
    """Loop-thread state of one request being received."""

    xfer: int
    handle: KVHandle
    status: TransferStatus
    announced: set[int] = field(default_factory=set)
    layer_tasks: list[asyncio.Task] = field(default_factory=list)
    tags: dict[int, bytes] = field(default_factory=dict)  # bulk tag of each layer as it landed


class InboundConnection:
    """One sender. Frames are handled in order on ``run``; bulk lands on layer tasks."""

    def __init__(self, store: KVStore, loop: EventLoopThread, config: TransportConfig, conn_id: int,
                 ep: Endpoint, key: FrameKey, *, admissions: Admissions, rejections: Rejections,
                 record: Callable[[TransferStatus], None], on_closed: Callable[[int], None]) -> None:
        self.store = store
        self.loop = loop
        self.config = config
        self.key = key
        self.admissions = admissions
        self.rejections = rejections
        self._record = record
        self._on_closed = on_closed
        self.conn_id = conn_id
        self.ep = ep
        self.task: asyncio.Task | None = None
        self.last_seen = time.monotonic()
        self.next_seq = 0
        self.last_xfer = 0
        self.transfers: dict[int, InboundTransfer] = {}
        self.error: KVStoreError | None = None
        self._side_tasks: set[asyncio.Task] = set()
        self._bye: asyncio.Task | None = None
        self._seq_in = 0   # frames received on the control channel (their tags cover it)
        self._seq_out = 0  # frames sent on the reply channel

    # ---------------------------------------------------------------- plumbing

    def fail(self, error: KVStoreError, *, graceful: bool = False) -> None:
        """End the connection; ``run`` cleans up once the posted receives are canceled.

        A peer that broke the protocol is alive: it gets a BYE with the reason (so it fails
        its transfers now, not after its timeout), and the endpoint goes once that is out.
        """
        if self.error is not None:
            return
        self.error = error
        log.log(logging.INFO if graceful else logging.WARNING,
                "closing KV connection %#x: %s", self.conn_id, error)
        if isinstance(error, (WireError, ProtocolError)):
            bye = self.ep.send(self._encode(wire.Bye(str(error)[:wire.MAX_TEXT])), reply_tag(self.conn_id))
            self._bye = self._spawn(asyncio.wait_for(bye, 0.5), "BYE", quiet=True)
            self._bye.add_done_callback(lambda _: self.ep.abort())
        else:
            self.ep.abort()

    def _spawn(self, coro, what: str, *, quiet: bool = False) -> asyncio.Task:
        task = self.loop.spawn(coro, what, quiet=quiet)
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)
        return task

    def _encode(self, frame: wire.Frame) -> bytes:
        """The next frame of the reply channel: call in the order the frames are sent."""
        data = wire.encode(frame, self.key, reply_tag(self.conn_id), self._seq_out)
        self._seq_out += 1
        return data

    def send(self, frame: wire.Frame) -> None:
        """Fire and forget. Never awaited: UCX does not cancel a send to a dead peer, and a
        frame loop stuck on one would never reach its teardown. Tasks start in creation
        order, so frames still leave in order."""
        coro = self.ep.send(self._encode(frame), reply_tag(self.conn_id))
        self._spawn(coro, f"frame to {self.conn_id:#x}", quiet=True)

    # ---------------------------------------------------------------- frames

    async def run(self) -> None:
        buf = bytearray(wire.MAX_FRAME_BYTES)
        try:
            while True:
                frame = await self.ep.recv_frame(buf, ctrl_tag(self.conn_id), self.key, self._seq_in)
                self._seq_in += 1
                self.last_seen = time.monotonic()
                if not self._handle(frame):
                    return
        except MessageTruncated:
            self.rejections.count(Rejected.FRAME_MALFORMED)
            self.fail(WireError(f"frame larger than {wire.MAX_FRAME_BYTES} bytes"))
        except AuthenticationFailed as e:
            self.rejections.count(Rejected.FRAME_AUTH)
            self.fail(e)
        except WireError as e:
            self.rejections.count(Rejected.FRAME_MALFORMED)
            self.fail(e)
        except ProtocolError as e:
            self.rejections.count(Rejected.PROTOCOL)
            self.fail(e)
        except (OperationCanceled, TransportError) as e:
            self.fail(PeerLost(f"connection lost: {e}"))
        finally:
            await self._teardown()

    def _handle(self, frame: wire.Frame) -> bool:
        """Act on one frame; False once the connection is to end."""
        if isinstance(frame, wire.Offer):
            self._on_offer(frame)
        elif isinstance(frame, wire.Layer):
            self._on_layer(frame)
        elif isinstance(frame, wire.Done):
            inb = self._transfer(frame.xfer, finished_ok=True)
            if inb is not None:
                if len(frame.tags) not in (0, inb.handle.num_layers):
                    raise ProtocolError(f"DONE of {inb.handle.request_id!r} carries {len(frame.tags)} bulk "
                                        f"tags for {inb.handle.num_layers} layers")
                self._spawn(self._finish(inb, tags=frame.tags), f"commit of {inb.handle.request_id!r}")
        elif isinstance(frame, wire.Abort):
            inb = self._transfer(frame.xfer, finished_ok=True)
            if inb is not None:
                self._spawn(self._finish(inb, aborted=frame.detail),
                            f"abort of {inb.handle.request_id!r}")
        elif isinstance(frame, wire.Bye):
            self.fail(PeerLost(f"sender closed the connection: {frame.detail}"), graceful=True)
            return False
        elif not isinstance(frame, wire.Ping):
            raise ProtocolError(f"unexpected {type(frame).__name__} frame from a sender")
        return True

    def _transfer(self, xfer: int, *, finished_ok: bool = False) -> InboundTransfer | None:
        """The live transfer ``xfer``; None for one already finished (a late DONE or ABORT
        crossing our COMMITTED or FAILED), when ``finished_ok``."""
        inb = self.transfers.get(xfer)
        if inb is None and not (finished_ok and xfer <= self.last_xfer):
            raise ProtocolError(f"frame for unknown or finished transfer {xfer}")
        return inb

    def _end(self, inb: InboundTransfer) -> None:
        self.transfers.pop(inb.xfer, None)

    def _on_offer(self, offer: wire.Offer) -> None:
        if offer.xfer <= self.last_xfer:
            raise ProtocolError(f"transfer id {offer.xfer} not above the last one ({self.last_xfer})")
        self.last_xfer = offer.xfer
        try:
            handle = self._reserve(offer)
        except TransferRefused as e:
            reason, detail = e.reason, e.detail
        except StoreFull as e:
            reason, detail = RefusalReason.STORE_FULL, str(e)
        except DuplicateRequest as e:
            reason, detail = RefusalReason.DUPLICATE_REQUEST, str(e)
        else:
            status = TransferStatus(offer.request_id)
            status.advance(TransferState.TRANSFERRING)
            self.transfers[offer.xfer] = InboundTransfer(offer.xfer, handle, status)
            self._record(status)
            runs = [handle.run_lengths(layer) for layer in range(handle.num_layers)]
            self.send(wire.Accept(offer.xfer, runs))
            return
        log.info("refused request %r (%s): %s", offer.request_id, reason.value, detail)
        if reason is RefusalReason.NOT_ADMITTED:
            self.rejections.count(Rejected.NOT_ADMITTED)
        # A live transfer keeps its status: neither a duplicate nor an offer without its
        # admission (the admission was consumed by the first) may overwrite it.
        if reason not in (RefusalReason.DUPLICATE_REQUEST, RefusalReason.NOT_ADMITTED):
            status = TransferStatus(offer.request_id)
            status.fail(refusal(reason, detail))
            self._record(status)
        self.send(wire.Refuse(offer.xfer, reason.value, detail))

    def _reserve(self, offer: wire.Offer) -> KVHandle:
        """Check the offer against its admission and this store, then reserve. Raises before
        allocating."""
        admission = self.admissions.take(offer.request_id)
        if admission is None:
            raise TransferRefused(RefusalReason.NOT_ADMITTED,
                                  f"request {offer.request_id!r} is not admitted on this decode worker "
                                  f"(never admitted, withdrawn, expired or already offered)")
        if offer.num_tokens != admission.num_tokens:
            raise TransferRefused(RefusalReason.BAD_REQUEST,
                                  f"offer of {offer.num_tokens} tokens for {offer.request_id!r}, admitted "
                                  f"with {admission.num_tokens}")
        g = self.store.geometry
        theirs = (offer.num_layers, offer.num_kv_heads, offer.head_dim, offer.block_tokens, offer.dtype)
        ours = (g.num_layers, g.num_kv_heads, g.head_dim, BLOCK_TOKENS, "bf16")
        if theirs != ours:
            raise TransferRefused(RefusalReason.GEOMETRY_MISMATCH,
                                  f"offer geometry (layers, kv heads, head dim, block, dtype) "
                                  f"{theirs} != this store's {ours}")
        if offer.num_tokens <= 0 or (offer.kv_bytes, offer.meta_bytes) != (
                g.kv_bytes(offer.num_tokens), g.meta_bytes(offer.num_tokens)):
            raise TransferRefused(RefusalReason.BAD_REQUEST,
                                  f"offer of {offer.num_tokens} tokens declares {offer.kv_bytes}+"
                                  f"{offer.meta_bytes} bytes; expected {g.kv_bytes(offer.num_tokens)}+"
                                  f"{g.meta_bytes(offer.num_tokens)}")
        return self.store.reserve(offer.request_id, offer.num_tokens)

    def _on_layer(self, frame: wire.Layer) -> None:
        inb = self._transfer(frame.xfer)
        assert inb is not None
        handle = inb.handle
        if frame.layer >= handle.num_layers or frame.layer in inb.announced:
            raise ProtocolError(f"layer {frame.layer} of {handle.request_id!r} bad or repeated")
        if frame.first_seq != self.next_seq:
            raise ProtocolError(f"layer {frame.layer}: data sequence {frame.first_seq}, "
                                f"expected {self.next_seq}")
        targets = self._targets(inb, frame)
        inb.announced.add(frame.layer)
        self.next_seq += len(targets)
        task = self._spawn(self._recv_layer(inb, frame.layer, targets),
                           f"layer {frame.layer} of {handle.request_id!r}")
        inb.layer_tasks.append(task)

    def _targets(self, inb: InboundTransfer, frame: wire.Layer) -> list[tuple[int, np.ndarray]]:
        """Arena views for each announced message; a segment must lie inside one of our runs."""
        if sum(frame.segments) != inb.handle.num_blocks:
            raise ProtocolError(f"layer {frame.layer}: segments cover {sum(frame.segments)} "
                                f"blocks of {inb.handle.num_blocks}")
        views = self.store.layer_views(inb.handle.request_id, frame.layer)
        out, seq, block, i = [], frame.first_seq, 0, 0
        for n in frame.segments:
            while views[i].first_block + views[i].pages.shape[0] <= block:
                i += 1
            view = views[i]
            lo = block - view.first_block
            if lo + n > view.pages.shape[0]:
                raise ProtocolError(f"layer {frame.layer}: segment at block {block} of {n} pages "
                                    f"crosses a page run of this store")
            for arr in (view.pages, view.kmin, view.kmax):
                out.append((data_tag(self.conn_id, seq), arr[lo:lo + n]))
                seq += 1
            block += n
        return out

    async def _recv_one(self, buf: np.ndarray, tag: int) -> None:
        await self.ep.recv(buf, tag)
        self.last_seen = time.monotonic()

    async def _recv_layer(self, inb: InboundTransfer, layer: int, targets) -> None:
        # return_exceptions: this task ends only when every receive has, so a finished layer
        # task means no receive of it is still posted into the pages.
        results = await asyncio.gather(*(self._recv_one(buf, tag) for tag, buf in targets),
                                       return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if any(isinstance(e, MessageTruncated) for e in errors):
            self.fail(ProtocolError(f"layer {layer}: a bulk message exceeded its announced size"))
        elif errors:
            self.fail(PeerLost(f"bulk receive of layer {layer} failed: {errors[0]!r}"))
        else:
            if self.config.bulk_tags:  # hashed on a thread while later layers land; checked at DONE
                inb.tags[layer] = await asyncio.to_thread(self.key.bulk_tag, self.conn_id, inb.xfer, layer,
                                                          [buf for _, buf in targets])
            self.store.mark_written(inb.handle.request_id, layer)

    async def _finish(self, inb: InboundTransfer, *, aborted: str | None = None,
                      tags: list[bytes] | None = None) -> None:
        if inb.layer_tasks:
            await asyncio.wait(inb.layer_tasks)  # wait, never cancel: UCX may be writing
        if inb.status.done or self.error is not None:
            return  # a failed receive failed the connection; its teardown frees
        request_id = inb.handle.request_id
        missing = sorted(set(range(inb.handle.num_layers)) - inb.announced)
        if aborted is None and not missing and self.config.bulk_tags:
            if tags:
                forged = [layer for layer in range(inb.handle.num_layers)
                          if not hmac.compare_digest(inb.tags.get(layer, b""), tags[layer])]
                why = "do not match the sender's tags (corrupted or injected in transit)"
            else:
                forged = list(range(inb.handle.num_layers))
                why = "came without tags (the sender runs with transport.bulk_tags: false)"
            if forged:
                self.rejections.count(Rejected.BULK_TAG)
                self.store.abort(request_id)
                self._end(inb)
                detail = (f"integrity check failed: the bulk bytes of layers {forged} {why}; the request's "
                          f"pages are freed")
                log.warning("KV of %r refused: %s", request_id, detail)
                inb.status.fail(TransferFailed(f"{request_id!r}: {detail}"))
                self.send(wire.Failed(inb.xfer, detail))
                return
        if aborted is None and not missing:
            self.store.commit(request_id)
            inb.status.advance(TransferState.SUCCESS)
            self._end(inb)
            self.send(wire.Committed(inb.xfer))
            return
        self.store.abort(request_id)
        self._end(inb)
        if aborted is not None:
            inb.status.fail(TransferAborted(f"sender aborted {request_id!r}: {aborted}"))
        else:
            detail = f"layers {missing} never announced"
            inb.status.fail(TransferFailed(f"{request_id!r}: {detail}"))
            self.send(wire.Failed(inb.xfer, detail))

    async def _teardown(self) -> None:
        if self._bye is not None:
            await asyncio.wait([self._bye])
        self.ep.abort()
        pending = [t for inb in self.transfers.values() for t in inb.layer_tasks if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=self.config.timeout_s)
        error = self.error if self.error is not None else PeerLost("connection closed")
        for inb in self.transfers.values():
            if inb.status.done:
                continue
            if any(not t.done() for t in inb.layer_tasks):
                # UCX did not confirm the cancel: the pages may still be written. Leak them
                # (the entry stays reserved) rather than hand them to another request.
                log.error("receives into %r not canceled; its pages are quarantined",
                          inb.handle.request_id)
            else:
                self.store.abort(inb.handle.request_id)
            inb.status.fail(error if isinstance(error, TransferFailed)
                            else TransferFailed(f"connection closed: {error}"))
        for task in list(self._side_tasks):
            task.cancel()
        self._on_closed(self.conn_id)
        log.info("KV connection %#x closed", self.conn_id)
