"""What one decode step of the hybrid operator did, per layer: blocks per device, cache
traffic, predicted and measured times (both the host-selection and the GPU paths report it)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class LayerReport:
    layer: int
    budget_used: float  # mean over (request, KV head) rows of selected blocks / blocks in the context
    cpu_blocks: int
    gpu_cached_blocks: int
    gpu_uva_blocks: int
    cache_copies: int
    cache_evictions: int
    predicted_cpu_s: float
    predicted_gpu_s: float
    wall_s: float  # from selection to the merged output
    gpu_busy_s: float | None  # measured (CUDA events) on a GPU, else None
    measured_cpu_s: float | None = None  # host time of the CPU share's call; None: no CPU share

    @property
    def predicted_gpu_idle_s(self) -> float:
        return max(self.predicted_cpu_s - self.predicted_gpu_s, 0.0) if self.predicted_gpu_s > 0 else 0.0


@dataclass(frozen=True, slots=True)
class StepReport:
    layers: tuple[LayerReport, ...]
    # GPU timeline from the first layer's work to the last's (CUDA events); None: not measured.
    # The GPU path queues layers without waiting, so its host wall per layer says nothing of
    # the GPU's gaps: this does.
    gpu_span_s: float | None = None
    # per request of the batch: the fraction of its KV read this step, averaged over layers and KV heads
    budget_per_request: tuple[float, ...] = ()
    whole_step: bool = False  # every layer replayed inside segment graphs (hybrid.step_graph): none timed apart

    def _sum(self, values) -> float:
        return float(sum(values))

    @property
    def budget_used(self) -> float:
        return float(np.mean([r.budget_used for r in self.layers])) if self.layers else 0.0

    @property
    def cpu_blocks(self) -> int:
        return sum(r.cpu_blocks for r in self.layers)

    @property
    def gpu_blocks(self) -> int:
        return sum(r.gpu_cached_blocks + r.gpu_uva_blocks for r in self.layers)

    @property
    def gpu_cached_blocks(self) -> int:
        return sum(r.gpu_cached_blocks for r in self.layers)

    @property
    def predicted_gpu_idle_fraction(self) -> float:
        """Of the predicted attention time, the share the GPU waits for the CPU (0 with no GPU work)."""
        total = self._sum(max(r.predicted_cpu_s, r.predicted_gpu_s) for r in self.layers)
        busy = self._sum(r.predicted_gpu_s for r in self.layers)
        return 0.0 if busy == 0 or total == 0 else 1.0 - busy / total

    @property
    def predicted_cpu_s(self) -> float:
        return self._sum(r.predicted_cpu_s for r in self.layers)

    @property
    def measured_cpu_s(self) -> float:
        return self._sum(r.measured_cpu_s or 0.0 for r in self.layers)

    @property
    def gpu_busy_s(self) -> float | None:
        """GPU work of the step (CUDA events around each layer's kernels); None without a GPU."""
        if not self.layers or any(r.gpu_busy_s is None for r in self.layers):
            return None
        return self._sum(r.gpu_busy_s for r in self.layers)

    @property
    def measured_gpu_idle_fraction(self) -> float | None:
        """1 - GPU work / (the GPU span, else the layers' summed wall time); None without a GPU."""
        busy = self.gpu_busy_s
        if busy is None:
            return None
        wall = self.gpu_span_s if self.gpu_span_s is not None else self._sum(r.wall_s for r in self.layers)
        return max(0.0, 1.0 - busy / wall) if wall > 0 else None
