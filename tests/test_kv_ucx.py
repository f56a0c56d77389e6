"""Two processes on this machine move KV store-to-store over UCX (loopback): byte-exact,
with a sender dying mid-transfer, a full store, a garbage frame, an offer that was never
admitted and a sender holding another deployment's secret."""

from __future__ import annotations

import multiprocessing as mp
import time

import pytest

pytest.importorskip("ucxx")

from kv_store import (FrameKey, KVGeometry, KVStore, StoreConfig, TransportConfig, new_secret,  # noqa: E402
                      wire)

import kv_peers  # noqa: E402

G = KVGeometry(num_layers=4, num_kv_heads=2, head_dim=16)
SERVER_PAGES = 600
TC = TransportConfig(ucx_tls="sm,self", heartbeat_s=0.5, timeout_s=5.0, connect_timeout_s=30.0)
SECRET = new_secret()
CTX = mp.get_context("spawn")


def store_config(pages: int) -> StoreConfig:
    return StoreConfig(G, capacity_bytes=pages * (G.page_bytes + G.meta_page_bytes), pin="off")


def ask(pipe, msg, timeout_s: float = 60.0):
    if msg is not None:
        pipe.send(msg)
    assert pipe.poll(timeout_s), f"no answer to {msg!r} in {timeout_s} s"
    answer = pipe.recv()
    assert not (isinstance(answer, tuple) and answer[0] == "crash"), answer[1]
    return answer


def expected_digest(num_tokens: int, seed: int) -> str:
    store = KVStore(store_config(4 * (num_tokens // 16 + 1)))
    store.reserve("r", num_tokens)
    for layer, (k, v) in enumerate(kv_peers.random_kv(G, num_tokens, seed)):
        store.write_layer_kv("r", layer, k, v)
    store.commit("r")
    return kv_peers.digest(store, "r")


class Peer:
    def __init__(self, target, *args) -> None:
        self.pipe, child = CTX.Pipe()
        self.proc = CTX.Process(target=target, args=(child, *args), daemon=True)
        self.proc.start()

    def stop(self) -> None:
        if self.proc.is_alive():
            try:
                ask(self.pipe, ("stop",), 20)
            except (AssertionError, EOFError, BrokenPipeError):
                pass
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)


def start_server(transport: TransportConfig, pages: int = SERVER_PAGES) -> tuple[Peer, bytes]:
    server = Peer(kv_peers.server_main, store_config(pages), transport, SECRET)
    kind, address = ask(server.pipe, None)
    assert kind == "address"
    return server, address


def start_sender(address: bytes, transport: TransportConfig = TC, secret: bytes = SECRET) -> Peer:
    sender = Peer(kv_peers.sender_main, store_config(800), transport, address, secret)
    assert ask(sender.pipe, None) == ("connected",)
    return sender


def admit(server_peer: Peer, request_id: str, num_tokens: int) -> None:
    assert ask(server_peer.pipe, ("admit", request_id, num_tokens)) == "ok"


@pytest.fixture(scope="module")
def server():
    peer, address = start_server(TC)
    yield peer, address
    peer.stop()


@pytest.fixture(scope="module")
def sender(server):
    peer = start_sender(server[1])
    yield peer
    peer.stop()


def used_pages(server_peer: Peer) -> int:
    return ask(server_peer.pipe, ("stats",)).used_pages


@pytest.mark.parametrize("num_tokens,seed", [(1000, 1), (17, 2), (1, 3)])
def test_push_over_ucx_is_byte_exact(server, sender, num_tokens, seed):
    srv, _ = server
    rid = f"exact-{num_tokens}"
    admit(srv, rid, num_tokens)
    assert ask(sender.pipe, ("push", rid, num_tokens, seed, None)) == ("ok", "success")
    assert ask(srv.pipe, ("wait", rid, 20)) == ("ok", expected_digest(num_tokens, seed))
    assert ask(srv.pipe, ("release", rid)) == "ok"
    assert used_pages(srv) == 0


def test_full_store_is_refused_before_bulk(server, sender):
    srv, _ = server
    before = ask(srv.pipe, ("stats",))
    # 4 layers x 188 pages > 600: refused whole.
    admit(srv, "too-big", 3000)
    assert ask(sender.pipe, ("push", "too-big", 3000, 4, None))[:2] == ("error", "RemoteStoreFull")
    after = ask(srv.pipe, ("stats",))
    assert after.bytes_in == before.bytes_in and after.used_pages == before.used_pages
    assert after.alloc_failures == before.alloc_failures + 1
    assert ask(srv.pipe, ("poll", "too-big")) == ("failed", "RemoteStoreFull")


def test_sender_dying_mid_transfer_frees_pages_and_server_carries_on(server, sender):
    srv, address = server
    doomed = start_sender(address)
    admit(srv, "doomed", 2000)
    doomed.pipe.send(("push", "doomed", 2000, 5, 2))  # dies after pushing 2 of 4 layers
    doomed.proc.join(30)
    assert doomed.proc.exitcode == 3
    deadline = time.monotonic() + 30
    while ask(srv.pipe, ("poll", "doomed"))[0] != "failed":
        assert time.monotonic() < deadline, "the dead sender's transfer never failed"
        time.sleep(0.2)
    assert ask(srv.pipe, ("poll", "doomed")) == ("failed", "PeerLost")
    assert used_pages(srv) == 0
    admit(srv, "after-death", 300)
    assert ask(sender.pipe, ("push", "after-death", 300, 6, None)) == ("ok", "success")
    assert ask(srv.pipe, ("wait", "after-death", 20)) == ("ok", expected_digest(300, 6))
    assert ask(srv.pipe, ("release", "after-death")) == "ok"


def test_garbage_frame_closes_that_connection_only(server, sender):
    srv, address = server
    bad = start_sender(address)
    from kv_store.transport_base import ctrl_tag
    channel = ctrl_tag(ask(bad.pipe, ("conn_id",)))
    frame = bytearray(wire.encode(wire.Offer(1, "x", 10, 4, 2, 16, 16, "bf16", 1, 1), FrameKey(SECRET), channel))
    frame[-3] ^= 0xFF  # corrupt the body: checksum mismatch
    assert ask(bad.pipe, ("raw_frame", bytes(frame))) == "sent"
    admit(srv, "after-garbage", 64)
    assert ask(sender.pipe, ("push", "after-garbage", 64, 7, None)) == ("ok", "success")
    assert ask(srv.pipe, ("wait", "after-garbage", 20)) == ("ok", expected_digest(64, 7))
    # The corrupted connection is gone: its next push fails on the sender's side.
    admit(srv, "on-closed", 64)
    assert ask(bad.pipe, ("push", "on-closed", 64, 8, None))[:2] == ("error", "PeerLost")
    assert ask(srv.pipe, ("release", "after-garbage")) == "ok"
    bad.stop()


def test_tcp_with_ucx_error_handling():
    """Across hosts the transport runs over TCP; UCX's own peer error handling is on there."""
    tcp = TransportConfig(ucx_tls="tcp,self", ucx_net_devices="lo", ucx_error_handling=True, heartbeat_s=0.5,
                          timeout_s=5.0, connect_timeout_s=30.0)
    srv, address = start_server(tcp)
    try:
        snd = start_sender(address, tcp)
        admit(srv, "tcp", 500)
        assert ask(snd.pipe, ("push", "tcp", 500, 9, None)) == ("ok", "success")
        assert ask(srv.pipe, ("wait", "tcp", 20)) == ("ok", expected_digest(500, 9))
        snd.stop()
    finally:
        srv.stop()


def test_an_offer_never_admitted_holds_no_pages(server, sender):
    srv, _ = server
    before = ask(srv.pipe, ("rejections",))["not_admitted"]
    assert ask(sender.pipe, ("push", "not-admitted", 1000, 10, None))[:2] == ("error", "TransferRefused")
    assert used_pages(srv) == 0
    assert ask(srv.pipe, ("rejections",))["not_admitted"] == before + 1


def test_a_sender_with_another_secret_is_told_authentication_failed(server):
    srv, address = server
    quick = TransportConfig(ucx_tls="sm,self", heartbeat_s=0.5, timeout_s=5.0, connect_timeout_s=3.0)
    before = ask(srv.pipe, ("rejections",))["hello_auth"]
    intruder = Peer(kv_peers.sender_main, store_config(100), quick, address, new_secret())
    try:
        kind, error, message, sender_pages = ask(intruder.pipe, None)
        assert (kind, error) == ("connect_failed", "PeerLost") and "authentication" in message
        assert sender_pages == 0 and used_pages(srv) == 0
        assert ask(srv.pipe, ("rejections",))["hello_auth"] == before + 1
    finally:
        intruder.pipe.send("done")
        intruder.proc.join(10)
        if intruder.proc.is_alive():
            intruder.proc.kill()


def test_an_admission_whose_offer_never_comes_frees_its_pages(server, sender):
    srv, _ = server
    assert ask(srv.pipe, ("admit", "late", 100, 1.0, 500)) == "ok"
    assert used_pages(srv) == 4 * 32
    deadline = time.monotonic() + 20
    while ask(srv.pipe, ("poll", "late"))[0] != "failed":
        assert time.monotonic() < deadline, "the admission never expired"
        time.sleep(0.2)
    assert ask(srv.pipe, ("poll", "late")) == ("failed", "TransferFailed")
    assert used_pages(srv) == 0
    # The offer, too late: refused, nothing held.
    assert ask(sender.pipe, ("push", "late", 100, 11, None))[:2] == ("error", "TransferRefused")
    assert used_pages(srv) == 0
