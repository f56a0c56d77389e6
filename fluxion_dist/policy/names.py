"""The policies a deployment may name, and what each one means to the operator.

A policy is two independent choices: *which* blocks a row reads (its selection rule) and
*where* they are computed (its execution). Only ``fluxion`` keeps a GPU block cache.

=============  =========  ==========  =====  ==================================================
policy         selection  execution   cache  meaning
=============  =========  ==========  =====  ==================================================
full           all        balanced    no     every block (no scoring)
quest_gpu      fixed      gpu_only    no     Quest: top-k at ``budget`` of every row, on the GPU
cpu_only       fixed      cpu_only    no     the same blocks, all computed on the CPU
fixed_hybrid   fixed      static      no     the same blocks, a CPU share fixed once
fluxion        fluxion    balanced    yes    pooled output-aware budgets (``policy.budget``)
=============  =========  ==========  =====  ==================================================

Selection rules: ``all`` reads every block; ``fixed`` gives every (layer, request, KV head)
row the same share ``ceil(budget * nb)`` (sinks and window included); ``fluxion`` pools that
share over all layers and heads of a request and grants it by measured demand.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Selection = Literal["all", "fixed", "fluxion"]
Execution = Literal["balanced", "gpu_only", "cpu_only", "static"]


@dataclass(frozen=True, slots=True)
class PolicyTraits:
    selection: Selection
    execution: Execution
    uses_cache: bool


TRAITS: dict[str, PolicyTraits] = {
    "full": PolicyTraits("all", "balanced", False),
    "quest_gpu": PolicyTraits("fixed", "gpu_only", False),
    "cpu_only": PolicyTraits("fixed", "cpu_only", False),
    "fixed_hybrid": PolicyTraits("fixed", "static", False),
    "fluxion": PolicyTraits("fluxion", "balanced", True),
}

POLICIES: tuple[str, ...] = tuple(TRAITS)


def traits(policy: str) -> PolicyTraits:
    """The traits of ``policy``; ValueError naming the allowed ones otherwise."""
    try:
        return TRAITS[policy]
    except KeyError:
        raise ValueError(f"sparse.policy {policy!r}; allowed: {', '.join(POLICIES)}") from None
