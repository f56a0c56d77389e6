"""The policy facade: which blocks each KV head reads this step, by ``SparseConfig.policy``.

One call per (request, layer) per decode step. The policies differ only in *which*
blocks; where they are computed (GPU fetch, CPU, a split) is the scheduler's
business, so ``quest_gpu``, ``cpu_only`` and ``fixed_hybrid`` select identically:

- ``full``: every block (no scoring);
- ``quest_gpu`` / ``cpu_only`` / ``fixed_hybrid``: ``fixed_budget.select_fixed``;
- ``fluxion``: Quest scores -> estimated mass -> head predictor (EMA state carried
  in ``PolicyDecision.state``; pass it back for the same request and layer next
  step) -> granularity-budget selector.

AsyncTLS token refinement (``hierarchical.refine_tokens``) needs the candidates' keys,
which a policy over metadata does not read; the served operator does not apply it
(decisions are whole 16-token blocks).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fluxion_dist.attention.layout import BLOCK_TOKENS, num_blocks
from fluxion_dist.config.schema import SparseConfig
from fluxion_dist.sparse.budget_selector import SelectorOptions, select_budgets
from fluxion_dist.sparse.fixed_budget import select_fixed
from fluxion_dist.sparse.head_predictor import HeadFeatures, PredictorConfig, predict_heads
from fluxion_dist.sparse.scoring import MetadataPyramid, estimated_mass, quest_scores, unit_tokens
from fluxion_dist.sparse.selection import BlockSelection, SparseInputError, forced_blocks, selection_from_mask

_FIXED = ("quest_gpu", "cpu_only", "fixed_hybrid")


@dataclass(frozen=True, slots=True)
class PolicyOptions:
    predictor: PredictorConfig = field(default_factory=PredictorConfig)
    selector: SelectorOptions = field(default_factory=SelectorOptions)


@dataclass(frozen=True, slots=True)
class PolicyDecision:
    """One (request, layer, step): the selection and what it cost, per KV head."""

    selection: BlockSelection  # rows = this request's KV heads; ``concat_selections`` batches them
    blocks_used: np.ndarray  # int64 [Hkv]
    budget_used: np.ndarray  # float64 [Hkv]: blocks_used / nb
    mass_kept: np.ndarray  # float64 [Hkv]: base-granularity estimated mass kept (1 for full)
    granularity: np.ndarray  # int64 [Hkv]: tokens per unit the head was selected at
    kinds: np.ndarray | None  # int8 [Hkv] HeadKind values (fluxion only)
    state: HeadFeatures | None  # predictor EMA for the next step (fluxion only)


def decide(q: np.ndarray, pyramid: MetadataPyramid, config: SparseConfig, *,
           state: HeadFeatures | None = None, scale: float | None = None,
           options: PolicyOptions = PolicyOptions()) -> PolicyDecision:
    """Select the blocks of one (request, layer) for query ``q [Hq, d]`` under ``config.policy``."""
    t, hkv = pyramid.num_tokens, pyramid.num_kv_heads
    nb = num_blocks(t)
    if q.ndim != 2 or q.shape[0] % hkv or q.shape[1] != pyramid.kmin[0].shape[2]:
        raise SparseInputError(f"q must be [Hq, d] with Hq a multiple of {hkv} and d = "
                               f"{pyramid.kmin[0].shape[2]}; got {q.shape}")
    scale = 1.0 / np.sqrt(q.shape[1]) if scale is None else scale
    fine = np.full(hkv, BLOCK_TOKENS, dtype=np.int64)
    if config.policy == "full":
        blocks = np.full(hkv, nb, dtype=np.int64)
        return PolicyDecision(selection_from_mask(np.ones((hkv, nb), bool)), blocks, np.ones(hkv),
                              np.ones(hkv), fine, None, None)
    scores = quest_scores(q, pyramid.kmin[0], pyramid.kmax[0], scale)
    mass = estimated_mass(scores, unit_tokens(t, 1), hkv)
    if config.policy in _FIXED:
        sel = select_fixed(scores, t, hkv, config)
        rows = np.repeat(np.arange(hkv), sel.blocks_per_row())
        kept = np.bincount(rows, weights=mass[rows, sel.sel_blocks], minlength=hkv)
        used = sel.blocks_per_row()
        return PolicyDecision(sel, used, used / nb, kept, fine, None, None)
    if config.policy == "fluxion":
        forced = forced_blocks(t, config.sink_tokens, config.recent_tokens)
        pred = predict_heads(mass, forced, state, options.predictor)
        bs = select_budgets(q, pyramid, config, pred.kinds, base_mass=mass, scale=scale, options=options.selector)
        return PolicyDecision(bs.selection, bs.blocks_used, bs.budget_used, bs.mass_kept, bs.granularity,
                              pred.kinds, pred.features)
    raise SparseInputError(f"SparseConfig.policy {config.policy!r} has no selection; "
                           f"allowed: full, {', '.join(_FIXED)}, fluxion")
