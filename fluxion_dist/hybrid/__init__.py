"""The Fluxion hybrid decode-attention operator: CPU and GPU on one step, merged exactly.

One concept per module:

- ``cost_model``: :class:`CostModel` (rates per path, frozen), :func:`calibrate` (measured at
  start-up: Cython CPU rate here; UVA, cached and copy rates on a GPU), ``CostModel.from_rates``;
- ``scheduler``: :func:`split_layer` -> :class:`Split` (CPU CSR, GPU CSR + ``sel_slot``);
- ``block_cache``: :class:`BlockCacheTable` (AsyncTLS incremental cache bookkeeping) -> ``CachePlan``;
- ``gpu_path``: the GPU side's contract and its CPU stand-in ``EmulatedGpuPath`` (tests);
- ``device_budget``: the GPU path's host decisions (per-head budgets, CPU share), NumPy;
- ``device_pipeline`` / ``device_hook`` / ``gpu_calibration``: the GPU path on CuPy, everything
  up to the attention on the device (import only with a GPU);
- ``merge``: host-side exact merge of partials;
- ``step_report``: :class:`StepReport` / :class:`LayerReport`, what a step did per layer;
- ``operator``: :class:`HybridAttention` (persistent) and its per-step ``StepHook``, the
  model's ``attend`` hook.

Nothing here imports CuPy at module level.
"""

from fluxion_dist.hybrid.block_cache import BlockCacheError, BlockCacheTable, CachePlan
from fluxion_dist.hybrid.cost_model import CostModel, CostModelError, calibrate, measure_cpu
from fluxion_dist.hybrid.gpu_path import EmulatedGpuPath, GpuPath, LayerInputs, MergedLayer
from fluxion_dist.hybrid.merge import EmptyAttentionError, merge_batch_partials
from fluxion_dist.hybrid.operator import (HostArena, HybridAttention, HybridAttentionError, HybridOptions,
                                          PagedSequenceView, StepHook)
from fluxion_dist.hybrid.scheduler import SPLIT_MODES, Split, SplitMode, balanced_cpu_blocks, split_layer
from fluxion_dist.hybrid.step_report import LayerReport, StepReport

__all__ = [
    "BlockCacheError", "BlockCacheTable", "CachePlan", "CostModel", "CostModelError", "EmptyAttentionError",
    "EmulatedGpuPath", "GpuPath", "HostArena", "HybridAttention", "HybridAttentionError", "HybridOptions",
    "LayerInputs", "LayerReport", "MergedLayer", "PagedSequenceView", "SPLIT_MODES", "Split", "SplitMode",
    "StepHook", "StepReport", "balanced_cpu_blocks", "calibrate", "measure_cpu", "merge_batch_partials",
    "split_layer",
]
