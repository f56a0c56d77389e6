"""One layer's device and pinned buffers in the pipeline (``device_pipeline``), per batch shape.

A CUDA graph captures addresses, so everything a layer's calls read and write is allocated
once per shape key ``(batch, q heads, table width, list bound, cache on, candidate bound)``:
the pinned parameter block the graph copies in first (io addresses, positions, per-row
counts, the CPU fraction), the stage buffers, and the pinned twins the host reads back.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import cupy as cp
import cupyx
import numpy as np

from fluxion_dist.kernels.attention import num_split_chunks, split_k_parts
from fluxion_dist.kernels.device import sm_count
from fluxion_dist.kernels.selection import select_buffers
from fluxion_dist.kernels.staging import IO_WORDS

if TYPE_CHECKING:
    from fluxion_dist.hybrid.device_pipeline import LayerPlan


class LayerState:
    """Everything one layer's calls read and write, allocated once per batch shape: a CUDA
    graph captures addresses, so inputs are copied in and parameters written in place."""

    def __init__(self, key: tuple, hkv: int, d: int) -> None:
        bsz, hq, width, bound, _, cand_bound = key
        rows = bsz * hkv
        cand_n = rows if cand_bound else 0
        self.key, self.hkv, self.bound = key, hkv, bound
        self.scale = 1.0 / math.sqrt(d)
        self.warm: set[tuple] = set()
        self.graphs: dict[tuple, cp.cuda.graph.Graph] = {}
        self.last_end: cp.cuda.Event | None = None  # of the last call that used these buffers, until seen done
        # reused call to call (read by ``counts`` before the next call): start, end, routed,
        # attended, merge start
        self.events = tuple(cp.cuda.Event() for _ in range(5))
        # a segment graph's CPU branch: fork after the routing, join before the merge; its
        # admission branch: fork after the attention
        self.branch_events = tuple(cp.cuda.Event(disable_timing=True) for _ in range(3))
        self.host_job = None  # that branch's host node's job (cpu.team.AttentionTeam.host_job)
        self.host_job_tables: tuple | None = None  # the address and shape of the table rows it reads
        # one pinned block the graph copies in first: io (the call's tensors, int64 [IO_WORDS])
        # | params: pos [B] | k_rows [B*Hkv] | cand_rows [B*Hkv] (rescoring only) | step | cpu fraction
        io_bytes = IO_WORDS * 8
        self.block_h = cupyx.empty_pinned((io_bytes + 4 * (bsz + rows + cand_n + 2),), np.uint8)
        self.block = cp.empty(self.block_h.shape, cp.uint8)
        self.io_h, self.io = self.block_h[:io_bytes].view(np.int64), self.block[:io_bytes].view(cp.int64)
        self.params_h, self.params = self.block_h[io_bytes:].view(np.int32), self.block[io_bytes:].view(cp.int32)
        self._k_rows: np.ndarray | None = None  # the plan's array last written into params_h
        self.seq = self.params[:bsz]  # pos, then + 1 by the append
        self.k_rows = self.params[bsz:bsz + rows].reshape(bsz, hkv)
        self.stamp = self.params[bsz + rows + cand_n:bsz + rows + cand_n + 1]  # the step: admission by reuse
        self.frac = self.params[bsz + rows + cand_n + 1:].view(cp.float32)
        # the rescoring stage: candidate counts, their CSR, exact log-sum-exps, dense exact scores
        self.cand_bound, self.cand = cand_bound, None
        if cand_bound:
            self.cand_rows = self.params[bsz + rows:bsz + rows + cand_n].reshape(bsz, hkv)
            self.cand = select_buffers(rows, cand_bound)
            self.cand_lse = cp.empty((rows * cand_bound, hq // hkv), cp.float32)
            self.exact = cp.empty((bsz, hkv, width), cp.float32)
        self.q = cp.empty((bsz, hq, d), cp.float32)
        self.k_new = cp.empty((bsz, hkv, d), cp.uint16)
        self.v_new = cp.empty((bsz, hkv, d), cp.uint16)
        self.no_slots = cp.full((bsz, hkv), -1, cp.int32)  # the new token's block is partial: never cached
        self.kv_scores = cp.empty((bsz, hkv, width), cp.float32)
        self.sel = select_buffers(rows, bound)
        self.topp = None  # the predictor's top-p buffers, made on the first refresh
        cap = self.sel.blocks.shape[0]
        self.sel_slot, self.cpu_blocks, self.admit_keys = (cp.empty(cap, cp.int32) for _ in range(3))
        self.cpu_indptr, self.counts = cp.empty(rows + 1, cp.int32), cp.empty(4, cp.int32)
        pinned = cupyx.empty_pinned
        self.counts_h, self.cpu_indptr_h = pinned((4,), np.int32), pinned((rows + 1,), np.int32)
        self.cpu_blocks_h, self.q_h = pinned((cap,), np.int32), pinned((bsz, hq, d), np.float32)
        self.demand_h = pinned((rows,), np.int32)
        self.far = cp.empty(rows, cp.int32)
        self.o = cp.empty((2, bsz, hq, d), cp.float32)
        self.m = cp.empty((2, bsz, hq), cp.float32)
        self.l = cp.empty((2, bsz, hq), cp.float32)
        self.o_h, self.m_h, self.l_h = pinned((bsz, hq, d), np.float32), pinned((bsz, hq), np.float32), \
            pinned((bsz, hq), np.float32)
        chunks = num_split_chunks(rows, bound, sm_count(cp.cuda.runtime.getDevice()))[1]
        self.parts = split_k_parts(chunks, bsz, hq, d) if chunks > 1 else None
        self.out = cp.empty((bsz, hq, d), cp.float32)

    def set_params(self, pos: np.ndarray, plan: "LayerPlan") -> None:
        bsz = pos.size
        self.params_h[:bsz] = pos
        if plan.k_rows is not self._k_rows:  # plans are kept while their inputs hold
            self.params_h[bsz:bsz + plan.k_rows.size] = plan.k_rows.ravel()
            self._k_rows = plan.k_rows
        if self.cand is not None:
            self.params_h[bsz + plan.k_rows.size:-2] = plan.cand_rows.ravel()
        self.params_h[-2] = plan.step
        self.params_h.view(np.float32)[-1] = plan.cpu_fraction

    def set_cpu_partial(self, o: np.ndarray | None, m: np.ndarray | None, l: np.ndarray | None) -> None:
        if o is None:
            self.m_h.fill(-np.inf)  # an empty partial: the merge skips it
            self.l_h.fill(0.0)
            return
        np.copyto(self.o_h, o)
        np.copyto(self.m_h, m)
        np.copyto(self.l_h, l)
