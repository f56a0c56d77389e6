"""Blocks per (layer, request, KV head) row: the kept blocks, water-filling, the pooled rule.

A row's *kept* blocks are its request's first ``sink_blocks`` and last ``recent_blocks``
(attention sinks and the recent window, always read). A row's *demand* is the number of
blocks beyond the kept ones it needs: of the blocks whose estimated softmax mass reaches the
mass target (the top-p pass), those outside the kept set. Top-k over scores where the kept
blocks are forced first then reads exactly the kept blocks plus the top-p set at
``kept + demand`` blocks.

:func:`pooled_row_budgets` is Fluxion's budget. ``budget`` is the *average* over all layers
and KV heads of a step: request b's pool is ``ceil(budget_b * nb_b)`` blocks times every
row it has (the total a fixed policy such as Quest reads), not a per-layer cap that can only
be underspent. Every row first gets a floor (a share of the budget, never below its kept
blocks); local heads (demand 0: the kept blocks hold their mass) get only their kept blocks
when the head predictor is on; the rest of the pool goes max-min fairly to the demand beyond
the floors, across all layers and heads of the request (a needle head's few blocks are never
squeezed by a dense head's long tail); what is left once every demand is met is spread evenly
so the pool is spent. A request without measured demand gets the fixed rule.

:func:`demand_row_budgets` is the rule under a quality target (``sparse.max_output_error``):
every row its kept blocks plus its demand, a request's average capped, no pool to spend.

Vectorised over the batch: the host runs it once per step over L x B x Hkv rows.
"""

from __future__ import annotations

import numpy as np

from fluxion_dist.errors import FluxionError


class BudgetError(FluxionError, ValueError):
    """Budget inputs of the wrong shape or range; the message names the argument."""


def forced_count(nb, sink_blocks: int, recent_blocks: int) -> np.ndarray:
    """Kept blocks (the first ``sink_blocks`` and last ``recent_blocks``; in a context shorter
    than both together they cover it all) per context of ``nb`` blocks; any shape."""
    return np.minimum(np.asarray(nb, dtype=np.int64), sink_blocks + recent_blocks)


def kept_mask(nb: int, sink_blocks: int, recent_blocks: int) -> np.ndarray:
    """``[nb]`` bool: the kept blocks of a context of ``nb`` blocks (``force_blocks``'s set)."""
    j = np.arange(nb)
    return (j < sink_blocks) | (j >= nb - recent_blocks)


def share_blocks(nb, budget) -> np.ndarray:
    """A fixed policy's blocks per row, ``ceil(budget * nb)`` (at least 1, at most nb)."""
    nb = np.asarray(nb, dtype=np.int64)
    # the epsilon keeps 0.05 * 100 (= 5.000000000000001 in binary) at 5
    share = np.ceil(np.asarray(budget, dtype=np.float64) * nb - 1e-9).astype(np.int64)
    return np.minimum(np.maximum(share, 1), np.maximum(nb, 1))


def water_fill_rows(demand: np.ndarray, cap) -> np.ndarray:
    """Max-min fair integer shares, per row of ``demand [N, R]`` (int64 >= 0) under ``cap [N]``:
    entry ``(n, r)`` gets ``min(demand, level_n)``, the level as high as the cap allows; the
    integer level's leftovers go one each to the entries still short, lowest index first."""
    # Few NumPy calls, no Python loop: the host runs this every step.
    demand = np.asarray(demand, dtype=np.int64)
    n, r = demand.shape
    cap = np.maximum(np.asarray(cap, dtype=np.int64).reshape(-1), 0)
    if r == 0:
        return demand.copy()
    srt = np.sort(demand, axis=1)
    below = srt.cumsum(axis=1) - srt  # with the level at srt[i], entries below i take their demand
    # the total at level srt[i] is non-decreasing in i, so the entries over the cap are a suffix
    first = r - (below + srt * np.arange(r, 0, -1) > cap[:, None]).sum(axis=1)
    at = below[np.arange(n), np.minimum(first, r - 1)]
    level = np.where(first < r, (cap - at) // np.maximum(r - first, 1), np.iinfo(np.int64).max)
    grant = np.minimum(demand, level[:, None])
    short = grant < demand
    grant += short & (short.cumsum(axis=1) <= (cap - grant.sum(axis=1))[:, None])
    return grant


def water_fill(demand, cap: int) -> np.ndarray:
    """:func:`water_fill_rows` of one list."""
    return water_fill_rows(np.asarray(demand, dtype=np.int64)[None], [cap])[0]


def row_floors(kept, nb, budget, floor_fraction: float) -> np.ndarray:
    """A row's floor: ``floor_fraction`` of its request's ``budget`` in blocks, never below its
    ``kept`` blocks nor above its ``nb`` (arrays that broadcast together)."""
    if floor_fraction <= 0:
        return np.asarray(kept)
    return np.minimum(np.maximum(kept, share_blocks(nb, floor_fraction * budget)), nb)


def pooled_row_budgets(demand, nb, budget, *, sink_blocks: int, recent_blocks: int, floor_fraction: float,
                       head_predictor: bool, num_layers: int | None = None,
                       num_kv_heads: int | None = None) -> np.ndarray:
    """Blocks per row ``int64 [L, B, Hkv]``, kept blocks included, never above nb.

    ``demand``: int ``[L, B, Hkv]`` blocks beyond the kept ones (module doc); a negative entry
    (not measured yet) sends its whole request to the fixed rule; None: nothing measured (then
    ``num_layers`` and ``num_kv_heads`` give the shape). ``nb [B]``: blocks per request, the new
    token's included; ``budget [B]`` (or one float): each request's average budget (1.0: every
    block).
    """
    nb = np.asarray(nb, dtype=np.int64)
    bsz = nb.size
    if nb.ndim != 1 or bsz == 0 or nb.min() < 1:
        raise BudgetError(f"nb must be [B] of positive block counts; got {nb!r}")
    budget = np.asarray(budget, dtype=np.float64)
    if budget.ndim == 0:
        budget = np.full(bsz, float(budget))
    if budget.shape != (bsz,) or not (budget.min() > 0 and budget.max() <= 1):
        raise BudgetError(f"budget must lie in (0, 1], one per request (or one for all); got {budget}")
    if not 0.0 <= floor_fraction <= 1.0:
        raise BudgetError(f"floor_fraction must lie in [0, 1]; got {floor_fraction}")
    if demand is None:
        if num_layers is None or num_kv_heads is None:
            raise BudgetError("without demand, num_layers and num_kv_heads give the shape")
        layers, hkv = num_layers, num_kv_heads
    else:
        demand = np.asarray(demand, dtype=np.int64)
        if demand.ndim != 3 or demand.shape[1] != bsz:
            raise BudgetError(f"demand must be [L, B={bsz}, Hkv]; got {demand.shape}")
        layers, _, hkv = demand.shape
    rows = layers * hkv
    share = share_blocks(nb, budget)
    kept = np.minimum(nb, sink_blocks + recent_blocks)
    out = np.repeat(np.minimum(np.maximum(share, kept), nb)[:, None], rows, axis=1)  # the fixed rule
    if demand is None:
        return out.reshape(bsz, layers, hkv).transpose(1, 0, 2)
    dem = demand.transpose(1, 0, 2).reshape(bsz, rows)
    known = dem.min(axis=1) >= 0
    if not known.all():
        if not known.any():
            return out.reshape(bsz, layers, hkv).transpose(1, 0, 2)
        dem, nb, kept, share, budget = dem[known], nb[known], kept[known], share[known], budget[known]
    k, n = kept[:, None], nb[:, None]
    floor = row_floors(k, n, budget[:, None], floor_fraction)
    grant = np.where(dem == 0, k, floor) if head_predictor else np.repeat(floor, rows, axis=1)
    surplus = np.maximum(share * rows - grant.sum(axis=1), 0)
    extra = water_fill_rows(np.maximum(np.minimum(k + dem, n) - grant, 0), surplus)
    grant += extra
    rest = surplus - extra.sum(axis=1)
    if rest.max() > 0:  # every demand met with pool to spare: spread it evenly
        grant += water_fill_rows(n - grant, rest)
    out[known] = grant
    return out.reshape(bsz, layers, hkv).transpose(1, 0, 2)


def demand_row_budgets(demand, nb, budget, cap, *, sink_blocks: int, recent_blocks: int,
                       floor_fraction: float) -> np.ndarray:
    """Blocks per row ``int64 [L, B, Hkv]`` under a quality target: each row its kept blocks
    plus its measured ``demand`` (``[L, B, Hkv]``, as for :func:`pooled_row_budgets`), at least
    its floor (``floor_fraction`` of its request's ``budget``, as pooled) and never above nb; a
    request whose rows together ask for more than ``cap`` (its average budget's ceiling, one
    float) of its blocks gets the demand beyond the floors water-filled under that many. A
    request with any demand unmeasured (negative), or ``budget`` 1.0 (every block), gets the
    fixed rule at its ``budget [B]``."""
    demand = np.asarray(demand, dtype=np.int64)
    nb = np.asarray(nb, dtype=np.int64)
    if demand.ndim != 3 or demand.shape[1] != nb.size:
        raise BudgetError(f"demand must be [L, B={nb.size}, Hkv]; got {demand.shape}")
    if not 0 < cap <= 1:
        raise BudgetError(f"cap must lie in (0, 1]; got {cap}")
    layers, bsz, hkv = demand.shape
    out = pooled_row_budgets(None, nb, budget, sink_blocks=sink_blocks, recent_blocks=recent_blocks,
                             floor_fraction=1.0, head_predictor=False, num_layers=layers, num_kv_heads=hkv)
    budget = np.broadcast_to(np.asarray(budget, dtype=np.float64), (bsz,))
    dem = demand.transpose(1, 0, 2).reshape(bsz, layers * hkv)
    use = (dem.min(axis=1) >= 0) & (budget < 1.0)
    if not use.any():
        return out
    n, k = nb[use][:, None], np.minimum(nb[use], sink_blocks + recent_blocks)[:, None]
    floor = np.broadcast_to(row_floors(k, n, budget[use][:, None], floor_fraction), dem[use].shape)
    want = np.maximum(np.minimum(n, k + dem[use]) - floor, 0)  # beyond the floors
    room = np.maximum(share_blocks(nb[use], cap) * layers * hkv - floor.sum(axis=1), 0)
    grant = floor + water_fill_rows(want, room)
    rows = out.transpose(1, 0, 2).reshape(bsz, layers * hkv)
    rows[use] = grant
    return rows.reshape(bsz, layers, hkv).transpose(1, 0, 2)
