"""Control frames of the KV transfer: a fixed prefix, then a msgpack map. No pickle.

    magic "FXKV" | version u16 | kind u16 | body_len u32 | crc32 u32 | tag 32 B | msgpack body

The crc32 covers the prefix fields before it and the body, so a flipped kind cannot turn
one valid frame into another (DONE and COMMITTED have the same keys). The tag is an
HMAC-SHA256 under the deployment's secret (``auth.FrameKey``) over the channel the frame
travels on (its 64-bit UCX tag), its index on that channel (``seq``: 0 for the first frame
and for every HELLO; not on the wire, both ends count), the prefix up to the tag and the
body: a frame from outside the deployment, moved to another connection or direction, or
replayed on its own channel, does not verify.

Bulk KV never goes in a frame: a LAYER frame announces the raw messages that follow on
their own tags, and DONE carries each layer's bulk tag (``FrameKey.bulk_tag``), which the
receiver checks before it commits the request. A frame is trusted only after, in order: the buffer holds a whole prefix;
magic and version match; the declared body fits ``MAX_FRAME_BYTES`` and the bytes
received; the checksum matches (a truncated or corrupted frame fails here); the tag
verifies (``AuthenticationFailed``: a frame of another deployment fails here, before
msgpack reads a byte of its body); msgpack decodes under tight container limits; the map
has exactly the kind's keys with values of the right type and range. Nothing is
allocated from a frame's numbers before that.
"""

from __future__ import annotations

import dataclasses
import enum
import struct
import zlib
from dataclasses import dataclass
from typing import Callable, Union

import msgpack

from kv_store.auth import TAG_BYTES, FrameKey
from kv_store.errors import AuthenticationFailed, FrameTooLarge, MalformedFrame, VersionMismatch

WIRE_VERSION = 3
MAGIC = b"FXKV"
PREFIX = struct.Struct(f"<4sHHII{TAG_BYTES}s")
_CRC_AT = 12  # offset of the crc field: everything before it is covered
_TAG_AT = 16  # offset of the tag: the crc and everything before it are covered
MAX_FRAME_BYTES = 64 * 1024
"""Receive buffers of control frames are this big; a larger message is truncated by UCX."""

U32 = 2**32 - 1
U63 = 2**63 - 1
MAX_LAYERS = 1024
MAX_SEGMENTS = 4096
MAX_REQUEST_ID = 256
MAX_ADDRESS = 16 * 1024
MAX_TEXT = 1024


class FrameKind(enum.IntEnum):
    HELLO = 1       # sender -> receiver (worker tag): my connection id and UCX address
    WELCOME = 2     # receiver -> sender: connection accepted or not
    OFFER = 3       # sender: a request's KV is coming (sizes); nothing is sent before the answer
    ACCEPT = 4      # receiver: pages reserved; their run lengths per layer
    REFUSE = 5      # receiver: typed refusal; nothing was allocated
    LAYER = 6       # sender: one layer's bulk follows as 3 messages per segment
    DONE = 7        # sender: every layer was announced; each layer's bulk tag
    COMMITTED = 8   # receiver: the request is READY in its store
    FAILED = 9      # receiver: an accepted transfer failed; its pages are freed
    ABORT = 10      # sender: give the transfer up; the receiver frees its pages
    PING = 11       # either way: I am alive
    BYE = 12        # either way: closing the connection


@dataclass(frozen=True, slots=True)
class Hello:
    conn_id: int
    address: bytes


@dataclass(frozen=True, slots=True)
class Welcome:
    conn_id: int
    ok: bool
    detail: str


@dataclass(frozen=True, slots=True)
class Offer:
    xfer: int
    request_id: str
    num_tokens: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_tokens: int
    dtype: str
    kv_bytes: int
    meta_bytes: int


@dataclass(frozen=True, slots=True)
class Accept:
    xfer: int
    runs: list[list[int]]


@dataclass(frozen=True, slots=True)
class Refuse:
    xfer: int
    reason: str
    detail: str


@dataclass(frozen=True, slots=True)
class Layer:
    xfer: int
    layer: int
    segments: list[int]
    first_seq: int


@dataclass(frozen=True, slots=True)
class Done:
    xfer: int
    tags: list[bytes]  # per layer, in layer order: FrameKey.bulk_tag of its messages; [] untagged


@dataclass(frozen=True, slots=True)
class Committed:
    xfer: int


@dataclass(frozen=True, slots=True)
class Failed:
    xfer: int
    detail: str


@dataclass(frozen=True, slots=True)
class Abort:
    xfer: int
    detail: str


@dataclass(frozen=True, slots=True)
class Ping:
    pass


@dataclass(frozen=True, slots=True)
class Bye:
    detail: str


Frame = Union[Hello, Welcome, Offer, Accept, Refuse, Layer, Done, Committed, Failed, Abort,
              Ping, Bye]
Check = Callable[[object], bool]


def _uint(hi: int) -> Check:
    return lambda x: type(x) is int and 0 <= x <= hi


def _text(n: int) -> Check:
    return lambda x: type(x) is str and len(x) <= n


def _bin(n: int) -> Check:
    return lambda x: type(x) is bytes and 0 < len(x) <= n


def _is_bool(x: object) -> bool:
    return type(x) is bool


def _uints(n: int, lo: int, hi: int) -> Check:
    return lambda x: (type(x) is list and 0 < len(x) <= n
                      and all(type(i) is int and lo <= i <= hi for i in x))


def _tags(x: object) -> bool:  # empty: the sender does not tag (transport.bulk_tags: false)
    return type(x) is list and len(x) <= MAX_LAYERS and all(
        type(t) is bytes and len(t) == TAG_BYTES for t in x)


def _runs(x: object) -> bool:
    return type(x) is list and 0 < len(x) <= MAX_LAYERS and all(
        _uints(MAX_SEGMENTS, 1, U32)(r) for r in x)


_XFER = _uint(U32)
_SCHEMA: dict[FrameKind, tuple[type, dict[str, Check]]] = {
    FrameKind.HELLO: (Hello, {"conn_id": _uint(U32), "address": _bin(MAX_ADDRESS)}),
    FrameKind.WELCOME: (Welcome, {"conn_id": _uint(U32), "ok": _is_bool, "detail": _text(MAX_TEXT)}),
    FrameKind.OFFER: (Offer, {
        "xfer": _XFER, "request_id": _text(MAX_REQUEST_ID), "num_tokens": _uint(U32),
        "num_layers": _uint(MAX_LAYERS), "num_kv_heads": _uint(U32), "head_dim": _uint(U32),
        "block_tokens": _uint(U32), "dtype": _text(16), "kv_bytes": _uint(U63),
        "meta_bytes": _uint(U63)}),
    FrameKind.ACCEPT: (Accept, {"xfer": _XFER, "runs": _runs}),
    FrameKind.REFUSE: (Refuse, {"xfer": _XFER, "reason": _text(64), "detail": _text(MAX_TEXT)}),
    FrameKind.LAYER: (Layer, {"xfer": _XFER, "layer": _uint(MAX_LAYERS),
                              "segments": _uints(MAX_SEGMENTS, 1, U32), "first_seq": _uint(U63)}),
    FrameKind.DONE: (Done, {"xfer": _XFER, "tags": _tags}),
    FrameKind.COMMITTED: (Committed, {"xfer": _XFER}),
    FrameKind.FAILED: (Failed, {"xfer": _XFER, "detail": _text(MAX_TEXT)}),
    FrameKind.ABORT: (Abort, {"xfer": _XFER, "detail": _text(MAX_TEXT)}),
    FrameKind.PING: (Ping, {}),
    FrameKind.BYE: (Bye, {"detail": _text(MAX_TEXT)}),
}
_KIND: dict[type, FrameKind] = {cls: kind for kind, (cls, _) in _SCHEMA.items()}


def _check_fields(kind: FrameKind, body: dict) -> None:
    fields = _SCHEMA[kind][1]
    if set(body) != set(fields):
        raise MalformedFrame(f"{kind.name} frame has keys {sorted(body)}; expected {sorted(fields)}")
    for name, check in fields.items():
        if not check(body[name]):
            raise MalformedFrame(f"{kind.name} frame: bad value for {name!r}: {body[name]!r:.80}")


def encode(frame: Frame, key: FrameKey, channel: int, seq: int = 0) -> bytes:
    """The frame as it goes on the wire as frame ``seq`` of ``channel`` (the UCX tag it is
    sent with)."""
    kind = _KIND[type(frame)]
    body_map = dataclasses.asdict(frame)
    _check_fields(kind, body_map)  # never put on the wire what a peer would reject
    body = msgpack.packb(body_map, use_bin_type=True)
    if PREFIX.size + len(body) > MAX_FRAME_BYTES:
        raise FrameTooLarge(f"{kind.name} frame of {PREFIX.size + len(body)} bytes exceeds "
                            f"{MAX_FRAME_BYTES}")
    head = PREFIX.pack(MAGIC, WIRE_VERSION, int(kind), len(body), 0, b"")[:_CRC_AT]
    head += struct.pack("<I", zlib.crc32(body, zlib.crc32(head)))
    return head + key.tag(channel, seq, head, body) + body


def decode(buf: bytes | bytearray | memoryview, key: FrameKey, channel: int, seq: int = 0) -> Frame:
    """Parse and validate frame ``seq`` received on ``channel`` from the start of ``buf``
    (trailing bytes are slack)."""
    view = memoryview(buf).cast("B")
    if len(view) < PREFIX.size:
        raise MalformedFrame(f"frame of {len(view)} bytes is shorter than its {PREFIX.size}-byte prefix")
    magic, version, kind_no, body_len, crc, tag = PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise MalformedFrame(f"bad magic {bytes(magic)!r}")
    if version != WIRE_VERSION:
        raise VersionMismatch(f"wire version {version}; this side speaks {WIRE_VERSION}")
    if PREFIX.size + body_len > MAX_FRAME_BYTES:
        raise FrameTooLarge(f"declared body of {body_len} bytes exceeds the "
                            f"{MAX_FRAME_BYTES}-byte frame limit")
    if PREFIX.size + body_len > len(view):
        raise MalformedFrame(f"truncated frame: body of {body_len} bytes declared, "
                             f"{len(view) - PREFIX.size} present")
    body = view[PREFIX.size:PREFIX.size + body_len]
    if zlib.crc32(body, zlib.crc32(view[:_CRC_AT])) != crc:
        raise MalformedFrame("checksum mismatch (corrupt or truncated frame)")
    if not key.verify(channel, seq, tag, view[:_TAG_AT], body):
        raise AuthenticationFailed("authentication failed: the frame's tag does not verify under this "
                                   "deployment's secret (a sender of another deployment, or a forged or "
                                   "replayed frame)")
    try:
        kind = FrameKind(kind_no)
    except ValueError:
        raise MalformedFrame(f"unknown frame kind {kind_no}") from None
    try:
        obj = msgpack.unpackb(body, raw=False, use_list=True, strict_map_key=True,
                              max_str_len=MAX_ADDRESS, max_bin_len=MAX_ADDRESS,
                              max_array_len=MAX_SEGMENTS, max_map_len=32, max_ext_len=0)
    except Exception as e:  # msgpack raises a zoo of types (ValueError, ExtraData, StackError...)
        raise MalformedFrame(f"{kind.name} frame: undecodable msgpack: {type(e).__name__}: {e}") from None
    if type(obj) is not dict:
        raise MalformedFrame(f"{kind.name} frame body is a {type(obj).__name__}, not a map")
    _check_fields(kind, obj)
    return _SCHEMA[kind][0](**obj)
