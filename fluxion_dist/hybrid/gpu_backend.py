"""The GPU path of the hybrid operator on CuPy: the block-cache pool, its copies, the partial, the merge.

Streams: ``compute`` runs the attention kernel and the merge; ``copier`` runs the block
cache's copy-ins, overlapped with compute. Ordering, which is all the correctness there is:

- a copy-in may overwrite an evicted slot, which a kernel issued *earlier* may still
  read: the copier waits for an event recorded on ``compute`` when the copy is issued
  (every earlier kernel is before it; kernels of the same layer call never read an
  evicted slot, the bookkeeping guarantees it);
- a slot becomes readable in its partition's (layer's) next call: before that call's
  kernel, ``compute`` waits for the event recorded after the partition's copies. That
  is a step later, so the wait is normally already satisfied and costs nothing; one
  event per layer, so layer l+1 never waits for layer l's copies.

The copy is a gather through UVA straight from the host arena into the pool, moving 16
bytes per element (the arena and pool viewed as complex128, a plain 16-byte move), so
each warp reads whole 512-byte rows of the 8 KiB (block, head) runs.

Imports CuPy: import this module only where ``kernels.device.gpu_unavailable_reason()``
is None.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass

import cupy as cp
import numpy as np

from fluxion_dist.attention.layout import BLOCK_TOKENS
from fluxion_dist.cpu.attention import BatchPartial
from fluxion_dist.hybrid.block_cache import CachePlan
from fluxion_dist.hybrid.gpu_path import LayerInputs, MergedLayer
from fluxion_dist.kernels.attention import sparse_partial_attention
from fluxion_dist.kernels.merge import merge_attention
from fluxion_dist.kernels.uva import map_host_array
from fluxion_dist.sparse.selection import BlockSelection

_MOVE = cp.complex128  # a 16-byte element: one lane moves one uint4


@dataclass(frozen=True, slots=True)
class _Handle:
    o: cp.ndarray  # f32 [2, B, Hq, d]: slice 0 the GPU partial, slice 1 the CPU's
    m: cp.ndarray  # f32 [2, B, Hq]
    l: cp.ndarray
    start: cp.cuda.Event
    end: cp.cuda.Event


class CupyGpuPath:
    """Owns the device pool of ``num_slots`` (block, head) slots and the arena's UVA view."""

    def __init__(self, kv_pages: np.ndarray, num_slots: int, num_partitions: int) -> None:
        d = kv_pages.shape[4]
        if d % 8:
            raise ValueError(f"head_dim must be a multiple of 8 for 16-byte copies; got {d}")
        self.arena = map_host_array(kv_pages)  # page-locks it unless the store already did
        self._arena16 = self.arena.view(_MOVE)  # [P, Hkv, 2, 16, d/8]
        self.pool = cp.zeros((max(num_slots, 1), 2, BLOCK_TOKENS, d), cp.uint16)
        self._pool16 = self.pool.view(_MOVE)
        self.compute = cp.cuda.Stream(non_blocking=True)
        self.copier = cp.cuda.Stream(non_blocking=True)
        self._copied: list[cp.cuda.Event | None] = [None] * num_partitions
        self.copies = 0

    def copy_in(self, partition: int, plan: CachePlan) -> None:
        n = int(plan.copy_slots.size)
        if n == 0:
            return
        after = self.compute.record()
        with self.copier:
            self.copier.wait_event(after)
            pages = cp.asarray(plan.copy_pages, dtype=cp.int64)
            heads = cp.asarray(plan.copy_heads, dtype=cp.int64)
            dst = cp.asarray(plan.copy_slots, dtype=cp.int64)
            self._pool16[dst] = self._arena16[pages, heads]
            self._copied[partition] = self.copier.record()
        self.copies += n

    def launch(self, partition: int, inputs: LayerInputs, gpu: BlockSelection, gpu_slot: np.ndarray) -> object:
        b, hq, d = inputs.q.shape
        with self.compute:
            ready = self._copied[partition]
            if ready is not None:
                self.compute.wait_event(ready)
            o = cp.empty((2, b, hq, d), cp.float32)
            m = cp.empty((2, b, hq), cp.float32)
            l = cp.empty((2, b, hq), cp.float32)
            start = self.compute.record()
            if gpu.sel_blocks.size:
                sparse_partial_attention(
                    cp.asarray(inputs.q), self.arena, cp.asarray(inputs.block_tables),
                    cp.asarray(inputs.seq_lens), cp.asarray(gpu.sel_indptr), cp.asarray(gpu.sel_blocks),
                    scale=inputs.scale, max_row_blocks=int(gpu.blocks_per_row().max()),
                    sel_slot=cp.asarray(gpu_slot, dtype=cp.int32), cache_pool=self.pool,
                    out=(o[0], m[0], l[0]))
            else:
                o[0].fill(0.0)
                m[0].fill(-np.inf)
                l[0].fill(0.0)
            end = self.compute.record()
        return _Handle(o, m, l, start, end)

    def finish(self, handle: object, cpu: Future[BatchPartial] | None) -> MergedLayer:
        if not isinstance(handle, _Handle):
            raise TypeError(f"CupyGpuPath.finish got a {type(handle).__name__}, not its own handle")
        n = 1
        with self.compute:
            if cpu is not None:
                part = cpu.result()
                handle.o[1].set(part.o, stream=self.compute)
                handle.m[1].set(part.m, stream=self.compute)
                handle.l[1].set(part.l, stream=self.compute)
                n = 2
            out = merge_attention(handle.o[:n], handle.m[:n], handle.l[:n], out_dtype="float32")
            host = cp.asnumpy(out, stream=self.compute)
        self.compute.synchronize()
        busy = cp.cuda.get_elapsed_time(handle.start, handle.end) / 1e3
        return MergedLayer(host, busy)
