"""Child processes for the two-process UCX tests: a decode-side server and a prefill-side sender.

Each runs in a process of its own (multiprocessing spawn: UCX is initialised inside it,
after the process exists) and obeys commands from a pipe. The pipe is local test plumbing;
the KV itself only ever crosses UCX.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import traceback
from multiprocessing.connection import Connection

import numpy as np

from kv_store import KVSender, KVServer, KVStore, StoreConfig, TransportConfig
from kv_store.ucx_transport import ucx_fabric


def random_kv(geometry, num_tokens: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per layer ``k, v [T, Hkv, d]`` float32, reproducible from the seed."""
    rng = np.random.default_rng(seed)
    shape = (num_tokens, geometry.num_kv_heads, geometry.head_dim)
    return [(rng.standard_normal(shape, dtype=np.float32), rng.standard_normal(shape, dtype=np.float32))
            for _ in range(geometry.num_layers)]


def digest(store: KVStore, request_id: str) -> str:
    """Hash of every layer's blocks and metadata, in logical order."""
    h = hashlib.sha256()
    for layer in range(store.geometry.num_layers):
        for arr in store.get(request_id, layer):
            h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def _log_setup() -> None:
    logging.basicConfig(level=logging.INFO, format=f"[{os.getpid()}] %(name)s %(levelname)s %(message)s")


def server_main(pipe: Connection, store_config: StoreConfig, transport: TransportConfig,
                secret: bytes) -> None:
    _log_setup()
    try:
        store = KVStore(store_config)
        server = KVServer(store, ucx_fabric(transport), transport, secret=secret)
        pipe.send(("address", server.address()))
        while True:
            cmd, *args = pipe.recv()
            if cmd == "admit":
                request_id, num_tokens = args
                server.admit(request_id, num_tokens)
                pipe.send("ok")
            elif cmd == "rejections":
                pipe.send(server.rejections.snapshot())
            elif cmd == "connections":
                pipe.send(server.num_connections)
            elif cmd == "wait":
                request_id, timeout_s = args
                try:
                    server.wait(request_id, timeout_s)
                    pipe.send(("ok", digest(store, request_id)))
                except Exception as e:  # reported to the test, which asserts on the type name
                    pipe.send(("error", type(e).__name__, str(e)))
            elif cmd == "poll":
                error = server.status(args[0]).error if server.status(args[0]) else None
                pipe.send((server.poll(args[0]).value, type(error).__name__ if error else None))
            elif cmd == "release":
                store.claim(args[0])
                store.release(args[0])
                pipe.send("ok")
            elif cmd == "stats":
                pipe.send(store.stats())
            elif cmd == "stop":
                server.close()
                pipe.send("stopped")
                return
    except Exception:
        pipe.send(("crash", traceback.format_exc()))


def sender_main(pipe: Connection, store_config: StoreConfig, transport: TransportConfig,
                address: bytes, secret: bytes) -> None:
    _log_setup()
    try:
        store = KVStore(store_config)
        sender = KVSender(store, ucx_fabric(transport), transport, secret=secret)
        try:
            peer = sender.connect(address)
        except Exception as e:  # reported to the test (a wrong secret is expected to land here)
            pipe.send(("connect_failed", type(e).__name__, str(e), store.stats().used_pages))
            pipe.recv()  # hold the process until the test has looked at the server
            return
        pipe.send(("connected",))
        while True:
            cmd, *args = pipe.recv()
            if cmd == "push":
                request_id, num_tokens, seed, die_after = args
                kv = random_kv(store.geometry, num_tokens, seed)
                store.reserve(request_id, num_tokens, ttl_s=600)
                transfer = sender.begin(peer, request_id)
                for layer, (k, v) in enumerate(kv):
                    store.write_layer_kv(request_id, layer, k, v)
                    transfer.push_layer(layer)
                    if die_after is not None and layer + 1 == die_after:
                        time.sleep(0.5)  # let the pushed layers reach the wire
                        os._exit(3)  # a prefill process dying mid-transfer
                transfer.finish()
                try:
                    transfer.wait(60)
                    store.commit(request_id)
                    pipe.send(("ok", transfer.poll().value))
                except Exception as e:
                    pipe.send(("error", type(e).__name__, str(e)))
                store.abort(request_id)
            elif cmd == "raw_frame":
                # A hand-made frame on this connection's control tag: the fuzz case over UCX.
                from kv_store.transport_base import ctrl_tag
                payload = args[0]
                sender.fabric.loop.run(peer.ep.send(payload, ctrl_tag(peer.conn_id)), timeout_s=10)
                pipe.send("sent")
            elif cmd == "conn_id":
                pipe.send(peer.conn_id)
            elif cmd == "stop":
                sender.close()
                pipe.send("stopped")
                return
    except Exception:
        pipe.send(("crash", traceback.format_exc()))
