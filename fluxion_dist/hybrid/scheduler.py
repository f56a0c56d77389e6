"""Priority-based CPU/GPU split of one layer's sparse attention (Fluxion's scheduler).

Input: the selected base blocks of every (request, KV head) row (the batch CSR of
``sparse.BlockSelection``), which of them sit in the GPU block cache (``cached_slot``,
-1: not cached) and the cost model. Output: two CSR selections over the same rows,
one for the Cython path and one for the GPU kernel with ``sel_slot`` per entry (the
cache slot, or -1: read the host page through UVA). Every selected block lands in
exactly one of them, so the exact merge of the two partials is the attention over the
whole selection, whatever the split.

Rules, in order:

- a cached block is computed by the GPU (it is already in HBM: the cheapest read);
- a block with a partial token mask goes to the CPU (the GPU kernel reads whole
  blocks; only the Cython kernel takes ``sel_masks``);
- the uncached rest is split so both sides are predicted to finish together: ``x``
  blocks to the CPU minimise ``max(cpu_time(x), gpu_time(cached, rest - x, copies))``;
- which ``x``: rows in order of their uncached work, largest first, whole rows to the
  CPU until ``x`` is reached, the boundary row split (its first blocks to the CPU).
  Largest rows first because the CPU pays per row (each row reloads the group's query
  and writes a partial) while the GPU's split-K grid spreads any row over its SMs, so
  the CPU should get few long rows and the GPU the many short ones.

Modes: ``balanced`` (above; Fluxion and full), ``static`` (a fixed fraction of every
layer's uncached blocks to the CPU in row order, set once; the fixed hybrid baseline),
``gpu_only`` (Quest-style: all on the GPU) and ``cpu_only``. A cost model without a GPU
turns every mode into ``cpu_only``. Pure NumPy, vectorised: no loop over rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from fluxion_dist.hybrid.cost_model import CostModel
from fluxion_dist.sparse.selection import FULL_MASK, BlockSelection, SparseInputError

SplitMode = Literal["balanced", "static", "gpu_only", "cpu_only"]
SPLIT_MODES: tuple[SplitMode, ...] = ("balanced", "static", "gpu_only", "cpu_only")


@dataclass(frozen=True, slots=True)
class Split:
    """One layer's work for both devices, and what the cost model predicts for it."""

    cpu: BlockSelection  # rows as the input's; sel_masks carried over when the input had them
    gpu: BlockSelection  # whole blocks only
    gpu_slot: np.ndarray  # int32 [gpu nnz]: cache slot, -1 = UVA read of the host page
    cpu_blocks: int
    gpu_cached_blocks: int
    gpu_uva_blocks: int
    cpu_s: float  # predicted
    gpu_s: float  # predicted, copy-ins sharing PCIe included

    @property
    def predicted_s(self) -> float:
        return max(self.cpu_s, self.gpu_s)

    @property
    def gpu_idle_s(self) -> float:
        """Predicted time the GPU waits for the CPU in this layer (the merge needs both)."""
        return max(self.cpu_s - self.gpu_s, 0.0)


def _csr(selection: BlockSelection, rows: np.ndarray, keep: np.ndarray, masks: bool) -> BlockSelection:
    counts = np.bincount(rows[keep], minlength=selection.num_rows)
    indptr = np.zeros(selection.num_rows + 1, dtype=np.int32)
    np.cumsum(counts, out=indptr[1:])
    sel_masks = selection.sel_masks[keep] if masks and selection.sel_masks is not None else None
    return BlockSelection(indptr, selection.sel_blocks[keep].astype(np.int32), selection.num_kv_heads, sel_masks)


def _priority_rank(rows: np.ndarray, free: np.ndarray, num_rows: int, *, largest_first: bool) -> np.ndarray:
    """Rank of each free entry in the CPU's take order (0 = first); non-free entries get nnz."""
    nnz = rows.size
    per_row = np.bincount(rows[free], minlength=num_rows)
    if largest_first:
        order = np.argsort(-per_row, kind="stable")  # equal sizes: lower row first
    else:
        order = np.arange(num_rows)
    start = np.empty(num_rows, dtype=np.int64)
    start[order] = np.concatenate([[0], np.cumsum(per_row[order])[:-1]])
    # index of a free entry among its row's free entries: entries are grouped by row
    idx_free = np.flatnonzero(free)
    first_of_row = np.searchsorted(rows[idx_free], np.arange(num_rows))
    within = np.arange(idx_free.size) - first_of_row[rows[idx_free]]
    rank = np.full(nnz, nnz, dtype=np.int64)
    rank[idx_free] = start[rows[idx_free]] + within
    return rank


def balanced_cpu_blocks(cost: CostModel, forced_cpu: int, cached: int, free: int, copies: int) -> int:
    """How many of the ``free`` (uncached, whole) blocks the CPU takes so both finish together."""
    if not cost.has_gpu:
        return free
    if free == 0:
        return 0
    tc, tu = cost.cpu_block_s, cost.uva_block_s
    gpu_all = cost.gpu_time(cached, free, copies)
    # cpu_over + (F + x) tc = gpu_all - x tu  (both sides busy; the overheads make it affine)
    x_star = (gpu_all - cost.cpu_overhead_s - forced_cpu * tc) / (tc + tu)
    cands = {0, free, int(np.clip(np.floor(x_star), 0, free)), int(np.clip(np.ceil(x_star), 0, free))}

    def makespan(x: int) -> tuple[float, int]:
        return (max(cost.cpu_time(forced_cpu + x), cost.gpu_time(cached, free - x, copies)), x)

    return min(cands, key=makespan)


def split_layer(selection: BlockSelection, cost: CostModel, *, mode: SplitMode,
                cached_slot: np.ndarray | None = None, copies: int = 0,
                static_cpu_fraction: float = 0.5) -> Split:
    """Split one layer's selection between the CPU and the GPU (see the module docstring).

    ``cached_slot int32 [nnz]``: the entry's GPU cache slot or -1 (None: nothing cached);
    ``copies``: cache copy-ins issued this layer (they take PCIe time from the UVA reads).
    """
    if mode not in SPLIT_MODES:
        raise SparseInputError(f"split mode {mode!r} is not one of {SPLIT_MODES}")
    if not 0.0 <= static_cpu_fraction <= 1.0:
        raise SparseInputError(f"static_cpu_fraction must be in [0, 1]; got {static_cpu_fraction}")
    nnz = selection.sel_blocks.size
    counts = selection.blocks_per_row()
    rows = np.repeat(np.arange(selection.num_rows), counts)
    if cached_slot is None:
        slot = np.full(nnz, -1, dtype=np.int32)
    else:
        slot = np.asarray(cached_slot, dtype=np.int32)
        if slot.shape != (nnz,):
            raise SparseInputError(f"cached_slot must be [{nnz}] (one per selected block); got {slot.shape}")
    if not cost.has_gpu:
        mode = "cpu_only"

    forced_cpu = (np.zeros(nnz, bool) if selection.sel_masks is None
                  else selection.sel_masks != FULL_MASK)
    if mode == "cpu_only":
        to_cpu = np.ones(nnz, dtype=bool)
    else:
        cached = (slot >= 0) & ~forced_cpu
        free = ~cached & ~forced_cpu
        n_free = int(free.sum())
        if mode == "gpu_only":
            x = 0
        elif mode == "static":
            x = int(round(static_cpu_fraction * n_free))
        else:
            x = balanced_cpu_blocks(cost, int(forced_cpu.sum()), int(cached.sum()), n_free, copies)
        rank = _priority_rank(rows, free, selection.num_rows, largest_first=(mode == "balanced"))
        to_cpu = forced_cpu | (free & (rank < x))

    to_gpu = ~to_cpu
    gpu_slot = np.where(to_gpu, slot, -1)[to_gpu].astype(np.int32)
    n_cpu = int(to_cpu.sum())
    n_cached = int((gpu_slot >= 0).sum())
    n_uva = int(gpu_slot.size - n_cached)
    gpu_copies = copies if cost.has_gpu else 0
    return Split(_csr(selection, rows, to_cpu, masks=True), _csr(selection, rows, to_gpu, masks=False),
                 gpu_slot, n_cpu, n_cached, n_uva, cost.cpu_time(n_cpu),
                 cost.gpu_time(n_cached, n_uva, gpu_copies) if cost.has_gpu else 0.0)
