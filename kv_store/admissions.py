"""The requests a decode worker expects KV for. The router admits a request on the decode
worker before any prefill starts; only an OFFER for an admitted request id reserves pages.

An admission is consumed by its one OFFER, withdrawn by ``forget`` (the router aborted the
request), or expires at its deadline: then the store entries it holds (the pages reserved
for the request's generated tokens) are freed, so an admission whose offer never comes
holds nothing for longer than ``transport.offer_deadline_s``.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from kv_store.errors import DuplicateRequest
from kv_store.lease import Clock


@dataclass(frozen=True, slots=True)
class Admission:
    request_id: str
    num_tokens: int
    """Prompt tokens the offer must announce."""
    deadline: float
    """Clock time by which the offer must have arrived."""
    holds: tuple[str, ...]
    """Store entries reserved for this request that are freed if it expires."""


class Admissions:
    """Thread-safe: admitted from the worker's thread, taken and expired on the loop thread."""

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._by_id: dict[str, Admission] = {}

    def admit(self, request_id: str, num_tokens: int, deadline_s: float, holds: tuple[str, ...] = ()) -> None:
        if not deadline_s > 0:
            raise ValueError(f"admission deadline must be > 0 s; got {deadline_s!r}")
        if not 0 < num_tokens:
            raise ValueError(f"admission of {request_id!r} for {num_tokens} tokens; must be > 0")
        with self._lock:
            if request_id in self._by_id:
                raise DuplicateRequest(f"request {request_id!r} is already admitted")
            self._by_id[request_id] = Admission(request_id, num_tokens, self._clock() + deadline_s, holds)

    def forget(self, request_id: str) -> bool:
        with self._lock:
            return self._by_id.pop(request_id, None) is not None

    def take(self, request_id: str) -> Admission | None:
        """The admission an OFFER consumes; None when there is none (or it is past its deadline)."""
        with self._lock:
            adm = self._by_id.get(request_id)
            if adm is None or adm.deadline < self._clock():
                return None  # an expired one stays for ``expired`` to free what it holds
            del self._by_id[request_id]
            return adm

    def expired(self) -> list[Admission]:
        """Remove and return every admission past its deadline."""
        now = self._clock()
        with self._lock:
            gone = [a for a in self._by_id.values() if a.deadline < now]
            for a in gone:
                del self._by_id[a.request_id]
        return gone

    def __contains__(self, request_id: str) -> bool:
        with self._lock:
            return request_id in self._by_id

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_id)
