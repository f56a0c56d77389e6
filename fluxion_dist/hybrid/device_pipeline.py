"""GPU-resident layer pipeline of the hybrid operator: one layer of one decode step.

Life of a layer call (``DevicePipeline.run_layer``), everything up to the attention
queued on the ``compute`` stream without a host round trip:

1. append: the new token's K/V go into its arena page (pinned host memory, written through
   UVA, so the CPU path sees it) and its block's min/max into the device metadata mirror;
2. score: Quest upper bounds of every block for every KV head (``kernels.scoring``);
   on a predictor refresh, a top-p pass at the mass target measures each head's demand;
3. select: sinks and the recent window forced in, top-k per (request, KV head) at the
   per-row budget the host set (``device_budget.row_budgets``);
4. route (``kernels.block_table.classify_entries``): each selected block is a cache hit,
   a UVA read, or CPU work (an evenly spread share of the misses), with the CPU's CSR and
   the list of misses to admit into the cache;
5. the GPU partial (hits from the pool, UVA reads in place, CPU entries skipped) is
   queued; the small CSR and counts come back to pinned host memory meanwhile;
6. the host waits for those copies only (the attention keeps running), queues the cache
   admission on the ``copier`` stream (it waits for this layer's attention, which may
   read slots it evicts), runs the CPU partial (Cython, GIL released) over its share,
   then the exact merge on ``compute``.

A slot admitted in layer l's call serves from layer l's next call: the compute stream
waits for that layer's admission event before its routing reads the table. Each layer
owns a ring of ``cache_slots // num_layers`` slots, so layers never evict each other.

Imports CuPy: import only where ``kernels.device.gpu_unavailable_reason()`` is None.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import cupy as cp
import cupyx
import numpy as np

from fluxion_dist.attention.layout import BLOCK_TOKENS
from fluxion_dist.cpu.attention import sparse_partial_attention as cpu_partial
from fluxion_dist.kernels.append import append_kv
from fluxion_dist.kernels.attention import sparse_partial_attention as gpu_partial
from fluxion_dist.kernels.block_table import admit_blocks, classify_entries, force_blocks
from fluxion_dist.kernels.merge import merge_attention
from fluxion_dist.kernels.scoring import quest_scores
from fluxion_dist.kernels.selection import select_topk, select_topp
from fluxion_dist.kernels.uva import map_host_array


@dataclass(frozen=True, slots=True)
class LayerPlan:
    """The host's decisions for one layer call."""

    k_rows: cp.ndarray | None  # int32 [B, Hkv] blocks per row (device); None: every block (full)
    max_row_blocks: int  # bound on k_rows (sizes the lists and the split-K grid)
    cpu_fraction: float  # share of the cache misses the CPU computes
    use_cache: bool
    measure_demand: bool  # run the predictor's top-p pass


@dataclass(slots=True)
class LayerOutcome:
    out: cp.ndarray  # float32 [B, Hq, d], ready on ``compute`` after ``spans[-1][1]``
    hits: int
    uva: int
    cpu: int
    admitted: int
    evicted: int
    demand: np.ndarray | None  # int64 [B, Hkv] blocks to reach the mass target (a refresh)
    cpu_s: float  # measured wall time of the CPU partial
    spans: tuple[tuple[cp.cuda.Event, cp.cuda.Event], ...]  # GPU work: (selection..attention), (merge)

    def gpu_busy_s(self) -> float:
        """Sum of the spans (synchronises on their events)."""
        for _, end in self.spans:
            end.synchronize()
        return sum(cp.cuda.get_elapsed_time(a, b) for a, b in self.spans) / 1e3


class DevicePipeline:
    """Device state of the operator: UVA arena view, metadata mirror, block cache, streams."""

    def __init__(self, kv_pages: np.ndarray, kmin: np.ndarray, kmax: np.ndarray, *, num_layers: int,
                 cache_slots: int, cpu_threads: int, mass_target: float, sink_blocks: int,
                 recent_blocks: int) -> None:
        pages, hkv, _, _, d = kv_pages.shape
        if pages * hkv >= 2**31:
            raise ValueError(f"{pages} pages x {hkv} heads overflow the table's int32 keys")
        self.kv_host = kv_pages
        self.kv_dev = map_host_array(kv_pages)  # page-locks it unless the store already did
        self.kmin, self.kmax = cp.asarray(kmin), cp.asarray(kmax)
        self.num_layers, self.cpu_threads = num_layers, cpu_threads
        self.mass_target, self.sink_blocks, self.recent_blocks = mass_target, sink_blocks, recent_blocks
        self.slots_per_layer = cache_slots // num_layers
        total = max(self.slots_per_layer * num_layers, 1)
        self.pool = cp.empty((total, 2, BLOCK_TOKENS, d), cp.uint16)
        self.slot_of = cp.full(pages * hkv, -1, cp.int32)
        self.owner = cp.full(total + 1, -1, cp.int32)  # [total]: where invalidations of uncached keys land
        self.ring = [0] * num_layers
        self.filled = [0] * num_layers
        self.compute = cp.cuda.Stream(non_blocking=True)
        self.copier = cp.cuda.Stream(non_blocking=True)
        self._admitted: list[cp.cuda.Event | None] = [None] * num_layers
        self._staging: dict[str, np.ndarray] = {}
        self._no_slots: dict[tuple[int, int], cp.ndarray] = {}

    def load_metadata(self, pages: np.ndarray, kmin: np.ndarray, kmax: np.ndarray) -> None:
        """Mirror a new request's block metadata (from the KV store) onto the device."""
        if pages.size:
            idx = cp.asarray(pages, dtype=cp.int64)
            self.kmin[idx] = cp.asarray(kmin)
            self.kmax[idx] = cp.asarray(kmax)

    def invalidate(self, pages: np.ndarray) -> None:
        """Forget whatever the cache holds of ``pages`` (recycled or released)."""
        if pages.size == 0:
            return
        hkv = self.kv_host.shape[1]
        with self.compute:
            for ev in self._admitted:
                if ev is not None:
                    self.compute.wait_event(ev)
            keys = (cp.asarray(pages, dtype=cp.int64)[:, None] * hkv + cp.arange(hkv)).ravel()
            slots = self.slot_of[keys]
            self.owner[cp.where(slots >= 0, slots, self.owner.size - 1)] = -1
            self.owner[-1] = -1
            self.slot_of[keys] = -1

    def _stage(self, name: str, src: cp.ndarray) -> np.ndarray:
        """Queue a copy of ``src`` into a pinned host buffer (reused across calls)."""
        buf = self._staging.get(name)
        if buf is None or buf.size < src.size:
            buf = cupyx.empty_pinned((max(src.size, 2 * (0 if buf is None else buf.size)),), src.dtype)
            self._staging[name] = buf
        view = buf[:src.size].reshape(src.shape)
        src.get(stream=self.compute, out=view)
        return view

    def run_layer(self, layer: int, plan: LayerPlan, q: cp.ndarray, q_host: np.ndarray | None,
                  k_new: cp.ndarray, v_new: cp.ndarray, tables: cp.ndarray, tables_host: np.ndarray,
                  pos: cp.ndarray, seq_host: np.ndarray) -> LayerOutcome:
        """One layer (see the module doc). q float32 [B, Hq, d] on the device (``q_host`` its host
        copy, or None to fetch it when the CPU needs it); k_new, v_new bf16 bits [B, Hkv, d];
        tables int32 [B, W] and its host twin; pos int32 [B], tokens before this one;
        seq_host = pos + 1 on the host."""
        bsz, hq, d = q.shape
        hkv = self.kv_host.shape[1]
        rows = bsz * hkv
        scale = 1.0 / math.sqrt(d)
        use_cache = plan.use_cache and self.slots_per_layer > 0
        s = self.compute
        with s:
            if self._admitted[layer] is not None:
                s.wait_event(self._admitted[layer])
            start = s.record()
            seq = pos.copy()
            append_kv(k_new, v_new, seq, tables, self.kmin, self.kmax, slots=self._none_cached(bsz, hkv),
                      cache_pool=None, kv_pages=self.kv_dev)
            _, kv_scores = quest_scores(q, self.kmin, self.kmax, tables, seq, scale=scale, query_scores=False)
            demand_sel = select_topp(kv_scores, seq, self.mass_target) if plan.measure_demand else None
            if plan.k_rows is None:
                sel = select_topk(kv_scores, seq, tables.shape[1])
            else:
                force_blocks(kv_scores, seq, sink_blocks=self.sink_blocks, recent_blocks=self.recent_blocks)
                sel = select_topk(kv_scores, seq, plan.k_rows, max_k=plan.max_row_blocks)
            cap = sel.blocks.shape[0]
            sel_slot, cpu_blocks = cp.empty(cap, cp.int32), cp.empty(cap, cp.int32)
            cpu_indptr, counts = cp.empty(rows + 1, cp.int32), cp.empty(4, cp.int32)
            admit_keys = cp.empty(cap, cp.int32) if use_cache else None
            classify_entries(sel.indptr, sel.blocks, tables, seq, heads=hkv, slot_of=self.slot_of if use_cache else None,
                             cpu_fraction=plan.cpu_fraction, out=(sel_slot, cpu_indptr, cpu_blocks, admit_keys, counts))
            counts_h = self._stage("counts", counts)
            if plan.cpu_fraction > 0:
                cpu_indptr_h = self._stage("cpu_indptr", cpu_indptr)
                cpu_blocks_h = self._stage("cpu_blocks", cpu_blocks)
                if q_host is None:
                    q_host = self._stage("q", q)
            demand_h = self._stage("demand", demand_sel.indptr) if demand_sel is not None else None
            ready = s.record()
            o = cp.empty((2, bsz, hq, d), cp.float32)
            m = cp.empty((2, bsz, hq), cp.float32)
            l = cp.empty((2, bsz, hq), cp.float32)
            gpu_partial(q, self.kv_dev, tables, seq, sel.indptr, sel.blocks, scale=scale,
                        max_row_blocks=sel.max_row_blocks, sel_slot=sel_slot, cache_pool=self.pool,
                        out=(o[0], m[0], l[0]))
            attended = s.record()
        ready.synchronize()
        hits, uva, n_cpu, n_admit = (int(x) for x in counts_h)
        demand = np.diff(demand_h.astype(np.int64)).reshape(bsz, hkv) if demand_h is not None else None

        admitted = evicted = 0
        if use_cache and n_admit:
            admitted = min(n_admit, self.slots_per_layer)
            with self.copier:
                self.copier.wait_event(attended)
                admit_blocks(admit_keys, admitted, slot_base=layer * self.slots_per_layer,
                             slot_count=self.slots_per_layer, ring=self.ring[layer], slot_of=self.slot_of,
                             owner=self.owner, kv_pages=self.kv_dev, pool=self.pool)
                self._admitted[layer] = self.copier.record()
            evicted = max(0, self.filled[layer] + admitted - self.slots_per_layer)
            self.filled[layer] = min(self.slots_per_layer, self.filled[layer] + admitted)
            self.ring[layer] = (self.ring[layer] + admitted) % self.slots_per_layer

        cpu_s, part = 0.0, None
        if n_cpu:
            t0 = time.perf_counter()
            part = cpu_partial(q_host, self.kv_host, tables_host, seq_host, cpu_indptr_h, cpu_blocks_h[:n_cpu],
                               scale, num_threads=self.cpu_threads)
            cpu_s = time.perf_counter() - t0
        with s:
            merge_start = s.record()
            n = 1
            if part is not None:
                o[1].set(part.o, stream=s)
                m[1].set(part.m, stream=s)
                l[1].set(part.l, stream=s)
                n = 2
            out = merge_attention(o[:n], m[:n], l[:n], out_dtype="float32")
            end = s.record()
        return LayerOutcome(out, hits, uva, n_cpu, admitted, evicted, demand, cpu_s,
                            ((start, attended), (merge_start, end)))

    def _none_cached(self, bsz: int, hkv: int) -> cp.ndarray:
        # The new token's block is partial, and a partial block is never cached.
        arr = self._no_slots.get((bsz, hkv))
        if arr is None:
            arr = self._no_slots[(bsz, hkv)] = cp.full((bsz, hkv), -1, cp.int32)
        return arr
