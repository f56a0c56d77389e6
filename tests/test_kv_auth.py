"""The KV channel's admission and authentication over the in-process fabric: an offer holds
pages only for an admitted request, an admission without an offer is freed at its deadline,
and a sender with another deployment's secret gets nothing but a clear error."""

from __future__ import annotations

import time

import numpy as np
import pytest

from kv_store import (KVGeometry, KVSender, KVServer, KVStore, PeerLost, RefusalReason, StoreConfig,
                      TransferFailed, TransferRefused, TransferState, TransportConfig, new_secret,
                      pack_layer)
from kv_store.fake_transport import FakeHub
from polling import eventually

G = KVGeometry(num_layers=3, num_kv_heads=2, head_dim=16)
TC = TransportConfig(heartbeat_s=0.1, timeout_s=1.0, connect_timeout_s=1.0, offer_deadline_s=0.5)
SECRET = new_secret()


def make_store(pages: int) -> KVStore:
    return KVStore(StoreConfig(G, capacity_bytes=pages * (G.page_bytes + G.meta_page_bytes), pin="off"))


def write_request(store: KVStore, rid: str, num_tokens: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    shape = (num_tokens, G.num_kv_heads, G.head_dim)
    kvs = [pack_layer(rng.standard_normal(shape, dtype=np.float32), rng.standard_normal(shape, dtype=np.float32))
           for _ in range(G.num_layers)]
    store.reserve(rid, num_tokens, ttl_s=60)
    for layer, kv in enumerate(kvs):
        store.write_layer(rid, layer, kv)
    return kvs


@pytest.fixture
def pair():
    hub = FakeHub()
    dst, src = make_store(300), make_store(300)
    server = KVServer(dst, hub.fabric(), TC, secret=SECRET)
    sender = KVSender(src, hub.fabric(), TC, secret=SECRET)
    peer = sender.connect(server.address())
    yield hub, src, dst, server, sender, peer
    sender.close()
    server.close()
    hub.close()


def test_an_offer_for_a_request_not_admitted_holds_no_pages(pair):
    hub, src, dst, server, sender, peer = pair
    write_request(src, "stranger", 1000, seed=1)  # 63 pages a layer: would fit
    t = sender.push(peer, "stranger")
    with pytest.raises(TransferRefused) as e:
        t.wait(5)
    assert e.value.reason is RefusalReason.NOT_ADMITTED and "not admitted" in str(e.value)
    assert t.bytes_sent == 0 and dst.stats().used_pages == 0 and dst.stats().bytes_in == 0
    assert server.rejections.snapshot()["not_admitted"] == 1
    assert server.status("stranger") is None  # nothing recorded under an id this server never admitted
    # The connection still serves the admitted request that follows.
    kvs = write_request(src, "admitted", 17, seed=2)
    server.admit("admitted", 17)
    sender.push(peer, "admitted").wait(5)
    for layer, kv in enumerate(kvs):
        for got, want in zip(dst.get("admitted", layer), kv):
            np.testing.assert_array_equal(got, want)


def test_an_admission_must_match_the_offer_and_is_used_once(pair):
    hub, src, dst, server, sender, peer = pair
    write_request(src, "r", 15, seed=3)
    server.admit("r", 16)  # the router said 16 tokens; the offer says 15
    with pytest.raises(TransferRefused) as e:
        sender.push(peer, "r").wait(5)
    assert e.value.reason is RefusalReason.BAD_REQUEST
    server.admit("r", 15)
    sender.push(peer, "r").wait(5)
    dst.claim("r")
    dst.release("r")
    with pytest.raises(TransferRefused) as e:  # the same offer again: its admission is spent
        sender.push(peer, "r").wait(5)
    assert e.value.reason is RefusalReason.NOT_ADMITTED
    assert dst.stats().used_pages == 0


def test_a_withdrawn_admission_refuses_its_offer(pair):
    hub, src, dst, server, sender, peer = pair
    write_request(src, "gone", 40, seed=4)
    server.admit("gone", 40)
    assert server.forget("gone") and not server.forget("gone")
    with pytest.raises(TransferRefused) as e:
        sender.push(peer, "gone").wait(5)
    assert e.value.reason is RefusalReason.NOT_ADMITTED
    assert dst.stats().used_pages == 0


def test_an_admission_whose_offer_never_comes_is_freed_after_the_deadline(pair):
    hub, src, dst, server, sender, peer = pair
    dst.reserve("late/decode", 1000, ttl_s=600)  # the generated tokens' pages, held for the request
    assert dst.stats().used_pages == G.num_layers * 63
    t0 = time.monotonic()
    server.admit("late", 33, holds=("late/decode",))
    eventually(lambda: server.poll("late") is TransferState.FAILED, timeout_s=5)
    waited = time.monotonic() - t0
    assert TC.offer_deadline_s <= waited < TC.offer_deadline_s + 5 * TC.heartbeat_s + 1.0
    assert isinstance(server.status("late").error, TransferFailed)
    assert "offer_deadline_s" in str(server.status("late").error)
    assert dst.stats().used_pages == 0 and "late" not in server.admissions
    assert server.rejections.snapshot()["admission_expired"] == 1
    write_request(src, "late", 33, seed=5)  # the offer, too late: refused, nothing held
    with pytest.raises(TransferRefused) as e:
        sender.push(peer, "late").wait(5)
    assert e.value.reason is RefusalReason.NOT_ADMITTED
    assert dst.stats().used_pages == 0


def test_a_sender_with_another_secret_gets_a_clear_error_and_nothing_is_held():
    hub = FakeHub()
    dst, src = make_store(100), make_store(100)
    server = KVServer(dst, hub.fabric(), TC, secret=SECRET)
    intruder = KVSender(src, hub.fabric(), TC, secret=new_secret())
    server.admit("r", 50)  # even an admitted request id does not help without the secret
    t0 = time.monotonic()
    with pytest.raises(PeerLost, match="authentication"):
        intruder.connect(server.address())
    assert time.monotonic() - t0 < TC.connect_timeout_s + 2
    assert server.rejections.snapshot()["hello_auth"] == 1 and server.num_connections == 0
    assert dst.stats().used_pages == 0 and src.stats().used_pages == 0
    server.close()
    hub.close()


def test_the_secret_is_required_and_checked():
    hub = FakeHub()
    with pytest.raises(TypeError):
        KVServer(make_store(10), hub.fabric(), TC)  # no secret: no server
    with pytest.raises(ValueError, match="at least 16 bytes"):
        KVSender(make_store(10), hub.fabric(), TC, secret=b"guessable")
    hub.close()
