"""The state of one transfer, as the worker that started or awaits it polls it.

SGLang's disaggregation style: the worker never blocks on the network; it asks
``poll()`` between steps and acts on the answer. Terminal states are sticky.
"""

from __future__ import annotations

import enum
import threading

from kv_store.errors import KVStoreError, TransferTimeout


class TransferState(enum.Enum):
    PENDING = "pending"
    """Sender: offer sent, no answer yet. Receiver: nothing announced for this request yet."""
    TRANSFERRING = "transferring"
    """Pages are reserved on the receiver; layers are moving."""
    SUCCESS = "success"
    """The request is READY in the receiver's store."""
    FAILED = "failed"
    """See ``error``; the receiver's pages for it are freed."""


TERMINAL = (TransferState.SUCCESS, TransferState.FAILED)


class TransferStatus:
    """Written by the transport's loop thread, read from any thread."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self._state = TransferState.PENDING
        self._error: KVStoreError | None = None
        self._lock = threading.Lock()
        self._done = threading.Event()

    def poll(self) -> TransferState:
        return self._state

    @property
    def error(self) -> KVStoreError | None:
        return self._error

    @property
    def done(self) -> bool:
        return self._state in TERMINAL

    def wait(self, timeout_s: float | None = None) -> None:
        """Block until SUCCESS (returns) or FAILED (raises the typed error)."""
        if not self._done.wait(timeout_s):
            raise TransferTimeout(f"transfer of {self.request_id!r} still {self._state.value} "
                                  f"after {timeout_s} s")
        if self._error is not None:
            raise self._error

    def advance(self, state: TransferState) -> bool:
        """Move to a non-failed state; ignored once terminal. Returns whether it moved."""
        with self._lock:
            if self._state in TERMINAL:
                return False
            self._state = state
        if state in TERMINAL:
            self._done.set()
        return True

    def fail(self, error: KVStoreError) -> bool:
        with self._lock:
            if self._state in TERMINAL:
                return False
            self._state, self._error = TransferState.FAILED, error
        self._done.set()
        return True

    def __repr__(self) -> str:
        return f"TransferStatus({self.request_id!r}, {self._state.value}, error={self._error!r})"
