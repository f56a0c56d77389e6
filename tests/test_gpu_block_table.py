"""kernels.block_table against its NumPy oracle (routing) and the arena itself (admission)."""

from __future__ import annotations

import numpy as np
import pytest

from tests import gpu_util

gpu_util.skip_unless_gpu()

import cupy as cp  # noqa: E402

from fluxion_dist.policy.routing import route_entries_reference  # noqa: E402
from fluxion_dist.kernels.block_table import admit_blocks, classify_entries, force_blocks  # noqa: E402
from fluxion_dist.kernels.uva import pinned_empty  # noqa: E402

pytestmark = pytest.mark.gpu


def _selection(rng, seq_lens, heads, pages):
    nbs = [-(-t // 16) for t in seq_lens]
    tables = np.full((len(seq_lens), max(nbs)), 1 << 30, np.int32)
    perm = rng.permutation(pages)
    at = 0
    for b, nb in enumerate(nbs):
        tables[b, :nb] = perm[at:at + nb]
        at += nb
    rows = [np.sort(rng.choice(nbs[r // heads], size=rng.integers(0, nbs[r // heads] + 1), replace=False))
            for r in range(len(seq_lens) * heads)]
    indptr = np.concatenate([[0], np.cumsum([x.size for x in rows])]).astype(np.int32)
    return tables, indptr, np.concatenate(rows).astype(np.int32)


@pytest.mark.parametrize("fraction", [0.0, 0.37, 1.0])
@pytest.mark.parametrize("cached", [False, True, "reused"])
@pytest.mark.parametrize("seq_lens,heads", [([1, 15, 17], 2), ([1000, 1333, 4000, 33], 8), ([20000], 1)])
def test_classify_matches_reference(seq_lens, heads, cached, fraction):
    """``cached="reused"``: admission by reuse within 2 steps, the stamps a random mix of 1, 2 and 14 steps back."""
    rng, seed = gpu_util.fresh_rng()
    pages = sum(-(-t // 16) for t in seq_lens) + 7
    tables, indptr, blocks = _selection(rng, seq_lens, heads, pages)
    seq = np.asarray(seq_lens, np.int32)
    slot_of = np.where(rng.random(pages * heads) < 0.4, rng.integers(0, 1 << 20, pages * heads), -1).astype(np.int32)
    # spare capacity: tiles past nnz run too; two launches: each leaves its scratch at zero
    cap = blocks.size + 700
    padded = np.concatenate([blocks, np.zeros(cap - blocks.size, np.int32)])
    stamp = 9
    seen = None
    if cached == "reused":
        seen = rng.choice(np.array([stamp - 1, stamp - 2, -5], np.int32), pages * heads)
    seen_want = None if seen is None else seen.copy()
    window = 2  # stamps 8 and 7 count as reuse, -5 does not
    want = route_entries_reference(indptr, blocks, tables, seq, heads, slot_of if cached else None, fraction,
                                   seen_want, stamp, window)
    nnz = blocks.size
    for launch in range(2):
        seen_dev = None if seen is None else cp.asarray(seen)  # each launch from the same stamps
        outs = (cp.full(cap, 77, cp.int32), cp.full(indptr.size, 77, cp.int32), cp.full(cap, 77, cp.int32),
                cp.full(cap, 77, cp.int32), cp.full(4, 77, cp.int32))
        classify_entries(cp.asarray(indptr), cp.asarray(padded), cp.asarray(tables), cp.asarray(seq), heads=heads,
                         slot_of=cp.asarray(slot_of) if cached else None,
                         cpu_fraction=cp.asarray([fraction], cp.float32), out=outs, last_seen=seen_dev,
                         stamp=None if seen is None else cp.asarray([stamp], cp.int32), window=window)
        sel_slot, cpu_indptr, cpu_blocks, admit, counts = (cp.asnumpy(x) for x in outs)
        msg = f"seed {seed}, launch {launch}"
        np.testing.assert_array_equal(counts, want[4], err_msg=msg)
        np.testing.assert_array_equal(sel_slot[:nnz], want[0], err_msg=msg)
        np.testing.assert_array_equal(cpu_indptr, want[1], err_msg=msg)
        np.testing.assert_array_equal(cpu_blocks[:counts[2]], want[2], err_msg=msg)
        if cached:
            np.testing.assert_array_equal(admit[:counts[3]], want[3], err_msg=msg)
        if seen is not None:
            np.testing.assert_array_equal(cp.asnumpy(seen_dev), seen_want, err_msg=msg)


def test_force_blocks_marks_sinks_and_window():
    rng, seed = gpu_util.fresh_rng()
    seq = np.array([1, 17, 100, 1000], np.int32)
    scores = rng.standard_normal((4, 3, 70)).astype(np.float32)
    dev = cp.asarray(scores)
    force_blocks(dev, cp.asarray(seq), sink_blocks=1, recent_blocks=3)
    got = cp.asnumpy(dev)
    for b, t in enumerate(seq):
        nb = min(-(-int(t) // 16), 70)
        forced = np.zeros(70, bool)
        forced[:1] = True
        forced[max(nb - 3, 0):nb] = True
        np.testing.assert_array_equal(got[b][:, forced], np.float32(3.0e38), err_msg=f"seed {seed}")
        np.testing.assert_array_equal(got[b][:, ~forced], scores[b][:, ~forced], err_msg=f"seed {seed}")


def test_admission_fills_slots_and_evicts_in_ring_order():
    rng, seed = gpu_util.fresh_rng()
    pages, heads, d = 40, 2, 128
    host, dev = pinned_empty((pages, heads, 2, 16, d), np.uint16)
    host[...] = rng.integers(0, 1 << 16, host.shape, dtype=np.uint16)
    pool = cp.zeros((2 * 16, 2, 16, d), cp.uint16)
    slot_of = cp.full(pages * heads, -1, cp.int32)
    owner = cp.full(pool.shape[0] + 1, -1, cp.int32)
    keys = rng.permutation(pages * heads)[:24].astype(np.int32)
    # partition 1 (slots 16..31): 10 then 14 admissions wrap the ring and evict the first 8
    ring = cp.zeros(1, cp.int32)
    for lo, hi in ((0, 10), (10, 24)):
        counts = cp.asarray([7, 3, 0, hi - lo], cp.int32)
        admit_blocks(cp.asarray(keys[lo:hi]), counts, ring, slot_base=16, slot_count=16, slot_of=slot_of,
                     owner=owner, kv_pages=dev, pool=pool)
    assert int(ring[0]) == 24 % 16
    so, ow, pl = cp.asnumpy(slot_of), cp.asnumpy(owner), cp.asnumpy(pool)
    live = keys[8:]
    assert np.all(so[keys[:8]] == -1), f"seed {seed}"
    for i, key in enumerate(live):
        slot = 16 + (8 + i) % 16
        assert so[key] == slot and ow[slot] == key, f"seed {seed}"
        np.testing.assert_array_equal(pl[slot], host[key // heads, key % heads], err_msg=f"seed {seed}")
    assert np.all(ow[:16] == -1) and np.all(pl[:16] == 0)


def test_admission_copies_at_most_the_partition():
    """More cacheable misses than slots: only the partition's slots are filled, once each."""
    rng, seed = gpu_util.fresh_rng()
    pages, heads, d = 30, 1, 64
    host, dev = pinned_empty((pages, heads, 2, 16, d), np.uint16)
    host[...] = rng.integers(0, 1 << 15, host.shape, dtype=np.uint16)
    pool = cp.zeros((16, 2, 16, d), cp.uint16)
    slot_of = cp.full(pages * heads, -1, cp.int32)
    owner = cp.full(pool.shape[0] + 1, -1, cp.int32)
    keys = rng.permutation(pages * heads)[:20].astype(np.int32)
    ring = cp.asarray([5], cp.int32)
    admit_blocks(cp.asarray(keys), cp.asarray([0, 0, 0, 20], cp.int32), ring, slot_base=8, slot_count=8,
                 slot_of=slot_of, owner=owner, kv_pages=dev, pool=pool)
    so, ow, pl = cp.asnumpy(slot_of), cp.asnumpy(owner), cp.asnumpy(pool)
    assert int(ring[0]) == 5, f"seed {seed}"  # a full turn
    for i, key in enumerate(keys[:8]):
        slot = 8 + (5 + i) % 8
        assert so[key] == slot and ow[slot] == key, f"seed {seed}"
        np.testing.assert_array_equal(pl[slot], host[key, 0], err_msg=f"seed {seed}")
    assert np.all(so[keys[8:]] == -1) and np.all(ow[:8] == -1), f"seed {seed}"
