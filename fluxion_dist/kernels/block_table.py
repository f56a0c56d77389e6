"""The GPU block cache's table and per-layer routing of selected blocks (launchers for block_table.cu).

Oracle: :func:`fluxion_dist.policy.routing.route_entries_reference` (the same routing
in NumPy); the cache contents are checked against the arena itself (a slot holds exactly
its owner's run).
"""

from __future__ import annotations

import cupy as cp
import numpy as np

from fluxion_dist.kernels import loader
from fluxion_dist.kernels.checks import BF16_BITS, expect
from fluxion_dist.kernels.counters import look_back_scratch

SLOT_UVA = -1
SLOT_CPU = -2  # common.cuh: a selected block the CPU computes; the attention kernel skips it
_CLASSIFY_THREADS = 256  # block_table.cu's SELECT_THREADS: entries per CTA
_FORCE_THREADS = 128
_ADMIT_THREADS = 512  # a 16-token run at d=128 is 512 16-byte words: one load per thread (PCIe latency once)
_ADMIT_GRID = 1024  # CTAs of an admission; each loops over its share of the runs


def force_blocks(scores: cp.ndarray, seq_lens: cp.ndarray, *, sink_blocks: int, recent_blocks: int) -> None:
    """Give each request's first ``sink_blocks`` and last ``recent_blocks`` blocks the
    largest finite score, in place (scores float32 [B, H, n] at 16-token granularity)."""
    expect("scores", scores, np.float32, (None, None, None))
    expect("seq_lens", seq_lens, np.int32, (scores.shape[0],))
    bsz, heads, n = scores.shape
    if sink_blocks < 0 or recent_blocks < 0:
        raise ValueError(f"sink_blocks and recent_blocks must be >= 0; got {sink_blocks}, {recent_blocks}")
    if bsz * heads == 0 or sink_blocks + recent_blocks == 0:
        return
    loader.get_kernel("block_table", "force_blocks")((bsz * heads,), (_FORCE_THREADS,), (
        scores, seq_lens, np.int32(heads), np.int32(n), np.int32(sink_blocks), np.int32(recent_blocks)))


def classify_entries(indptr: cp.ndarray, blocks: cp.ndarray, block_tables: cp.ndarray, seq_lens: cp.ndarray, *,
                     heads: int, slot_of: cp.ndarray | None, cpu_fraction: cp.ndarray,
                     out: tuple[cp.ndarray, cp.ndarray, cp.ndarray, cp.ndarray | None, cp.ndarray],
                     last_seen: cp.ndarray | None = None, stamp: cp.ndarray | None = None, window: int = 1) -> None:
    """Route every selected block: cache hit, UVA read or CPU (one launch, no host round trip).

    indptr int32 [R + 1], blocks int32 [>= nnz]: the selection, row ``b * heads + h``;
    block_tables int32 [B, max_blocks]; seq_lens int32 [B] (the new token included);
    slot_of int32 [P * heads] or None (nothing cached: every entry is a miss).
    ``cpu_fraction`` (float32 [1] on the device, read when the kernel runs, so a captured
    graph follows it) of the misses, evenly spread in entry order, go to the CPU.

    ``out = (sel_slot [>= nnz], cpu_indptr [R + 1], cpu_blocks [>= nnz], admit_keys [>= nnz]
    or None, counts [4])``, all int32: ``sel_slot`` is the slot, -1 (UVA) or ``SLOT_CPU``;
    ``admit_keys`` lists ``page * heads + head`` of the misses that are full blocks;
    ``counts`` = hits, UVA reads, CPU entries, admissions.

    ``last_seen`` (int32 [P * heads], with ``stamp`` int32 [1], both on the device): admission
    by reuse. Every selected key's entry becomes ``stamp``, and a miss is admitted only if its
    entry was at least ``stamp - window`` (selected within the ``window`` steps before as well;
    a never-selected key must hold a stamp far in the past, e.g. ``NEVER_SEEN``).
    """
    expect("indptr", indptr, np.int32, (None,))
    rows = indptr.shape[0] - 1
    expect("blocks", blocks, np.int32, (None,))
    expect("block_tables", block_tables, np.int32, (None, None))
    expect("seq_lens", seq_lens, np.int32, (block_tables.shape[0],))
    if rows != block_tables.shape[0] * heads:
        raise ValueError(f"indptr has {rows} rows; {block_tables.shape[0]} requests x {heads} heads expected")
    if rows <= 0:
        raise ValueError(f"classify_entries needs at least one row; got {rows}")
    expect("cpu_fraction", cpu_fraction, np.float32, (1,))
    sel_slot, cpu_indptr, cpu_blocks, admit_keys, counts = out
    for name, a in (("sel_slot", sel_slot), ("cpu_blocks", cpu_blocks)):
        expect(name, a, np.int32, (blocks.shape[0],))
    expect("cpu_indptr", cpu_indptr, np.int32, (rows + 1,))
    expect("counts", counts, np.int32, (4,))
    if slot_of is not None:
        expect("slot_of", slot_of, np.int32, (None,))
        if admit_keys is None:
            raise ValueError("admit_keys is needed with slot_of")
        expect("admit_keys", admit_keys, np.int32, (blocks.shape[0],))
    if (last_seen is None) != (stamp is None):
        raise ValueError("last_seen and stamp go together")
    if last_seen is not None:
        expect("last_seen", last_seen, np.int32, (None,))
        expect("stamp", stamp, np.int32, (1,))
        if window < 1:
            raise ValueError(f"window must be >= 1 step; got {window}")
    null = np.uint64(0)
    # a tile of entries per CTA, up to the lists' capacity (nnz itself is only on the device)
    tiles = max(1, -(-blocks.shape[0] // _CLASSIFY_THREADS))
    counters, status, row_cpu = look_back_scratch(tiles, rows)  # row_cpu: CPU entries per row
    loader.get_kernel("block_table", "classify_entries")((tiles,), (_CLASSIFY_THREADS,), (
        indptr, blocks, np.int32(rows), np.int32(heads), block_tables, np.int32(block_tables.shape[1]), seq_lens,
        slot_of if slot_of is not None else null, cpu_fraction, sel_slot, cpu_indptr, cpu_blocks,
        admit_keys if slot_of is not None else null, counts, counters, status, row_cpu,
        last_seen if last_seen is not None else null, stamp if stamp is not None else null, np.int32(window)))


def admit_blocks(admit_keys: cp.ndarray, counts: cp.ndarray, ring: cp.ndarray, *, slot_base: int, slot_count: int,
                 slot_of: cp.ndarray, owner: cp.ndarray, kv_pages: cp.ndarray, pool: cp.ndarray) -> None:
    """Copy the first ``min(counts[3], slot_count)`` listed runs into slots
    ``slot_base + (ring + i) % slot_count`` and advance ``ring``; both counts (int32 [4], as
    ``classify_entries`` writes them) and ring (int32 [1]) are read on the device, so no host
    round trip decides how much to copy.

    kv_pages: the arena, bf16 bits [P, Hkv, 2, 16, d] (a UVA view of pinned host memory);
    pool: bf16 bits [S, 2, 16, d]; the table (``slot_of``, ``owner``) is updated in place.
    """
    expect("kv_pages", kv_pages, BF16_BITS, (None, None, 2, None, None))
    expect("pool", pool, BF16_BITS, (None, 2, kv_pages.shape[3], kv_pages.shape[4]))
    expect("admit_keys", admit_keys, np.int32, (None,))
    expect("counts", counts, np.int32, (4,))
    expect("ring", ring, np.int32, (1,))
    if slot_count < 1 or slot_base < 0 or slot_base + slot_count > pool.shape[0]:
        raise ValueError(f"slots [{slot_base}, {slot_base + slot_count}) must be a non-empty range of the "
                         f"pool's {pool.shape[0]}")
    run_vec = 2 * kv_pages.shape[3] * kv_pages.shape[4] * 2 // 16
    grid = max(1, min(admit_keys.shape[0], slot_count, _ADMIT_GRID))
    loader.get_kernel("block_table", "admit_blocks")((grid,), (_ADMIT_THREADS,), (
        admit_keys, counts, np.int32(slot_base), np.int32(slot_count), ring, slot_of, owner,
        kv_pages, pool, np.int32(run_vec)))
    loader.get_kernel("block_table", "advance_ring")((1,), (1,), (counts, np.int32(slot_count), ring))
