"""The incremental GPU block cache (AsyncTLS): which (page, KV head) runs sit in which slot.

The device holds a pool of slots, each one (block, head) of K and V (``[S, 2, 16, d]``
bf16, 8 KiB at d=128). This module is the host-side bookkeeping only, pure NumPy and
tested on CPU; ``gpu_path.EmulatedGpuPath`` owns a pool and does the copies it asks for (the GPU
path keeps its table on the device: ``kernels.block_table``).

Per layer call (:meth:`BlockCacheTable.plan`), given the layer's selected entries:

1. copies issued by the previous call of the same partition become valid (the device
   side makes the compute stream wait for their event before any kernel that reads
   the slots this call returns);
2. each entry gets its slot if it is cached and valid, else -1 (read through UVA or
   by the CPU this step);
3. misses that may be cached are admitted, highest priority first (sinks and the
   recent window, then by estimated mass), at most ``admit_limit`` per call; their
   copy runs asynchronously on a side stream while this step computes, and they
   serve from the next step on: consecutive steps select mostly the same blocks, so
   only the newly selected ones move;
4. slots come from the free list, then by eviction: least recently used first,
   pinned (sink / recent) last, lowest score first among equals. A slot used in this
   call is never evicted (a kernel of this call reads it).

Staleness: a block is admitted only once it is *full* (all 16 tokens written); a full
block of a live request never changes, so its copy stays exact. The last, partially
filled block of a sequence is never cached (it is read in place, one block per row).
As a second line, :meth:`on_append` drops any slot of a page that receives a token,
and :meth:`invalidate_pages` drops a released or recycled page's slots.

Layers get separate partitions of the pool: a layer's working set competes only with
its own earlier steps, so one layer's long selection cannot flush the others (a shared
LRU over 32 layers visited in a cycle thrashes once the total exceeds the pool).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fluxion_dist.errors import FluxionError


class BlockCacheError(FluxionError, ValueError):
    """Bad geometry or arguments for the block cache; the message names them."""


@dataclass(frozen=True, slots=True)
class CachePlan:
    """One layer call: where each entry is served from, and the copies to issue."""

    slots: np.ndarray  # int32 [n]: valid slot for the entry, -1 = not cached (yet)
    copy_pages: np.ndarray  # int64 [c]: arena page of each copy-in
    copy_heads: np.ndarray  # int64 [c]: KV head of each copy-in
    copy_slots: np.ndarray  # int32 [c]: destination slot (global id)
    evicted: int  # slots whose block was dropped to make room

    @property
    def hits(self) -> int:
        return int((self.slots >= 0).sum())


class BlockCacheTable:
    """Slots ``[partition * slots_per_partition, (partition + 1) * slots_per_partition)`` per layer."""

    def __init__(self, num_pages: int, num_kv_heads: int, slots_per_partition: int, *,
                 num_partitions: int = 1, admit_limit: int | None = None) -> None:
        if num_pages < 1 or num_kv_heads < 1 or slots_per_partition < 0 or num_partitions < 1:
            raise BlockCacheError(f"need num_pages, num_kv_heads, num_partitions >= 1 and slots >= 0; got "
                                  f"{num_pages}, {num_kv_heads}, {num_partitions}, {slots_per_partition}")
        if admit_limit is not None and admit_limit < 0:
            raise BlockCacheError(f"admit_limit must be >= 0 or None; got {admit_limit}")
        self.num_pages, self.num_kv_heads = num_pages, num_kv_heads
        self.slots_per_partition, self.num_partitions = slots_per_partition, num_partitions
        self.admit_limit = admit_limit
        total = slots_per_partition * num_partitions
        # a direct (page, head) -> slot map: 4 bytes per 8 KiB run of the arena, O(1) vectorised lookups
        self._page_slot = np.full((num_pages, num_kv_heads), -1, dtype=np.int32)
        self._slot_page = np.full(total, -1, dtype=np.int64)
        self._slot_head = np.zeros(total, dtype=np.int64)
        self._slot_last = np.zeros(total, dtype=np.int64)  # tick of the last call that used it
        self._slot_pinned = np.zeros(total, dtype=bool)
        self._slot_score = np.zeros(total, dtype=np.float64)
        self._slot_valid = np.zeros(total, dtype=bool)  # False while its copy is in flight
        self._pending: list[np.ndarray] = [np.zeros(0, np.int32) for _ in range(num_partitions)]
        self._tick = 0

    @property
    def num_slots(self) -> int:
        return self.slots_per_partition * self.num_partitions

    def occupied(self, partition: int | None = None) -> int:
        used = self._slot_page >= 0
        if partition is None:
            return int(used.sum())
        lo = partition * self.slots_per_partition
        return int(used[lo:lo + self.slots_per_partition].sum())

    def lookup(self, pages: np.ndarray, heads: np.ndarray) -> np.ndarray:
        """The valid slot of each (page, head), -1 where none (no side effects)."""
        s = self._page_slot[pages, heads]
        return np.where((s >= 0) & self._slot_valid[np.maximum(s, 0)], s, -1).astype(np.int32)

    def resident(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(slots, pages, heads)`` of every occupied slot, valid or in flight (tests, debugging)."""
        s = np.flatnonzero(self._slot_page >= 0)
        return s.astype(np.int32), self._slot_page[s].copy(), self._slot_head[s].copy()

    def plan(self, partition: int, pages: np.ndarray, heads: np.ndarray, *, cacheable: np.ndarray,
             pinned: np.ndarray, score: np.ndarray) -> CachePlan:
        """Serve and admit one layer call's selected entries (see the module docstring).

        ``pages, heads [n]`` (int) name each selected (block, KV head) by its arena page;
        ``cacheable [n]``: the block is full (False for a sequence's last, partial block);
        ``pinned [n]``: a sink or recent-window block; ``score [n]``: its estimated mass.
        """
        if not 0 <= partition < self.num_partitions:
            raise BlockCacheError(f"partition {partition} is outside [0, {self.num_partitions})")
        pages = np.asarray(pages, dtype=np.int64)
        heads = np.asarray(heads, dtype=np.int64)
        n = pages.size
        for name, a in (("heads", heads), ("cacheable", cacheable), ("pinned", pinned), ("score", score)):
            if np.shape(a) != (n,):
                raise BlockCacheError(f"{name} must be [{n}] like pages; got {np.shape(a)}")
        if n and (pages.min() < 0 or pages.max() >= self.num_pages or heads.min() < 0
                  or heads.max() >= self.num_kv_heads):
            raise BlockCacheError(f"pages must lie in [0, {self.num_pages}) and heads in [0, {self.num_kv_heads})")
        self._tick += 1
        pend = self._pending[partition]
        self._slot_valid[pend[self._slot_page[pend] >= 0]] = True
        self._pending[partition] = np.zeros(0, np.int32)

        s = self._page_slot[pages, heads]
        present = s >= 0
        lo = partition * self.slots_per_partition
        hi = lo + self.slots_per_partition
        if present.any() and ((s[present] < lo) | (s[present] >= hi)).any():
            raise BlockCacheError(f"a (page, head) of partition {partition} is cached in another partition: "
                                  "each layer's pages must be its own")
        sp = s[present]
        self._slot_last[sp] = self._tick
        self._slot_pinned[sp] = np.asarray(pinned, bool)[present]
        self._slot_score[sp] = np.asarray(score, np.float64)[present]
        slots = np.where(present & self._slot_valid[np.maximum(s, 0)], s, -1).astype(np.int32)

        # admissions: the best misses first, as many as the limit and the evictable slots allow
        cand = np.flatnonzero(~present & np.asarray(cacheable, bool))
        if cand.size:
            cand = cand[np.unique(pages[cand] * self.num_kv_heads + heads[cand], return_index=True)[1]]
            cand = cand[np.lexsort((-np.asarray(score, np.float64)[cand], ~np.asarray(pinned, bool)[cand]))]
        limit = cand.size if self.admit_limit is None else min(cand.size, self.admit_limit)
        part = np.arange(lo, hi)
        free = part[self._slot_page[part] < 0]
        evictable = part[(self._slot_page[part] >= 0) & (self._slot_last[part] < self._tick)]
        evictable = evictable[np.lexsort((self._slot_score[evictable], self._slot_last[evictable],
                                          self._slot_pinned[evictable]))]
        take = min(limit, free.size + evictable.size)
        cand = cand[:take]
        n_evict = max(take - free.size, 0)
        victims = evictable[:n_evict]
        self._drop(victims)
        dst = np.concatenate([free[:take], victims]).astype(np.int32)
        cp_pages, cp_heads = pages[cand], heads[cand]
        self._page_slot[cp_pages, cp_heads] = dst
        self._slot_page[dst] = cp_pages
        self._slot_head[dst] = cp_heads
        self._slot_last[dst] = self._tick
        self._slot_pinned[dst] = np.asarray(pinned, bool)[cand]
        self._slot_score[dst] = np.asarray(score, np.float64)[cand]
        self._slot_valid[dst] = False
        self._pending[partition] = dst
        return CachePlan(slots, cp_pages, cp_heads, dst, int(victims.size))

    def _drop(self, slots: np.ndarray) -> None:
        slots = slots[self._slot_page[slots] >= 0]
        self._page_slot[self._slot_page[slots], self._slot_head[slots]] = -1
        self._slot_page[slots] = -1
        self._slot_valid[slots] = False
        self._slot_pinned[slots] = False

    def invalidate_pages(self, pages: np.ndarray) -> int:
        """Drop every slot of these pages (released, recycled, or written); returns how many."""
        pages = np.unique(np.asarray(pages, dtype=np.int64))
        if pages.size == 0:
            return 0
        if pages.min() < 0 or pages.max() >= self.num_pages:
            raise BlockCacheError(f"pages must lie in [0, {self.num_pages})")
        s = self._page_slot[pages].ravel()
        s = s[s >= 0]
        self._drop(s)
        return int(s.size)

    def on_append(self, pages: np.ndarray) -> int:
        """A token was written into these pages: any cached copy of them is stale now."""
        return self.invalidate_pages(pages)
