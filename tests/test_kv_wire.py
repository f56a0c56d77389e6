"""Wire format: round trips, and every corrupt, truncated, oversize, ill-typed or
unauthenticated frame is rejected with a ``WireError`` (never another exception, never a
wrong frame); a frame's tag is checked before msgpack reads its body."""

from __future__ import annotations

import struct
import zlib

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kv_store import wire
from kv_store.auth import FrameKey, new_secret
from kv_store.errors import (AuthenticationFailed, FrameTooLarge, MalformedFrame, VersionMismatch,
                             WireError)

KEY = FrameKey(new_secret())
CH = (0x1234_5678 << 32) | 1  # a connection's control tag


def enc(frame) -> bytes:
    return wire.encode(frame, KEY, CH)


def dec(data):
    return wire.decode(data, KEY, CH)

FRAMES = [
    wire.Hello(7, b"\x01" * 147),
    wire.Welcome(7, True, ""),
    wire.Offer(1, "req-\u00e9", 32768, 32, 8, 128, 16, "bf16", 4 << 30, 256 << 20),
    wire.Accept(1, [[2048]] * 32 + [[1000, 1048]]),
    wire.Refuse(1, "store_full", "need 65536 pages, 12 free"),
    wire.Layer(1, 31, [1000, 1048], 2**40),
    wire.Done(1, [bytes(range(32))] * 32), wire.Committed(1), wire.Failed(1, "x"), wire.Abort(1, "y"),
    wire.Ping(), wire.Bye("bye"),
]


def _frame_with_body(kind: wire.FrameKind, body: bytes, version: int = wire.WIRE_VERSION,
                     key: FrameKey = KEY) -> bytes:
    """A frame with a right checksum and (under ``key``) a right tag around any body."""
    head = wire.PREFIX.pack(wire.MAGIC, version, int(kind), len(body), 0, b"")[:12]
    head += struct.pack("<I", zlib.crc32(body, zlib.crc32(head)))
    return head + key.tag(CH, 0, head, body) + body


@pytest.mark.parametrize("frame", FRAMES, ids=lambda f: type(f).__name__)
def test_round_trip(frame):
    data = enc(frame)
    assert dec(data) == frame
    assert dec(data + b"\0" * 100) == frame  # slack after a frame in a receive buffer


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_are_rejected(data):
    with pytest.raises(WireError):
        dec(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(FRAMES), st.data())
def test_any_single_corruption_or_truncation_is_rejected(frame, data):
    raw = bytearray(enc(frame))
    if data.draw(st.booleans(), label="truncate"):
        cut = data.draw(st.integers(0, len(raw) - 1), label="cut")
        damaged = bytes(raw[:cut])
    else:
        i = data.draw(st.integers(0, len(raw) - 1), label="byte")
        raw[i] ^= data.draw(st.integers(1, 255), label="xor")
        damaged = bytes(raw)
    with pytest.raises(WireError):
        dec(damaged)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(list(wire.FrameKind)),
       st.dictionaries(st.text(max_size=12),
                       st.one_of(st.integers(-2**63, 2**64 - 1), st.booleans(), st.none(),
                                 st.text(max_size=20), st.binary(max_size=20), st.floats(),
                                 st.lists(st.integers(-5, 5), max_size=5)),
                       max_size=12))
def test_valid_checksum_but_wrong_schema_is_rejected(kind, body):
    frame = _frame_with_body(kind, msgpack.packb(body, use_bin_type=True))
    try:
        decoded = dec(frame)
    except WireError:
        return
    # Only a map that happens to satisfy the schema decodes (e.g. {} for PING), and then
    # it encodes back to an equal frame.
    assert dec(enc(decoded)) == decoded


@pytest.mark.parametrize("body", [
    {"xfer": True},                 # a bool is not an int
    {"xfer": -1},                   # negative
    {"xfer": 1, "extra": 0},        # unknown key
    {},                             # missing key
    {"xfer": 2**40},                # out of range
])
def test_schema_violations(body):
    with pytest.raises(MalformedFrame):
        dec(_frame_with_body(wire.FrameKind.DONE, msgpack.packb(body)))


def test_non_map_and_ext_bodies():
    for body in (msgpack.packb([1, 2]), msgpack.packb(msgpack.ExtType(1, b"x")), b"\xc1"):
        with pytest.raises(MalformedFrame):
            dec(_frame_with_body(wire.FrameKind.PING, body))


def test_oversize_frames():
    big = _frame_with_body(wire.FrameKind.BYE, b"\0" * wire.MAX_FRAME_BYTES)
    with pytest.raises(FrameTooLarge):
        dec(big)
    enc(wire.Layer(1, 0, [1] * wire.MAX_SEGMENTS, 0))  # at the list limit: fits
    with pytest.raises(FrameTooLarge):
        enc(wire.Accept(1, [[1] * 4000] * 20))  # every list in range, 80 KB in all
    with pytest.raises(MalformedFrame):  # a list longer than the schema allows, refused on encode too
        enc(wire.Layer(1, 0, [1] * (wire.MAX_SEGMENTS + 1), 0))


def test_version_and_magic():
    body = msgpack.packb({"detail": ""})
    with pytest.raises(VersionMismatch):
        dec(_frame_with_body(wire.FrameKind.BYE, body, version=wire.WIRE_VERSION + 1))
    good = enc(wire.Ping())
    with pytest.raises(MalformedFrame, match="magic"):
        dec(b"XXXX" + good[4:])
    with pytest.raises(MalformedFrame, match="unknown frame kind"):
        dec(_frame_with_body(99, body))


@pytest.mark.parametrize("frame", FRAMES, ids=lambda f: type(f).__name__)
def test_a_frame_verifies_only_under_its_key_and_channel(frame):
    data = enc(frame)
    with pytest.raises(AuthenticationFailed, match="authentication failed"):
        wire.decode(data, FrameKey(new_secret()), CH)            # another deployment's secret
    for channel in (CH ^ 1, CH ^ 3, CH ^ (1 << 32)):            # moved to another direction/connection
        with pytest.raises(AuthenticationFailed):
            wire.decode(data, KEY, channel)
    later = wire.encode(frame, KEY, CH, 41)
    assert wire.decode(later, KEY, CH, 41) == frame
    for seq in (0, 40, 42):                                      # replayed, or out of its place
        with pytest.raises(AuthenticationFailed):
            wire.decode(later, KEY, CH, seq)
    stripped = bytearray(data)
    stripped[16:16 + 32] = bytes(32)                            # the tag left out
    with pytest.raises(AuthenticationFailed):
        dec(bytes(stripped))


def test_the_tag_is_checked_before_msgpack_reads_the_body():
    """A body msgpack would choke on (here: bytes that are not msgpack at all) under a valid
    checksum but another key is refused for its tag, not its body."""
    body = b"\xc1" * 64
    with pytest.raises(AuthenticationFailed):
        dec(_frame_with_body(wire.FrameKind.OFFER, body, key=FrameKey(new_secret())))
    with pytest.raises(MalformedFrame, match="undecodable msgpack"):
        dec(_frame_with_body(wire.FrameKind.OFFER, body))


def test_a_key_never_shows_its_secret():
    secret = new_secret()
    key = FrameKey(secret)
    assert secret.hex() not in repr(key) and str(secret) not in repr(key)
    with pytest.raises(TypeError):
        import pickle
        pickle.dumps(key)
    for bad in (b"short", "a string of 32 characters......", None):
        with pytest.raises(ValueError, match="at least 16 bytes"):
            FrameKey(bad)
