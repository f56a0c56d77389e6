#!/usr/bin/env python
"""Benchmark: raw UCXX send/recv vs our store-to-store KV push, two processes, loopback.

(a) raw: one process sends B bytes to the other with plain ucxx tag messages (endpoints
    from worker addresses, as the transport makes them), between the same arena memory.
(b) push: the same B bytes as a real KV cache (every layer in 16-token pages, kmin/kmax
    metadata) pushed from a prefill store to a decode store by ``KVSender``/``KVServer``:
    offer, accept, per-layer frames and bulk, commit.

Prints GB/s of both, the ratio (b)/(a) (target >= 0.8) and the time to push the KV.
Defaults are a 32k-token KV of an 8B-shaped model (32 layers x 8 KV heads x d=128 bf16 =
4 GiB, plus 0.25 GiB metadata), which needs ~9 GiB of RAM over the two processes; run
smaller with e.g. ``--tokens 4096 --layers 8``.

    python scripts/bench_transfer.py [--tokens 32768 --layers 32 --kv-heads 8 --head-dim 128]
                                     [--tls sm,self] [--iters 3] [--inflight 4] [--no-verify]
                                     [--bulk-tags]

(b) runs as deployed by default (``transport.bulk_tags: false``); ``--bulk-tags`` adds the
per-layer bulk tags (HMAC-SHA256 on both ends) to show their cost.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")

import numpy as np  # noqa: E402

from kv_store import (KVGeometry, KVSender, KVServer, KVStore, StoreConfig, TransportConfig,  # noqa: E402
                      new_secret)
from kv_store.ucx_transport import ucx_fabric  # noqa: E402

RAW_TAG = 0x5EED_0000_0000_0001
RAW_CHUNK = 1 << 30  # raw messages of at most 1 GiB, all posted at once


def _store_config(geometry: KVGeometry, num_tokens: int, pin: str) -> StoreConfig:
    pages = geometry.num_layers * geometry.blocks_for(num_tokens) + 1
    return StoreConfig(geometry, capacity_bytes=pages * (geometry.page_bytes + geometry.meta_page_bytes),
                       pin=pin)


def _raw_buffers(store: KVStore, nbytes: int) -> list[np.ndarray]:
    """Raw messages over the arena's own bytes: KV pages, then kmin and kmax."""
    flat = [a.reshape(-1).view(np.uint8) for a in (store.arena.pages, store.arena.kmin, store.arena.kmax)]
    out, left = [], nbytes
    for arr in flat:
        for lo in range(0, arr.nbytes, RAW_CHUNK):
            if left <= 0:
                return out
            piece = arr[lo:lo + min(RAW_CHUNK, left)]
            out.append(piece)
            left -= piece.nbytes
    return out


def _checksum(store: KVStore, request_id: str) -> int:
    crc = 0
    for layer in range(store.geometry.num_layers):
        for view in store.layer_views(request_id, layer):
            for arr in (view.pages, view.kmin, view.kmax):
                crc = zlib.crc32(memoryview(arr).cast("B"), crc)
    return crc


def receiver_main(pipe, geometry, num_tokens, transport, pin, secret) -> None:
    import ucxx
    from ucxx.types import Tag
    store = KVStore(_store_config(geometry, num_tokens, pin))
    fabric = ucx_fabric(transport)
    server = KVServer(store, fabric, transport, secret=secret)
    server.admit("kv", num_tokens, deadline_s=3600)  # the router's part: the next push is expected
    pipe.send(server.address())
    while True:
        cmd, *args = pipe.recv()
        if cmd == "raw_recv":
            bufs = _raw_buffers(store, args[0])

            async def recv_all():
                import asyncio
                await asyncio.gather(*(ucxx.recv(b, Tag(RAW_TAG + i)) for i, b in enumerate(bufs)))
            fut = fabric.loop.submit(recv_all())
            pipe.send("posted")
            fut.result()
            pipe.send("received")
        elif cmd == "wait":
            server.wait(args[0], 600)
            crc = _checksum(store, args[0]) if args[1] else 0
            store.claim(args[0])
            store.release(args[0])
            server.admit("kv", num_tokens, deadline_s=3600)
            pipe.send(crc)
        elif cmd == "stop":
            server.close()
            pipe.send(store.stats())
            return


def sender_main(pipe, geometry, num_tokens, transport, address, verify, pin, secret) -> None:
    import ucxx
    from ucxx.types import Tag
    store = KVStore(_store_config(geometry, num_tokens, pin))
    fabric = ucx_fabric(transport)
    sender = KVSender(store, fabric, transport, secret=secret)
    peer = sender.connect(address)
    # The KV: random bits in every page and metadata row of one stored request (a random
    # 16 MiB tile, varied per layer: generating 4 GiB of randomness would take longer than the bench).
    store.reserve("kv", num_tokens)
    tile = np.random.default_rng(0).integers(0, 1 << 16, size=8 << 20, dtype=np.uint16)
    for layer in range(geometry.num_layers):
        for view in store.layer_views("kv", layer):
            for arr in (view.pages, view.kmin, view.kmax):
                flat = arr.reshape(-1)
                for lo in range(0, flat.size, tile.size):
                    n = min(tile.size, flat.size - lo)
                    np.bitwise_xor(tile[:n], layer, out=flat[lo:lo + n])
        store.mark_written("kv", layer)
    store.commit("kv")
    crc = _checksum(store, "kv") if verify else 0
    raw_ep = fabric.loop.run(ucxx.create_endpoint_from_worker_address(
        ucxx.get_ucx_address_from_buffer(address), endpoint_error_handling=transport.ucx_error_handling))
    pipe.send(("ready", crc))
    while True:
        cmd, *args = pipe.recv()
        if cmd == "raw_send":
            bufs = _raw_buffers(store, args[0])

            async def send_all():
                import asyncio
                t0 = time.perf_counter()
                await asyncio.gather(*(raw_ep.send(b, tag=Tag(RAW_TAG + i), force_tag=True)
                                       for i, b in enumerate(bufs)))
                return time.perf_counter() - t0
            pipe.send(fabric.loop.run(send_all()))
        elif cmd == "push":
            # The receiver released the previous copy, so the same id is free again there.
            t0 = time.perf_counter()
            transfer = sender.push(peer, "kv")
            transfer.wait(600)
            pipe.send(time.perf_counter() - t0)
        elif cmd == "stop":
            sender.close()
            pipe.send(store.stats())
            return


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--tls", default="sm,self", help="UCX_TLS (default sm,self)")
    ap.add_argument("--net-devices", default=None, help="UCX_NET_DEVICES, e.g. lo for tcp")
    ap.add_argument("--inflight", type=int, default=4, help="layers in flight per connection")
    ap.add_argument("--iters", type=int, default=3, help="timed iterations of each (after one warm-up)")
    ap.add_argument("--no-verify", action="store_true", help="skip the crc32 of the received KV")
    ap.add_argument("--bulk-tags", action="store_true",
                    help="push with the per-layer bulk tags (transport.bulk_tags: true)")
    ap.add_argument("--pin", choices=("off", "auto"), default="off",
                    help="auto: page-lock both arenas for the GPU when one is present")
    args = ap.parse_args()

    geometry = KVGeometry(args.layers, args.kv_heads, args.head_dim)
    transport = TransportConfig(ucx_tls=args.tls, ucx_net_devices=args.net_devices or "all",
                                layers_in_flight=args.inflight, timeout_s=60.0, bulk_tags=args.bulk_tags)
    secret = new_secret()
    kv_bytes, meta_bytes = geometry.kv_bytes(args.tokens), geometry.meta_bytes(args.tokens)
    total = kv_bytes + meta_bytes
    verify = not args.no_verify
    print(f"KV: {args.tokens} tokens x {args.layers} layers x {args.kv_heads} KV heads x d={args.head_dim} "
          f"bf16 = {kv_bytes / 2**30:.3f} GiB + {meta_bytes / 2**30:.3f} GiB metadata; "
          f"UCX_TLS={args.tls}, {args.inflight} layers in flight, pin={args.pin}, "
          f"bulk tags {'on' if args.bulk_tags else 'off'}", flush=True)

    ctx = mp.get_context("spawn")
    rpipe, rchild = ctx.Pipe()
    spipe, schild = ctx.Pipe()
    receiver = ctx.Process(target=receiver_main, args=(rchild, geometry, args.tokens, transport, args.pin, secret))
    receiver.start()
    address = rpipe.recv()
    sender = ctx.Process(target=sender_main, args=(schild, geometry, args.tokens, transport, address, verify,
                                                         args.pin, secret))
    sender.start()
    _, sent_crc = spipe.recv()

    raw_times, push_times = [], []
    for i in range(args.iters + 1):
        rpipe.send(("raw_recv", total))
        assert rpipe.recv() == "posted"
        spipe.send(("raw_send", total))
        dt = spipe.recv()
        assert rpipe.recv() == "received"
        if i:
            raw_times.append(dt)
        spipe.send(("push",))
        dt = spipe.recv()
        rpipe.send(("wait", "kv", verify and i == args.iters))
        crc = rpipe.recv()
        if i:
            push_times.append(dt)
        if verify and i == args.iters and crc != sent_crc:
            raise SystemExit(f"received KV differs from the sent KV (crc {crc:#x} != {sent_crc:#x})")
    spipe.send(("stop",))
    spipe.recv()
    rpipe.send(("stop",))
    rpipe.recv()
    sender.join(30)
    receiver.join(30)

    raw, push = statistics.median(raw_times), statistics.median(push_times)
    gbs = lambda t: total / t / 1e9  # noqa: E731
    for label, t, times in (("(a) raw ucxx send/recv ", raw, raw_times),
                            ("(b) store-to-store push", push, push_times)):
        print(f"{label}: {total / 2**30:.3f} GiB, median {t * 1e3:8.1f} ms = {gbs(t):6.2f} GB/s "
              f"(all: {', '.join(f'{gbs(x):.2f}' for x in times)})")
    print(f"ratio (b)/(a) = {raw / push:.3f}  (target >= 0.8)")
    print(f"push of a {args.tokens}-token KV ({args.layers} layers x {args.kv_heads} KV heads x "
          f"d={args.head_dim} bf16, {kv_bytes / 2**30:.2f} GiB): {push:.3f} s"
          + ("; received KV verified byte-exact (crc32)" if verify else ""))


if __name__ == "__main__":
    main()
