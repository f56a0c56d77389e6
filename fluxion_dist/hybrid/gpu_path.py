"""The GPU side of a hybrid layer, as the operator sees it, and its CPU stand-in for CI.

:class:`GpuPath` is what the operator calls per layer: issue the block cache's copy-ins,
launch the GPU partial over its share (cache slots or UVA reads of the host arena),
then merge it with the CPU partial. On a real GPU the operator runs
``device_pipeline.DevicePipeline`` instead (selection and routing on the device too); this
contract keeps the host-selection path testable without one:

- :class:`EmulatedGpuPath` here: the same contract on the CPU, for tests on machines
  with no GPU. Its "pool" is a NumPy array filled by the copy-ins at the moment they
  are issued, and its attention reads each cached entry *from that pool* (the Cython
  kernel over an arena copy whose cached runs are replaced by their slots' bytes). A
  stale slot therefore gives a wrong answer here exactly as it would on the GPU.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from fluxion_dist.attention.layout import BLOCK_TOKENS
from fluxion_dist.cpu.attention import BatchPartial, sparse_partial_attention
from fluxion_dist.hybrid.block_cache import CachePlan
from fluxion_dist.hybrid.merge import merge_batch_partials
from fluxion_dist.sparse.selection import BlockSelection


@dataclass(frozen=True, slots=True)
class LayerInputs:
    """What both devices read for one layer (host arrays)."""

    q: np.ndarray  # f32 [B, Hq, d]
    block_tables: np.ndarray  # i32 [B, max_blocks]
    seq_lens: np.ndarray  # i32 [B], the new token included
    scale: float


@dataclass(frozen=True, slots=True)
class MergedLayer:
    out: np.ndarray  # f32 [B, Hq, d]
    gpu_busy_s: float | None  # measured time of the GPU's kernels (None: not measured)


class GpuPath(Protocol):
    def copy_in(self, partition: int, plan: CachePlan) -> None:
        """Start copying ``plan``'s blocks into their slots; they serve from this partition's next call."""

    def launch(self, partition: int, inputs: LayerInputs, gpu: BlockSelection, gpu_slot: np.ndarray) -> object:
        """Start the GPU partial over ``gpu`` (entries with ``gpu_slot >= 0`` from the pool); returns a handle."""

    def finish(self, handle: object, cpu: Future[BatchPartial] | None) -> MergedLayer:
        """Wait for both partials and merge them exactly; ``cpu`` None when the CPU share was empty."""


@dataclass(frozen=True, slots=True)
class _EmulatedHandle:
    partial: BatchPartial | None


class EmulatedGpuPath:
    """CPU stand-in for the GPU path (tests): same contract, NumPy pool, Cython attention."""

    def __init__(self, kv_pages: np.ndarray, num_slots: int, *, num_threads: int = 1) -> None:
        d = kv_pages.shape[4]
        self.kv_pages = kv_pages
        self.pool = np.zeros((max(num_slots, 1), 2, BLOCK_TOKENS, d), dtype=np.uint16)
        self.num_threads = num_threads
        self.copies = 0

    def copy_in(self, partition: int, plan: CachePlan) -> None:
        if plan.copy_slots.size:
            self.pool[plan.copy_slots] = self.kv_pages[plan.copy_pages, plan.copy_heads]
            self.copies += int(plan.copy_slots.size)

    def launch(self, partition: int, inputs: LayerInputs, gpu: BlockSelection, gpu_slot: np.ndarray) -> object:
        if gpu.sel_blocks.size == 0:
            return _EmulatedHandle(None)
        arena = self.kv_pages
        cached = np.flatnonzero(gpu_slot >= 0)
        if cached.size:
            # read cached entries from their slot: an arena copy with those runs replaced
            arena = self.kv_pages.copy()
            hkv = arena.shape[1]
            rows = np.repeat(np.arange(gpu.num_rows), gpu.blocks_per_row())[cached]
            pages = inputs.block_tables[rows // hkv, gpu.sel_blocks[cached]]
            arena[pages, rows % hkv] = self.pool[gpu_slot[cached]]
        part = sparse_partial_attention(inputs.q, arena, inputs.block_tables, inputs.seq_lens, gpu.sel_indptr,
                                        gpu.sel_blocks, inputs.scale, num_threads=self.num_threads)
        return _EmulatedHandle(part)

    def finish(self, handle: object, cpu: Future[BatchPartial] | None) -> MergedLayer:
        if not isinstance(handle, _EmulatedHandle):
            raise TypeError(f"EmulatedGpuPath.finish got a {type(handle).__name__}, not its own handle")
        parts = [p for p in (handle.partial, None if cpu is None else cpu.result()) if p is not None]
        return MergedLayer(merge_batch_partials(parts), None)
