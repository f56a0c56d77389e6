"""Where a layer's selected blocks run: the CPU's share of the cache misses, and the routing oracle.

- ``balanced_cpu_fraction``: the share of a layer's cache misses the CPU computes so that
  both sides are predicted to finish together (cost model, the layer's last hit/miss
  counts), or none where the split would not pay for the host round trip it needs.
- ``route_entries_reference``: the NumPy oracle of ``kernels.block_table.classify_entries``.
"""

from __future__ import annotations

import math

import numpy as np

from fluxion_dist.attention.layout import BLOCK_TOKENS
from fluxion_dist.hybrid.cost_model import CostModel

SLOT_UVA, SLOT_CPU = -1, -2
NEVER_SEEN = -(1 << 30)  # admission by reuse: the stamp of a key never selected (steps count up from 0)


def balanced_cpu_fraction(cost: CostModel, hits: int, misses: int, *, admits: int = 0,
                          switch_s: float = 0.0) -> float:
    """Share of ``misses`` for the CPU minimising the layer's predicted time.

    All on the GPU: cached hits, every miss through UVA, the admissions' copies sharing PCIe.
    Split: the CPU's share costs its fixed overhead plus its blocks, the GPU the rest, both
    running together; the split point where they finish together is taken (the better of its
    two integer neighbours). A split also costs ``switch_s``: the host waits for the GPU's
    routing in the middle of the layer, so it loses the lead it otherwise keeps over the GPU
    (about one layer's host time). Small miss sets therefore stay on the GPU.
    """
    if misses <= 0 or cost.cpu_bytes_per_s <= 0:
        return 0.0
    if not cost.has_gpu:
        return 1.0
    u, c = cost.uva_block_s, cost.cpu_block_s
    if hits > 0 and misses * u <= switch_s:
        return 0.0  # the GPU's share of any split costs at least the hits, plus the round trip
    best_x, best_t = 0, cost.gpu_time(hits, misses, admits)
    even = (cost.gpu_time(hits, misses, admits) - cost.cpu_overhead_s) / (c + u)
    # (all to the CPU is a candidate too: with no hits the GPU then launches nothing)
    for x in {min(max(math.floor(even), 1), misses), min(max(math.ceil(even), 1), misses), misses}:
        t = max(cost.cpu_time(x), cost.gpu_time(hits, misses - x, admits)) + switch_s
        if t < best_t:
            best_x, best_t = x, t
    return best_x / misses


def route_entries_reference(indptr: np.ndarray, blocks: np.ndarray, block_tables: np.ndarray, seq_lens: np.ndarray,
                            heads: int, slot_of: np.ndarray | None, cpu_fraction: float,
                            last_seen: np.ndarray | None = None, stamp: int = 0, window: int = 1):
    """NumPy oracle of ``classify_entries``: (sel_slot, cpu_indptr, cpu_blocks, admit_keys, counts).
    With ``last_seen`` (int32, updated in place) only misses selected within the ``window``
    steps before ``stamp`` are admitted."""
    rows = indptr.size - 1
    nnz = int(indptr[-1])
    row = np.repeat(np.arange(rows), np.diff(indptr))
    blk = blocks[:nnz].astype(np.int64)
    b = row // heads
    key = block_tables[b, blk].astype(np.int64) * heads + row % heads
    slot = slot_of[key] if slot_of is not None else np.full(nnz, SLOT_UVA, np.int64)
    miss = slot < 0
    r = np.cumsum(miss) - miss  # rank among misses
    to_cpu = miss & (np.floor((r + 1) * np.float64(np.float32(cpu_fraction)))
                     > np.floor(r * np.float64(np.float32(cpu_fraction))))
    admit = miss & ((blk + 1) * BLOCK_TOKENS <= seq_lens[b]) & (slot_of is not None)
    if last_seen is not None:
        admit &= stamp - last_seen[key].astype(np.int64) <= window
        last_seen[key] = stamp
    sel_slot = np.where(to_cpu, SLOT_CPU, slot).astype(np.int32)
    cpu_indptr = np.concatenate(([0], np.cumsum(np.bincount(row[to_cpu], minlength=rows)))).astype(np.int32)
    counts = np.array([nnz - miss.sum(), miss.sum() - to_cpu.sum(), to_cpu.sum(), admit.sum()], np.int32)
    return sel_slot, cpu_indptr, blk[to_cpu].astype(np.int32), key[admit].astype(np.int32), counts
