"""The operator's decode step on a GPU: the ``attend`` hook over :class:`DevicePipeline`.

Per step (``DeviceStepHook.__init__``): the batch's block tables go to the device (rebuilt
only when a sequence gains pages); the positions and blocks per request are read once.
At the step's first layer call the host takes in the demand of every layer whose last
measuring call is done on the GPU (without waiting for any), and plans every layer's rows at
once from the demand known then (``step_plan.plan_step``: the pooled budget, as on the CPU).

Per layer (``__call__``), while the GPU still runs earlier layers: the host takes in the
counts of the layer's previous call (hits, misses, the far demand; long done on the GPU),
and decides

- whether the layer measures demand this step (``step_plan.measures``: every
  ``refresh_steps`` steps, staggered over the layers, and on a request's first step);
- the rescoring stage's candidates per row, if on (``step_plan.rescore_factor``);
- the CPU share of the misses: balanced from the cost model, the layer's last hit/miss
  counts and the host's own time per layer (fluxion, full: a split makes the host wait
  mid-layer), fixed (fixed_hybrid), 0 (quest_gpu) or 1 (cpu_only).

then the addresses of q, the new K/V and a fresh output tensor go into the layer's pinned
parameters, one ``DevicePipeline.run_layer`` is queued after the caller's stream, whose
later work waits for it; the layer's graph itself reads the inputs and writes the output
(a CUDA tensor in, a CUDA tensor out, without a host wait unless the layer has a
CPU share; a CPU tensor in, a CPU tensor out).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Sequence

import cupy as cp
import numpy as np
import torch

from fluxion_dist.attention.layout import num_blocks
from fluxion_dist.hybrid import step_graph
from fluxion_dist.hybrid.cost_model import CostModel, observe_cpu
from fluxion_dist.hybrid.device_pipeline import DevicePipeline, LayerOutcome, LayerPlan, copy_bytes
from fluxion_dist.hybrid.operator import HybridAttentionError  # operator imports this module lazily
from fluxion_dist.hybrid.step_plan import (blocks_after_append, demand_of, measures, plan_step, request_budgets,
                                           rescore_factor)
from fluxion_dist.hybrid.step_report import LayerReport, StepReport
from fluxion_dist.kernels.staging import io_words
from fluxion_dist.policy.select import candidate_rows
from fluxion_dist.policy.routing import balanced_cpu_fraction

_STAGED = {torch.float32: "float32", torch.bfloat16: "bfloat16"}  # dtypes the graph reads and writes itself

if TYPE_CHECKING:
    from fluxion_dist.hybrid.operator import HybridAttention, PagedSequenceView


class DeviceTables:
    """Host and device block tables [L, B, W] of a batch, refreshed when a sequence gains pages.

    W is rounded up to whole ``WIDTH_STEP`` blocks and the device array is rewritten in place
    while its shape holds: the layers' CUDA graphs captured its address."""

    WIDTH_STEP = 256

    def __init__(self) -> None:
        self._key: tuple = ()
        self.host: np.ndarray | None = None
        self.dev: cp.ndarray | None = None
        self.dev_layers: list[cp.ndarray] = []  # views of ``dev``, one per layer
        self.generation = 0  # bumped when the arrays are made anew (graphs captured their addresses)

    def get(self, batch: Sequence["PagedSequenceView"], request_ids: Sequence[str],
            stream: cp.cuda.Stream) -> tuple[np.ndarray, list[cp.ndarray]]:
        key = tuple((rid, len(s.block_tables[0])) for rid, s in zip(request_ids, batch))
        if key != self._key or self.host is None:
            layers = len(batch[0].block_tables)
            width = -(-max(n for _, n in key) // self.WIDTH_STEP) * self.WIDTH_STEP
            shape = (layers, len(batch), width)
            if self.host is None or self.host.shape != shape:
                self.host = np.zeros(shape, np.int32)
                self.generation += 1
            host = self.host
            host.fill(0)
            for b, s in enumerate(batch):
                for layer, row in enumerate(s.block_tables):
                    host[layer, b, :len(row)] = row
            with stream:
                if self.dev is None or self.dev.shape != host.shape:
                    self.dev = cp.asarray(host)
                    self.dev_layers = list(self.dev)
                else:
                    self.dev.set(host, stream=stream)
            self._key = key
        return self.host, self.dev_layers


class DevicePathState:
    """What the GPU path learns across steps: the far demand per (request, layer), each layer's
    last counts, the host's time per layer, and each layer's last call, learnt from lazily (at
    the layer's next call, when its GPU work is long done, or at a step's start if it is done)."""

    def __init__(self, pipe: DevicePipeline, cost: CostModel) -> None:
        self.pipe = pipe
        self.tables = DeviceTables()
        self.demand: dict[tuple[str, int], np.ndarray] = {}
        self.last_counts: dict[int, tuple[int, int, int]] = {}  # layer -> hits, misses, admissions
        self.unread: dict[int, tuple[LayerOutcome, tuple[str, ...]]] = {}  # layer -> last call, its requests
        self.steps = 0
        # kept across steps so segment graphs repeat (step_graph): each layer's list bound,
        # and the step until which a layer keeps its CPU branch
        self.bounds: dict[int, int] = {}
        self.branch_until: dict[int, int] = {}
        # a split costs the host's lead over the GPU, about one layer's host time: measured on
        # the GPU-only calls, the calibrated launch overhead until then
        self.host_layer_s = cost.gpu_overhead_s
        # the split's rates: the start-up model, its CPU rate then following the measured calls
        self.cost = cost

    def forget(self, request_id: str) -> None:
        for key in [k for k in self.demand if k[0] == request_id]:
            del self.demand[key]
        for layer in [lay for lay, (_, rids) in self.unread.items() if request_id in rids]:
            outcome, _ = self.unread.pop(layer)
            self.pipe.counts(layer, outcome)  # the cache's bookkeeping; the demand is not kept

    def learn(self, layer: int) -> None:
        """Take in the counts of the layer's last call (waits for its GPU work, if any is left)."""
        last = self.unread.pop(layer, None)
        if last is None:
            return
        outcome, request_ids = last
        c = self.pipe.counts(layer, outcome)
        if c.demand is not None:
            for b, rid in enumerate(request_ids):
                self.demand[(rid, layer)] = c.demand[b]
        self.last_counts[layer] = (c.hits, c.uva + c.cpu, c.admitted)
        if c.cpu:
            self.cost = observe_cpu(self.cost, c.cpu, c.cpu_s)

    def learn_measured(self) -> None:
        """Take in the demand of every layer whose last call measured it and is done on the GPU
        (a query per layer, no wait: the host keeps its lead)."""
        for layer in [lay for lay, (out, _) in self.unread.items() if out.plan.measure_demand and out.end.done]:
            self.learn(layer)


class DeviceStepHook:
    """``attend(layer, q [B,Hq,d], k_new [B,Hkv,d], v_new [B,Hkv,d]) -> [B,Hq,d]`` on the GPU."""

    def __init__(self, op: "HybridAttention", batch: list["PagedSequenceView"], request_ids: list[str],
                 overrides: list) -> None:
        state: DevicePathState = op.device_state
        self.budgets = request_budgets(op.config, overrides)
        self.selections: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.demand: np.ndarray | None = None  # [L, B, Hkv] known at the step's first call (-1: unknown)
        self.k_rows: np.ndarray | None = None  # [L, B, Hkv] the step's plan
        self.op, self.state, self.batch, self.request_ids = op, state, batch, tuple(request_ids)
        pipe: DevicePipeline = op.pipeline
        self.tables_host, self.tables_layers = state.tables.get(batch, request_ids, pipe.compute)
        self.pos_host = np.array([s.seq_len for s in batch], np.int32)
        if num_blocks(int(self.pos_host.max()) + 1) > self.tables_host.shape[2]:
            raise HybridAttentionError(f"a sequence has fewer pages than its {int(self.pos_host.max()) + 1} tokens need")
        self.nb = blocks_after_append(self.pos_host)
        # layer, outcome, wall, budget used, the cost model it was planned with
        self.outcomes: list[tuple[int, LayerOutcome, float, float, CostModel]] = []
        self._used: list[np.ndarray] = []  # per layer call: [B] budget used per request
        self._caller: int | None = None  # the caller's CUDA stream, read at the step's first call
        self.planned: dict = {}  # layer -> step_graph.PlannedLayer, once its segment is planned
        self.segment_events: tuple = ()  # the last segment replay's start and end
        self.step = state.steps
        state.steps += 1

    def _plan_step(self) -> None:
        """Every layer's rows, once, at the step's first call."""
        op, state = self.op, self.state
        state.learn_measured()
        layers, hkv = op.options.num_layers, op.num_kv_heads
        self.demand = demand_of(state.demand, self.request_ids, layers, hkv)
        self.k_rows = plan_step(op.config, op.kept, self.demand, self.nb, self.budgets, layers, hkv).astype(np.int32)

    def plan_layer(self, layer: int) -> tuple[LayerPlan, float]:
        """The layer's plan (and its budget used), from the step's rows and the layer's last counts."""
        op = self.op
        if layer in self.planned:
            p = self.planned[layer]
            return p.plan, p.used
        if self.k_rows is None:
            self._plan_step()
        k_rows = np.minimum(self.k_rows[layer], self.nb[:, None].astype(np.int32))
        measure = measures(op.config, self.budgets, self.demand, self.step, layer, op.options.refresh_steps)
        used = float((k_rows / self.nb[:, None]).mean())
        width = self.tables_host.shape[2]
        bound = _bucket(int(k_rows.max()), width)
        last = self.state.bounds.get(layer, 0)
        if bound < last < 4 * bound and last <= width:  # shrink only past a factor 4: fewer shapes
            bound = last
        self.state.bounds[layer] = bound
        cand, cand_bound = None, 0
        factor = rescore_factor(op.config, k_rows, self.nb)
        if factor:  # the rescoring stage's candidates (policy.select step 5)
            cand = candidate_rows(k_rows, self.pos_host + 1, factor).astype(np.int32)
            cand_bound = _bucket(int(cand.max()), width)
        return LayerPlan(k_rows, bound, self._cpu_fraction(layer), op.use_cache, measure, cand, cand_bound,
                         self.step), used

    def _cpu_fraction(self, layer: int) -> float:
        op = self.op
        if op.mode == "gpu_only":
            return 0.0
        if op.mode == "cpu_only":
            return 1.0
        last = self.state.last_counts.get(layer)
        if op.mode == "static" or last is None:
            return op.static_cpu_fraction
        hits, misses, admits = last
        return balanced_cpu_fraction(self.state.cost, hits, misses, admits=admits, switch_s=self.state.host_layer_s)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        op, pipe, state = self.op, self.op.pipeline, self.state
        bsz = len(self.batch)
        op.check_hook_args(layer, q, k, v, bsz)
        t0 = time.perf_counter()
        # learning and planning happen here, per layer, while the GPU still runs earlier layers
        state.learn(layer)
        plan, used = self.plan_layer(layer)
        st = pipe.prepare(layer, plan, bsz, q.shape[1], self.tables_host.shape[2])
        caller = None
        if q.is_cuda:
            # the layer's graph reads q, k, v and writes the output where the caller's tensors
            # are (kernels.staging), ordered on the caller's stream by events: no copies queued here
            if self._caller is None:  # a model runs a step's layers on one stream
                self._caller = torch.cuda.current_stream().cuda_stream
            caller = self._caller
            q_src = q if q.dtype in _STAGED and q.is_contiguous() else q.float().contiguous()
            k_src, v_src = (x if x.dtype == torch.bfloat16 and x.is_contiguous() else x.to(torch.bfloat16).contiguous()
                            for x in (k, v))
            # a temporary above may be freed on return: the caller's stream, whose later work
            # could reuse its memory, waits for the layer first
            result = torch.empty(q.shape, dtype=q.dtype if q.dtype in _STAGED else torch.float32, device=q.device)
            st.io_h[:] = io_words(q_src.data_ptr(), k_src.data_ptr(), v_src.data_ptr(), result.data_ptr(),
                                  _STAGED[q_src.dtype], _STAGED[result.dtype])
        else:
            srcs = [x.to(dtype).contiguous() for x, dtype in ((q, torch.float32), (k, torch.bfloat16),
                                                              (v, torch.bfloat16))]  # alive until copied
            for dst, src in zip((st.q, st.k_new, st.v_new), srcs):
                copy_bytes(dst.data.ptr, src.data_ptr(), dst.nbytes, pipe.compute.ptr)
            # the graph's staging then copies each buffer onto itself
            st.io_h[:] = io_words(st.q.data.ptr, st.k_new.data.ptr, st.v_new.data.ptr, st.out.data.ptr,
                                  "float32", "float32")
        res = pipe.run_layer(layer, plan, st, self.tables_layers[layer], self.tables_host[layer], self.pos_host,
                             after=caller)
        state.unread[layer] = (res, self.request_ids)
        if op.options.record_selection:  # the harness's read-back: a wait per layer
            res.end.synchronize()
            indptr = cp.asnumpy(st.sel.indptr)
            self.selections[layer] = (indptr, cp.asnumpy(st.sel.blocks[:int(indptr[-1])]))
        if q.is_cuda:
            cp.cuda.runtime.streamWaitEvent(caller, res.end.ptr, 0)
            if result.dtype != q.dtype:
                result = result.to(q.dtype)
        else:
            res.end.synchronize()
            result = torch.from_numpy(cp.asnumpy(res.out)).to(q.dtype)
        wall = time.perf_counter() - t0
        if plan.cpu_fraction == 0 and q.is_cuda:
            state.host_layer_s += 0.1 * (wall - state.host_layer_s)
        self.record(layer, res, wall, used, plan)
        return result

    def record(self, layer: int, res: LayerOutcome, wall: float, used: float, plan: LayerPlan) -> None:
        self.outcomes.append((layer, res, wall, used, self.state.cost))
        self._used.append(plan.k_rows.mean(axis=1) / self.nb)

    # Segment graphs (step_graph, driven by the model runner): plan, capture, replay.
    def plan_layers(self, first: int, end: int, num_q_heads: int) -> tuple | None:
        """Plan layers [first, end) now; the segment graph's key, or None where the layers cannot
        be one graph (the harness reads each layer's selection back)."""
        if self.op.options.record_selection:
            return None
        return step_graph.plan(self, num_q_heads, first, end)

    @property
    def graph_epoch(self) -> tuple:
        """Segment graphs of another epoch can never replay (they captured block tables since
        made anew): the runner drops them."""
        return id(self.state), self.state.tables.generation

    def capture_hook(self) -> "step_graph.CaptureHook":
        return step_graph.CaptureHook(self)

    def before_replay(self, captured) -> None:
        step_graph.before_replay(self, captured)

    def after_replay(self, captured) -> None:
        step_graph.after_replay(self, captured)

    def report(self) -> StepReport:
        """What the step did (waits for its GPU work). Call before the next step's calls: the
        layers' buffers are rewritten then."""
        pipe = self.op.pipeline
        reports = []
        for layer, res, wall, used, cost in self.outcomes:  # cost: the model its split was planned with
            c = pipe.counts(layer, res)
            reports.append(LayerReport(
                layer, used, c.cpu, c.hits, c.uva, c.admitted, c.evicted,
                cost.cpu_time(c.cpu) if c.cpu else 0.0, cost.gpu_time(c.hits, c.uva, c.admitted), wall,
                pipe.gpu_busy_s(res), c.cpu_s if c.cpu else None))
        span = None
        if self.outcomes:
            span = cp.cuda.get_elapsed_time(self.outcomes[0][1].spans[0][0], self.outcomes[-1][1].end) / 1e3
        per_request = tuple(float(x) for x in np.mean(self._used, axis=0)) if self._used else ()
        whole = bool(self.outcomes) and all(res.in_segment_graph for _, res, *_ in self.outcomes)
        return StepReport(tuple(reports), gpu_span_s=span, budget_per_request=per_request, whole_step=whole)


def _bucket(k_max: int, width: int) -> int:
    """The list bound a layer is captured with: a power of two (at least 64) covering k_max, so
    budgets that move step to step reuse one graph; never past the table's width."""
    return min(width, max(64, 1 << max(k_max - 1, 0).bit_length()))
