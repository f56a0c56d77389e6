"""The host-memory paged KV store.

A request's life in a store:

1. ``reserve(request_id, num_tokens)``: all pages of all layers are allocated at once,
   or ``StoreFull`` is raised and nothing is held. The entry is RESERVED.
2. Each layer is filled, either copied in (``write_layer`` / ``write_layer_kv``) or
   written in place through ``layer_views`` (the prefill model, or the UCX receiver
   landing bytes straight in the pages) and then ``mark_written``.
3. ``commit``: every layer is written; the entry is READY and readable in place by the
   kernels through ``handle(...).block_table(layer)``. A lease of ``ready_ttl_s`` starts.
4. The decoder ``claim``s it (ending the lease) and ``release``s it when the request ends;
   ``abort`` frees it from any state; an unclaimed entry whose lease runs out is reaped.

Two tiers, like Mooncake's store: ``put``/``get`` move whole arrays (simple, copies);
``reserve -> layer_views -> mark_written -> commit`` is zero-copy.
All methods are thread-safe: the transport's event-loop thread and the worker's threads
share one store.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np

from kv_store.allocator import PageAllocator
from kv_store.arena import Arena
from kv_store.config import StoreConfig
from kv_store.errors import (DuplicateRequest, IncompleteWrite, LayoutError, RequestNotReady,
                             StoreFull, UnknownRequest)
from kv_store.handle import KVHandle
from kv_store.lease import Clock, LeaseTable
from kv_store.packing import LayerKV, pack_layer
from kv_store.stats import Counters, StoreStats

log = logging.getLogger(__name__)


class EntryState(enum.Enum):
    RESERVED = "reserved"
    READY = "ready"


class RunView(NamedTuple):
    """Writable views of one contiguous run of a request-layer's pages."""

    first_block: int        # logical block index of the run's first page
    pages: np.ndarray       # [n, Hkv, 2, 16, d]
    kmin: np.ndarray        # [n, Hkv, d]
    kmax: np.ndarray        # [n, Hkv, d]


@dataclass(slots=True)
class _Entry:
    handle: KVHandle
    state: EntryState
    written: list[bool]
    claimed: bool = False


class KVStore:
    def __init__(self, config: StoreConfig, *, clock: Clock = time.monotonic) -> None:
        self.config = config
        self.geometry = config.geometry
        self.arena = Arena(config.geometry, config.num_pages, pin=config.pin,
                           prefault=config.prefault)
        self._alloc = PageAllocator(config.num_pages)
        self._leases = LeaseTable(clock)
        self._entries: dict[str, _Entry] = {}
        self._counters = Counters()
        self._lock = threading.Lock()

    # ------------------------------------------------------------ reserve / write / commit

    def reserve(self, request_id: str, num_tokens: int, *, ttl_s: float | None = None) -> KVHandle:
        """Allocate every layer of a request; ``ttl_s`` leases the RESERVED entry (None: the
        caller frees it itself, as the transport does)."""
        if num_tokens <= 0:
            raise ValueError(f"num_tokens must be > 0; got {num_tokens}")
        nb = self.geometry.blocks_for(num_tokens)
        with self._lock:
            self._reap_locked()
            if request_id in self._entries:
                raise DuplicateRequest(f"request {request_id!r} is already in the store")
            try:
                runs = self._alloc.allocate([nb] * self.geometry.num_layers,
                                            self.config.max_runs_per_layer)
            except StoreFull:
                self._counters.alloc_failures += 1
                raise
            handle = KVHandle.build(request_id, num_tokens, runs)
            self._entries[request_id] = _Entry(handle, EntryState.RESERVED,
                                               [False] * self.geometry.num_layers)
            if ttl_s is not None:
                self._leases.grant(request_id, ttl_s)
            return handle

    def layer_views(self, request_id: str, layer: int) -> list[RunView]:
        """Views of the layer's pages, run by run in logical order (write in place, receive
        into, or send from). The views stay valid until the entry is freed."""
        with self._lock:
            handle = self._entry(request_id).handle
        self._check_layer(layer)
        views, first = [], 0
        for run in handle.runs[layer]:
            sl = slice(run.start, run.stop)
            views.append(RunView(first, self.arena.pages[sl], self.arena.kmin[sl],
                                 self.arena.kmax[sl]))
            first += run.length
        return views

    def mark_written(self, request_id: str, layer: int) -> None:
        self._check_layer(layer)
        with self._lock:
            entry = self._entry(request_id)
            if entry.state is not EntryState.RESERVED:
                raise RequestNotReady(f"request {request_id!r} is {entry.state.value}, not reserved")
            if not entry.written[layer]:
                entry.written[layer] = True
                nb = entry.handle.num_blocks
                self._counters.bytes_in += nb * (self.geometry.page_bytes
                                                 + self.geometry.meta_page_bytes)

    def is_written(self, request_id: str, layer: int) -> bool:
        self._check_layer(layer)
        with self._lock:
            entry = self._entry(request_id)
            return entry.state is EntryState.READY or entry.written[layer]

    def write_layer(self, request_id: str, layer: int, kv: LayerKV) -> None:
        """Copy one layer's blocks and metadata into the reserved pages."""
        handle = self.handle(request_id)
        expect = (handle.num_blocks, *self.geometry.page_shape)
        meta = (handle.num_blocks, *self.geometry.meta_shape)
        if kv.blocks.shape != expect or kv.kmin.shape != meta or kv.kmax.shape != meta:
            raise LayoutError(f"layer arrays {kv.blocks.shape}, {kv.kmin.shape}, {kv.kmax.shape} "
                              f"do not match {expect} and {meta}")
        if kv.blocks.dtype != np.uint16 or kv.kmin.dtype != np.uint16 or kv.kmax.dtype != np.uint16:
            raise LayoutError("layer arrays must be uint16 bf16 bits")
        for view in self.layer_views(request_id, layer):
            sl = slice(view.first_block, view.first_block + view.pages.shape[0])
            view.pages[...] = kv.blocks[sl]
            view.kmin[...] = kv.kmin[sl]
            view.kmax[...] = kv.kmax[sl]
        self.mark_written(request_id, layer)

    def write_layer_kv(self, request_id: str, layer: int, k, v) -> None:
        """Round ``k, v [T, Hkv, d]`` to bf16, compute the block metadata, store them."""
        reserved = self.handle(request_id).num_tokens
        if reserved != k.shape[0]:
            raise LayoutError(f"{k.shape[0]} tokens given for a request reserved with {reserved}")
        self.write_layer(request_id, layer, pack_layer(k, v))

    def commit(self, request_id: str, *, ttl_s: float | None = None) -> KVHandle:
        """RESERVED -> READY once every layer is written; the ready lease starts."""
        with self._lock:
            entry = self._entry(request_id)
            if entry.state is not EntryState.RESERVED:
                raise RequestNotReady(f"request {request_id!r} is already {entry.state.value}")
            missing = [i for i, w in enumerate(entry.written) if not w]
            if missing:
                raise IncompleteWrite(f"request {request_id!r}: layers {missing} not written")
            entry.state = EntryState.READY
            self._leases.grant(request_id, self.config.ready_ttl_s if ttl_s is None else ttl_s)
            return entry.handle

    # ------------------------------------------------------------ simple tier

    def put(self, request_id: str, num_tokens: int, layers: Sequence[LayerKV], *,
            ttl_s: float | None = None) -> KVHandle:
        """Store a whole request from arrays (copies). All or nothing."""
        if len(layers) != self.geometry.num_layers:
            raise LayoutError(f"{len(layers)} layers given; the store holds {self.geometry.num_layers}")
        self.reserve(request_id, num_tokens)
        try:
            for layer, kv in enumerate(layers):
                self.write_layer(request_id, layer, kv)
            return self.commit(request_id, ttl_s=ttl_s)
        except BaseException:
            self.abort(request_id)
            raise

    def get(self, request_id: str, layer: int) -> LayerKV:
        """A copy of one layer of a READY request, blocks in logical order."""
        self._check_layer(layer)
        with self._lock:
            entry = self._ready(request_id)
            table = entry.handle.block_table(layer)
            out = LayerKV(self.arena.pages[table], self.arena.kmin[table], self.arena.kmax[table])
            self._counters.bytes_out += out.blocks.nbytes + out.kmin.nbytes + out.kmax.nbytes
            return out

    # ------------------------------------------------------------ ownership

    def handle(self, request_id: str) -> KVHandle:
        with self._lock:
            return self._entry(request_id).handle

    def state(self, request_id: str) -> EntryState:
        with self._lock:
            return self._entry(request_id).state

    def __contains__(self, request_id: str) -> bool:
        with self._lock:
            return request_id in self._entries

    def claim(self, request_id: str) -> KVHandle:
        """The decoder takes a READY request: its lease ends, it is freed only by ``release``."""
        with self._lock:
            entry = self._ready(request_id)
            if entry.claimed:
                raise RequestNotReady(f"request {request_id!r} is already claimed")
            entry.claimed = True
            self._leases.end(request_id)
            return entry.handle

    def keep(self, request_id: str) -> None:
        """End the lease of an entry in any state: its owner frees it explicitly from now on
        (the decode pages a running sequence grows into are RESERVED, never committed)."""
        with self._lock:
            self._entry(request_id)
            self._leases.end(request_id)

    def renew(self, request_id: str, ttl_s: float) -> None:
        with self._lock:
            self._entry(request_id)
            self._leases.grant(request_id, ttl_s)

    def release(self, request_id: str) -> None:
        """Free a READY request whose decoding ended."""
        with self._lock:
            self._ready(request_id)
            self._free_locked(request_id)

    def abort(self, request_id: str) -> None:
        """Free a request in any state. Unknown ids are ignored: abort is a cleanup path."""
        with self._lock:
            if request_id in self._entries:
                self._counters.aborts += 1
                self._free_locked(request_id)

    def reap_expired(self) -> list[str]:
        with self._lock:
            return self._reap_locked()

    def record_out(self, nbytes: int) -> None:
        """Count bytes read out in place (the UCX sender)."""
        with self._lock:
            self._counters.bytes_out += nbytes

    def stats(self) -> StoreStats:
        with self._lock:
            states = [e.state for e in self._entries.values()]
            c = self._counters
            return StoreStats(
                total_pages=self._alloc.num_pages, used_pages=self._alloc.used_pages,
                free_extents=self._alloc.num_extents,
                largest_free_extent=self._alloc.largest_extent(),
                requests_reserved=states.count(EntryState.RESERVED),
                requests_ready=states.count(EntryState.READY),
                alloc_failures=c.alloc_failures, leases_expired=c.leases_expired,
                aborts=c.aborts, bytes_in=c.bytes_in, bytes_out=c.bytes_out)

    def close(self) -> None:
        self.arena.close()

    # ------------------------------------------------------------ internals

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.geometry.num_layers:
            raise IndexError(f"layer {layer} out of range [0, {self.geometry.num_layers})")

    def _entry(self, request_id: str) -> _Entry:
        entry = self._entries.get(request_id)
        if entry is None:
            raise UnknownRequest(f"request {request_id!r} is not in the store")
        return entry

    def _ready(self, request_id: str) -> _Entry:
        entry = self._entry(request_id)
        if entry.state is not EntryState.READY:
            raise RequestNotReady(f"request {request_id!r} is {entry.state.value}, not ready")
        return entry

    def _free_locked(self, request_id: str) -> None:
        entry = self._entries.pop(request_id)
        self._leases.end(request_id)
        for runs in entry.handle.runs:
            self._alloc.free(runs)

    def _reap_locked(self) -> list[str]:
        expired = [r for r in self._leases.expired() if r in self._entries]
        for request_id in expired:
            log.warning("lease of request %r expired (%s); freeing its %d pages", request_id,
                        self._entries[request_id].state.value,
                        self._entries[request_id].handle.num_pages)
            self._counters.leases_expired += 1
            self._free_locked(request_id)
        return expired
