"""Prefill side of the KV transfer: pushes a request's KV from this node's store to a decode
node's store, layer by layer as the model produces it.

A request's life here:

1. ``peer = sender.connect(address)`` once per decode node: HELLO, then WELCOME back.
2. ``t = sender.begin(peer, request_id)`` (the request is reserved in the local store):
   OFFER goes out; ``t.poll()`` is PENDING. No bulk moves until the receiver answers.
3. After writing layer ``l`` into the local store, ``t.push_layer(l)``: it returns at once.
   Once ACCEPT has come (with the receiver's page runs), each layer is sent as a LAYER
   frame plus three raw messages (KV pages, kmin, kmax) per segment, a segment being a
   stretch contiguous in both stores. Up to ``layers_in_flight`` layers are on the
   wire at once. Layers pushed before ACCEPT wait for it. (The decode worker must have
   admitted the request id, or the OFFER is refused: REFUSE not_admitted.)
4. ``t.finish()`` after the last layer: DONE follows the last layer's bulk. ``poll()``
   says SUCCESS when COMMITTED comes back; the local pages may then be freed.
5. REFUSE (e.g. the decode store is full) fails the transfer with a typed error before
   any bulk was sent; a silent or vanished receiver fails every transfer of the
   connection with ``PeerLost`` after ``timeout_s``.
"""

from __future__ import annotations

from kv_store.auth import FrameKey
from kv_store.config import TransportConfig
from kv_store.peer_connection import PeerConnection
from kv_store.send_transfer import SendTransfer
from kv_store.store import KVStore
from kv_store.transport_base import Fabric


class KVSender:
    """Pushes requests of ``store`` to decode nodes. Sync, non-blocking API, any thread."""

    def __init__(self, store: KVStore, fabric: Fabric, config: TransportConfig, *, secret: bytes) -> None:
        self.store = store
        self._key = FrameKey(secret)
        self.config = config
        self.fabric = fabric
        self._peers: list[PeerConnection] = []

    def connect(self, address: bytes) -> PeerConnection:
        """Open a connection to a KV server (blocks for the handshake only)."""
        peer = PeerConnection(self.store, self.fabric, self.config, address, self._key)
        self.fabric.loop.run(peer.open(), timeout_s=self.config.connect_timeout_s + 5)
        self._peers.append(peer)
        return peer

    def begin(self, peer: PeerConnection, request_id: str) -> SendTransfer:
        """Announce a request reserved in the local store; layers follow by ``push_layer``."""
        transfer = SendTransfer(peer, request_id, self.store.handle(request_id).num_tokens)
        self.fabric.loop.call_soon(peer.offer, transfer)
        return transfer

    def push(self, peer: PeerConnection, request_id: str) -> SendTransfer:
        """Send a request whose every layer is already in the local store."""
        transfer = self.begin(peer, request_id)
        for layer in range(self.store.geometry.num_layers):
            transfer.push_layer(layer)
        transfer.finish()
        return transfer

    def close(self) -> None:
        """Say BYE on every connection and drop them (transfers still running fail)."""
        for peer in self._peers:
            peer.close()
        self._peers.clear()
