"""The GPU path's decode step as a few CUDA graphs: each holds a segment of layers, with every
layer's model pieces and operator work.

Life of a segment graph (driven by ``decode_worker.model_runner.ModelRunner``, a step being a
few segments of consecutive layers):

1. ``plan``: the hook learns the segment's layers' last counts (the previous step is done: its
   tokens were sampled) and plans them: rows (the step's pooled plan, made at its first
   segment), demand refreshes, CPU fractions, list bounds; each layer's state is prepared and
   its pinned parameters are written. The host plans a segment while the GPU runs the one
   before. The key names what the graph's structure depends on: per layer its state (shape and
   buffers), whether it refreshes demand, and whether it has a CPU branch.
2. first sight of a key: the segment runs piecewise (the layers' own graphs warm); second
   sight: the runner captures it through ``capture_hook``, whose layer calls queue the
   pipeline's bodies (``DevicePipeline.capture_layer``) on the pipeline's stream.
3. each replay: ``before_replay`` writes the io words (the graph's q, k, v and output
   addresses) into every layer's parameters, the graph runs, ``after_replay`` records the
   segment's end and hands each layer's outcome to the state, read at the next step's plan.

A layer's CPU branch is a host node (``cpu/host_job.h``) on a side stream: the CPU partial runs
while the GPU attends its own share, so a layer with CPU work needs no host wait either. A
node costs the GPU a round trip to the host even when it has nothing to do, so a layer keeps
its branch only ``BRANCH_STEPS`` steps after its last CPU share; its list bound shrinks only
past a factor 4. Keys then repeat (the refresh stagger cycles over ``refresh_steps``) and few
graphs are captured.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import cupy as cp
import numpy as np
import torch

from fluxion_dist.hybrid.device_pipeline import LayerOutcome, LayerPlan
from fluxion_dist.kernels.staging import io_words

if TYPE_CHECKING:
    from fluxion_dist.cpu._team import HostJob
    from fluxion_dist.hybrid.device_hook import DeviceStepHook
    from fluxion_dist.hybrid.layer_state import LayerState

BRANCH_STEPS = 16


@dataclass(slots=True)
class PlannedLayer:
    plan: LayerPlan
    used: float
    state: "LayerState"
    cpu_branch: bool


@dataclass(frozen=True, slots=True)
class CapturedLayer:
    layer: int
    state: "LayerState"
    io: tuple[int, ...]
    host_job: "HostJob | None"
    # the graph's q, k, v and output: its pool memory, held so the addresses stay the graph's
    tensors: tuple[torch.Tensor, ...]


def plan(hook: "DeviceStepHook", num_q_heads: int, first: int, end: int) -> tuple:
    """Plan layers [first, end) of the step now; returns their segment graph's key."""
    state, pipe = hook.state, hook.op.pipeline
    for layer in range(first, end):
        state.learn(layer)
    bsz, width = len(hook.batch), hook.tables_host.shape[2]
    if first == 0:
        pipe.lengths.setdefault(bsz, np.zeros(bsz, np.int32))[:] = hook.pos_host + 1
    planned, key = hook.planned, [bsz]
    for layer in range(first, end):
        p, used = hook.plan_layer(layer)
        if p.cpu_fraction > 0:
            state.branch_until[layer] = hook.step + BRANCH_STEPS
        branch = hook.step < state.branch_until.get(layer, -1)
        st = pipe.prepare(layer, p, bsz, num_q_heads, width)
        st.set_params(hook.pos_host, p)
        planned[layer] = PlannedLayer(p, used, st, branch)
        key.append((id(st), p.measure_demand, branch))
    return tuple(key)


class CaptureHook:
    """The attend hook while the runner captures a segment: queues each layer's body on the
    capturing stream and keeps what a replay needs."""

    def __init__(self, hook: "DeviceStepHook") -> None:
        self.hook = hook
        self.captured: list[CapturedLayer] = []
        # the capture runs on the pipeline's stream: the kernels' per-stream scratch
        # (kernels.counters) exists for it already, and allocating during a capture fails
        self.stream = torch.cuda.ExternalStream(hook.op.pipeline.compute.ptr)
        hook.op.pipeline.admits_open = False  # a failed capture may have left one open

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        hook = self.hook
        hook.op.check_hook_args(layer, q, k, v, len(hook.batch))
        p = hook.planned[layer]
        q_src = q if q.dtype in (torch.float32, torch.bfloat16) and q.is_contiguous() else q.float().contiguous()
        k_src, v_src = (x.to(torch.bfloat16).contiguous() for x in (k, v))
        out = torch.empty(q.shape, dtype=q_src.dtype, device=q.device)
        io = io_words(q_src.data_ptr(), k_src.data_ptr(), v_src.data_ptr(), out.data_ptr(), _name(q_src.dtype),
                      _name(out.dtype))
        pipe = hook.op.pipeline
        job = pipe.capture_layer(layer, p.plan, p.state, hook.tables_layers[layer], hook.tables_host[layer],
                                 pipe.compute, p.cpu_branch)
        self.captured.append(CapturedLayer(layer, p.state, io, job, (q_src, k_src, v_src, out)))
        return out if out.dtype == q.dtype else out.to(q.dtype)

    def finish(self) -> None:
        """Before the capture ends: join the branches the layers left open (cache admissions)."""
        pipe = self.hook.op.pipeline
        pipe.join_side_work(pipe.compute)


def before_replay(hook: "DeviceStepHook", captured: list[CapturedLayer]) -> None:
    for c in captured:
        c.state.io_h[:] = c.io
    hook.segment_events = (cp.cuda.Event(), cp.cuda.Event())
    cp.cuda.runtime.eventRecord(hook.segment_events[0].ptr, torch.cuda.current_stream().cuda_stream)


def after_replay(hook: "DeviceStepHook", captured: list[CapturedLayer]) -> None:
    """Hand the segment's layers' outcomes to the state (their counts are read at the next
    step's plan)."""
    state = hook.state
    start, end = hook.segment_events
    cp.cuda.runtime.eventRecord(end.ptr, torch.cuda.current_stream().cuda_stream)
    for c in captured:
        p = hook.planned[c.layer]
        c.state.last_end = end
        res = LayerOutcome(c.state.out, ((start, end),), c.state, p.plan, host_job=c.host_job, in_segment_graph=True)
        state.unread[c.layer] = (res, hook.request_ids)
        hook.record(c.layer, res, 0.0, p.used, p.plan)


def _name(dtype: torch.dtype) -> str:
    return "float32" if dtype == torch.float32 else "bfloat16"
