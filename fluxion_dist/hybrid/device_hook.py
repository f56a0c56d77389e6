"""The operator's decode step on a GPU: the ``attend`` hook over :class:`DevicePipeline`.

Per step (``DeviceStepHook.__init__``): the batch's block tables for every layer go to the
device once (rebuilt only when a sequence gains pages), the positions once, and the host
plans every layer from what it learnt at the previous step:

- budgets (``device_budget.row_budgets``): fluxion from each head's measured demand
  (the predictor's top-p pass, refreshed every ``refresh_steps`` steps per layer, staggered
  over the layers, and on a request's first step), the fixed policies from the budget;
- the CPU share of the misses: balanced from the cost model and the layer's last hit/miss
  counts (fluxion, full), fixed (fixed_hybrid), 0 (quest_gpu) or 1 (cpu_only).

Per layer (``__call__``): one ``DevicePipeline.run_layer``; the output stays on the GPU
(a CUDA tensor in, a CUDA tensor out; a CPU tensor in, a CPU tensor out).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Sequence

import cupy as cp
import numpy as np
import torch

from fluxion_dist.attention.layout import BLOCK_TOKENS, num_blocks
from fluxion_dist.hybrid.device_budget import balanced_cpu_fraction, row_budgets
from fluxion_dist.hybrid.device_pipeline import DevicePipeline, LayerOutcome, LayerPlan
from fluxion_dist.hybrid.step_report import LayerReport, StepReport

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

    def get(self, batch: Sequence["PagedSequenceView"], request_ids: Sequence[str],
            stream: cp.cuda.Stream) -> tuple[np.ndarray, cp.ndarray]:
        key = tuple((rid, len(s.block_tables[0])) for rid, s in zip(request_ids, batch))
        if key != self._key or self.host is None:
            layers = len(batch[0].block_tables)
            width = -(-max(n for _, n in key) // self.WIDTH_STEP) * self.WIDTH_STEP
            host = np.zeros((layers, len(batch), width), np.int32)
            for b, s in enumerate(batch):
                for layer, row in enumerate(s.block_tables):
                    host[layer, b, :len(row)] = row
            with stream:
                if self.dev is None or self.dev.shape != host.shape:
                    self.dev = cp.asarray(host)
                else:
                    self.dev.set(host, stream=stream)
            self.host, self._key = host, key
        return self.host, self.dev


class DeviceStepHook:
    """``attend(layer, q [B,Hq,d], k_new [B,Hkv,d], v_new [B,Hkv,d]) -> [B,Hq,d]`` on the GPU."""

    def __init__(self, op: "HybridAttention", batch: list["PagedSequenceView"], request_ids: list[str]) -> None:
        self.op, self.batch, self.request_ids = op, batch, request_ids
        pipe: DevicePipeline = op.pipeline
        self.tables_host, self.tables_dev = op.device_tables.get(batch, request_ids, pipe.compute)
        self.pos_host = np.array([s.seq_len for s in batch], np.int32)
        self.seq_host = self.pos_host + 1
        if np.any(num_blocks(self.seq_host.max()) > self.tables_host.shape[2]):
            raise op.error(f"a sequence has fewer pages than its {int(self.seq_host.max())} tokens need")
        nb = (self.seq_host + BLOCK_TOKENS - 1) // BLOCK_TOKENS
        cfg, hkv = op.config, pipe.kv_host.shape[1]
        exact = cfg.policy == "full" or (cfg.policy == "fluxion" and cfg.mass_target >= 1.0)
        self.plans: list[LayerPlan] = []
        self.budget_used: list[float] = []
        for layer in range(op.options.num_layers):
            measure = False
            if exact:  # every block (a mass target of 1 needs them all, as in the host policy)
                k_rows = np.broadcast_to(nb[:, None], (len(batch), hkv))
            else:
                demand = None
                if cfg.policy == "fluxion":
                    known = [op.demand.get((rid, layer)) for rid in request_ids]
                    measure = any(d is None for d in known) or (op.steps + layer) % op.options.refresh_steps == 0
                    if all(d is not None for d in known):
                        demand = np.stack(known)
                k_rows = np.broadcast_to(row_budgets(demand, nb, budget=cfg.budget, sink_blocks=pipe.sink_blocks,
                                                     recent_blocks=pipe.recent_blocks), (len(batch), hkv))
            k_rows = np.ascontiguousarray(k_rows, dtype=np.int32)
            self.budget_used.append(float(np.mean(k_rows / nb[:, None])))
            self.plans.append(LayerPlan(k_rows, _bucket(int(k_rows.max()), self.tables_host.shape[2]),
                                        self._cpu_fraction(layer), op.use_cache, measure))
        self.outcomes: list[tuple[int, LayerOutcome, float]] = []
        op.steps += 1

    def _cpu_fraction(self, layer: int) -> float:
        op = self.op
        if op.mode == "gpu_only":
            return 0.0
        if op.mode == "cpu_only":
            return 1.0
        last = op.last_counts.get(layer)
        if op.mode == "static" or last is None:
            return op.static_cpu_fraction
        hits, misses, admits = last
        return balanced_cpu_fraction(op.cost, hits, misses, admits=admits)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        op, pipe = self.op, self.op.pipeline
        bsz = len(self.batch)
        op.check_hook_args(layer, q, k, v, bsz)
        t0 = time.perf_counter()
        torch_stream = None
        if q.is_cuda:
            torch_stream = cp.cuda.Stream.from_external(torch.cuda.current_stream(q.device))
        qf = q.detach().to(torch.float32).contiguous()
        kb = k.detach().to(torch.bfloat16).contiguous().view(torch.int16)
        vb = v.detach().to(torch.bfloat16).contiguous().view(torch.int16)
        if torch_stream is not None:
            pipe.compute.wait_event(torch_stream.record())
            q_dev = cp.from_dlpack(qf)
            k_dev, v_dev = cp.from_dlpack(kb).view(cp.uint16), cp.from_dlpack(vb).view(cp.uint16)
        else:
            with pipe.compute:
                q_dev = cp.asarray(qf.numpy())
                k_dev, v_dev = cp.asarray(kb.numpy().view(np.uint16)), cp.asarray(vb.numpy().view(np.uint16))
        res = pipe.run_layer(layer, self.plans[layer], q_dev, k_dev, v_dev, self.tables_dev[layer],
                             self.tables_host[layer], self.pos_host)
        if res.demand is not None:
            for b, rid in enumerate(self.request_ids):
                op.demand[(rid, layer)] = res.demand[b]
        op.last_counts[layer] = (res.hits, res.uva + res.cpu, res.admitted)
        if torch_stream is not None:
            torch_stream.wait_event(res.spans[-1][1])
            # res.out is the layer's buffer, rewritten at its next call: hand out a copy
            out = torch.from_dlpack(res.out).to(q.dtype, copy=True)
        else:
            with pipe.compute:
                out = torch.from_numpy(cp.asnumpy(res.out, stream=pipe.compute)).to(q.dtype)
        self.outcomes.append((layer, res, time.perf_counter() - t0))
        return out

    def report(self) -> StepReport:
        cost = self.op.cost
        reports = []
        for layer, r, wall in self.outcomes:
            reports.append(LayerReport(
                layer, self.budget_used[layer], r.cpu, r.hits, r.uva, r.admitted, r.evicted,
                cost.cpu_time(r.cpu) if r.cpu else 0.0, cost.gpu_time(r.hits, r.uva, r.admitted), wall,
                r.gpu_busy_s()))
        return StepReport(tuple(reports))


def _bucket(k_max: int, width: int) -> int:
    """The list bound a layer is captured with: a power of two (at least 64) covering k_max, so
    budgets that move step to step reuse one graph; never past the table's width."""
    return min(width, max(64, 1 << max(k_max - 1, 0).bit_length()))
