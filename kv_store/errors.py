"""Typed errors of the KV store and its transfer path.

Callers branch on the class, never on a message or a return code: a router that
sees ``RemoteStoreFull`` tries another decode node, one that sees ``PeerLost``
re-runs the prefill.
"""

from __future__ import annotations

import enum


class KVStoreError(Exception):
    """Base of every error raised by ``kv_store``."""


# ---------------------------------------------------------------- local store

class StoreFull(KVStoreError):
    """Not enough free pages (or too fragmented) for a whole request; nothing was allocated."""

    def __init__(self, needed_pages: int, free_pages: int, detail: str = "") -> None:
        self.needed_pages = needed_pages
        self.free_pages = free_pages
        self.detail = detail
        msg = f"KV store full: need {needed_pages} pages, {free_pages} free"
        super().__init__(f"{msg} ({detail})" if detail else msg)

    def __reduce__(self):  # Ray carries errors between processes: rebuild from the fields
        return (type(self), (self.needed_pages, self.free_pages, self.detail))


class UnknownRequest(KVStoreError):
    """The request id has no entry in the store (never stored, already freed or expired)."""


class DuplicateRequest(KVStoreError):
    """A request id that is already stored was reserved again."""


class RequestNotReady(KVStoreError):
    """The request exists but is not in the state the call needs (e.g. read before commit)."""


class IncompleteWrite(KVStoreError):
    """Commit of a request some of whose layers were never written."""


class LayoutError(KVStoreError):
    """An array's shape or dtype does not follow the KV layout contract."""


class PinningError(KVStoreError):
    """The arena could not be page-locked for the GPU although the config requires it."""


# ---------------------------------------------------------------- wire

class WireError(KVStoreError):
    """A frame was rejected; the connection that carried it is closed."""


class FrameTooLarge(WireError):
    """A frame (or its declared body) exceeds the size limit."""


class MalformedFrame(WireError):
    """Bad magic, checksum, msgpack or schema: the frame cannot be trusted."""


class VersionMismatch(WireError):
    """The peer speaks another wire version."""


class AuthenticationFailed(WireError):
    """A frame's tag does not verify under this deployment's secret: it came from outside the
    deployment (or another channel), so nothing in it is read."""


class BadAddress(WireError):
    """An authenticated HELLO carried a worker address this fabric will not hand to UCX."""


# ---------------------------------------------------------------- transfer

class TransportError(KVStoreError):
    """A send or receive failed below the protocol (UCX or the fake fabric)."""


class MessageTruncated(TransportError):
    """A message was larger than the buffer posted for it."""


class OperationCanceled(TransportError):
    """The operation was canceled because its endpoint was closed."""


class TransportConfigError(KVStoreError):
    """The transport cannot be set up as configured (e.g. UCX already initialised differently)."""


class ProtocolError(KVStoreError):
    """A well-formed frame that breaks the protocol (unknown transfer, bad segments, ...)."""


class TransferFailed(KVStoreError):
    """A transfer ended without its KV landing in the remote store."""


class PeerLost(TransferFailed):
    """The peer died, went silent past the timeout or closed the connection mid-transfer."""


class TransferAborted(TransferFailed):
    """The sender aborted the transfer."""


class TransferTimeout(TransferFailed):
    """A blocking wait for a transfer ran out of time (the transfer itself may still finish)."""


class RefusalReason(enum.Enum):
    STORE_FULL = "store_full"
    DUPLICATE_REQUEST = "duplicate_request"
    GEOMETRY_MISMATCH = "geometry_mismatch"
    BAD_REQUEST = "bad_request"
    SHUTTING_DOWN = "shutting_down"
    NOT_ADMITTED = "not_admitted"
    """No admission (or it expired or was withdrawn) for the request id: nothing was reserved."""


class TransferRefused(TransferFailed):
    """The receiver refused the transfer before any bulk data was sent."""

    def __init__(self, reason: RefusalReason, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"transfer refused ({reason.value}): {detail}")

    def __reduce__(self):
        return (type(self), (self.reason, self.detail))


class RemoteStoreFull(TransferRefused):
    """The receiver's store had no room; nothing was allocated there and no bulk was sent."""

    def __init__(self, detail: str) -> None:
        super().__init__(RefusalReason.STORE_FULL, detail)

    def __reduce__(self):
        return (type(self), (self.detail,))


def refusal(reason: RefusalReason, detail: str) -> TransferRefused:
    """The typed error a sender raises for a refusal frame."""
    if reason is RefusalReason.STORE_FULL:
        return RemoteStoreFull(detail)
    return TransferRefused(reason, detail)
