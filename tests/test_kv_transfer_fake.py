"""The transfer protocol over the in-process fake fabric: byte-exact pushes and every fault of a
peer or of the bytes in transit (hostile frames: test_kv_transfer_hostile_frames.py)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from kv_store import (FrameKey, KVGeometry, KVSender, KVServer, KVStore, PeerLost, RefusalReason,
                      RemoteStoreFull, StoreConfig, TransferAborted, TransferFailed, TransferRefused,
                      TransferState, TransportConfig, new_secret, pack_layer)
from kv_store.fake_transport import FakeHub
from polling import eventually

G = KVGeometry(num_layers=3, num_kv_heads=2, head_dim=16)
# Timeouts short enough for quick fault tests, long enough for a loaded 2-core CI machine.
TC = TransportConfig(heartbeat_s=0.1, timeout_s=1.0, connect_timeout_s=5.0)
TAGGED = dataclasses.replace(TC, bulk_tags=True)  # bulk tags are opt-in
SECRET = new_secret()
KEY = FrameKey(SECRET)


def server_on(store: KVStore, fabric, config: TransportConfig = TC) -> KVServer:
    return KVServer(store, fabric, config, secret=SECRET)


def sender_on(store: KVStore, fabric, config: TransportConfig = TC) -> KVSender:
    return KVSender(store, fabric, config, secret=SECRET)


def make_store(pages: int, geometry: KVGeometry = G, **kw) -> KVStore:
    per_page = geometry.page_bytes + geometry.meta_page_bytes
    return KVStore(StoreConfig(geometry, capacity_bytes=pages * per_page, pin="off", **kw))


def write_request(store: KVStore, rid: str, num_tokens: int, seed: int, *, server: KVServer | None = None,
                  layers=None):
    """Reserve and write ``layers`` (default all) of a random request; return its LayerKVs.
    With ``server``, the request is admitted there first (as the router does)."""
    if server is not None:
        server.admit(rid, num_tokens)
    rng = np.random.default_rng(seed)
    shape = (num_tokens, store.geometry.num_kv_heads, store.geometry.head_dim)
    kvs = [pack_layer(rng.standard_normal(shape, dtype=np.float32),
                      rng.standard_normal(shape, dtype=np.float32))
           for _ in range(store.geometry.num_layers)]
    store.reserve(rid, num_tokens, ttl_s=60)
    for layer in (range(store.geometry.num_layers) if layers is None else layers):
        store.write_layer(rid, layer, kvs[layer])
    return kvs


def assert_same(store: KVStore, rid: str, kvs) -> None:
    for layer, kv in enumerate(kvs):
        for got, want in zip(store.get(rid, layer), kv):
            np.testing.assert_array_equal(got, want)


@pytest.fixture
def hub():
    h = FakeHub()
    yield h
    h.close()


@pytest.fixture
def pair(hub):
    dst = make_store(400)
    server = server_on(dst, hub.fabric())
    src = make_store(400)
    sender = sender_on(src, hub.fabric())
    peer = sender.connect(server.address())
    yield src, dst, sender, peer, server
    sender.close()
    server.close()


@pytest.mark.parametrize("num_tokens", [1, 17, 300])
def test_layer_by_layer_push_is_byte_exact(pair, num_tokens):
    src, dst, sender, peer, server = pair
    rng = np.random.default_rng(num_tokens)
    shape = (num_tokens, G.num_kv_heads, G.head_dim)
    src.reserve("r", num_tokens, ttl_s=60)
    server.admit("r", num_tokens)
    t = sender.begin(peer, "r")
    assert t.poll() in (TransferState.PENDING, TransferState.TRANSFERRING)
    for layer in range(G.num_layers):  # pushed as produced, some before ACCEPT is back
        src.write_layer_kv("r", layer, rng.standard_normal(shape), rng.standard_normal(shape))
        t.push_layer(layer)
    t.finish()
    t.wait(5)
    assert server.poll("r") is TransferState.SUCCESS
    src.commit("r")
    assert_same(dst, "r", [src.get("r", layer) for layer in range(G.num_layers)])
    assert t.bytes_sent == G.kv_bytes(num_tokens) + G.meta_bytes(num_tokens)
    assert dst.stats().bytes_in == t.bytes_sent


def _fragment(store: KVStore, hole: int, count: int) -> None:
    """Leave ``count`` free holes of ``hole`` pages between held pages."""
    for i in range(2 * count):
        store.reserve(f"pad{i}", hole * 16 // store.geometry.num_layers or 1, ttl_s=600)
    for i in range(0, 2 * count, 2):
        store.abort(f"pad{i}")


def test_fragmented_stores_split_layers_into_segments(hub):
    src, dst = make_store(240), make_store(240)
    _fragment(dst, hole=3, count=40)   # forty 3-page holes fill the receiver's free space
    _fragment(src, hole=6, count=20)   # twenty 6-page holes on the sender: other boundaries
    server = server_on(dst, hub.fabric())
    sender = sender_on(src, hub.fabric())
    kvs = write_request(src, "r", 200, seed=3, server=server)  # 13 pages per layer
    sender.push(sender.connect(server.address()), "r").wait(5)
    assert max(len(r) for r in dst.handle("r").runs) > 1 and max(len(r) for r in src.handle("r").runs) > 1
    assert_same(dst, "r", kvs)
    sender.close()
    server.close()


def test_store_full_is_refused_before_any_bulk(hub):
    dst = make_store(10)
    server = server_on(dst, hub.fabric())
    src = make_store(100)
    sender = sender_on(src, hub.fabric())
    write_request(src, "big", 100, seed=1, server=server)  # 3 layers x 7 pages > 10
    peer = sender.connect(server.address())
    t = sender.push(peer, "big")
    with pytest.raises(RemoteStoreFull) as e:
        t.wait(5)
    assert e.value.reason is RefusalReason.STORE_FULL
    assert t.bytes_sent == 0 and src.stats().bytes_out == 0
    s = dst.stats()
    assert s.used_pages == 0 and s.bytes_in == 0 and s.alloc_failures == 1
    assert server.poll("big") is TransferState.FAILED
    write_request(src, "small", 40, seed=2, server=server)  # 3 x 3 pages: fits; the connection still works
    sender.push(peer, "small").wait(5)
    sender.close()
    server.close()


def test_geometry_mismatch_and_duplicate_are_refused(pair, hub):
    src, dst, sender, peer, server = pair
    kvs = write_request(src, "r", 20, seed=0, server=server)
    sender.push(peer, "r").wait(5)
    with pytest.raises(TransferRefused) as e:  # its admission was used up by the first offer
        sender.push(peer, "r").wait(5)
    assert e.value.reason is RefusalReason.NOT_ADMITTED
    server.admit("r", 20)
    with pytest.raises(TransferRefused) as e:
        sender.push(peer, "r").wait(5)
    assert e.value.reason is RefusalReason.DUPLICATE_REQUEST
    assert server.poll("r") is TransferState.SUCCESS  # the stored copy is untouched
    assert_same(dst, "r", kvs)
    other = make_store(50, KVGeometry(num_layers=3, num_kv_heads=4, head_dim=16))
    other_sender = sender_on(other, hub.fabric())
    write_request(other, "g", 20, seed=0, server=server)
    with pytest.raises(TransferRefused) as e:
        other_sender.push(other_sender.connect(server.address()), "g").wait(5)
    assert e.value.reason is RefusalReason.GEOMETRY_MISMATCH
    other_sender.close()


def test_sender_dying_mid_transfer_frees_its_pages(hub):
    dst = make_store(100)
    server = server_on(dst, hub.fabric())
    src = make_store(100)
    fabric = hub.fabric()
    sender = sender_on(src, fabric)
    write_request(src, "r", 100, seed=0, server=server, layers=[0])
    t = sender.begin(sender.connect(server.address()), "r")
    t.push_layer(0)
    eventually(lambda: dst.stats().bytes_in > 0)  # layer 0 landed, pages reserved
    assert dst.stats().used_pages == 3 * 7
    fabric.kill()
    eventually(lambda: server.poll("r") is TransferState.FAILED)
    assert isinstance(server.status("r").error, PeerLost)
    assert dst.stats().used_pages == 0 and server.num_connections == 0
    # The server carries on with the next sender.
    src2 = make_store(100)
    sender2 = sender_on(src2, hub.fabric())
    kvs = write_request(src2, "r", 100, seed=1, server=server)
    sender2.push(sender2.connect(server.address()), "r").wait(5)
    assert_same(dst, "r", kvs)
    sender2.close()
    server.close()


def test_receiver_dying_fails_the_sender_transfer(hub):
    server_fabric = hub.fabric()
    server = server_on(make_store(100), server_fabric)
    src = make_store(100)
    sender = sender_on(src, hub.fabric())
    write_request(src, "r", 50, seed=0, server=server)
    peer = sender.connect(server.address())
    server_fabric.kill()
    t = sender.push(peer, "r")
    with pytest.raises(PeerLost):
        t.wait(5)
    assert not peer.alive


def test_sender_abort_frees_receiver_pages(pair):
    src, dst, sender, peer, server = pair
    write_request(src, "r", 64, seed=0, server=server, layers=[0])
    t = sender.begin(peer, "r")
    t.push_layer(0)
    eventually(lambda: dst.stats().bytes_in > 0)
    t.abort("prefill failed")
    with pytest.raises(TransferAborted):
        t.wait(1)
    eventually(lambda: server.poll("r") is TransferState.FAILED)
    assert isinstance(server.status("r").error, TransferAborted)
    assert dst.stats().used_pages == 0 and server.num_connections == 1


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_bulk_bytes_changed_in_transit_fail_the_transfer_and_free_its_pages(hub, seed):
    """One byte of one bulk message (KV pages or metadata, any layer) changed on the wire: the
    receiver's tag of that layer differs from the sender's, so the request never becomes READY,
    both ends fail it naming the layer, its pages are freed and the connection carries on."""
    rng = np.random.default_rng(seed)
    dst = make_store(100)
    server = server_on(dst, hub.fabric(), TAGGED)
    src = make_store(200)
    fabric = hub.fabric()
    sender = sender_on(src, fabric, TAGGED)
    peer = sender.connect(server.address())
    num_tokens = int(rng.integers(1, 100))
    write_request(src, "r", num_tokens, seed=seed, server=server)
    fabric.flip_bulk_byte(int(rng.integers(0, 3 * G.num_layers)), int(rng.integers(0, 1 << 20)))
    t = sender.push(peer, "r")
    with pytest.raises(TransferFailed, match=r"integrity check failed: the bulk bytes of layers \[\d\]") as e:
        t.wait(5)
    assert "pages are freed" in str(e.value)
    eventually(lambda: server.poll("r") is TransferState.FAILED)
    assert "integrity check failed" in str(server.status("r").error)
    assert "r" not in dst and dst.stats().used_pages == 0
    assert server.rejections.snapshot()["bulk_tag"] == 1
    # The same connection carries the next request, byte-exact.
    kvs = write_request(src, "r2", num_tokens + 17, seed=seed + 10, server=server)
    sender.push(peer, "r2").wait(5)
    assert peer.alive and server.poll("r2") is TransferState.SUCCESS
    assert_same(dst, "r2", kvs)
    sender.close()
    server.close()


def test_untagged_bulk_is_refused_unless_both_ends_trust_the_network(hub):
    untagged = TC
    for server_config, ok in ((TAGGED, False), (untagged, True)):
        dst = make_store(100)
        server = server_on(dst, hub.fabric(), server_config)
        src = make_store(100)
        sender = sender_on(src, hub.fabric(), untagged)
        kvs = write_request(src, "r", 40, seed=7, server=server)
        t = sender.push(sender.connect(server.address()), "r")
        if ok:
            t.wait(5)
            assert_same(dst, "r", kvs)
        else:
            with pytest.raises(TransferFailed, match="came without tags .*transport.bulk_tags: false"):
                t.wait(5)
            eventually(lambda: server.poll("r") is TransferState.FAILED)
            assert dst.stats().used_pages == 0
        sender.close()
        server.close()


def test_bulk_tag_covers_every_byte_and_its_place():
    rng = np.random.default_rng(5)
    messages = [rng.integers(0, 1 << 16, size=(7, 2, 32), dtype=np.uint16),
                rng.integers(0, 1 << 16, size=(7, 2, 16), dtype=np.uint16)]
    tag = KEY.bulk_tag(9, 3, 1, messages)
    assert len(tag) == 32 and tag == KEY.bulk_tag(9, 3, 1, [m.copy() for m in messages])
    for conn, xfer, layer in ((8, 3, 1), (9, 4, 1), (9, 3, 2)):
        assert KEY.bulk_tag(conn, xfer, layer, messages) != tag
    assert FrameKey(new_secret()).bulk_tag(9, 3, 1, messages) != tag
    flipped = [m.copy() for m in messages]
    flipped[1].reshape(-1).view(np.uint8)[int(rng.integers(0, flipped[1].nbytes))] ^= 1
    assert KEY.bulk_tag(9, 3, 1, flipped) != tag
    assert KEY.bulk_tag(9, 3, 1, messages[::-1]) != tag


def test_unclaimed_request_is_reclaimed_when_its_lease_ends(hub):
    dst = make_store(100, ready_ttl_s=0.2)
    server = server_on(dst, hub.fabric())
    src = make_store(100)
    sender = sender_on(src, hub.fabric())
    peer = sender.connect(server.address())
    for rid in ("claimed", "forgotten"):
        write_request(src, rid, 30, seed=0, server=server)
        sender.push(peer, rid).wait(5)
    dst.claim("claimed")
    eventually(lambda: "forgotten" not in dst)
    assert "claimed" in dst and dst.stats().leases_expired == 1
    sender.close()
    server.close()


def test_many_concurrent_transfers_from_two_senders(hub):
    dst = make_store(2000)
    server = server_on(dst, hub.fabric(), TransportConfig(heartbeat_s=0.1, timeout_s=1.0,
                                                          layers_in_flight=2))
    expected, transfers = {}, []
    for s in range(2):
        src = make_store(600)
        sender = sender_on(src, hub.fabric())
        peer = sender.connect(server.address())
        for i in range(5):
            rid = f"s{s}-r{i}"
            expected[rid] = write_request(src, rid, 17 + 31 * i, seed=10 * s + i, server=server)
            transfers.append(sender.push(peer, rid))
    for t in transfers:
        t.wait(10)
    for rid, kvs in expected.items():
        assert_same(dst, rid, kvs)
    server.close()
