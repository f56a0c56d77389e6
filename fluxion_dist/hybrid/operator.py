"""HybridAttention: Fluxion's decode attention over the host KV arena, CPU and GPU together.

One policy (``fluxion_dist.policy``) on both backends. At a step's start the hook plans every
layer at once (``step_plan.plan_step``): blocks per (layer, request, KV head) row, the budget
being the average over the step's layers and heads (pooled per request for fluxion, a fixed
share otherwise, every block for full or a request asking for it).

Life of one layer of one decode step (the model's ``attend`` hook):

1. append: the new token's K/V (bf16) go into its slot of each sequence's last page in the
   host arena, and that page's Quest min/max are widened (the hook contract: the cache holds
   the new token before attention);
2. score: Quest upper bounds of every block, the max over each KV head's query heads;
3. demand (fluxion, on a refresh: ``step_plan.measures``): a top-p pass at the mass target;
   each row's far demand (the set's blocks outside the sinks and window) is kept per
   (request, layer) for the next steps' plans;
4. select: sinks and the recent window forced first, then top-k per row at the planned count
   (CSR of logical blocks, ascending); fluxion with ``rescore_factor`` c: top-k takes
   ``ceil(c x k)`` candidates, and of those the k with the most exact mass (``policy.select``);
   on the CPU, fluxion with ``token_refine_factor`` c: of ``ceil(c x k)`` candidates the
   ``16 k`` tokens with the highest exact scores, as per-block token masks (sinks and window
   whole);
5. attend: the partial attention over the selected blocks (tokens), merged exactly into
   ``[B, Hq, d]``.

**On the CPU** (``device="cpu"``, or ``"auto"`` where ``kernels.device.gpu_unavailable_reason()``
is not None) ``host_hook.StepHook`` runs it: the Cython functions of ``cpu.selection`` for 2-4 (forcing
and the demand count from ``policy.select``) and the Cython attention over every selected
block, all on the operator's persistent ``cpu.team.AttentionTeam`` (``cpu_threads`` threads
for the operator's life, bound once per step: a layer call pays a few microseconds before it
reads KV, not an OpenMP region's start and the per-call checks). On a GPU the pipeline's CPU share
runs on the same team (one caller thread: the model's, which runs the layers in turn).
**On a GPU** (``device="gpu"``) ``device_hook.DeviceStepHook`` over
``device_pipeline.DevicePipeline`` runs the same stages as kernels, replayed as CUDA graphs,
with a block cache and the routing of each block to the cache, UVA reads or the CPU; its
NumPy twin is ``policy.select``. Both select in 16-token blocks, the unit of the arena.

Policies (``SparseConfig.policy``; ``policy.names``):

=============  ==========================  ==============================  =====
policy         which blocks                where (on a GPU)                cache
=============  ==========================  ==============================  =====
full           all                         balanced split                  no
quest_gpu      fixed share (Quest top-k)   GPU, UVA reads only             no
cpu_only       fixed share                 CPU only                        no
fixed_hybrid   fixed share                 static split (fraction fixed    no
                                           once from the rates)
fluxion        pooled budgets by demand    balanced split                  yes
=============  ==========================  ==============================  =====

On the CPU every policy computes all its blocks there. A request may carry its own policy
(full) or budget (``policy.request.RequestSparse``, ``step(..., sparse=)``).

Each step reports, per layer: the budget used, the blocks on each device, the cache's hits
and copies, and the GPU's idle time (predicted by the cost model; measured with CUDA events
on a GPU); per request, the fraction of its KV read (``StepReport.budget_per_request``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol, Sequence

import numpy as np
import torch

from fluxion_dist.attention.layout import BLOCK_TOKENS, from_bf16_bits
from fluxion_dist.config.schema import SparseConfig
from fluxion_dist.cpu.team import AttentionTeam
from fluxion_dist.errors import FluxionError
from fluxion_dist.hybrid.cost_model import CostModel
from fluxion_dist.hybrid.step_plan import KeptBlocks, demand_mass
from fluxion_dist.policy.names import TRAITS
from fluxion_dist.policy.request import RequestSparse

Device = Literal["auto", "cpu", "gpu"]


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
    num_layers: int = field(metadata={"doc": "decoder layers (one cache partition and demand state each)"})
    cpu_threads: int = field(default=1, metadata={"doc": "threads of the Cython path"})
    device: Device = field(default="auto", metadata={"doc": "auto | cpu | gpu (see the module doc)"})
    static_cpu_fraction: float | None = field(default=None, metadata={
        "doc": "fixed_hybrid's CPU share of the blocks; None: from the cost model's rates, once"})
    cuda_graphs: bool = field(default=True, metadata={
        "doc": "GPU path: replay each layer's launches as CUDA graphs (False: launch eagerly, for debugging)"})
    refresh_steps: int = field(default=8, metadata={
        "doc": "steps between a layer's demand measurements (fluxion's top-p pass), staggered over layers"})
    record_selection: bool = field(default=False, metadata={
        "doc": "keep each layer's selection on the hook (hook.selections: layer -> (indptr, blocks)); "
               "on a GPU a read-back per layer: for the quality harness"})

    def __post_init__(self) -> None:
        if self.num_layers < 1 or self.cpu_threads < 1 or self.refresh_steps < 1:
            raise HybridAttentionError(f"HybridOptions.num_layers, .cpu_threads and .refresh_steps must be >= 1; "
                                       f"got {self.num_layers}, {self.cpu_threads}, {self.refresh_steps}")
        if self.device not in ("auto", "cpu", "gpu"):
            raise HybridAttentionError(f"HybridOptions.device {self.device!r}; allowed: auto, cpu, gpu")


def _resolve_device(device: Device) -> Literal["cpu", "gpu"]:
    if device == "cpu":
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
    """The persistent operator: cost model, demand state, (on a GPU) the device pipeline.
    ``step(batch, request_ids)`` gives the step's hook."""

    def __init__(self, arena: HostArena, config: SparseConfig, cost: CostModel, options: HybridOptions) -> None:
        if config.policy not in TRAITS:
            raise HybridAttentionError(f"SparseConfig.policy {config.policy!r}; allowed: {', '.join(TRAITS)}")
        if cost.head_dim != arena.kv_pages.shape[4]:
            raise HybridAttentionError(f"cost model is for head_dim {cost.head_dim}; arena has "
                                       f"{arena.kv_pages.shape[4]}")
        self.arena, self.config, self.options = arena, config, options
        self.device = _resolve_device(options.device)
        if self.device == "gpu" and config.token_refine_factor > 0:
            raise HybridAttentionError(
                f"sparse.token_refine_factor={config.token_refine_factor:g} runs on the CPU path only (operator "
                f"device 'cpu'); the GPU pipeline selects whole blocks: set it to 0 there")
        self.kept = KeptBlocks.from_config(config)
        policy = TRAITS[config.policy]
        mode, use_cache = policy.execution, policy.uses_cache
        if self.device == "cpu":
            # no GPU: the CPU executes every block
            cost = CostModel(cost.head_dim, cost.cpu_bytes_per_s, cpu_overhead_s=cost.cpu_overhead_s)
            mode, use_cache = "cpu_only", False
        elif not cost.has_gpu:
            raise HybridAttentionError(f"device {self.device!r} needs a cost model with GPU rates")
        self.cost, self.mode, self.use_cache = cost, mode, use_cache
        self.static_cpu_fraction = (options.static_cpu_fraction if options.static_cpu_fraction is not None
                                    else cost.cpu_bytes_per_s / (cost.cpu_bytes_per_s + cost.uva_bytes_per_s))
        # per (request, layer): far demand [Hkv] of the last top-p pass (the CPU path's; the
        # GPU path keeps its own in device_state, learnt from the device)
        self.demand: dict[tuple[str, int], np.ndarray] = {}
        self.steps = 0
        self.pipeline = None
        self.team = AttentionTeam(options.cpu_threads)
        if self.device == "gpu":
            from fluxion_dist.hybrid.device_hook import DevicePathState
            from fluxion_dist.hybrid.device_pipeline import DevicePipeline

            self.pipeline = DevicePipeline(
                arena.kv_pages, arena.kmin, arena.kmax, num_layers=options.num_layers,
                cache_slots=config.gpu_cache_blocks if use_cache else 0, cpu_team=self.team,
                mass_target=demand_mass(config), sink_blocks=self.kept.sink_blocks,
                recent_blocks=self.kept.recent_blocks, use_graphs=options.cuda_graphs,
                reuse_window=config.cache_reuse_window if config.cache_admission == "reused" else 0)
            self.device_state = DevicePathState(self.pipeline, cost)
        self._known: set[str] = set()

    @property
    def num_kv_heads(self) -> int:
        return self.arena.kv_pages.shape[1]

    def close(self) -> None:
        self.pipeline = None  # the device pool and metadata mirror go back to CuPy's pool
        self.team.close()  # joins the CPU threads; a later step's attention raises

    def release(self, request_id: str, pages: Sequence[int] = ()) -> None:
        """A request left: forget its demand and drop its pages from the cache."""
        self._known.discard(request_id)
        for key in [k for k in self.demand if k[0] == request_id]:
            del self.demand[key]
        if self.device == "gpu":
            self.device_state.forget(request_id)
        self._forget_pages(np.asarray(pages, dtype=np.int64))

    def _forget_pages(self, pages: np.ndarray) -> None:
        if self.pipeline is not None and pages.size:
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
        from fluxion_dist.hybrid.host_hook import StepHook

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
