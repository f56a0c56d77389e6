"""A hostile process on the KV network: hostile HELLOs (random bytes, foreign and missing tags,
flipped bytes, random addresses) and, on connections it opened properly, random frames,
foreign-key and replayed frames, protocol breaches and offers for ids nobody admitted. The
decode-side server (a child process over UCX loopback) counts every one of them, holds no
page for any, stays alive and still lands a correct transfer byte-exact."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("ucxx")

import kv_peers  # noqa: E402
from test_kv_ucx import SECRET, TC, Peer, admit, ask, expected_digest, start_sender, store_config  # noqa: E402

HELLOS = 240          # bounded: ~1 ms each over loopback
CONNECTIONS = 24      # each: handshake, 0-2 refused offers, one frame that ends it


@pytest.mark.parametrize("seed", [1])
def test_hostile_frames_never_kill_the_server_and_each_is_counted(seed):
    server = Peer(kv_peers.server_main, store_config(600), TC, SECRET)
    try:
        kind, address = ask(server.pipe, None)
        assert kind == "address"
        fuzzer = Peer(kv_peers.fuzz_main, TC, address, SECRET, seed, HELLOS, CONNECTIONS)
        kind, expected = ask(fuzzer.pipe, None, timeout_s=300)
        assert kind == "expected", expected
        fuzzer.proc.join(20)
        assert sum(expected.values()) == HELLOS + CONNECTIONS + expected.get("not_admitted", 0)
        assert all(expected.get(r) for r in ("hello_malformed", "hello_auth", "hello_address",
                                              "frame_malformed", "frame_auth", "protocol", "not_admitted"))
        deadline = time.monotonic() + 30
        while (got := ask(server.pipe, ("rejections",))) != {**dict.fromkeys(got, 0), **expected}:
            assert time.monotonic() < deadline, f"counted {got}, sent {expected}"
            time.sleep(0.2)
        assert server.proc.is_alive()
        assert ask(server.pipe, ("stats",)).used_pages == 0
        while ask(server.pipe, ("connections",)):  # every hostile connection was closed
            assert time.monotonic() < deadline
            time.sleep(0.2)
        sender = start_sender(address)
        try:
            admit(server, "after-fuzz", 1000)
            assert ask(sender.pipe, ("push", "after-fuzz", 1000, seed, None)) == ("ok", "success")
            assert ask(server.pipe, ("wait", "after-fuzz", 20)) == ("ok", expected_digest(1000, seed))
            assert ask(server.pipe, ("release", "after-fuzz")) == "ok"
        finally:
            sender.stop()
        assert ask(server.pipe, ("stats",)).used_pages == 0
    finally:
        server.stop()
