"""A loopback decode-side KV peer for the benchmarks: a spawned process whose ``KVServer``
takes a prefill's UCX push into a store of its own, as a decode worker's does.

    peer = DecodePeer(geometry, capacity_bytes, transport, secret)
    peer.admit("r0", num_tokens)     # the router's part: the next offer of r0 is expected
    ...                              # KVSender.connect(peer.address), begin, push_layer, finish
    peer.drain("r0")                 # its commit arrived; the pages are freed again
    peer.close()

``PushTarget`` wraps a peer and a sender to it for timing a layer-pipelined push. Loopback only: the peer binds nothing but its UCX worker (the sender connects by address).
"""

from __future__ import annotations

import multiprocessing as mp
import time

from kv_store import (KVGeometry, KVSender, KVServer, KVStore, StoreConfig, TransferState, TransportConfig,
                      new_secret)
from kv_store.ucx_transport import ucx_fabric


def _serve(pipe, geometry: KVGeometry, capacity_bytes: int, transport: TransportConfig, secret: bytes) -> None:
    store = KVStore(StoreConfig(geometry, capacity_bytes, pin="off"))
    server = KVServer(store, ucx_fabric(transport), transport, secret=secret)
    pipe.send(server.address())
    try:
        while True:
            cmd, *args = pipe.recv()
            if cmd == "admit":
                server.admit(args[0], args[1], deadline_s=3600)
            elif cmd == "drain":
                server.wait(args[0], transport.timeout_s)
                store.claim(args[0])
                store.release(args[0])
            else:
                pipe.send(store.stats().used_pages)
                return
            pipe.send("ok")
    finally:
        server.close()
        store.close()


class DecodePeer:
    def __init__(self, geometry: KVGeometry, capacity_bytes: int, transport: TransportConfig, secret: bytes) -> None:
        ctx = mp.get_context("spawn")  # the parent may hold a CUDA context
        self._pipe, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, geometry, capacity_bytes, transport, secret),
                                 daemon=True)
        self._proc.start()
        self.address: bytes = self._call_raw()

    def _call_raw(self, *msg):
        if msg:
            self._pipe.send(msg)
        if not self._pipe.poll(120):
            raise RuntimeError("the loopback decode peer did not answer within 120 s")
        return self._pipe.recv()

    def admit(self, request_id: str, num_tokens: int) -> None:
        self._call_raw("admit", request_id, num_tokens)

    def drain(self, request_id: str) -> None:
        self._call_raw("drain", request_id)

    def close(self) -> int:
        """Stops the peer; returns its store's pages still in use (0: nothing leaked)."""
        try:
            return self._call_raw("stop")
        finally:
            self._proc.join(10)


class PushTarget:
    """A loopback ``DecodePeer`` and a sender to it over UCX shared memory, for timing a
    prefill whose layers go on the wire as they land in its store (the prefill worker's pipeline)."""

    def __init__(self, geometry: KVGeometry, capacity_bytes: int) -> None:
        self.transport = TransportConfig(ucx_tls="sm,self", timeout_s=600.0)
        secret = new_secret()
        self.peer = DecodePeer(geometry, capacity_bytes, self.transport, secret)
        self.fabric = ucx_fabric(self.transport)
        self._sender = lambda store: KVSender(store, self.fabric, self.transport, secret=secret)

    def timed(self, store: KVStore, rid: str, n: int, prefill_into_store) -> float:
        """Seconds from the offer to the peer's commit of ``prefill_into_store(after_layer)``, which
        must call ``after_layer(layer)`` once each layer is in ``store``; the peer then frees it."""
        self.peer.admit(rid, n)
        sender = self._sender(store)
        try:
            conn = sender.connect(self.peer.address)
            t0 = time.perf_counter()
            store.reserve(rid, n)
            transfer = sender.begin(conn, rid)
            prefill_into_store(transfer.push_layer)
            transfer.finish()
            while transfer.poll() not in (TransferState.SUCCESS, TransferState.FAILED):
                time.sleep(0.0005)
            elapsed = time.perf_counter() - t0
            if transfer.poll() is not TransferState.SUCCESS:
                raise RuntimeError(f"the UCX push failed: {transfer.error}")
            self.peer.drain(rid)
            return elapsed
        finally:
            store.abort(rid)
            sender.close()

    def close(self) -> None:
        left = self.peer.close()
        if left:
            raise RuntimeError(f"the decode peer kept {left} pages after its last drain")
