"""Page allocator: free extents of the arena, best fit, coalesced on free.

A request-layer is given one contiguous run of pages when any free extent can hold it:
one run is one message on the wire and one sequential read for the kernels. Only when
no extent fits is a layer spread over several runs (largest extents first, so the count
stays small), and past ``max_runs`` the request is refused as fragmented.
Requests are all-or-nothing: a failed allocation leaves the free list as it was.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Sequence

from kv_store.errors import KVStoreError, StoreFull


@dataclass(frozen=True, slots=True)
class PageRun:
    """Pages ``[start, start + length)`` of the arena."""

    start: int
    length: int

    @property
    def stop(self) -> int:
        return self.start + self.length


class AllocatorCorrupt(KVStoreError):
    """A free of pages that are already free: a double free in the caller."""


class PageAllocator:
    def __init__(self, num_pages: int) -> None:
        self.num_pages = num_pages
        self._starts: list[int] = [0]          # sorted starts of free extents
        self._length: dict[int, int] = {0: num_pages}
        self.free_pages = num_pages

    @property
    def used_pages(self) -> int:
        return self.num_pages - self.free_pages

    @property
    def num_extents(self) -> int:
        return len(self._starts)

    def largest_extent(self) -> int:
        return max(self._length.values(), default=0)

    def allocate(self, counts: Sequence[int], max_runs: int) -> list[list[PageRun]]:
        """One list of runs per entry of ``counts`` (pages each), all or nothing."""
        needed = sum(counts)
        if needed > self.free_pages:
            raise StoreFull(needed, self.free_pages)
        done: list[list[PageRun]] = []
        try:
            for count in counts:
                done.append(self._allocate_one(count, max_runs))
        except StoreFull as e:
            for runs in done:
                self.free(runs)
            raise StoreFull(needed, self.free_pages, str(e)) from None
        return done

    def _allocate_one(self, count: int, max_runs: int) -> list[PageRun]:
        if count <= 0:
            raise ValueError(f"a request-layer needs at least one page; got {count}")
        best = None
        for start in self._starts:
            length = self._length[start]
            if length >= count and (best is None or length < self._length[best]):
                best = start
                if length == count:
                    break
        if best is not None:
            return [self._take(best, count)]
        by_size = sorted(self._starts, key=lambda s: -self._length[s])
        covered, picked = 0, []
        for start in by_size:
            if covered >= count:
                break
            picked.append(start)
            covered += self._length[start]
        if len(picked) > max_runs:
            raise StoreFull(count, self.free_pages,
                            f"fragmented: {count} pages would take {len(picked)} runs > {max_runs}")
        runs, left = [], count
        for start in sorted(picked):
            take = min(left, self._length[start])
            runs.append(self._take(start, take))
            left -= take
        return runs

    def _take(self, start: int, count: int) -> PageRun:
        length = self._length.pop(start)
        i = bisect.bisect_left(self._starts, start)
        if length == count:
            del self._starts[i]
        else:
            self._starts[i] = start + count
            self._length[start + count] = length - count
        self.free_pages -= count
        return PageRun(start, count)

    def free(self, runs: Sequence[PageRun]) -> None:
        for run in runs:
            self._free_one(run)

    def _free_one(self, run: PageRun) -> None:
        if run.length <= 0 or run.start < 0 or run.stop > self.num_pages:
            raise AllocatorCorrupt(f"free of {run} outside the arena of {self.num_pages} pages")
        i = bisect.bisect_left(self._starts, run.start)
        prev_start = self._starts[i - 1] if i > 0 else None
        next_start = self._starts[i] if i < len(self._starts) else None
        if prev_start is not None and prev_start + self._length[prev_start] > run.start:
            raise AllocatorCorrupt(f"double free: {run} overlaps a free extent at {prev_start}")
        if next_start is not None and next_start < run.stop:
            raise AllocatorCorrupt(f"double free: {run} overlaps a free extent at {next_start}")
        start, length = run.start, run.length
        if next_start == run.stop:
            length += self._length.pop(next_start)
            del self._starts[i]
        if prev_start is not None and prev_start + self._length[prev_start] == run.start:
            self._length[prev_start] += length
        else:
            self._starts.insert(i, start)
            self._length[start] = length
        self.free_pages += run.length
