"""The one sparse-attention policy: which KV blocks each (layer, request, KV head) row reads.

Plain functions on NumPy arrays, one concept per module; the GPU pipeline, the CPU path and
the quality harness all run them:

- ``names``: :data:`POLICIES` and each policy's selection rule, execution and cache use;
- ``request``: :class:`RequestSparse`, a request's own policy/budget, and its validation;
- ``budget``: kept blocks, water-filling, and :func:`pooled_row_budgets` (the budget is the
  average over a step's layers and heads, pooled across them, granted by demand);
- ``select``: the NumPy twin of the GPU stages (Quest bounds, kv-head max, top-p demand,
  forcing, top-k -> CSR), bit-compatible with the kernels;
- ``routing``: the CPU's share of a layer's misses and the routing oracle.
"""

from fluxion_dist.policy.names import POLICIES, TRAITS, PolicyTraits, traits
from fluxion_dist.policy.request import RequestSparse, RequestSparseError, resolve_request_sparse

__all__ = ["POLICIES", "TRAITS", "PolicyTraits", "RequestSparse", "RequestSparseError", "resolve_request_sparse",
           "traits"]
