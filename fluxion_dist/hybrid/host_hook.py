"""The operator's decode step on the CPU: the ``attend`` hook over the host arena.

Per step (``StepHook.__init__``): every layer's rows are planned at once from the demand
known at the step's start (``step_plan.plan_step``: the pooled budget, as on the GPU).

Per layer (``__call__``): the new token's K/V go into the arena and its page's box widens;
Quest scores, the top-p demand pass on a refresh, the forced blocks, top-k (or the
rescoring stage, or token refinement) run as Cython functions on the operator's team; then
the partial attention over the selection, on the same team, merged into ``[B, Hq, d]``.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

import numpy as np
import torch

from fluxion_dist.attention.layout import BLOCK_TOKENS
from fluxion_dist.cpu import selection as cpu_sel
from fluxion_dist.cpu.attention import BatchPartial
from fluxion_dist.cpu.team import AttentionTeam
from fluxion_dist.hybrid.merge import merge_batch_partials
from fluxion_dist.hybrid.operator import HybridAttentionError
from fluxion_dist.hybrid.step_plan import (blocks_after_append, demand_mass, demand_of, measures, plan_step,
                                           request_budgets, rescore_factor, token_refine_factor)
from fluxion_dist.hybrid.step_report import LayerReport, StepReport
from fluxion_dist.policy import select as twin

if TYPE_CHECKING:
    from fluxion_dist.hybrid.operator import HybridAttention, PagedSequenceView
    from fluxion_dist.policy.request import RequestSparse


class StepHook:
    """``attend(layer, q [B,Hq,d], k_new [B,Hkv,d], v_new [B,Hkv,d]) -> [B,Hq,d]`` for one step, on the CPU."""

    def __init__(self, op: "HybridAttention", batch: list["PagedSequenceView"], request_ids: list[str],
                 overrides: list["RequestSparse | None"]) -> None:
        self.op, self.batch, self.request_ids = op, batch, request_ids
        self.budgets = request_budgets(op.config, overrides)
        self.nb = blocks_after_append([s.seq_len for s in batch])
        layers = op.options.num_layers
        # the demand known at the step's start: the plan, and which layers measure
        self.demand = demand_of(op.demand, request_ids, layers, op.num_kv_heads)
        self.k_rows = plan_step(op.config, op.kept, self.demand, self.nb, self.budgets, layers, op.num_kv_heads)
        self.step = op.steps
        op.steps += 1
        self._reports: list[LayerReport] = []
        self._used: list[np.ndarray] = []  # per layer: [B] budget used per request
        self.selections: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.token_masks: dict[int, np.ndarray] = {}  # per layer, where token refinement chose tokens
        self._binding = object()  # this step's tag on the operator's team (bound at its first layer)
        self.selection_team: AttentionTeam | None = op.team  # where scoring and selection run (None: OpenMP)

    def report(self) -> StepReport:
        per_request = tuple(float(x) for x in np.mean(self._used, axis=0)) if self._used else ()
        return StepReport(tuple(self._reports), budget_per_request=per_request)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        op = self.op
        bsz = len(self.batch)
        d = op.arena.kv_pages.shape[4]
        op.check_hook_args(layer, q, k, v, bsz)

        pos = np.array([s.seq_len for s in self.batch], dtype=np.int64)
        seq_lens = (pos + 1).astype(np.int32)
        nbs = self.nb
        tables = np.zeros((bsz, int(nbs.max())), dtype=np.int32)
        for b, s in enumerate(self.batch):
            row = s.block_tables[layer]
            if len(row) < nbs[b]:
                raise HybridAttentionError(f"sequence {b} has {len(row)} pages in layer {layer}; "
                                           f"{seq_lens[b]} tokens need {nbs[b]}")
            tables[b, :nbs[b]] = row[:nbs[b]]
        op._append(tables[np.arange(bsz), pos // BLOCK_TOKENS], pos % BLOCK_TOKENS, _bits(k), _bits(v))

        t0 = time.perf_counter()
        qf = np.ascontiguousarray(q.detach().to(torch.float32).cpu().numpy())
        scale = 1.0 / math.sqrt(d)
        indptr, blocks, masks = self._select(layer, qf, tables, seq_lens)
        if op.options.record_selection:
            self.selections[layer] = (indptr.copy(), blocks.copy())
            if masks is not None:
                self.token_masks[layer] = masks.copy()
        t_cpu = time.perf_counter()
        out = merge_batch_partials([self._attend(qf, tables, seq_lens, indptr, blocks, scale, masks)])
        wall = time.perf_counter() - t0
        cpu_s = time.perf_counter() - t_cpu
        per_row = np.diff(indptr).reshape(bsz, op.num_kv_heads)
        used = per_row.mean(axis=1) / nbs
        self._used.append(used)
        nnz = int(indptr[-1])
        self._reports.append(LayerReport(layer, float(used.mean()), nnz, 0, 0, 0, 0, op.cost.cpu_time(nnz), 0.0,
                                         wall, None, cpu_s))
        return torch.from_numpy(out).to(device=q.device, dtype=q.dtype)

    def _attend(self, qf: np.ndarray, tables: np.ndarray, seq_lens: np.ndarray, indptr: np.ndarray,
                blocks: np.ndarray, scale: float, masks: np.ndarray | None = None) -> BatchPartial:
        """The layer's partial attention over its selection, on the operator's team."""
        team = self.op.team
        if team.owner is not self._binding:  # the step's first layer, or another step bound since
            team.bind(self.op.arena.kv_pages, seq_lens, qf.shape[1], scale, owner=self._binding)
        return team.attend(qf, tables, indptr, blocks, masks)

    def _select(self, layer: int, qf: np.ndarray, tables: np.ndarray, seq_lens: np.ndarray):
        """Scores -> demand (on a refresh) -> forced -> top-k: the layer's CSR and its token
        masks (None: every token of each selected block)."""
        op = self.op
        hkv, threads = op.num_kv_heads, op.options.cpu_threads
        k_rows = self.k_rows[layer]
        row_lens = np.repeat(self.nb, hkv).astype(np.int32)
        if np.all(k_rows >= self.nb[:, None]):  # every block of every row: nothing to rank
            indptr = np.zeros(row_lens.size + 1, dtype=np.int32)
            np.cumsum(row_lens, out=indptr[1:])
            return indptr, np.concatenate([np.arange(n, dtype=np.int32) for n in row_lens]), None
        scale = 1.0 / math.sqrt(qf.shape[2])
        scores = cpu_sel.quest_scores_paged(qf, op.arena.kmin, op.arena.kmax, tables, seq_lens, scale,
                                            num_threads=threads, team=self.selection_team)
        kv = np.ascontiguousarray(cpu_sel.kv_head_max(scores, hkv))  # [B, Hkv, W]
        rows = kv.reshape(-1, kv.shape[2])
        if measures(op.config, self.budgets, self.demand, self.step, layer, op.options.refresh_steps):
            top = cpu_sel.select_topp(rows, demand_mass(op.config), num_threads=threads, row_lens=row_lens,
                                      team=self.selection_team)
            far = twin.far_demand(top.indptr, top.ids, seq_lens, hkv, sink_blocks=op.kept.sink_blocks,
                                  recent_blocks=op.kept.recent_blocks)
            for b, rid in enumerate(self.request_ids):
                op.demand[(rid, layer)] = far[b]
        twin.force_kept(kv, seq_lens, sink_blocks=op.kept.sink_blocks, recent_blocks=op.kept.recent_blocks)
        factor = rescore_factor(op.config, k_rows, self.nb)
        if factor:  # candidates by bound, kept by exact mass (policy.select, step 5)
            cand = cpu_sel.select_topk(rows, twin.candidate_rows(k_rows, seq_lens, factor).ravel(),
                                       num_threads=threads, row_lens=row_lens, team=self.selection_team)
            lse = cpu_sel.candidate_lse(qf, op.arena.kv_pages, tables, seq_lens, cand.indptr, cand.ids, scale,
                                        num_threads=threads)
            kv = twin.candidate_scores(lse, cand.indptr, cand.ids, seq_lens, hkv, kv.shape[2],
                                       sink_blocks=op.kept.sink_blocks, recent_blocks=op.kept.recent_blocks)
            rows = kv.reshape(-1, kv.shape[2])
        refine = token_refine_factor(op.config, k_rows, self.nb)
        if refine:
            return self._refine_tokens(qf, tables, seq_lens, rows, k_rows, row_lens, refine, scale)
        sel = cpu_sel.select_topk(rows, k_rows.ravel(), num_threads=threads, row_lens=row_lens,
                                  team=self.selection_team)
        return sel.indptr, sel.ids, None

    def _refine_tokens(self, qf, tables, seq_lens, rows, k_rows, row_lens, factor: float, scale: float):
        """Block -> token refinement: of the top ``ceil(factor x k)`` blocks per row by bound
        (the kept ones forced first), the ``16 k`` tokens with the highest exact score, every
        valid token of a kept block included; blocks left without a token are dropped."""
        op, threads = self.op, self.op.options.cpu_threads
        cand = cpu_sel.select_topk(rows, twin.candidate_rows(k_rows, seq_lens, factor).ravel(),
                                   num_threads=threads, row_lens=row_lens, team=self.selection_team)
        tok = cpu_sel.token_scores(qf, op.arena.kv_pages, tables, seq_lens, cand.indptr, cand.ids, scale,
                                   num_threads=threads)
        rows_of = np.repeat(np.arange(cand.indptr.size - 1), np.diff(cand.indptr))
        kept = (cand.ids < op.kept.sink_blocks) | (cand.ids >= row_lens[rows_of] - op.kept.recent_blocks)
        tok[kept] = np.where(np.isfinite(tok[kept]), twin.FORCED_SCORE, tok[kept])
        masks = cpu_sel.select_tokens_topk(tok, cand.indptr, k_rows.ravel() * BLOCK_TOKENS, num_threads=threads)
        used = masks != 0
        indptr = np.zeros_like(cand.indptr)
        np.cumsum(np.bincount(rows_of[used], minlength=indptr.size - 1), out=indptr[1:])
        return indptr, cand.ids[used], masks[used]


def _bits(x: torch.Tensor) -> np.ndarray:
    return x.detach().to(torch.bfloat16).cpu().contiguous().view(torch.int16).numpy().view(np.uint16)
