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

if TYPE_CHECKING:
    from fluxion_dist.hybrid.operator import HybridAttention, PagedSequenceView


class DeviceTables:
    """Host and device block tables [L, B, W] of a batch, refreshed when a sequence gains pages."""

    def __init__(self) -> None:
        self._key: tuple = ()
        self.host: np.ndarray | None = None
        self.dev: cp.ndarray | None = None

    def get(self, batch: Sequence["PagedSequenceView"], request_ids: Sequence[str]) -> tuple[np.ndarray, cp.ndarray]:
        key = tuple((rid, len(s.block_tables[0])) for rid, s in zip(request_ids, batch))
        if key != self._key or self.host is None:
            layers = len(batch[0].block_tables)
            width = max(n for _, n in key)
            host = np.zeros((layers, len(batch), width), np.int32)
            for b, s in enumerate(batch):
                for layer, row in enumerate(s.block_tables):
                    host[layer, b, :len(row)] = row
            self.host, self.dev, self._key = host, cp.asarray(host), key
        return self.host, self.dev


class DeviceStepHook:
    """``attend(layer, q [B,Hq,d], k_new [B,Hkv,d], v_new [B,Hkv,d]) -> [B,Hq,d]`` on the GPU."""

    def __init__(self, op: "HybridAttention", batch: list["PagedSequenceView"], request_ids: list[str]) -> None:
        self.op, self.batch, self.request_ids = op, batch, request_ids
        pipe: DevicePipeline = op.pipeline
        self.tables_host, self.tables_dev = op.device_tables.get(batch, request_ids)
        self.pos_host = np.array([s.seq_len for s in batch], np.int32)
        self.seq_host = self.pos_host + 1
        if np.any(num_blocks(self.seq_host.max()) > self.tables_host.shape[2]):
            raise op.error(f"a sequence has fewer pages than its {int(self.seq_host.max())} tokens need")
        self.pos_dev = cp.asarray(self.pos_host)
        nb = (self.seq_host + BLOCK_TOKENS - 1) // BLOCK_TOKENS
        cfg, hkv = op.config, pipe.kv_host.shape[1]
        self.plans: list[LayerPlan] = []
        budgets = []
        for layer in range(op.options.num_layers):
            measure = False
            if cfg.policy == "full" or (cfg.policy == "fluxion" and cfg.mass_target >= 1.0):
                # a mass target of 1 needs every block, as in the host policy
                k_rows = None
                budgets.append(np.ones((len(batch), hkv)))
                bound = int(nb.max())
            else:
                demand = None
                if cfg.policy == "fluxion":
                    known = [op.demand.get((rid, layer)) for rid in request_ids]
                    measure = any(d is None for d in known) or (op.steps + layer) % op.options.refresh_steps == 0
                    if all(d is not None for d in known):
                        demand = np.stack(known)
                k_rows = np.broadcast_to(row_budgets(demand, nb, budget=cfg.budget, sink_blocks=pipe.sink_blocks,
                                                     recent_blocks=pipe.recent_blocks), (len(batch), hkv))
                budgets.append(k_rows / nb[:, None])
                bound = int(k_rows.max())
                k_rows = np.ascontiguousarray(k_rows, dtype=np.int32)
            self.plans.append(LayerPlan(k_rows, bound, self._cpu_fraction(layer), op.use_cache, measure))
        # one upload for every layer's budgets
        stacked = [p.k_rows for p in self.plans if p.k_rows is not None]
        if stacked:
            dev = cp.asarray(np.stack(stacked))
            it = iter(range(len(stacked)))
            self.plans = [p if p.k_rows is None else LayerPlan(dev[next(it)], p.max_row_blocks, p.cpu_fraction,
                                                               p.use_cache, p.measure_demand) for p in self.plans]
        self.budget_used = [float(np.mean(x)) for x in budgets]
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
            torch_stream = cp.cuda.ExternalStream(torch.cuda.current_stream(q.device).cuda_stream)
        qf = q.detach().to(torch.float32).contiguous()
        kb = k.detach().to(torch.bfloat16).contiguous().view(torch.int16)
        vb = v.detach().to(torch.bfloat16).contiguous().view(torch.int16)
        if torch_stream is not None:
            pipe.compute.wait_event(torch_stream.record())
            q_dev, q_host = cp.from_dlpack(qf), None
            k_dev, v_dev = cp.from_dlpack(kb).view(cp.uint16), cp.from_dlpack(vb).view(cp.uint16)
        else:
            q_host = qf.numpy()
            with pipe.compute:
                q_dev = cp.asarray(q_host)
                k_dev, v_dev = cp.asarray(kb.numpy().view(np.uint16)), cp.asarray(vb.numpy().view(np.uint16))
        res = pipe.run_layer(layer, self.plans[layer], q_dev, q_host, k_dev, v_dev, self.tables_dev[layer],
                             self.tables_host[layer], self.pos_dev, self.seq_host)
        if res.demand is not None:
            for b, rid in enumerate(self.request_ids):
                op.demand[(rid, layer)] = res.demand[b]
        op.last_counts[layer] = (res.hits, res.uva + res.cpu, res.admitted)
        if torch_stream is not None:
            torch_stream.wait_event(res.spans[-1][1])
            out = torch.from_dlpack(res.out).to(q.dtype)
        else:
            with pipe.compute:
                out = torch.from_numpy(cp.asnumpy(res.out, stream=pipe.compute)).to(q.dtype)
        self.outcomes.append((layer, res, time.perf_counter() - t0))
        return out

    def report(self):
        from fluxion_dist.hybrid.operator import LayerReport, StepReport

        cost = self.op.cost
        reports = []
        for layer, r, wall in self.outcomes:
            reports.append(LayerReport(
                layer, self.budget_used[layer], r.cpu, r.hits, r.uva, r.admitted, r.evicted,
                cost.cpu_time(r.cpu) if r.cpu else 0.0, cost.gpu_time(r.hits, r.uva, r.admitted), wall,
                r.gpu_busy_s()))
        return StepReport(tuple(reports))
