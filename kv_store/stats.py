"""Counters of one store: occupancy, refusals, traffic. Read as an immutable snapshot."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class StoreStats:
    total_pages: int
    used_pages: int
    free_extents: int
    largest_free_extent: int
    requests_reserved: int
    """Entries being written or received into."""
    requests_ready: int
    """Committed entries (claimed or waiting for a decoder)."""
    alloc_failures: int
    """Reservations refused for want of (contiguous enough) pages."""
    leases_expired: int
    aborts: int
    bytes_in: int
    """KV and metadata bytes written into the store (put, write_layer, UCX receive)."""
    bytes_out: int
    """KV and metadata bytes read out (get, UCX send)."""

    @property
    def occupancy(self) -> float:
        return self.used_pages / self.total_pages


@dataclass(slots=True)
class Counters:
    """The mutable counters behind :class:`StoreStats`; guarded by the store's lock."""

    alloc_failures: int = 0
    leases_expired: int = 0
    aborts: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
