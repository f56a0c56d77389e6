"""GPU-resident layer pipeline of the hybrid operator: one layer of one decode step.

Life of a layer call (``prepare``, the caller names its q, new K/V and output tensors in
the state's io block, ``run_layer``):

0. stage: the graph reads q and the new K/V from the caller's tensors (``kernels.staging``);
1. append: the new token's K/V go into its arena page (pinned host memory, written through
   UVA, so the CPU path sees it) and its block's min/max into the device metadata mirror;
2. score: Quest upper bounds of every block for every KV head (``kernels.scoring``);
   on a predictor refresh, a top-p pass at the mass target and each row's far demand (its
   set's blocks outside the sinks and window, ``far_demand``);
3. select: sinks and the recent window forced in, top-k per (request, KV head) at the
   per-row count the host planned for the step (``step_plan.plan_step``, the pooled budget);
   with the rescoring stage (``LayerPlan.cand_rows``, fluxion's ``rescore_factor``) that
   top-k takes the planned candidates, ``kernels.rescore`` scores them exactly from the KV
   (cache slots, else the arena through UVA) and top-k at the planned count picks from those;
4. route (``kernels.block_table.classify_entries``): each selected block is a cache hit,
   a UVA read, or CPU work (an evenly spread share of the misses), with the CPU's CSR and
   the list of misses to admit into the cache;
5. the GPU partial over hits (pool) and UVA reads (in place); CPU entries are skipped;
6. the misses are admitted into the cache after the attention that may read the slots they
   evict (how many is read on the device); in a segment graph on a branch of its own, so the
   copies cross PCIe while the later layers compute;
7. the exact merge of the GPU partial with the CPU's, if any, written to the caller's output.

Two ways through it, chosen by the host's plan (``LayerPlan.cpu_fraction``):

- *GPU only* (no CPU share; the usual case once the cache holds a head's working set):
  steps 1-7 are one CUDA graph and the host never waits: it queues the layer and returns,
  staying ahead of the GPU. The counts (hits, misses, admissions, the far demand)
  land in pinned memory and are read once its GPU work is done (``counts``).
- *split*: steps 1-5 are queued, the host waits only for the routing's small CSR (the
  attention keeps running), runs the CPU partial (Cython, GIL released) over its share
  on the operator's persistent CPU team, on the calling thread, while the GPU attends the
  rest, then queues the merge.

A slot admitted in layer l's call serves from layer l's next call (one stream orders them).
Each layer owns a ring of ``cache_slots // num_layers`` slots, so layers never evict each other.

Imports CuPy: import only where ``kernels.device.gpu_unavailable_reason()`` is None.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import cupy as cp
import numpy as np

from fluxion_dist.attention.layout import BLOCK_TOKENS
from fluxion_dist.cpu.team import AttentionTeam
from fluxion_dist.cpu.attention import BatchPartial
from fluxion_dist.hybrid.far_demand import far_demand
from fluxion_dist.hybrid.layer_state import LayerState
from fluxion_dist.kernels.append import append_kv
from fluxion_dist.kernels.attention import sparse_partial_attention as gpu_partial
from fluxion_dist.kernels.host_node import launch_host_func
from fluxion_dist.kernels.block_table import admit_blocks, classify_entries, force_blocks
from fluxion_dist.kernels.merge import merge_attention
from fluxion_dist.kernels.rescore import candidate_lse, candidate_scores
from fluxion_dist.kernels.scoring import quest_scores
from fluxion_dist.kernels.selection import select_buffers, select_topk, select_topp
from fluxion_dist.kernels.staging import stage_inputs, stage_output
from fluxion_dist.kernels.uva import map_host_array
from fluxion_dist.policy.routing import NEVER_SEEN


if TYPE_CHECKING:
    from fluxion_dist.cpu._team import HostJob

_MAX_SHAPES = 8  # per layer: batch shapes x budget buckets


@dataclass(frozen=True, slots=True)
class LayerPlan:
    """The host's decisions for one layer call."""

    k_rows: np.ndarray  # int32 [B, Hkv] blocks per row, sinks and window included
    max_row_blocks: int  # bound on k_rows (sizes the lists and the split-K grid; few distinct values)
    cpu_fraction: float  # share of the cache misses the CPU computes
    use_cache: bool
    measure_demand: bool  # run the predictor's top-p pass
    cand_rows: np.ndarray | None = None  # int32 [B, Hkv] the rescoring stage's candidates; None: off
    max_cand_blocks: int = 0  # bound on cand_rows (sizes its buffers and grid), 0 when off
    step: int = 0  # the operator's step count (admission by reuse compares it with the last selection's)


@dataclass(slots=True)
class LayerOutcome:
    """What one layer call queued. ``out`` is ready on ``compute`` after ``end``; the counts
    are read by ``DevicePipeline.counts`` once the GPU has run the layer."""

    out: cp.ndarray  # float32 [B, Hq, d], the state's buffer: valid until this layer's next call
    spans: tuple[tuple[cp.cuda.Event, cp.cuda.Event], ...]  # GPU work, start and end of each piece
    state: "LayerState"
    plan: LayerPlan
    counts: "LayerCounts | None" = None  # read once
    cpu_s: float = 0.0  # host time of the CPU partial (the team's attend), 0 without one
    host_job: "HostJob | None" = None  # a segment graph's host node: its CPU partial, read once done
    in_segment_graph: bool = False  # replayed in a segment graph: its span is the segment's, not the layer's

    @property
    def end(self) -> cp.cuda.Event:
        return self.spans[-1][1]


@dataclass(frozen=True, slots=True)
class LayerCounts:
    hits: int
    uva: int
    cpu: int
    admitted: int
    evicted: int
    demand: np.ndarray | None  # int64 [B, Hkv] far demand: top-p blocks outside the kept ones (a refresh)
    cpu_s: float = 0.0  # measured host time of the CPU partial


class DevicePipeline:
    """Device state of the operator: UVA arena view, metadata mirror, block cache, streams."""

    def __init__(self, kv_pages: np.ndarray, kmin: np.ndarray, kmax: np.ndarray, *, num_layers: int,
                 cache_slots: int, cpu_team: AttentionTeam, mass_target: float, sink_blocks: int,
                 recent_blocks: int, use_graphs: bool = True, reuse_window: int = 0) -> None:
        pages, hkv, _, _, d = kv_pages.shape
        if pages * hkv >= 2**31:
            raise ValueError(f"{pages} pages x {hkv} heads overflow the table's int32 keys")
        self.kv_host = kv_pages
        self.kv_dev = map_host_array(kv_pages)  # page-locks it unless the store already did
        self.kmin, self.kmax = cp.asarray(kmin), cp.asarray(kmax)
        # the operator's, shared with its CPU path: run_layer is its only caller here, on the
        # model's thread, so one caller at a time holds
        self.num_layers, self.cpu_team = num_layers, cpu_team
        self.mass_target, self.sink_blocks, self.recent_blocks = mass_target, sink_blocks, recent_blocks
        self.slots_per_layer = cache_slots // num_layers
        total = max(self.slots_per_layer * num_layers, 1)
        self.pool = cp.empty((total, 2, BLOCK_TOKENS, d), cp.uint16)
        self.slot_of = cp.full(pages * hkv, -1, cp.int32)
        self.owner = cp.full(total + 1, -1, cp.int32)  # [total]: where invalidations of uncached keys land
        self.ring = cp.zeros((num_layers, 1), cp.int32)  # next slot of each layer's ring (device side)
        # admission by reuse (reuse_window > 0): the step each (page, head) was last selected
        # (pages are per layer, so one table serves every layer)
        self.reuse_window = reuse_window
        self.last_seen = (cp.full(pages * hkv, NEVER_SEEN, cp.int32) if reuse_window > 0 and self.slots_per_layer
                          else None)
        self.filled = [0] * num_layers  # slots in use per layer, for the eviction counts (host side)
        self.compute = cp.cuda.Stream(non_blocking=True)
        self.side = cp.cuda.Stream(non_blocking=True)  # a segment graph's CPU branches fork onto it
        self.admit_side = cp.cuda.Stream(non_blocking=True)  # and its cache admissions onto this one
        self._admits_done = cp.cuda.Event(disable_timing=True)
        self.admits_open = False  # admissions forked in the segment being captured, not joined yet
        self.lengths: dict[int, np.ndarray] = {}  # batch size -> the host jobs' lengths, rewritten per step
        self._states: list[dict[tuple, LayerState]] = [{} for _ in range(num_layers)]
        self.use_graphs = use_graphs
        self.states_built = 0  # layer states (buffers, then graphs) built: each costs milliseconds

    def load_metadata(self, pages: np.ndarray, kmin: np.ndarray, kmax: np.ndarray) -> None:
        """Mirror a new request's block metadata (from the KV store) onto the device."""
        if pages.size:
            # on ``compute``: a non-blocking stream is not ordered after CuPy's default one,
            # so the layers queued next could otherwise score stale metadata
            with self.compute:
                idx = cp.asarray(pages, dtype=cp.int64)
                self.kmin[idx] = cp.asarray(kmin)
                self.kmax[idx] = cp.asarray(kmax)

    def invalidate(self, pages: np.ndarray) -> None:
        """Forget whatever the cache holds of ``pages`` (recycled or released)."""
        if pages.size == 0:
            return
        hkv = self.kv_host.shape[1]
        with self.compute:
            keys = (cp.asarray(pages, dtype=cp.int64)[:, None] * hkv + cp.arange(hkv)).ravel()
            slots = self.slot_of[keys]
            self.owner[cp.where(slots >= 0, slots, self.owner.size - 1)] = -1
            self.owner[-1] = -1
            self.slot_of[keys] = -1

    def prepare(self, layer: int, plan: LayerPlan, bsz: int, hq: int, width: int) -> "LayerState":
        """The layer's state for this call, free to write: the caller names its q, new K/V
        and output tensors in ``io_h`` (``kernels.staging.io_words``; the layer's graph reads
        and writes them), then calls ``run_layer``."""
        # A layer alternates between a few shapes (budget buckets): each keeps its buffers and
        # graphs (with and without the predictor's pass), so a switch back costs nothing.
        key = (bsz, hq, width, plan.max_row_blocks, plan.use_cache, plan.max_cand_blocks)
        states = self._states[layer]
        st = states.get(key)
        if st is None:
            if len(states) >= _MAX_SHAPES:
                states.pop(next(iter(states)))
            st = states[key] = LayerState(key, self.kv_host.shape[1], self.kv_host.shape[4])
            self.states_built += 1
        if st.last_end is not None:
            # its previous call may still read the pinned parameters (from the previous step:
            # normally long done)
            st.last_end.synchronize()
        return st

    def run_layer(self, layer: int, plan: LayerPlan, st: "LayerState", tables: cp.ndarray, tables_host: np.ndarray,
                  pos_host: np.ndarray, after: int | None = None) -> LayerOutcome:
        """One layer (see the module doc) over the inputs in ``st``. tables int32 [B, W] (device,
        stable for the layer: its address is captured) and its host twin; pos_host int32 [B], the
        tokens before this one, one array per step (the CPU team binds the step's lengths at its
        first split layer, tagged with it); ``after``: a stream (handle) whose work so far the
        layer waits for (the caller's, which wrote the inputs), or None."""
        use_cache = self._caches(plan)
        measure = plan.measure_demand
        st.set_params(pos_host, plan)
        s, ev = self.compute, st.events
        cpu_s = 0.0
        if after is None:
            s.record(ev[0])
        else:  # the start event doubles as the dependency on the caller: one call fewer per layer
            cp.cuda.runtime.eventRecord(ev[0].ptr, after)
            cp.cuda.runtime.streamWaitEvent(s.ptr, ev[0].ptr, 0)
        if plan.cpu_fraction <= 0:
            self._replay(st, ("layer", measure), lambda: self._layer(st, layer, tables, use_cache, measure, s))
            s.record(ev[1])
            spans = ((ev[0], ev[1]),)
        else:
            self._replay(st, ("select", measure),
                         lambda: self._select(st, tables, use_cache, measure, for_cpu=True, s=s))
            s.record(ev[2])
            self._replay(st, ("attend",), lambda: self._attend(st, layer, tables, use_cache))
            s.record(ev[3])
            ev[2].synchronize()  # the routing's CSR is on the host; the attention runs on
            n_cpu = int(st.counts_h[2])
            if n_cpu:
                team = self.cpu_team
                if team.owner is not pos_host:
                    team.bind(self.kv_host, pos_host + 1, st.q_h.shape[1], st.scale, owner=pos_host)
                t_cpu = time.perf_counter()
                part = team.attend(st.q_h, tables_host, st.cpu_indptr_h, st.cpu_blocks_h[:n_cpu])
                cpu_s = time.perf_counter() - t_cpu
                st.set_cpu_partial(part.o, part.m, part.l)
            else:
                st.set_cpu_partial(None, None, None)
            s.record(ev[4])
            self._replay(st, ("merge",), lambda: (self._cpu_partial_in(st, s), self._merge(st)))
            s.record(ev[1])
            spans = ((ev[0], ev[3]), (ev[4], ev[1]))
        st.last_end = ev[1]
        return LayerOutcome(st.out, spans, st, plan, cpu_s=cpu_s)

    def capture_layer(self, layer: int, plan: LayerPlan, st: "LayerState", tables: cp.ndarray,
                      tables_host: np.ndarray, stream: cp.cuda.Stream, cpu_branch: bool) -> "HostJob | None":
        """Queue the layer's body on ``stream`` while a CUDA graph captures it (the model runner's
        segment graph): the work of ``run_layer`` with no event, wait or host call, over the
        parameters the host writes into ``st`` before each replay (``st.set_params``, the io
        words, ``self.lengths``). With ``cpu_branch`` the routing forks a branch onto ``side``:
        a host node runs the CPU partial over its share (none when the plan's fraction is 0)
        and the copies of its partial follow, joined before the merge, while the GPU attends
        its own share. The cache admission forks onto ``admit_side``, joined at the segment's
        end (``join_side_work``). Returns the CPU branch's host job."""
        use_cache, measure = self._caches(plan), plan.measure_demand
        with stream:
            if not cpu_branch:
                self._layer(st, layer, tables, use_cache, measure, stream, admit_aside=True)
                return None
            job = self._host_job(st, tables_host)
            self._select(st, tables, use_cache, measure, for_cpu=True, s=stream)
            fork, join, _ = st.branch_events
            stream.record(fork)
            self.side.wait_event(fork)
            launch_host_func(self.side.ptr, job.function, job.address)
            self._cpu_partial_in(st, self.side)
            self.side.record(join)
            self._attend(st, layer, tables, use_cache, admit_aside=True)
            stream.wait_event(join)
            self._merge(st)
        return job

    def _host_job(self, st: "LayerState", tables_host: np.ndarray) -> "HostJob":
        """The state's host job over these tables (made again when the table array is new; a
        graph captured with the old one holds it)."""
        bsz = st.key[0]
        lengths = self.lengths.get(bsz)
        if lengths is None:
            lengths = self.lengths[bsz] = np.zeros(bsz, np.int32)
        where = (tables_host.ctypes.data, tables_host.shape)
        if st.host_job is None or st.host_job_tables != where:
            st.host_job = self.cpu_team.host_job(self.kv_host, lengths, tables_host, st.q_h, st.cpu_indptr_h,
                                                 st.cpu_blocks_h, st.counts_h, BatchPartial(st.o_h, st.m_h, st.l_h),
                                                 st.scale)
            st.host_job_tables = where
        return st.host_job

    def counts(self, layer: int, outcome: LayerOutcome) -> LayerCounts:
        """The counts of a layer call (waits for its GPU work); read before the layer's next
        call (its pinned buffers and events are reused then)."""
        if outcome.counts is not None:
            return outcome.counts
        outcome.end.synchronize()
        st, plan = outcome.state, outcome.plan
        st.last_end = None  # its latest call (the contract: counts are read before the next one) is done
        hits, uva, n_cpu, n_admit = st.counts_h.tolist()
        cpu_s = outcome.cpu_s
        if outcome.host_job is not None:
            err = outcome.host_job.take_error()
            if err is not None:
                raise err
            cpu_s = outcome.host_job.last_seconds
        admitted = evicted = 0
        if self._caches(plan):
            admitted = min(n_admit, self.slots_per_layer)
            evicted = max(0, self.filled[layer] + admitted - self.slots_per_layer)
            self.filled[layer] = min(self.slots_per_layer, self.filled[layer] + admitted)
        demand = None
        if plan.measure_demand:
            demand = st.demand_h.astype(np.int64).reshape(plan.k_rows.shape)
        outcome.counts = LayerCounts(hits, uva, n_cpu, admitted, evicted, demand, cpu_s)
        return outcome.counts

    def _caches(self, plan: LayerPlan) -> bool:
        """Whether the layer call admits its misses into the block cache."""
        return plan.use_cache and self.slots_per_layer > 0

    @staticmethod
    def gpu_busy_s(outcome: LayerOutcome) -> float | None:
        """The layer call's GPU work (its spans' CUDA events); read before the layer's next call.
        None in a segment graph (its layers are not timed apart)."""
        if outcome.in_segment_graph:
            return None
        outcome.end.synchronize()
        return sum(cp.cuda.get_elapsed_time(a, b) for a, b in outcome.spans) / 1e3

    def _replay(self, st: "LayerState", name: tuple, body) -> None:
        """Run ``body`` on ``compute``: eagerly the first time (kernels compile, counters
        allocate), then captured once as a CUDA graph and replayed (one launch, not ~10)."""
        graph = st.graphs.get(name)
        if graph is None:
            with self.compute:
                if not self.use_graphs or name not in st.warm:
                    body()
                    st.warm.add(name)
                    return
                self.compute.begin_capture()
                try:
                    body()
                finally:
                    graph = self.compute.end_capture()
                st.graphs[name] = graph
        graph.launch(self.compute)

    def _select(self, st: "LayerState", tables: cp.ndarray, use_cache: bool, measure: bool, for_cpu: bool,
                s: cp.cuda.Stream) -> None:
        copy_bytes(st.block.data.ptr, st.block_h.ctypes.data, st.block.nbytes, s.ptr)
        stage_inputs(st.io, st.q, st.k_new, st.v_new)
        append_kv(st.k_new, st.v_new, st.seq, tables, self.kmin, self.kmax, slots=st.no_slots, cache_pool=None,
                  kv_pages=self.kv_dev)
        quest_scores(st.q, self.kmin, self.kmax, tables, st.seq, scale=st.scale, query_scores=False,
                     out=(None, st.kv_scores))
        if measure:
            if st.topp is None:  # allocated on the first refresh (eagerly run, before any capture)
                st.topp = select_buffers(st.hkv * st.key[0], st.key[2])
            top = select_topp(st.kv_scores, st.seq, self.mass_target, buffers=st.topp)
            far_demand(top.indptr, top.blocks, st.seq, heads=st.hkv, sink_blocks=self.sink_blocks,
                       recent_blocks=self.recent_blocks, out=st.far)
            copy_bytes(st.demand_h.ctypes.data, st.far.data.ptr, st.demand_h.nbytes, s.ptr)
        force_blocks(st.kv_scores, st.seq, sink_blocks=self.sink_blocks, recent_blocks=self.recent_blocks)
        ranked = st.kv_scores
        if st.cand is not None:  # the rescoring stage: candidates by bound, ranked by exact mass
            cand = select_topk(st.kv_scores, st.seq, st.cand_rows, max_k=st.cand_bound, buffers=st.cand)
            candidate_lse(st.q, self.kv_dev, tables, st.seq, cand.indptr, cand.blocks, scale=st.scale,
                          max_row_blocks=st.cand_bound, slot_of=self.slot_of if use_cache else None,
                          cache_pool=self.pool if use_cache else None, out=st.cand_lse)
            ranked = candidate_scores(st.cand_lse, cand.indptr, cand.blocks, st.seq, st.exact,
                                      sink_blocks=self.sink_blocks, recent_blocks=self.recent_blocks,
                                      head_dim=st.q.shape[2])
        sel = select_topk(ranked, st.seq, st.k_rows, max_k=st.bound, buffers=st.sel)
        reuse = use_cache and self.last_seen is not None
        classify_entries(sel.indptr, sel.blocks, tables, st.seq, heads=st.hkv, slot_of=self.slot_of if use_cache else None,
                         cpu_fraction=st.frac, out=(st.sel_slot, st.cpu_indptr, st.cpu_blocks, st.admit_keys, st.counts),
                         last_seen=self.last_seen if reuse else None, stamp=st.stamp if reuse else None,
                         window=max(self.reuse_window, 1))
        to_host = [(st.counts, st.counts_h)]
        if for_cpu:  # what the CPU partial reads
            to_host += [(st.cpu_indptr, st.cpu_indptr_h), (st.cpu_blocks, st.cpu_blocks_h), (st.q, st.q_h)]
        for src, dst in to_host:
            copy_bytes(dst.ctypes.data, src.data.ptr, dst.nbytes, s.ptr)

    def _attend(self, st: "LayerState", layer: int, tables: cp.ndarray, use_cache: bool,
                admit_aside: bool = False) -> None:
        gpu_partial(st.q, self.kv_dev, tables, st.seq, st.sel.indptr, st.sel.blocks, scale=st.scale,
                    max_row_blocks=st.bound, sel_slot=st.sel_slot, cache_pool=self.pool,
                    out=(st.o[0], st.m[0], st.l[0]), parts=st.parts)
        if not use_cache:
            return
        # after the attention, which may read the slots this evicts
        admit = lambda: admit_blocks(st.admit_keys, st.counts, self.ring[layer],  # noqa: E731
                                     slot_base=layer * self.slots_per_layer, slot_count=self.slots_per_layer,
                                     slot_of=self.slot_of, owner=self.owner, kv_pages=self.kv_dev, pool=self.pool)
        if not admit_aside:
            admit()
            return
        # In a segment graph the copy-in (PCIe) runs beside the later layers (HBM): only this
        # layer's next call reads its slots, and the segment joins the branch before it ends.
        # Other layers' calls touch other keys, slots and ring entries.
        cp.cuda.get_current_stream().record(st.branch_events[2])
        self.admit_side.wait_event(st.branch_events[2])
        with self.admit_side:
            admit()
        self.admits_open = True

    def join_side_work(self, stream: cp.cuda.Stream) -> None:
        """End a segment's capture: ``stream`` waits for the admissions forked aside."""
        if self.admits_open:
            self.admit_side.record(self._admits_done)
            stream.wait_event(self._admits_done)
            self.admits_open = False

    @staticmethod
    def _cpu_partial_in(st: "LayerState", s: cp.cuda.Stream) -> None:
        for dst, src in ((st.o[1], st.o_h), (st.m[1], st.m_h), (st.l[1], st.l_h)):
            copy_bytes(dst.data.ptr, src.ctypes.data, dst.nbytes, s.ptr)

    @staticmethod
    def _merge(st: "LayerState") -> None:
        merge_attention(st.o, st.m, st.l, out_dtype="float32", out=st.out)
        stage_output(st.io, st.out)

    def _layer(self, st: "LayerState", layer: int, tables: cp.ndarray, use_cache: bool, measure: bool,
               s: cp.cuda.Stream, admit_aside: bool = False) -> None:
        """The GPU-only layer: nothing for the CPU, so the merge normalises the GPU partial alone."""
        self._select(st, tables, use_cache, measure, for_cpu=False, s=s)
        self._attend(st, layer, tables, use_cache, admit_aside)
        merge_attention(st.o[:1], st.m[:1], st.l[:1], out_dtype="float32", out=st.out)
        stage_output(st.io, st.out)


def copy_bytes(dst: int, src: int, nbytes: int, stream: int) -> None:
    """Queue a copy of ``nbytes`` between two addresses on the stream with handle ``stream``."""
    # cudaMemcpyDefault: the direction follows from the (unified) addresses; pinned host
    # memory keeps it asynchronous, and capturable
    cp.cuda.runtime.memcpyAsync(dst, src, nbytes, 4, stream)
