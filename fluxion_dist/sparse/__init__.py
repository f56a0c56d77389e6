"""Sparse-attention policy: which KV blocks each head reads, decided from block metadata.

Device-independent (NumPy): the hybrid operator wires kernels to these decisions.
One concept per module: ``selection`` (the kernels' CSR form), ``scoring`` (Quest
bounds and estimated mass at 16/64/256 tokens), ``head_predictor``,
``budget_selector`` (Fluxion), ``hierarchical`` (AsyncTLS), ``fixed_budget`` (the
baselines), ``policy`` (the facade by ``SparseConfig.policy``).
"""

from fluxion_dist.sparse.budget_selector import BudgetSelection, SelectorOptions, select_budgets
from fluxion_dist.sparse.fixed_budget import fixed_budget_blocks, select_fixed
from fluxion_dist.sparse.head_predictor import (HeadFeatures, HeadKind, HeadPrediction, PredictorConfig,
                                                predict_heads)
from fluxion_dist.sparse.hierarchical import (HierarchicalOptions, TokenRefinement, hierarchical_select,
                                              refine_tokens, token_scores)
from fluxion_dist.sparse.policy import PolicyDecision, PolicyOptions, decide
from fluxion_dist.sparse.scoring import (MetadataPyramid, build_pyramid, estimated_mass, pyramid_from_kv,
                                         quest_scores, unit_tokens)
from fluxion_dist.sparse.selection import (BlockSelection, SparseInputError, concat_selections, forced_blocks,
                                           selected_tokens, selection_from_mask)

__all__ = [
    "BlockSelection", "BudgetSelection", "HeadFeatures", "HeadKind", "HeadPrediction", "HierarchicalOptions",
    "MetadataPyramid", "PolicyDecision", "PolicyOptions", "PredictorConfig", "SelectorOptions",
    "SparseInputError", "TokenRefinement", "build_pyramid", "concat_selections", "decide",
    "estimated_mass", "fixed_budget_blocks", "forced_blocks", "hierarchical_select", "predict_heads",
    "pyramid_from_kv", "quest_scores", "refine_tokens", "select_budgets", "select_fixed",
    "selected_tokens", "selection_from_mask", "token_scores", "unit_tokens",
]
