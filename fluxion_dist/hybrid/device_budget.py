"""Host-side decisions of the GPU-resident layer pipeline: per-head budgets and the CPU share.

The pipeline (:mod:`fluxion_dist.hybrid.device_pipeline`) keeps scoring, selection and
routing on the GPU; what the host decides per layer is a handful of numbers, all here, on
the host alone, so CI tests them (plain ints where the host runs them every layer, NumPy
where they run once per refresh or serve the reference):

- ``row_budget_lists``: Fluxion's output-aware budget on the device path. Each (request, KV
  head) row's *demand* is the number of blocks its estimated softmax mass needs to reach
  the mass target (a top-p pass on the GPU, refreshed every few steps: the predictor's
  measurement). The layer's cap (``budget`` x the request's KV) is shared max-min fairly
  (water-filling): heads that need little get all they need, so a needle head's few blocks
  are never squeezed by a dense head's long tail, and the dense heads split the rest.
  Sinks and the recent window are always kept, on top of the demand.
- ``head_kinds``: the predictor's label per head from the same demand: LOCAL (the kept
  blocks already hold the mass), RETRIEVAL (a few far blocks), DENSE.
- ``balanced_cpu_fraction``: the share of a layer's cache misses the CPU computes so that
  both sides are predicted to finish together (cost model, last step's hit/miss counts),
  or none where the split would not pay for the host round trip it needs.
- ``route_entries_reference``: the oracle of ``kernels.block_table.classify_entries``.
"""

from __future__ import annotations

import math

import numpy as np

from fluxion_dist.attention.layout import BLOCK_TOKENS
from fluxion_dist.hybrid.cost_model import CostModel
from fluxion_dist.sparse.head_predictor import HeadKind

SLOT_UVA, SLOT_CPU = -1, -2


def forced_count(nb: np.ndarray, sink_blocks: int, recent_blocks: int) -> np.ndarray:
    """Blocks always kept (the first ``sink_blocks`` and last ``recent_blocks``) per context of ``nb`` blocks."""
    nb = np.asarray(nb, dtype=np.int64)
    return np.array([_kept(int(n), sink_blocks, recent_blocks) for n in nb.ravel()], np.int64).reshape(nb.shape)


def _kept(nb: int, sink_blocks: int, recent_blocks: int) -> int:
    sinks, recent = min(nb, sink_blocks), min(nb, recent_blocks)
    return sinks + recent - max(sinks - max(nb - recent_blocks, 0), 0)


def water_fill(demand: list[int], cap: int) -> list[int]:
    """Max-min fair integer shares of ``cap`` for ``demand`` (>= 0): each row gets
    ``min(demand, level)``, the level as high as the cap allows; leftovers from the
    integer level go one each to the rows still short, lowest index first."""
    # Plain ints: a layer's rows are a few dozen numbers, and the host plans every layer of
    # every step; NumPy's per-call overhead on so few numbers costs more than the loop.
    if sum(demand) <= cap:
        return list(demand)
    cap = max(cap, 0)
    n = len(demand)
    below = 0  # with the level at srt[i], rows below i take their demand and the rest take srt[i]
    for i, d in enumerate(sorted(demand)):
        if below + d * (n - i) > cap:
            level = (cap - below) // (n - i)
            break
        below += d
    else:
        level = max(demand)
    grant = [min(d, level) for d in demand]
    spare = cap - sum(grant)
    for j, d in enumerate(demand):
        if spare <= 0:
            break
        if grant[j] < d:
            grant[j] += 1
            spare -= 1
    return grant


def row_budget_lists(demand: list[list[int]] | None, nb: list[int], hkv: int, *, budget: float, sink_blocks: int,
                     recent_blocks: int) -> list[list[int]]:
    """Blocks per (request, KV head) row, kept blocks included.

    ``demand`` [B][Hkv] (blocks to reach the mass target; None: not measured yet, every head
    gets an equal share, the fixed-budget rule); ``nb`` [B] blocks per request. Plain ints: the
    host plans a layer whenever its demand is measured, and NumPy's per-call overhead on a few
    dozen numbers cost more than the loops.
    """
    out = []
    for b, n in enumerate(nb):
        k = _kept(n, sink_blocks, recent_blocks)
        if demand is None:
            out.append([min(max(math.ceil(budget * n), k), n)] * hkv)
            continue
        cap = math.ceil(budget * hkv * n) - hkv * k
        # the demand was measured over every block, ranked by score: the forced sinks and
        # window need not hold its mass, so the whole demand is asked for beyond them
        extra = [min(max(x, 0), n - k) for x in demand[b]]
        out.append([k + g for g in water_fill(extra, max(cap, 0))])
    return out


def head_kinds(demand: np.ndarray, nb: np.ndarray, *, sink_blocks: int, recent_blocks: int,
               retrieval_fraction: float = 0.02) -> np.ndarray:
    """HeadKind per row [B, Hkv]: LOCAL if the kept blocks cover the demand, RETRIEVAL if the
    far demand is at most ``retrieval_fraction`` of the context, else DENSE."""
    nb = np.asarray(nb, dtype=np.int64)[:, None]
    far = np.asarray(demand, dtype=np.int64) - forced_count(nb, sink_blocks, recent_blocks)
    kinds = np.full(far.shape, int(HeadKind.DENSE), dtype=np.int64)
    kinds[far <= np.maximum(retrieval_fraction * nb, 1)] = int(HeadKind.RETRIEVAL)
    kinds[far <= 0] = int(HeadKind.LOCAL)
    return kinds


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
                            heads: int, slot_of: np.ndarray | None, cpu_fraction: float):
    """NumPy oracle of ``classify_entries``: (sel_slot, cpu_indptr, cpu_blocks, admit_keys, counts)."""
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
    sel_slot = np.where(to_cpu, SLOT_CPU, slot).astype(np.int32)
    cpu_indptr = np.concatenate(([0], np.cumsum(np.bincount(row[to_cpu], minlength=rows)))).astype(np.int32)
    counts = np.array([nnz - miss.sum(), miss.sum() - to_cpu.sum(), to_cpu.sum(), admit.sum()], np.int32)
    return sel_slot, cpu_indptr, blk[to_cpu].astype(np.int32), key[admit].astype(np.int32), counts
