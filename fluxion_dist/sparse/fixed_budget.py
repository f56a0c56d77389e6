"""The fixed-budget baselines' selection: the same fraction of blocks for every head.

This is exactly what the ``quest_gpu``, ``cpu_only`` and ``fixed_hybrid`` policies
read (they differ only in where the blocks are computed, not in which): per KV head,
the sinks and the recent window, then the blocks with the highest Quest score until
the head holds ``ceil(SparseConfig.budget * nb)`` blocks. The budget counts the kept
blocks, so a fixed policy and Fluxion at the same ``budget`` read the same share of
the KV on average (``SparseConfig.budget``: "fraction of the KV the fixed-budget
policies read"). A KV head ranks a block by the largest score over its query heads
(``reference.kv_head_scores``, what Quest does under GQA); ties go to the lower block
id (``reference.select_topk``).
"""

from __future__ import annotations

import numpy as np

from fluxion_dist.attention.layout import num_blocks
from fluxion_dist.config.schema import SparseConfig
from fluxion_dist.sparse.selection import BlockSelection, SparseInputError, forced_blocks, selection_from_mask


def fixed_budget_blocks(num_tokens: int, budget: float) -> int:
    """Blocks per KV head a fixed policy reads: ``ceil(budget * nb)``, at least one."""
    if not 0.0 < budget <= 1.0:
        raise SparseInputError(f"budget must be in (0, 1]; got {budget}")
    return max(1, int(np.ceil(budget * num_blocks(num_tokens) - 1e-9)))


def select_fixed(scores: np.ndarray, num_tokens: int, num_kv_heads: int, config: SparseConfig) -> BlockSelection:
    """Top-k by Quest score plus sinks and window, from base-block scores ``[Hq, nb]``.

    With fewer kept blocks than the budget, the budget tops them up; with more (a
    short context), the kept blocks alone are read.
    """
    hq, nb = scores.shape
    if nb != num_blocks(num_tokens) or hq % num_kv_heads:
        raise SparseInputError(f"scores [{hq}, {nb}] do not fit {num_tokens} tokens and {num_kv_heads} KV heads")
    forced = forced_blocks(num_tokens, config.sink_tokens, config.recent_tokens)
    extra = min(max(fixed_budget_blocks(num_tokens, config.budget) - int(forced.sum()), 0), int((~forced).sum()))
    kv_scores = scores.reshape(num_kv_heads, hq // num_kv_heads, nb).max(axis=1)
    mask = np.repeat(forced[None, :], num_kv_heads, axis=0)
    if extra:
        # kept blocks sort last; argsort of the negation is stable, so ties go to the lower id
        key = np.where(forced[None, :], np.inf, -kv_scores)
        top = np.argsort(key, axis=1, kind="stable")[:, :extra]
        np.put_along_axis(mask, top, True, axis=1)
    return selection_from_mask(mask)
