"""The block cache's bookkeeping: it never serves a stale block after an append (or after a
page is recycled), admissions serve from the next call on, slots in use are never evicted,
sinks and the recent window are kept first, layers do not evict each other."""

from __future__ import annotations

import numpy as np
import pytest

from fluxion_dist.attention.layout import BLOCK_TOKENS
from fluxion_dist.hybrid import BlockCacheError, BlockCacheTable


class Mirror:
    """A host arena that decodes token by token, and a host copy of the device pool that
    the plans' copy-ins fill, so every hit can be checked byte for byte."""

    def __init__(self, rng, table: BlockCacheTable, num_seqs: int, hkv: int, d: int = 4):
        self.rng, self.table, self.hkv = rng, table, hkv
        self.arena = np.zeros((table.num_pages, hkv, 2, BLOCK_TOKENS, d), np.uint16)
        self.pool = np.zeros((table.num_slots, 2, BLOCK_TOKENS, d), np.uint16)
        pages = rng.permutation(table.num_pages)
        per = table.num_pages // num_seqs
        self.tables = [pages[i * per:(i + 1) * per] for i in range(num_seqs)]
        self.lens = [int(rng.integers(1, 3 * BLOCK_TOKENS)) for _ in range(num_seqs)]
        for s in range(num_seqs):
            for t in range(self.lens[s]):
                self._write(s, t)

    def _write(self, s: int, t: int) -> int:
        page = int(self.tables[s][t // BLOCK_TOKENS])
        self.arena[page, :, :, t % BLOCK_TOKENS] = self.rng.integers(1, 2**16, size=self.arena.shape[1:3] + (self.arena.shape[4],))
        return page

    def append(self) -> np.ndarray:
        written = np.array([self._write(s, self.lens[s]) for s in range(len(self.lens))])
        self.lens = [n + 1 for n in self.lens]
        return written

    def plan(self, partition: int, *, honest: bool = True):
        """Select random blocks of every sequence (the last one often), plan, check hits, copy in."""
        pages, heads, full, pinned = [], [], [], []
        for s, n in enumerate(self.lens):
            nb = -(-n // BLOCK_TOKENS)
            for h in range(self.hkv):
                pick = np.flatnonzero(self.rng.random(nb) < 0.6)
                pick = np.union1d(pick, [nb - 1])
                pages += [int(self.tables[s][b]) for b in pick]
                heads += [h] * pick.size
                full += [(b + 1) * BLOCK_TOKENS <= n or not honest for b in pick]
                pinned += [b == 0 for b in pick]
        pages, heads = np.array(pages), np.array(heads)
        plan = self.table.plan(partition, pages, heads, cacheable=np.array(full), pinned=np.array(pinned),
                               score=self.rng.random(pages.size))
        hit = plan.slots >= 0
        for p, h, s in zip(pages[hit], heads[hit], plan.slots[hit]):
            np.testing.assert_array_equal(self.pool[s], self.arena[p, h], err_msg=f"stale slot {s} for page {p}")
        # the copy runs now, with the arena as it is during this call
        self.pool[plan.copy_slots] = self.arena[plan.copy_pages, plan.copy_heads]
        assert set(plan.copy_slots.tolist()).isdisjoint(plan.slots[hit].tolist())
        return plan


@pytest.mark.parametrize("honest", [True, False])
def test_never_serves_a_stale_block_after_an_append(honest):
    """honest=False marks even the partial last block cacheable: on_append must then catch it."""
    rng = np.random.default_rng(int(honest))
    table = BlockCacheTable(num_pages=60, num_kv_heads=2, slots_per_partition=24, admit_limit=10)
    m = Mirror(rng, table, num_seqs=3, hkv=2)
    hits = 0
    for _ in range(80):
        hits += m.plan(0, honest=honest).hits
        table.on_append(m.append())
    assert hits > 100  # the check above ran on plenty of hits


def test_recycled_pages_are_dropped():
    rng = np.random.default_rng(3)
    table = BlockCacheTable(num_pages=40, num_kv_heads=1, slots_per_partition=40)
    m = Mirror(rng, table, num_seqs=2, hkv=1)
    m.plan(0)
    assert m.plan(0).hits > 0
    old = m.tables[0]
    assert table.invalidate_pages(old) > 0
    m.arena[old] = rng.integers(1, 2**16, size=m.arena[old].shape)  # a new request's prefill
    assert (table.lookup(old, np.zeros(old.size, np.int64)) == -1).all()
    for _ in range(3):
        m.plan(0)  # would fail on a stale hit


def test_admissions_serve_from_the_next_call():
    t = BlockCacheTable(num_pages=10, num_kv_heads=2, slots_per_partition=8)
    pages, heads = np.array([1, 2, 3]), np.array([0, 1, 0])
    ones = np.ones(3, bool)
    p1 = t.plan(0, pages, heads, cacheable=ones, pinned=~ones, score=np.zeros(3))
    assert p1.hits == 0 and p1.copy_slots.size == 3
    assert (t.lookup(pages, heads) == -1).all()  # copies in flight until the next call
    p2 = t.plan(0, pages, heads, cacheable=ones, pinned=~ones, score=np.zeros(3))
    assert p2.hits == 3 and p2.copy_slots.size == 0
    np.testing.assert_array_equal(np.sort(p2.slots), np.sort(p1.copy_slots))
    # not cacheable: never admitted
    p3 = t.plan(0, np.array([4]), np.array([0]), cacheable=np.zeros(1, bool), pinned=np.zeros(1, bool),
                score=np.zeros(1))
    assert p3.copy_slots.size == 0


def test_eviction_keeps_slots_in_use_and_prefers_old_unpinned():
    t = BlockCacheTable(num_pages=20, num_kv_heads=1, slots_per_partition=4)
    z = np.zeros

    def plan(pages, pinned=None):
        pages = np.array(pages)
        pin = z(pages.size, bool) if pinned is None else np.array(pinned)
        return t.plan(0, pages, z(pages.size, np.int64), cacheable=np.ones(pages.size, bool), pinned=pin,
                      score=z(pages.size))

    plan([0, 1], pinned=[True, False])  # 0 is a sink
    plan([2, 3])
    p = plan([0, 4, 5])  # full: evict the least recently used unpinned slots (1 first, then 2 or 3)
    assert p.evicted == 2 and p.hits == 1
    cached = set(t.resident()[1].tolist())
    assert {0, 4, 5} <= cached and 1 not in cached
    # everything in use this call: nothing to evict, nothing admitted
    t2 = BlockCacheTable(num_pages=20, num_kv_heads=1, slots_per_partition=2)
    t2.plan(0, np.array([0, 1]), z(2, np.int64), cacheable=np.ones(2, bool), pinned=z(2, bool), score=z(2))
    p = t2.plan(0, np.array([0, 1, 2]), z(3, np.int64), cacheable=np.ones(3, bool), pinned=z(3, bool), score=z(3))
    assert p.hits == 2 and p.copy_slots.size == 0 and p.evicted == 0


def test_admission_priority_and_limit():
    t = BlockCacheTable(num_pages=20, num_kv_heads=1, slots_per_partition=8, admit_limit=2)
    pages = np.arange(5)
    p = t.plan(0, pages, np.zeros(5, np.int64), cacheable=np.ones(5, bool),
               pinned=np.array([False, False, False, True, False]), score=np.array([0.1, 0.9, 0.5, 0.0, 0.2]))
    assert p.copy_pages.tolist() == [3, 1]  # the pinned block first, then the highest score


def test_layers_have_their_own_slots():
    t = BlockCacheTable(num_pages=20, num_kv_heads=1, slots_per_partition=3, num_partitions=2)
    one = np.ones(3, bool)
    a = t.plan(0, np.array([0, 1, 2]), np.zeros(3, np.int64), cacheable=one, pinned=~one, score=np.zeros(3))
    b = t.plan(1, np.array([3, 4, 5]), np.zeros(3, np.int64), cacheable=one, pinned=~one, score=np.zeros(3))
    assert set(a.copy_slots.tolist()) == {0, 1, 2} and set(b.copy_slots.tolist()) == {3, 4, 5}
    assert t.occupied(0) == 3 and t.occupied(1) == 3
    with pytest.raises(BlockCacheError, match="another partition"):
        t.plan(1, np.array([0]), np.zeros(1, np.int64), cacheable=one[:1], pinned=~one[:1], score=np.zeros(1))
    with pytest.raises(BlockCacheError, match="partition 2"):
        t.plan(2, np.array([0]), np.zeros(1, np.int64), cacheable=one[:1], pinned=~one[:1], score=np.zeros(1))
    with pytest.raises(BlockCacheError, match="pages must lie"):
        t.plan(0, np.array([99]), np.zeros(1, np.int64), cacheable=one[:1], pinned=~one[:1], score=np.zeros(1))
