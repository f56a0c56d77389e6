"""A loopback decode-side KV peer for the benchmarks: a spawned process whose ``KVServer``
takes a prefill's UCX push into a store of its own, as a decode worker's does.

    peer = DecodePeer(geometry, capacity_bytes, transport, secret)
    peer.admit("r0", num_tokens)     # the router's part: the next offer of r0 is expected
    ...                              # KVSender.connect(peer.address), begin, push_layer, finish
    peer.drain("r0")                 # its commit arrived; the pages are freed again
    peer.close()

Loopback only: the peer binds nothing but its UCX worker (the sender connects by address).
"""

from __future__ import annotations

import multiprocessing as mp

from kv_store import KVGeometry, KVServer, KVStore, StoreConfig, TransportConfig
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
