"""The policy names the harness accepts, and its one selector of its own: the oracle.

Every deployment policy (``fluxion_dist.policy.POLICIES``: what a deployment YAML may set)
is measured through the production operator (``quality.operator_decode``), never through a
re-implementation here. The one harness-only selector is ``oracle_topk``: the blocks with
the most *true* softmax mass at the fixed budget, the best any block selector could do
with that many blocks. It reads the true attention, which no deployable policy can, so it
runs on the harness's own hook (``quality.decode_hook.PolicyAttention``) and is labelled an
oracle in every report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fluxion_dist.attention import reference
from fluxion_dist.policy import POLICIES

ORACLES = ("oracle_topk",)
HARNESS_POLICIES: tuple[str, ...] = (*POLICIES, *ORACLES)
DEFAULT_POLICIES = ("full", "quest_gpu", "fluxion", "oracle_topk")


METADATA = ("bf16", "int8")
"""The prompt's Quest boxes a variant's arena holds (``metadata=...``, the harness's own key):
bf16, as the store writes them, or the boxes of the int8 mirror
(``kernels.compact_metadata.mirror_boxes``): what the GPU's compact scoring would select."""


def split_variant(name: str) -> tuple[str, list[str]]:
    """``"fluxion:token_refine_factor=2,recent_tokens=256"`` -> ``("fluxion", [KEY=VALUE, ...])``:
    a deployment policy with SparseConfig fields of its own, so one run compares a switch on
    and off (the overrides are parsed and validated where the runner is made; ``metadata``,
    see METADATA, is the harness's)."""
    base, _, rest = name.partition(":")
    return base, [item for item in rest.split(",") if item]


def check_policy_names(names: list[str] | tuple[str, ...]) -> list[str]:
    """``names`` in order, without repeats; an unknown one raises ValueError naming the allowed ones.
    A deployment policy may carry overrides (``split_variant``); the oracle may not."""
    bad = [n for n in names if split_variant(n)[0] not in HARNESS_POLICIES
           or (split_variant(n)[0] in ORACLES and n not in ORACLES)]
    if bad:
        raise ValueError(f"unknown policy {bad[0]!r}; allowed: {', '.join(HARNESS_POLICIES)} "
                         f"(oracle_topk is the harness's oracle; the others are the deployment's)")
    return list(dict.fromkeys(names))


def label(name: str) -> str:
    """How a report names a policy: the oracle says it is one."""
    return f"{name} (oracle)" if name in ORACLES else name


@dataclass(frozen=True, slots=True)
class StepView:
    """One (sequence, layer, decode step) as the oracle sees it."""

    layer: int
    num_tokens: int  # tokens in the cache, the new one included
    # float64 [Hkv, nb]: the true softmax mass per block (mean over each KV head's query heads)
    true_block_mass: np.ndarray


def budget_blocks(budget: float, nb: int) -> int:
    return max(1, math.ceil(budget * nb - 1e-9))


class OracleTopK:
    def __init__(self, budget: float) -> None:
        if not 0 < budget <= 1:
            raise ValueError(f"oracle_topk budget must be in (0, 1]; got {budget}")
        self.budget = budget
        self.name = "oracle_topk"

    def select(self, view: StepView) -> np.ndarray:
        """``bool [Hkv, nb]``: per KV head, the ``budget`` fraction of blocks with the most true mass."""
        mass = view.true_block_mass
        k = budget_blocks(self.budget, mass.shape[1])
        mask = np.zeros(mass.shape, dtype=bool)
        for h, ids in enumerate(reference.select_topk(mass, k)):
            mask[h, ids] = True
        return mask
