"""A request's own sparse settings (the completion request's ``sparse: {policy, budget}``).

A deployment runs one policy; a request may ask for ``full`` attention instead, or for its
own budget under the deployment's policy, up to ``SparseConfig.max_request_budget``.
"""

from __future__ import annotations

from dataclasses import dataclass

from fluxion_dist.config.schema import SparseConfig
from fluxion_dist.errors import FluxionError

_KEYS = ("policy", "budget")


class RequestSparseError(FluxionError, ValueError):
    """A request's ``sparse`` field is malformed or outside what the deployment allows; the
    message names the field."""


@dataclass(frozen=True, slots=True)
class RequestSparse:
    policy: str
    budget: float  # the request's average budget (1.0 under ``full``)


def resolve_request_sparse(deploy: SparseConfig, requested: dict | None) -> RequestSparse | None:
    """The request's settings, validated against the deployment; None: the deployment's own."""
    if requested is None:
        return None
    if not isinstance(requested, dict):
        raise RequestSparseError(f"sparse must be an object with keys {', '.join(_KEYS)}; "
                                 f"got {type(requested).__name__}")
    unknown = sorted(str(k) for k in requested if k not in _KEYS)
    if unknown:
        raise RequestSparseError(f"sparse has unknown key(s) {', '.join(unknown)}; allowed: {', '.join(_KEYS)}")
    policy = requested.get("policy", deploy.policy)
    if not isinstance(policy, str):
        raise RequestSparseError(f"sparse.policy must be a string; got {type(policy).__name__}")
    if policy not in ("full", deploy.policy):
        raise RequestSparseError(f"sparse.policy {policy!r} is not served here; allowed: "
                                 f"{', '.join(dict.fromkeys(('full', deploy.policy)))}")
    if "budget" in requested:
        budget = requested["budget"]
        # bool is an int in Python, and never a budget
        if isinstance(budget, bool) or not isinstance(budget, (int, float)):
            raise RequestSparseError(f"sparse.budget must be a number; got {type(budget).__name__}")
        budget = float(budget)
        cap = deploy.max_request_budget
        if budget > cap:
            raise RequestSparseError(f"sparse.budget {budget} is above this deployment's cap {cap}")
        if not 0.0 < budget <= cap:  # NaN fails this too
            raise RequestSparseError(f"sparse.budget {budget} is outside (0, {cap}]")
    else:
        budget = deploy.budget
    if policy == "full":
        budget = 1.0  # every block, whatever budget came with it
    return RequestSparse(policy, budget)
