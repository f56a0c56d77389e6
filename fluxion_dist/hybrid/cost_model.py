"""How long a share of sparse attention takes on each path: rates measured at start-up.

The scheduler balances the CPU path against the GPU path with these numbers, so they
are measured on the machine that runs the step, never assumed:

- ``cpu_bytes_per_s``: the Cython kernel over host KV (all its threads), bytes of
  (block, head) K+V runs read per second, on the persistent team the operator runs it on
  (``cpu.team.AttentionTeam``: bound once per step, so its per-layer fixed cost is what the
  split rule must see);
- ``uva_bytes_per_s``: the GPU attention kernel reading host pages through UVA;
- ``cached_bytes_per_s``: the same kernel over GPU block-cache slots (HBM);
- ``copy_bytes_per_s``: the cache's asynchronous copy-in (it shares PCIe with UVA reads);
- fixed costs per call on each side (thread start / kernel launches and the merge).

:func:`observe_cpu` moves the CPU rate toward what the step's own calls measure.

Decode attention is memory bound (one query row per KV head and group), so one rate
per path in bytes is the model: a block costs ``block_bytes / rate`` whatever its row.
With no GPU the GPU rates are 0 and ``has_gpu`` is False: every block goes to the CPU.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import numpy as np

from fluxion_dist.attention.layout import BLOCK_TOKENS
from fluxion_dist.errors import FluxionError


class CostModelError(FluxionError, ValueError):
    """A rate or a fixed cost is out of range; the message names the field."""


@dataclass(frozen=True, slots=True)
class CostModel:
    head_dim: int = field(metadata={"doc": "d of the KV the rates were measured on"})
    cpu_bytes_per_s: float = field(metadata={"doc": "Cython kernel over host KV, all threads"})
    uva_bytes_per_s: float = field(default=0.0, metadata={"doc": "GPU kernel over host pages (UVA); 0: no GPU"})
    cached_bytes_per_s: float = field(default=0.0, metadata={"doc": "GPU kernel over cache slots; 0: no GPU"})
    copy_bytes_per_s: float = field(default=0.0, metadata={"doc": "cache copy-in over PCIe; 0: no GPU"})
    cpu_overhead_s: float = field(default=20e-6, metadata={"doc": "fixed cost of one CPU call"})
    gpu_overhead_s: float = field(default=20e-6, metadata={"doc": "fixed cost of the GPU launches of a layer"})

    def __post_init__(self) -> None:
        if self.head_dim < 1:
            raise CostModelError(f"CostModel.head_dim must be >= 1; got {self.head_dim}")
        if not self.cpu_bytes_per_s > 0:
            raise CostModelError(f"CostModel.cpu_bytes_per_s must be > 0; got {self.cpu_bytes_per_s}")
        for name, value in (("uva_bytes_per_s", self.uva_bytes_per_s),
                            ("cached_bytes_per_s", self.cached_bytes_per_s),
                            ("copy_bytes_per_s", self.copy_bytes_per_s),
                            ("cpu_overhead_s", self.cpu_overhead_s), ("gpu_overhead_s", self.gpu_overhead_s)):
            if not (value >= 0 and math.isfinite(value)):
                raise CostModelError(f"CostModel.{name} must be finite and >= 0; got {value}")
        gpu = (self.uva_bytes_per_s > 0, self.cached_bytes_per_s > 0)
        if gpu[0] != gpu[1]:
            raise CostModelError("CostModel: uva_bytes_per_s and cached_bytes_per_s are both > 0 (GPU) "
                                 f"or both 0 (no GPU); got {self.uva_bytes_per_s}, {self.cached_bytes_per_s}")

    @property
    def has_gpu(self) -> bool:
        return self.uva_bytes_per_s > 0

    @property
    def block_bytes(self) -> int:
        """Bytes of one (block, head): K and V, 16 tokens, bf16."""
        return 2 * BLOCK_TOKENS * self.head_dim * 2

    @property
    def cpu_block_s(self) -> float:
        return self.block_bytes / self.cpu_bytes_per_s

    @property
    def uva_block_s(self) -> float:
        return self.block_bytes / self.uva_bytes_per_s if self.has_gpu else math.inf

    @property
    def cached_block_s(self) -> float:
        return self.block_bytes / self.cached_bytes_per_s if self.has_gpu else math.inf

    @property
    def copy_block_s(self) -> float:
        return self.block_bytes / self.copy_bytes_per_s if self.copy_bytes_per_s > 0 else math.inf

    def cpu_time(self, blocks: int) -> float:
        return self.cpu_overhead_s + blocks * self.cpu_block_s if blocks else 0.0

    def gpu_time(self, cached: int, uva: int, copies: int = 0) -> float:
        """Predicted GPU-side time: launches, cached and UVA blocks, and copy-ins sharing PCIe."""
        if not (cached or uva):
            return copies * self.copy_block_s if copies else 0.0
        copy = copies * self.copy_block_s if copies else 0.0
        return self.gpu_overhead_s + cached * self.cached_block_s + uva * self.uva_block_s + copy

    @classmethod
    def cpu_only(cls, head_dim: int, cpu_gb_per_s: float, *, cpu_overhead_s: float = 20e-6) -> "CostModel":
        """A model with no GPU (tests, CPU-only machines)."""
        return cls(head_dim, cpu_gb_per_s * 1e9, cpu_overhead_s=cpu_overhead_s)

    @classmethod
    def from_rates(cls, head_dim: int, *, cpu_gb_per_s: float, uva_gb_per_s: float, cached_gb_per_s: float,
                   copy_gb_per_s: float | None = None, cpu_overhead_s: float = 20e-6,
                   gpu_overhead_s: float = 20e-6) -> "CostModel":
        """Given numbers (tests, or rates recorded on the GPU machine); copy defaults to the UVA rate."""
        copy = uva_gb_per_s if copy_gb_per_s is None else copy_gb_per_s
        return cls(head_dim, cpu_gb_per_s * 1e9, uva_gb_per_s * 1e9, cached_gb_per_s * 1e9, copy * 1e9,
                   cpu_overhead_s, gpu_overhead_s)


# A call's blocks below this tell the fixed cost, not the rate
OBSERVE_MIN_BLOCKS = 64


def observe_cpu(cost: CostModel, blocks: int, seconds: float, weight: float = 0.25) -> CostModel:
    """``cost`` with its CPU rate moved a ``weight`` of the way (in seconds per block) toward
    one measured call's: ``blocks`` (block, head) runs in ``seconds`` of host time.

    The start-up rate is measured alone, on a small arena; in a step the CPU reads blocks
    scattered over the whole arena while the GPU's UVA reads share the host's memory, so the
    rate the split must use is the one the step's own calls show. Calls too small to show
    a rate, or faster than the fixed cost, leave the model as it is."""
    if blocks < OBSERVE_MIN_BLOCKS or not seconds > cost.cpu_overhead_s or not 0.0 < weight <= 1.0:
        return cost
    block_s = (seconds - cost.cpu_overhead_s) / blocks
    block_s = (1.0 - weight) * cost.cpu_block_s + weight * block_s
    return replace(cost, cpu_bytes_per_s=cost.block_bytes / block_s)


def _best_of(fn, repeats: int) -> float:
    fn()  # warm: page faults, thread pool start, kernel compile
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_cpu(head_dim: int, num_kv_heads: int, group: int, *, num_threads: int,
                blocks_per_row: int = 512, repeats: int = 3, seed: int = 0) -> tuple[float, float]:
    """``(bytes_per_s, overhead_s)`` of the Cython kernel on an ``AttentionTeam`` of
    ``num_threads``, as the operator calls it (bound once, one ``attend`` per layer): a
    one-block call for the fixed cost, a ``blocks_per_row`` call for the rate.

    A few MiB of random KV (bigger than the caches of the small machines; the GPU host's
    rate is bandwidth-bound long before this size matters). ``blocks_per_row`` sets it.
    """
    from fluxion_dist.cpu.synthetic_arena import random_bf16_bits
    from fluxion_dist.cpu.team import AttentionTeam

    rng = np.random.default_rng(seed)
    nb = blocks_per_row
    pages = random_bf16_bits(rng, (nb, num_kv_heads, 2, BLOCK_TOKENS, head_dim))
    q = rng.standard_normal((1, num_kv_heads * group, head_dim)).astype(np.float32)
    table = np.arange(nb, dtype=np.int32)[None]
    lens = np.array([nb * BLOCK_TOKENS], dtype=np.int32)
    block_bytes = 2 * BLOCK_TOKENS * head_dim * 2

    def run(team: AttentionTeam, n: int) -> float:
        indptr = (np.arange(num_kv_heads + 1) * n).astype(np.int32)
        blocks = np.tile(np.arange(n, dtype=np.int32), num_kv_heads)
        return _best_of(lambda: team.attend(q, table, indptr, blocks), repeats)

    # the fixed cost from one block per row, the rate from the big run net of it; on a busy
    # machine a two-point slope can come out negative, this cannot
    with AttentionTeam(num_threads) as team:
        team.bind(pages, lens, q.shape[1], 1.0 / math.sqrt(head_dim))
        t_tiny, t_big = run(team, 1), run(team, nb)
    overhead = min(t_tiny, 0.5 * t_big)
    return nb * num_kv_heads * block_bytes / (t_big - overhead), overhead


def calibrate(head_dim: int, num_kv_heads: int, group: int, *, num_threads: int,
              gpu: bool = True, blocks_per_row: int = 512) -> CostModel:
    """Measure the CPU rate here and, where a GPU runs kernels and ``gpu`` is set, the GPU rates."""
    cpu_rate, cpu_over = measure_cpu(head_dim, num_kv_heads, group, num_threads=num_threads,
                                     blocks_per_row=blocks_per_row)
    from fluxion_dist.kernels.device import gpu_unavailable_reason

    if not gpu or gpu_unavailable_reason() is not None:
        return CostModel(head_dim, cpu_rate, cpu_overhead_s=cpu_over)
    from fluxion_dist.hybrid.gpu_calibration import measure_gpu

    rates = measure_gpu(head_dim, num_kv_heads, group)
    return CostModel(head_dim, cpu_rate, rates.uva_bytes_per_s, rates.cached_bytes_per_s,
                     rates.copy_bytes_per_s, cpu_over, rates.overhead_s)
