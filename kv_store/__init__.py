"""Host-memory paged KV store, its msgpack wire format and the UCX transfer prefill -> decode.

Importing this package never imports UCX: ``ucx_transport.ucx_fabric`` does, on first use,
inside the process that will use it.

Both sides hold the deployment's secret (``new_secret()``, handed out through Ray): every
control frame carries an HMAC tag under it.

Prefill node::

    store = KVStore(StoreConfig(geometry, capacity_bytes))
    sender = KVSender(store, ucx_fabric(transport_config), transport_config, secret=secret)
    peer = sender.connect(decode_server_address)           # bytes, e.g. through Ray
    store.reserve(rid, num_tokens, ttl_s=60)
    t = sender.begin(peer, rid)
    for layer ...: store.write_layer_kv(rid, layer, k, v); t.push_layer(layer)
    t.finish();  ... t.poll() is TransferState.SUCCESS -> store.abort(rid)

Decode node::

    server = KVServer(store, ucx_fabric(transport_config), transport_config, secret=secret)
    server.address()                                       # hand to the prefill side
    server.admit(rid, num_tokens)                          # before the prefill side offers it
    server.poll(rid) is TransferState.SUCCESS -> handle = store.claim(rid)
    ... kernels read store.arena.pages / kmin / kmax through handle.block_table(layer)
    store.release(rid)
"""

from kv_store.admissions import Admission, Admissions
from kv_store.allocator import PageAllocator, PageRun
from kv_store.arena import Arena
from kv_store.auth import FrameKey, new_secret
from kv_store.config import KVGeometry, StoreConfig, TransportConfig
from kv_store.errors import (AuthenticationFailed, BadAddress, DuplicateRequest, FrameTooLarge, IncompleteWrite, KVStoreError,
                             LayoutError, MalformedFrame, PeerLost, PinningError, ProtocolError,
                             RefusalReason, RemoteStoreFull, RequestNotReady, StoreFull,
                             TransferAborted, TransferFailed, TransferRefused, TransferTimeout,
                             TransportConfigError, TransportError, UnknownRequest, VersionMismatch,
                             WireError)
from kv_store.handle import KVHandle
from kv_store.packing import LayerKV, pack_layer
from kv_store.rejections import Rejected, Rejections
from kv_store.peer_connection import PeerConnection
from kv_store.send_transfer import SendTransfer
from kv_store.sender import KVSender
from kv_store.server import KVServer
from kv_store.stats import StoreStats
from kv_store.store import EntryState, KVStore, RunView
from kv_store.transfer import TransferState, TransferStatus

__all__ = [
    "Admission", "Admissions", "Arena", "AuthenticationFailed", "BadAddress", "FrameKey",
    "Rejected", "Rejections", "new_secret", "DuplicateRequest", "EntryState", "FrameTooLarge", "IncompleteWrite", "KVGeometry",
    "KVHandle", "KVSender", "KVServer", "KVStore", "KVStoreError", "LayerKV", "LayoutError",
    "MalformedFrame", "PageAllocator", "PageRun", "PeerConnection", "PeerLost", "PinningError",
    "ProtocolError", "RefusalReason", "RemoteStoreFull", "RequestNotReady", "RunView",
    "SendTransfer", "StoreConfig", "StoreFull", "StoreStats", "TransferAborted", "TransferFailed",
    "TransferRefused", "TransferState", "TransferStatus", "TransferTimeout", "TransportConfig",
    "TransportConfigError", "TransportError", "UnknownRequest", "VersionMismatch", "WireError",
    "pack_layer",
]
