"""What both backends decide once per decode step, from the one policy: budgets and refreshes.

The CPU path (``host_hook.StepHook``) and the GPU path (``device_hook.DeviceStepHook``) take
their rows' block counts from :func:`plan_step` at the step's start, over every layer at once
(``policy.budget.pooled_row_budgets``: the budget is the average over the step's layers and
heads), and measure a layer's demand when :func:`measures` says so:

- ``all`` (full, or a request asking for full): every block; nothing measured;
- ``fixed``: every row the fixed share of its request's budget; nothing measured;
- ``fluxion``: pooled budgets from the demand known at the step's start (per request and
  layer, the far demand of the top-p pass at the mass target); a request not measured yet
  gets the fixed share. Under a quality target (``max_output_error``) every row reads its
  demand at ``1 - max_output_error`` instead, capped per request (``demand_row_budgets``).
  A layer measures every ``refresh_steps`` steps, staggered over the
  layers so a step refreshes only some of them, and on every step where a request of the
  batch has no demand for it yet; never where demand cannot move a block (floors at the
  full share without the head predictor: then fluxion reads Quest's share per row).

:func:`rescore_factor` says whether a layer's top-k is the rescoring stage's (fluxion with
``SparseConfig.rescore_factor``; ``policy.select`` step 5): candidates by Quest bound, kept
by exact mass. The fixed policies stay pure Quest: they are the baselines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from fluxion_dist.attention.layout import BLOCK_TOKENS, num_blocks
from fluxion_dist.config.schema import SparseConfig
from fluxion_dist.policy.budget import demand_row_budgets, pooled_row_budgets
from fluxion_dist.policy.names import traits
from fluxion_dist.policy.request import RequestSparse


@dataclass(frozen=True, slots=True)
class KeptBlocks:
    """The blocks every row reads: ``sink_blocks`` first ones, ``recent_blocks`` last ones."""

    sink_blocks: int
    recent_blocks: int

    @classmethod
    def from_config(cls, config: SparseConfig) -> "KeptBlocks":
        # one block more than the window's tokens need: the window is counted back from the
        # new token, so it may straddle one more block boundary
        return cls(num_blocks(config.sink_tokens), num_blocks(config.recent_tokens) + 1)


def request_budgets(config: SparseConfig, overrides: Sequence[RequestSparse | None]) -> np.ndarray:
    """``float64 [B]``: each request's average budget, 1.0 where it reads every block."""
    if traits(config.policy).selection == "all":
        return np.ones(len(overrides))
    return np.array([config.budget if o is None else 1.0 if o.policy == "full" else o.budget for o in overrides])


def demand_of(demand: dict[tuple[str, int], np.ndarray], request_ids: Sequence[str], num_layers: int,
              num_kv_heads: int) -> np.ndarray:
    """``int64 [L, B, Hkv]`` from the per (request, layer) store; -1 where nothing is known."""
    out = np.full((num_layers, len(request_ids), num_kv_heads), -1, dtype=np.int64)
    for b, rid in enumerate(request_ids):
        for layer in range(num_layers):
            d = demand.get((rid, layer))
            if d is not None:
                out[layer, b] = d
    return out


def demand_mass(config: SparseConfig) -> float:
    """The estimated mass a row's demand must hold: ``1 - max_output_error`` under a quality
    target, else ``mass_target``."""
    return 1.0 - config.max_output_error if config.max_output_error > 0 else config.mass_target


def plan_step(config: SparseConfig, kept: KeptBlocks, demand: np.ndarray | None, nb: np.ndarray,
              budgets: np.ndarray, num_layers: int, num_kv_heads: int) -> np.ndarray:
    """``int64 [L, B, Hkv]`` blocks per row for the step (kept blocks included)."""
    rule = traits(config.policy).selection
    if rule == "fluxion" and config.max_output_error > 0 and demand is not None:
        return demand_row_budgets(demand, nb, budgets, config.max_request_budget, sink_blocks=kept.sink_blocks,
                                  recent_blocks=kept.recent_blocks, floor_fraction=config.floor_fraction)
    return pooled_row_budgets(demand if rule == "fluxion" else None, nb, budgets, sink_blocks=kept.sink_blocks,
                              recent_blocks=kept.recent_blocks, floor_fraction=config.floor_fraction,
                              head_predictor=config.head_predictor, num_layers=num_layers,
                              num_kv_heads=num_kv_heads)


def demand_matters(config: SparseConfig) -> bool:
    """Whether demand can move a row's blocks: not with floors at the full share and no head
    predictor (every row then reads the fixed share, whatever it measures)."""
    return config.floor_fraction < 1.0 or config.head_predictor or config.max_output_error > 0


def measures(config: SparseConfig, budgets: np.ndarray, demand: np.ndarray | None, step: int, layer: int,
             refresh_steps: int) -> bool:
    """Whether the layer runs the top-p pass this step (``demand`` as :func:`demand_of` gives it)."""
    if traits(config.policy).selection != "fluxion" or np.all(budgets >= 1.0) or not demand_matters(config):
        return False
    return demand is None or bool(np.any(demand[layer] < 0)) or (step + layer) % refresh_steps == 0


def blocks_after_append(seq_lens_before: np.ndarray) -> np.ndarray:
    """Blocks per request once this step's token is in."""
    return (np.asarray(seq_lens_before, dtype=np.int64) + BLOCK_TOKENS) // BLOCK_TOKENS


def rescore_factor(config: SparseConfig, k_rows: np.ndarray, nb: np.ndarray) -> float:
    """The layer's rescoring factor, 0.0 for none: fluxion's ``rescore_factor`` where some row
    (``k_rows [B, Hkv]``, ``nb [B]``) has blocks left to choose from."""
    return _second_stage(config, config.rescore_factor, k_rows, nb)


def token_refine_factor(config: SparseConfig, k_rows: np.ndarray, nb: np.ndarray) -> float:
    """The same for the CPU path's block -> token refinement (``token_refine_factor``)."""
    return _second_stage(config, config.token_refine_factor, k_rows, nb)


def _second_stage(config: SparseConfig, factor: float, k_rows: np.ndarray, nb: np.ndarray) -> float:
    if traits(config.policy).selection != "fluxion" or factor <= 0:
        return 0.0
    return factor if bool(np.any(np.asarray(k_rows) < np.asarray(nb)[:, None])) else 0.0
