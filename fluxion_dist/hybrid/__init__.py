"""The Fluxion hybrid decode-attention operator: CPU and GPU on one step, merged exactly.

One concept per module (the policy itself, plain functions, is ``fluxion_dist.policy``):

- ``cost_model``: :class:`CostModel` (rates per path, frozen), :func:`calibrate` (measured at
  start-up: Cython CPU rate here; UVA, cached and copy rates on a GPU), ``CostModel.from_rates``;
- ``step_plan``: what both backends decide once per step from the policy (rows' block
  counts over every layer, which layers measure demand);
- ``device_pipeline`` / ``device_hook`` / ``far_demand`` / ``gpu_calibration``: the GPU path on
  CuPy, everything up to the attention on the device (import only with a GPU);
- ``merge``: host-side exact merge of partials;
- ``step_report``: :class:`StepReport` / :class:`LayerReport`, what a step did per layer;
- ``operator``: :class:`HybridAttention` (persistent), whose ``step`` gives the model's
  ``attend`` hook: ``host_hook.StepHook`` on the CPU, ``device_hook.DeviceStepHook`` on a GPU;
- ``paged_builder``: an arena and paged sequences from dense K/V (tests, benchmarks).

Nothing here imports CuPy at module level.
"""

from fluxion_dist.hybrid.cost_model import CostModel, CostModelError, calibrate, measure_cpu
from fluxion_dist.hybrid.merge import EmptyAttentionError, merge_batch_partials
from fluxion_dist.hybrid.host_hook import StepHook
from fluxion_dist.hybrid.operator import (HostArena, HybridAttention, HybridAttentionError, HybridOptions,
                                          PagedSequenceView)
from fluxion_dist.hybrid.step_report import LayerReport, StepReport

__all__ = [
    "CostModel", "CostModelError", "EmptyAttentionError", "HostArena", "HybridAttention", "HybridAttentionError",
    "HybridOptions", "LayerReport", "PagedSequenceView", "StepHook", "StepReport", "calibrate", "measure_cpu",
    "merge_batch_partials",
]
