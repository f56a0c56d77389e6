"""Hostile frames against a live KV server over the in-process fake fabric: each bad, fuzzed,
forged or replayed frame closes only its own connection (or is refused with a typed reason),
no page is left used, and the server keeps serving real pushes."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kv_store import FrameKey, KVServer, TransferState, new_secret, wire
from kv_store.fake_transport import FakeHub
from kv_store.transport_base import HELLO_TAG, ctrl_tag, reply_tag
from polling import eventually
from tests.test_kv_transfer_fake import G, KEY, assert_same, make_store, sender_on, server_on, write_request


@pytest.fixture(scope="module")
def lone_server():
    hub = FakeHub()
    dst = make_store(200)
    server = server_on(dst, hub.fabric())
    yield hub, dst, server
    server.close()
    hub.close()


def _raw_connection(hub: FakeHub, server: KVServer):
    """Connect by hand (HELLO, WELCOME) to put arbitrary frames on a live connection."""
    fabric = hub.fabric()
    conn_id = secrets.randbelow(2**31) + 1

    async def go():
        ep = await fabric.connect(server.address())
        await ep.send(wire.encode(wire.Hello(conn_id, fabric.address()), KEY, HELLO_TAG), HELLO_TAG)
        buf = bytearray(wire.MAX_FRAME_BYTES)
        await asyncio.wait_for(ep.recv(buf, reply_tag(conn_id)), 2)
        assert wire.decode(buf, KEY, reply_tag(conn_id)) == wire.Welcome(conn_id, True, "")
        return ep
    return hub.loop.run(go()), conn_id


def _server_still_serves(hub, server, dst, rid: str) -> None:
    src = make_store(50)
    sender = sender_on(src, hub.fabric())
    kvs = write_request(src, rid, 40, seed=5, server=server)
    sender.push(sender.connect(server.address()), rid).wait(5)
    assert_same(dst, rid, kvs)
    dst.claim(rid)
    dst.release(rid)
    sender.close()


def _offer(rid: str = "r", kv_bytes: int = 1) -> wire.Offer:
    return wire.Offer(1, rid, 10, 3, 2, 16, 16, "bf16", kv_bytes, 1)


# Each builds the payload for a connection's control channel.
BAD_FRAMES = {
    "empty": lambda ch: b"",
    "garbage": lambda ch: b"\x00\xff" * 50,
    "truncated": lambda ch: wire.encode(_offer(), KEY, ch)[:-3],
    "oversize": lambda ch: b"\0" * (wire.MAX_FRAME_BYTES + 1),
    "unknown transfer": lambda ch: wire.encode(wire.Layer(99, 0, [1], 0), KEY, ch),
    "wrong direction": lambda ch: wire.encode(wire.Committed(1), KEY, ch),
    "another deployment's key": lambda ch: wire.encode(_offer(), FrameKey(new_secret()), ch),
    "replayed from another connection": lambda ch: wire.encode(_offer(), KEY, ch ^ (1 << 33)),
    "bad sizes": lambda ch: wire.encode(_offer(), KEY, ch),
    "not admitted": lambda ch: wire.encode(_offer("never-admitted", G.kv_bytes(10)), KEY, ch),
    "a later frame first": lambda ch: wire.encode(wire.Ping(), KEY, ch, 1),
}
REFUSED = {"bad sizes": ("r", "bad_request"), "not admitted": ("never-admitted", "not_admitted")}


@pytest.mark.parametrize("name", list(BAD_FRAMES))
def test_bad_frame_closes_only_its_connection(lone_server, name, caplog):
    hub, dst, server = lone_server
    ep, conn_id = _raw_connection(hub, server)
    rejected = server.rejections.total
    if name == "bad sizes":
        server.admit("r", 10)
    with caplog.at_level(logging.INFO, logger="kv_store"):
        hub.loop.run(ep.send(BAD_FRAMES[name](ctrl_tag(conn_id)), ctrl_tag(conn_id)))
        if name in REFUSED:  # a typed refusal, not a broken connection
            rid, reason = REFUSED[name]
            eventually(lambda: f"refused request {rid!r} ({reason})" in caplog.text)
            assert server.connected(conn_id)
            if name == "bad sizes":
                assert server.poll("r") is TransferState.FAILED
            else:  # nothing recorded for an id this server never admitted
                assert server.status(rid) is None and server.rejections.total == rejected + 1
        else:
            eventually(lambda: not server.connected(conn_id))
            assert f"closing KV connection {conn_id:#x}: " in caplog.text
            assert server.rejections.total == rejected + 1
            if "key" in name or "replayed" in name or "later" in name:
                assert "authentication failed" in caplog.text
                assert server.rejections.snapshot()["frame_auth"] >= 1
    assert dst.stats().used_pages == 0
    _server_still_serves(hub, server, dst, f"after-{name}")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(min_size=1, max_size=200))
def test_fuzzed_frames_close_the_connection_and_the_server_stays_up(lone_server, payload):
    hub, dst, server = lone_server
    ep, conn_id = _raw_connection(hub, server)
    rejected = server.rejections.total
    hub.loop.run(ep.send(payload, ctrl_tag(conn_id)))
    eventually(lambda: not server.connected(conn_id))
    assert server.rejections.total > rejected
    assert dst.stats().used_pages == 0


def test_bad_hello_frames_are_dropped(lone_server):
    hub, dst, server = lone_server
    fabric = hub.fabric()

    before, conns = server.rejections.snapshot(), server.num_connections
    hello = wire.Hello(5, fabric.address())
    junk = {
        "hello_malformed": [b"nonsense", b"\0" * (wire.MAX_FRAME_BYTES + 10),
                            wire.encode(wire.Ping(), KEY, HELLO_TAG)],
        "hello_auth": [wire.encode(hello, FrameKey(new_secret()), HELLO_TAG),
                       wire.encode(hello, KEY, ctrl_tag(5))],  # a frame of another channel
        "hello_unreachable": [wire.encode(wire.Hello(6, b"no-such-worker"), KEY, HELLO_TAG)],
    }

    async def send_hellos():
        ep = await fabric.connect(server.address())
        for frames in junk.values():
            for frame in frames:
                await ep.send(frame, HELLO_TAG)
    hub.loop.run(send_hellos())
    _server_still_serves(hub, server, dst, "after-hellos")
    after = server.rejections.snapshot()
    for reason, frames in junk.items():
        assert after[reason] - before[reason] == len(frames), reason
    assert server.num_connections <= conns  # none of them opened one (others may time out meanwhile)


def test_a_frame_replayed_on_its_own_channel_closes_the_connection(lone_server):
    """Each frame's tag covers its index on its channel: a genuine frame sent again does not verify."""
    hub, dst, server = lone_server
    ep, conn_id = _raw_connection(hub, server)
    ping = wire.encode(wire.Ping(), KEY, ctrl_tag(conn_id), 0)
    hub.loop.run(ep.send(ping, ctrl_tag(conn_id)))
    time.sleep(0.3)
    assert server.connected(conn_id)  # the genuine one is taken
    before = server.rejections.snapshot()["frame_auth"]
    hub.loop.run(ep.send(ping, ctrl_tag(conn_id)))
    eventually(lambda: not server.connected(conn_id))
    assert server.rejections.snapshot()["frame_auth"] == before + 1
