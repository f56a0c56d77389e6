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
                # Optionally with a deadline and pages held for the request (the decode worker's
                # reservation for the tokens it will generate), freed if the offer never comes.
                request_id, num_tokens, *extra = args
                deadline_s, hold_tokens = extra if extra else (None, 0)
                holds = ()
                if hold_tokens:
                    holds = (f"{request_id}/held",)
                    store.reserve(holds[0], hold_tokens, ttl_s=600)
                server.admit(request_id, num_tokens, deadline_s=deadline_s, holds=holds)
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


def fuzz_main(pipe: Connection, transport: TransportConfig, address: bytes, secret: bytes, seed: int,
              num_hellos: int, num_connections: int) -> None:
    """A hostile process inside the network (it can reach the server's UCX worker) that sends
    hostile HELLOs and, on connections it opens properly, hostile frames. Reports what each
    should have been counted as by the server."""
    _log_setup()
    try:
        pipe.send(("expected", dict(_fuzz(transport, address, secret, seed, num_hellos, num_connections))))
    except Exception:
        pipe.send(("crash", traceback.format_exc()))


def _fuzz(transport, address, secret, seed, num_hellos, num_connections):
    import asyncio
    import random
    from collections import Counter

    from kv_store import FrameKey, new_secret, wire
    from kv_store.transport_base import HELLO_TAG, ctrl_tag, reply_tag

    rng = random.Random(seed)
    fabric = ucx_fabric(transport)
    key, foreign = FrameKey(secret), FrameKey(new_secret())
    expected: Counter[str] = Counter()

    def conn_id() -> int:
        return rng.randrange(1, 2**32 - 1)

    def offer(xfer: int) -> wire.Offer:  # random ids and sizes, all in the schema's ranges
        return wire.Offer(xfer, f"fuzz-{rng.getrandbits(64):x}", rng.randrange(1, 2**32 - 1),
                          rng.randrange(1, 1024), rng.randrange(1, 64), rng.randrange(1, 512), 16, "bf16",
                          rng.randrange(0, 2**63), rng.randrange(0, 2**63))

    def hostile_hello(i: int) -> tuple[bytes, str]:
        hello = wire.Hello(conn_id(), fabric.address())
        kind = i % 6
        if kind == 0:
            return rng.randbytes(rng.randrange(1, 400)), "hello_malformed"
        if kind == 1:
            return wire.encode(hello, foreign, HELLO_TAG), "hello_auth"
        if kind == 2:  # the tag left out (zeros)
            raw = bytearray(wire.encode(hello, key, HELLO_TAG))
            raw[16:48] = bytes(32)
            return bytes(raw), "hello_auth"
        if kind == 3:  # authenticated, with a random address of another format
            first = rng.choice([b for b in range(256) if b != address[0]])
            junk = bytes([first]) + rng.randbytes(rng.randrange(0, 2000))
            return wire.encode(wire.Hello(conn_id(), junk), key, HELLO_TAG), "hello_address"
        if kind == 4:  # authenticated, an address too short to hold a header and a uuid
            junk = address[:1] + rng.randbytes(rng.randrange(0, 9))
            return wire.encode(wire.Hello(conn_id(), junk), key, HELLO_TAG), "hello_address"
        raw = bytearray(wire.encode(hello, key, HELLO_TAG))  # one byte flipped anywhere
        at = rng.randrange(len(raw))
        raw[at] ^= rng.randrange(1, 256)
        return bytes(raw), "hello_auth" if 16 <= at < 48 else "hello_malformed"

    def killer(cid: int, xfer: int, seq: int) -> tuple[bytes, str]:
        ch = ctrl_tag(cid)
        kind = rng.randrange(6)
        if kind == 0:
            return rng.randbytes(rng.randrange(1, 300)), "frame_malformed"
        if kind == 1:
            return wire.encode(offer(xfer), foreign, ch, seq), "frame_auth"
        if kind == 2:  # a genuine frame of another connection, replayed here
            return wire.encode(offer(xfer), key, ctrl_tag(cid ^ 1), seq), "frame_auth"
        if kind == 3:  # a genuine frame of this connection, replayed later
            return wire.encode(wire.Ping(), key, ch, max(seq - 1, 0) if seq else seq + 1), "frame_auth"
        if kind == 4:
            return wire.encode(wire.Layer(xfer + 7, 0, [1], 0), key, ch, seq), "protocol"
        return b"\0" * (wire.MAX_FRAME_BYTES + rng.randrange(1, 100)), "frame_malformed"

    async def run() -> None:
        ep = await fabric.connect(address)
        for i in range(num_hellos):
            payload, reason = hostile_hello(i)
            await ep.send(payload, HELLO_TAG)
            expected[reason] += 1
        for _ in range(num_connections):
            cid = conn_id()
            await ep.send(wire.encode(wire.Hello(cid, fabric.address()), key, HELLO_TAG), HELLO_TAG)
            buf = bytearray(wire.MAX_FRAME_BYTES)
            await asyncio.wait_for(ep.recv(buf, reply_tag(cid)), 20)
            assert wire.decode(buf, key, reply_tag(cid), 0) == wire.Welcome(cid, True, "")
            xfer = 0
            for _ in range(rng.randrange(0, 3)):  # offers for ids nobody admitted: refused, nothing held
                await ep.send(wire.encode(offer(xfer + 1), key, ctrl_tag(cid), xfer), ctrl_tag(cid))
                xfer += 1
                expected["not_admitted"] += 1
            payload, reason = killer(cid, xfer, xfer)
            await ep.send(payload, ctrl_tag(cid))
            expected[reason] += 1
            # Until the server says BYE (naming why). The BYE is best effort (its send is bounded
            # there), so no BYE is no failure here: the test checks the server's own account.
            try:
                seq = 1
                while not isinstance(await _recv_frame(ep, buf, key, reply_tag(cid), seq), wire.Bye):
                    seq += 1
            except asyncio.TimeoutError:
                pass
        ep.abort()

    fabric.loop.run(run(), timeout_s=300)
    return expected


async def _recv_frame(ep, buf: bytearray, key, tag: int, seq: int):
    import asyncio

    from kv_store import wire
    await asyncio.wait_for(ep.recv(buf, tag), 20)
    return wire.decode(buf, key, tag, seq)
