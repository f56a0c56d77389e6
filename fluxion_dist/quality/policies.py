"""Block-selection policies the quality harness compares, behind one small interface.

A policy sees one decode step of one layer (:class:`StepView`) and returns which
16-token blocks each KV head reads (``bool [Hkv, nb]``). The decode hook
(``quality.decode_hook``) then computes attention over exactly those tokens, so
every policy is judged by the same arithmetic and only its choice differs.

- ``full``: every block (the reference the others are measured against).
- ``oracle_topk``: the blocks with the most *true* softmax mass, at the fixed
  budget: the best any block selector could do with that many blocks.
- ``quest``: the fixed-budget baseline of the Fluxion paper: Quest upper-bound
  scores (``attention.reference.quest_scores``), top-k per KV head
  (``reference.select_topk``) at 5% of the blocks, sinks and recent window included.
- ``fluxion``: output-aware budgets from ``fluxion_dist.sparse`` (head predictor +
  granularity-budget selector), when that package is present.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from fluxion_dist.attention import reference
from fluxion_dist.sparse.selection import forced_blocks


@dataclass(frozen=True, slots=True)
class StepView:
    """One (sequence, layer, decode step) as a policy sees it."""

    layer: int
    q: np.ndarray  # float32 [Hq, d], post-RoPE
    num_tokens: int  # tokens in the cache, the new one included
    kmin: np.ndarray  # float32 [nb, Hkv, d]: Quest metadata of the base blocks
    kmax: np.ndarray
    scale: float
    # float64 [Hkv, nb]: the true softmax mass per block (mean over each KV head's
    # query heads). Only an oracle may read it; real policies see q and metadata.
    true_block_mass: np.ndarray


class Policy(Protocol):
    name: str

    def start_sequence(self) -> None:
        """Forget per-sequence state (e.g. a head predictor's running features)."""

    def select(self, view: StepView) -> np.ndarray:
        """``bool [Hkv, nb]``: the blocks each KV head attends this step."""


def budget_blocks(budget: float, nb: int) -> int:
    return max(1, math.ceil(budget * nb - 1e-9))


class FullPolicy:
    name = "full"

    def start_sequence(self) -> None:
        pass

    def select(self, view: StepView) -> np.ndarray:
        return np.ones(view.true_block_mass.shape, dtype=bool)


class OracleTopK:
    def __init__(self, budget: float = 0.05) -> None:
        self.budget = budget
        self.name = "oracle_topk"

    def start_sequence(self) -> None:
        pass

    def select(self, view: StepView) -> np.ndarray:
        mass = view.true_block_mass
        k = budget_blocks(self.budget, mass.shape[1])
        mask = np.zeros(mass.shape, dtype=bool)
        for h, ids in enumerate(reference.select_topk(mass, k)):
            mask[h, ids] = True
        return mask


class QuestFixed:
    """Quest top-k at a fixed fraction of the blocks; the kept sinks/window count towards it."""

    def __init__(self, budget: float = 0.05, sink_tokens: int = 16, recent_tokens: int = 128) -> None:
        self.budget, self.sink_tokens, self.recent_tokens = budget, sink_tokens, recent_tokens
        self.name = "quest"

    def start_sequence(self) -> None:
        pass

    def select(self, view: StepView) -> np.ndarray:
        keep = forced_blocks(view.num_tokens, self.sink_tokens, self.recent_tokens)
        hkv, nb = view.true_block_mass.shape
        scores = reference.kv_head_scores(reference.quest_scores(view.q, view.kmin, view.kmax, view.scale), hkv)
        scores[:, keep] = -np.inf  # already read; the top-k spends the rest of the budget
        k = max(0, budget_blocks(self.budget, nb) - int(keep.sum()))
        mask = np.repeat(keep[None], hkv, axis=0)
        if k:
            for h, ids in enumerate(reference.select_topk(scores, k)):
                mask[h, ids] = True
        return mask


def fluxion_policy(budget: float = 0.05, mass_target: float = 0.95) -> Policy | None:
    """The served Fluxion policy (``fluxion_dist.sparse`` through ``quality.fluxion_adapter``);
    None if the adapter cannot be imported."""
    try:
        from fluxion_dist.quality.fluxion_adapter import FluxionPolicy
    except ImportError:
        return None
    return FluxionPolicy(budget, mass_target)


POLICY_NAMES = ("full", "oracle_topk", "quest", "fluxion")


def make_policies(names: list[str], budget: float = 0.05) -> list[Policy]:
    """Policies by name; ``fluxion`` is skipped, with a notice, where it is unavailable."""
    out: list[Policy] = []
    for name in names:
        if name == "full":
            out.append(FullPolicy())
        elif name == "oracle_topk":
            out.append(OracleTopK(budget))
        elif name == "quest":
            out.append(QuestFixed(budget))
        elif name == "fluxion":
            policy = fluxion_policy(budget)
            if policy is None:
                print("fluxion policy unavailable (fluxion_dist.sparse missing): skipped")
            else:
                out.append(policy)
        else:
            raise ValueError(f"unknown policy {name!r}; allowed: {POLICY_NAMES}")
    return out
