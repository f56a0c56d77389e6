"""HybridAttention: Fluxion's decode attention over the host KV arena, CPU and GPU together.

Life of one layer of one decode step (``StepHook.__call__``, the model's ``attend`` hook):

1. append: the new token's K/V (bf16) go into its slot of each sequence's last page in
   the host arena, and that page's Quest min/max are widened (the hook contract: the
   cache holds the new token before attention); any cached copy of those pages is
   dropped (a partial block is never cached anyway);
2. select: per request, ``sparse.decide`` under the configured policy over the
   request's metadata pyramid (Fluxion's predictor state is kept per request and layer);
3. cache (fluxion only): look the selected (page, head) runs up in the GPU block cache
   and start the copy-in of newly selected full blocks on the side stream;
4. split (``scheduler.split_layer``): cached blocks to the GPU, the rest balanced
   between the CPU and UVA reads by the GPU so both are predicted to finish together;
5. run: the CPU partial (Cython, GIL released) in a worker thread while the GPU partial
   runs, then the exact log-sum-exp merge; returns ``[B, Hq, d]``.

Policies (``SparseConfig.policy``; every sparse one at ``SparseConfig.budget``):

=============  ==========================  ==============================  =====
policy         which blocks                where                           cache
=============  ==========================  ==============================  =====
full           all                         balanced split                  no
quest_gpu      fixed budget (Quest top-k)  GPU, UVA reads only             no
cpu_only       fixed budget                CPU only                        no
fixed_hybrid   fixed budget                static split (fraction fixed    no
                                           once from the rates), no
                                           predictor, no priority
fluxion        predictor + budget selector balanced, priority scheduler   yes
=============  ==========================  ==============================  =====

**On a GPU** (``device="gpu"``) the step is ``device_hook.DeviceStepHook`` over
``device_pipeline.DevicePipeline``: the same policies, but scoring, selection (per-head budgets
from the predictor's measured demand, ``device_budget``), the cache table and the routing of
each block stay on the device, replayed as CUDA graphs; the host only runs the CPU's share.
There every head is selected in 16-token blocks, the unit of the arena and of the cache (the
README's "Granularity on a GPU" says why the granularity selector and token masks stay on
the host-selection path).
The life above is the host-selection path (``cpu`` and ``emulated``), the one CI exercises.

**No GPU.** With ``device="cpu"`` (or ``"auto"`` on a machine where
``kernels.device.gpu_unavailable_reason()`` is not None) every policy still runs: the
GPU share is forced to zero and the CPU executes all blocks, so each policy's selection
and the whole hook are testable in CI. ``device="emulated"`` runs the GPU's share on a
CPU stand-in (``gpu_path.EmulatedGpuPath``) with the cache bookkeeping live, so splits,
cache hits and the merge are exercised without a GPU too.

Each step reports, per layer: the budget used, the blocks on each device, the cache's
hits and copies, and the GPU's idle time (predicted by the cost model; measured with
CUDA events on a GPU).
"""

from __future__ import annotations

import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Literal, Protocol, Sequence

import numpy as np
import torch

from fluxion_dist.attention.layout import BLOCK_TOKENS, from_bf16_bits, num_blocks
from fluxion_dist.config.schema import SparseConfig
from fluxion_dist.cpu.attention import BatchPartial, sparse_partial_attention
from fluxion_dist.errors import FluxionError
from fluxion_dist.hybrid.block_cache import BlockCacheTable, CachePlan
from fluxion_dist.hybrid.cost_model import CostModel
from fluxion_dist.hybrid.gpu_path import EmulatedGpuPath, GpuPath, LayerInputs
from fluxion_dist.hybrid.merge import merge_batch_partials
from fluxion_dist.hybrid.scheduler import SplitMode, split_layer
from fluxion_dist.hybrid.step_report import LayerReport, StepReport
from fluxion_dist.policy.request import RequestSparse
from fluxion_dist.sparse.head_predictor import HeadFeatures
from fluxion_dist.sparse.policy import PolicyOptions, decide
from fluxion_dist.sparse.scoring import build_pyramid
from fluxion_dist.sparse.selection import concat_selections, forced_blocks

Device = Literal["auto", "cpu", "gpu", "emulated"]

_EXECUTION: dict[str, tuple[SplitMode, bool]] = {
    "full": ("balanced", False),
    "quest_gpu": ("gpu_only", False),
    "cpu_only": ("cpu_only", False),
    "fixed_hybrid": ("static", False),
    "fluxion": ("balanced", True),
}


class HybridAttentionError(FluxionError, ValueError):
    """The operator was given inconsistent shapes, sequences or options; the message names them."""


class PagedSequenceView(Protocol):
    """What the operator reads of a sequence (``decode_worker.engine.PagedSequence`` fits)."""

    block_tables: list[list[int]]  # per layer: the sequence's pages in token order (incl. the new token's)
    seq_len: int  # tokens already in the pages, before this step's token


@dataclass(frozen=True, slots=True)
class HostArena:
    """The KV store's arena and metadata (host memory; pinned for UVA on a GPU machine)."""

    kv_pages: np.ndarray  # uint16 [P, Hkv, 2, 16, d] bf16 bits
    kmin: np.ndarray  # uint16 [P, Hkv, d]
    kmax: np.ndarray  # uint16 [P, Hkv, d]

    def __post_init__(self) -> None:
        kv = self.kv_pages
        if kv.dtype != np.uint16 or kv.ndim != 5 or kv.shape[2:4] != (2, BLOCK_TOKENS):
            raise HybridAttentionError(f"kv_pages must be uint16 [P, Hkv, 2, {BLOCK_TOKENS}, d]; "
                                       f"got {kv.dtype} {kv.shape}")
        want = (kv.shape[0], kv.shape[1], kv.shape[4])
        for name, a in (("kmin", self.kmin), ("kmax", self.kmax)):
            if a.dtype != np.uint16 or a.shape != want:
                raise HybridAttentionError(f"{name} must be uint16 {list(want)}; got {a.dtype} {a.shape}")


@dataclass(frozen=True, slots=True)
class HybridOptions:
    num_layers: int = field(metadata={"doc": "decoder layers (one cache partition and predictor state each)"})
    cpu_threads: int = field(default=1, metadata={"doc": "threads of the Cython path"})
    device: Device = field(default="auto", metadata={"doc": "auto | cpu | gpu | emulated (see the module doc)"})
    static_cpu_fraction: float | None = field(default=None, metadata={
        "doc": "fixed_hybrid's CPU share of the blocks; None: from the cost model's rates, once"})
    admit_limit: int | None = field(default=None, metadata={"doc": "cache copy-ins per layer call; None: no limit"})
    cuda_graphs: bool = field(default=True, metadata={
        "doc": "GPU path: replay each layer's launches as CUDA graphs (False: launch eagerly, for debugging)"})
    refresh_steps: int = field(default=8, metadata={
        "doc": "GPU path: steps between a layer's demand measurements (the predictor's top-p pass)"})
    policy: PolicyOptions = field(default_factory=PolicyOptions, metadata={"doc": "predictor/selector knobs"})
    record_selection: bool = field(default=False, metadata={
        "doc": "keep each layer's selection on the hook (hook.selections: layer -> (indptr, blocks)); "
               "on a GPU a read-back per layer: for the quality harness"})

    def __post_init__(self) -> None:
        if self.num_layers < 1 or self.cpu_threads < 1 or self.refresh_steps < 1:
            raise HybridAttentionError(f"HybridOptions.num_layers, .cpu_threads and .refresh_steps must be >= 1; "
                                       f"got {self.num_layers}, {self.cpu_threads}, {self.refresh_steps}")
        if self.device not in ("auto", "cpu", "gpu", "emulated"):
            raise HybridAttentionError(f"HybridOptions.device {self.device!r}; allowed: auto, cpu, gpu, emulated")


def _resolve_device(device: Device) -> Literal["cpu", "gpu", "emulated"]:
    if device in ("cpu", "emulated"):
        return device
    from fluxion_dist.kernels.device import gpu_unavailable_reason

    reason = gpu_unavailable_reason()
    if reason is None:
        return "gpu"
    if device == "gpu":
        raise HybridAttentionError(f"HybridOptions.device='gpu' but no GPU runs here: {reason}")
    return "cpu"


def _bits_to_float(bits: np.ndarray) -> np.ndarray:
    return from_bf16_bits(bits).reshape(bits.shape)


def _float_to_bits(x: np.ndarray) -> np.ndarray:
    # the values are bf16-exact (min/max of bf16 inputs), so truncation is exact
    return (np.ascontiguousarray(x, np.float32).view(np.uint32) >> 16).astype(np.uint16)


class HybridAttention:
    """The persistent operator: cost model, cache, predictor state. ``step(batch)`` gives the hook."""

    def __init__(self, arena: HostArena, config: SparseConfig, cost: CostModel, options: HybridOptions) -> None:
        if config.policy not in _EXECUTION:
            raise HybridAttentionError(f"SparseConfig.policy {config.policy!r}; allowed: {sorted(_EXECUTION)}")
        if cost.head_dim != arena.kv_pages.shape[4]:
            raise HybridAttentionError(f"cost model is for head_dim {cost.head_dim}; arena has "
                                       f"{arena.kv_pages.shape[4]}")
        self.arena, self.config, self.options = arena, config, options
        self.device = _resolve_device(options.device)
        mode, use_cache = _EXECUTION[config.policy]
        if self.device == "cpu":
            # no GPU: the GPU share is forced to zero, the CPU executes every block
            cost = CostModel(cost.head_dim, cost.cpu_bytes_per_s, cpu_overhead_s=cost.cpu_overhead_s)
            mode, use_cache = "cpu_only", False
        elif not cost.has_gpu:
            raise HybridAttentionError(f"device {self.device!r} needs a cost model with GPU rates")
        self.cost, self.mode = cost, mode
        self.static_cpu_fraction = (options.static_cpu_fraction if options.static_cpu_fraction is not None
                                    else cost.cpu_bytes_per_s / (cost.cpu_bytes_per_s + cost.uva_bytes_per_s))
        num_pages, hkv = arena.kv_pages.shape[:2]
        slots_per_layer = config.gpu_cache_blocks // options.num_layers if use_cache else 0
        self.cache: BlockCacheTable | None = None
        self.gpu: GpuPath | None = None
        self.use_cache = use_cache
        if self.device == "gpu":
            from fluxion_dist.hybrid.device_hook import DevicePathState
            from fluxion_dist.hybrid.device_pipeline import DevicePipeline

            self.pipeline = DevicePipeline(
                arena.kv_pages, arena.kmin, arena.kmax, num_layers=options.num_layers,
                cache_slots=config.gpu_cache_blocks if use_cache else 0, cpu_threads=options.cpu_threads,
                mass_target=config.mass_target, sink_blocks=num_blocks(config.sink_tokens),
                recent_blocks=num_blocks(config.recent_tokens) + 1, use_graphs=options.cuda_graphs)
            self.device_state = DevicePathState(self.pipeline, cost)
        elif self.device == "emulated":
            total_slots = slots_per_layer * options.num_layers
            self.gpu = EmulatedGpuPath(arena.kv_pages, total_slots, num_threads=options.cpu_threads)
            if use_cache and slots_per_layer > 0:
                self.cache = BlockCacheTable(num_pages, hkv, slots_per_layer, num_partitions=options.num_layers,
                                             admit_limit=options.admit_limit)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fluxion-cpu-attn")
        self._states: dict[tuple[str, int], HeadFeatures] = {}
        self._known: set[str] = set()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.pipeline = None  # the device pool and metadata mirror go back to CuPy's pool

    def release(self, request_id: str, pages: Sequence[int] = ()) -> None:
        """A request left: forget its predictor state and drop its pages from the cache."""
        self._known.discard(request_id)
        for key in [k for k in self._states if k[0] == request_id]:
            del self._states[key]
        if self.device == "gpu":
            self.device_state.forget(request_id)
        self._forget_pages(np.asarray(pages, dtype=np.int64))

    def _forget_pages(self, pages: np.ndarray) -> None:
        if self.cache is not None and pages.size:
            self.cache.invalidate_pages(pages)
        if self.device == "gpu" and self.pipeline is not None:
            self.pipeline.invalidate(pages)

    def step(self, batch: Sequence[PagedSequenceView], request_ids: Sequence[str],
             sparse: Sequence[RequestSparse | None] | None = None):
        """The ``AttentionHook`` for one decode step of ``batch`` (the caller bumps ``seq_len`` after).

        ``sparse``: per sequence, its own policy and budget (``policy.resolve_request_sparse``),
        or None for the deployment's."""
        if len(batch) != len(request_ids) or not batch:
            raise HybridAttentionError(f"need one request id per sequence and a non-empty batch; got "
                                       f"{len(batch)} sequences and {len(request_ids)} ids")
        overrides = [None] * len(batch) if sparse is None else list(sparse)
        if len(overrides) != len(batch):
            raise HybridAttentionError(f"need one sparse setting (or None) per sequence; got {len(overrides)} "
                                       f"for {len(batch)}")
        for rid, seq in zip(request_ids, batch):
            if rid not in self._known:
                # a new request may own recycled pages: whatever the cache holds of them is stale
                self._known.add(rid)
                pages = np.asarray([p for layer in seq.block_tables for p in layer], dtype=np.int64)
                self._forget_pages(pages)
                if self.device == "gpu":
                    # the device metadata mirror learns the prefill's blocks
                    self.pipeline.load_metadata(pages, self.arena.kmin[pages], self.arena.kmax[pages])
        if self.device == "gpu":
            from fluxion_dist.hybrid.device_hook import DeviceStepHook

            return DeviceStepHook(self, list(batch), list(request_ids), overrides)
        return StepHook(self, list(batch), list(request_ids), overrides)

    def check_hook_args(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bsz: int) -> None:
        hkv, d = self.arena.kv_pages.shape[1], self.arena.kv_pages.shape[4]
        if q.ndim != 3 or q.shape[0] != bsz or q.shape[2] != d or q.shape[1] % hkv:
            raise HybridAttentionError(f"q must be [B={bsz}, Hq (a multiple of {hkv}), d={d}]; got {tuple(q.shape)}")
        if k.shape != (bsz, hkv, d) or v.shape != k.shape:
            raise HybridAttentionError(f"k_new, v_new must be [{bsz}, {hkv}, {d}]; got {tuple(k.shape)}, {tuple(v.shape)}")
        if not 0 <= layer < self.options.num_layers:
            raise HybridAttentionError(f"layer {layer} is outside [0, {self.options.num_layers})")

    def _append(self, pages: np.ndarray, offs: np.ndarray, k: np.ndarray, v: np.ndarray) -> None:
        """Write token ``offs[b]`` of page ``pages[b]`` (bits ``k, v [B, Hkv, d]``) and widen its box."""
        a = self.arena
        a.kv_pages[pages, :, 0, offs] = k
        a.kv_pages[pages, :, 1, offs] = v
        first = offs == 0
        kf = _bits_to_float(k)
        lo = np.where(first[:, None, None], kf, np.minimum(_bits_to_float(a.kmin[pages]), kf))
        hi = np.where(first[:, None, None], kf, np.maximum(_bits_to_float(a.kmax[pages]), kf))
        a.kmin[pages] = _float_to_bits(lo)
        a.kmax[pages] = _float_to_bits(hi)
        if self.cache is not None:
            self.cache.on_append(pages)

    def _cpu_partial(self, inputs: LayerInputs, sel) -> BatchPartial:
        return sparse_partial_attention(inputs.q, self.arena.kv_pages, inputs.block_tables, inputs.seq_lens,
                                        sel.sel_indptr, sel.sel_blocks, inputs.scale,
                                        num_threads=self.options.cpu_threads, sel_masks=sel.sel_masks)


class StepHook:
    """``attend(layer, q [B,Hq,d], k_new [B,Hkv,d], v_new [B,Hkv,d]) -> [B,Hq,d]`` for one step."""

    def __init__(self, op: HybridAttention, batch: list[PagedSequenceView], request_ids: list[str],
                 overrides: list[RequestSparse | None]) -> None:
        self.op, self.batch, self.request_ids = op, batch, request_ids
        self.configs = [_request_config(op.config, o) for o in overrides]
        self._reports: list[LayerReport] = []
        self._used: list[np.ndarray] = []  # per layer: [B] budget used per request
        self.selections: dict[int, tuple[np.ndarray, np.ndarray]] = {}

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
        nbs = [num_blocks(int(t)) for t in seq_lens]
        tables = np.zeros((bsz, max(nbs)), dtype=np.int32)
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
        inputs = LayerInputs(qf, tables, seq_lens, scale)
        selection, budget = self._select(layer, qf, tables, seq_lens)
        if op.options.record_selection:
            self.selections[layer] = (selection.sel_indptr.copy(), selection.sel_blocks.copy())

        plan: CachePlan | None = None
        if op.cache is not None and op.gpu is not None:
            plan = self._plan_cache(layer, selection, tables, seq_lens)
            op.gpu.copy_in(layer, plan)
        split = split_layer(selection, op.cost, mode=op.mode, cached_slot=None if plan is None else plan.slots,
                            copies=0 if plan is None else int(plan.copy_slots.size),
                            static_cpu_fraction=op.static_cpu_fraction)

        cpu: Future[BatchPartial] | None = None
        if split.cpu.sel_blocks.size:
            cpu = op._pool.submit(op._cpu_partial, inputs, split.cpu)
        if op.gpu is not None:
            handle = op.gpu.launch(layer, inputs, split.gpu, split.gpu_slot)
            merged = op.gpu.finish(handle, cpu)
            out, busy = merged.out, merged.gpu_busy_s
        else:
            if cpu is None:
                raise HybridAttentionError(f"layer {layer}: the selection is empty")
            out, busy = merge_batch_partials([cpu.result()]), None
        wall = time.perf_counter() - t0
        self._reports.append(LayerReport(
            layer, budget, split.cpu_blocks, split.gpu_cached_blocks, split.gpu_uva_blocks,
            0 if plan is None else int(plan.copy_slots.size), 0 if plan is None else plan.evicted,
            split.cpu_s, split.gpu_s, wall, busy))
        return torch.from_numpy(out).to(device=q.device, dtype=q.dtype)

    def _select(self, layer: int, qf: np.ndarray, tables: np.ndarray, seq_lens: np.ndarray):
        op = self.op
        parts, used = [], []
        for b, rid in enumerate(self.request_ids):
            t = int(seq_lens[b])
            pages = tables[b, :num_blocks(t)]
            pyramid = build_pyramid(_bits_to_float(op.arena.kmin[pages]), _bits_to_float(op.arena.kmax[pages]), t)
            dec = decide(qf[b], pyramid, self.configs[b], state=op._states.get((rid, layer)),
                         options=op.options.policy)
            if dec.state is not None:
                op._states[(rid, layer)] = dec.state
            parts.append(dec.selection)
            used.append(dec.budget_used)
        self._used.append(np.array([u.mean() for u in used]))
        return concat_selections(parts), float(np.mean(np.concatenate(used)))

    def _plan_cache(self, layer: int, selection, tables: np.ndarray, seq_lens: np.ndarray) -> CachePlan:
        op = self.op
        hkv = selection.num_kv_heads
        rows = np.repeat(np.arange(selection.num_rows), selection.blocks_per_row())
        req = rows // hkv
        blk = selection.sel_blocks.astype(np.int64)
        pinned = np.zeros(blk.size, dtype=bool)
        for b in range(len(self.batch)):
            keep = forced_blocks(int(seq_lens[b]), op.config.sink_tokens, op.config.recent_tokens)
            mine = req == b
            pinned[mine] = keep[blk[mine]]
        full = (blk + 1) * BLOCK_TOKENS <= seq_lens[req]  # the last, partial block is never cached
        return op.cache.plan(layer, tables[req, blk], rows % hkv, cacheable=full, pinned=pinned,
                             score=np.zeros(blk.size))


def _request_config(config: SparseConfig, own: RequestSparse | None) -> SparseConfig:
    """The deployment's config as one request sees it: its own policy (full) or budget."""
    if own is None:
        return config
    if own.policy == "full":
        return replace(config, policy="full", budget=1.0)
    return replace(config, budget=own.budget)


def _bits(x: torch.Tensor) -> np.ndarray:
    return x.detach().to(torch.bfloat16).cpu().contiguous().view(torch.int16).numpy().view(np.uint16)
