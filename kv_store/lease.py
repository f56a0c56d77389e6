"""Leases: how long a stored request may sit without an owner before its pages go back.

A committed request waits for its decoder under a TTL; the decoder's ``claim`` ends
the lease (the decoder then owns the pages until ``release``). A local writer that
reserves with a TTL is covered the same way if it dies before committing. Entries a
transport is receiving into have no lease: freeing pages that UCX may still write
would hand them to another request, so the transport cancels its receives first and
frees itself (see ``server.py``).
"""

from __future__ import annotations

import heapq
from typing import Callable

Clock = Callable[[], float]


class LeaseTable:
    """Expiry times by request id; ``expired`` pops the ones past due (lazy heap)."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._deadline: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []

    def grant(self, request_id: str, ttl_s: float) -> float:
        """Start or renew a lease; returns its deadline."""
        if not ttl_s > 0:
            raise ValueError(f"lease ttl_s must be > 0; got {ttl_s}")
        deadline = self._clock() + ttl_s
        self._deadline[request_id] = deadline
        heapq.heappush(self._heap, (deadline, request_id))
        return deadline

    def end(self, request_id: str) -> None:
        """Drop a lease (claimed, released or freed); a no-op when there is none."""
        self._deadline.pop(request_id, None)

    def deadline(self, request_id: str) -> float | None:
        return self._deadline.get(request_id)

    def expired(self) -> list[str]:
        """Request ids whose lease ran out, removed from the table."""
        now = self._clock()
        out = []
        while self._heap and self._heap[0][0] <= now:
            deadline, request_id = heapq.heappop(self._heap)
            # Stale heap entries (renewed or ended leases) are skipped here, not searched out.
            if self._deadline.get(request_id) == deadline:
                del self._deadline[request_id]
                out.append(request_id)
        return out

    def __len__(self) -> int:
        return len(self._deadline)
