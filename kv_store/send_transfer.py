"""One request on its way out, as the prefill worker holds it (see ``sender.py``)."""

from __future__ import annotations

import asyncio
import threading
from typing import TYPE_CHECKING

from kv_store.errors import RequestNotReady
from kv_store.transfer import TransferStatus

if TYPE_CHECKING:
    from kv_store.peer_connection import PeerConnection


class SendTransfer(TransferStatus):
    """One request on its way out. ``push_layer``/``finish``/``abort`` never block."""

    def __init__(self, peer: "PeerConnection", request_id: str, num_tokens: int) -> None:
        super().__init__(request_id)
        self.peer = peer
        self.num_tokens = num_tokens
        self.bytes_sent = 0
        num_layers = peer.store.geometry.num_layers
        self._pushed = [False] * num_layers
        self._finished = False
        self._lock = threading.Lock()
        # Loop-thread state.
        self.xfer = 0
        self.remote_runs: list[list[int]] | None = None
        self.queued: list[int] = []
        self.finish_requested = False
        self.abort_detail: str | None = None
        self.layer_tasks: list[asyncio.Task] = []
        self.layer_tags: dict[int, bytes] = {}  # bulk tag of each layer sent, for DONE

    def push_layer(self, layer: int) -> None:
        """Queue layer ``layer`` (already written in the local store) for sending."""
        if not 0 <= layer < len(self._pushed):
            raise IndexError(f"layer {layer} out of range [0, {len(self._pushed)})")
        if not self.peer.store.is_written(self.request_id, layer):
            raise RequestNotReady(f"layer {layer} of {self.request_id!r} is not written locally yet")
        with self._lock:
            if self._finished or self._pushed[layer]:
                raise ValueError(f"layer {layer} of {self.request_id!r} pushed twice or after finish")
            self._pushed[layer] = True
        self.peer.loop.call_soon(self.peer.enqueue_layer, self, layer)

    def finish(self) -> None:
        with self._lock:
            missing = [i for i, p in enumerate(self._pushed) if not p]
            if missing:
                raise ValueError(f"finish of {self.request_id!r} before layers {missing} were pushed")
            if self._finished:
                return
            self._finished = True
        self.peer.loop.call_soon(self.peer.enqueue_finish, self)

    def abort(self, detail: str = "aborted by the prefill worker") -> None:
        """Give up; the receiver frees its pages. The local pages stay the caller's."""
        self.peer.loop.call_soon(self.peer.abort_transfer, self, detail)
