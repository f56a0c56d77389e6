"""Output-aware granularity-budget selector (Fluxion): per head, how much KV and how coarse.

Per KV head the budget is what its output needs, not a fixed fraction: the smallest
set of units whose estimated softmax mass, with the always-kept sinks and recent
window, reaches ``SparseConfig.mass_target``. The head's label steers the choice:

- LOCAL: sinks + recent window only (the predictor says nothing else matters);
- RETRIEVAL: 16-token units, so a needle costs one block, not a 256-token chunk;
- DENSE: 64- or 256-token units, whichever reaches the target with fewer tokens,
  the coarser one when within ``coarse_tolerance`` (fewer, longer contiguous reads
  and less selection work for a head that needs many blocks anyway);
- no label: every granularity competes.

A unit is never more than a quarter of a head's fair share of the cap (so at short
contexts a dense head drops to 64- or 16-token units rather than afford one chunk).

A mass target of 1 overrides the labels (exact attention needs every block).

Then one cap for the layer: ``SparseConfig.budget`` x the KV of all heads. Heads
that need less leave budget to heads that need more: the units all heads asked for
are granted in order of estimated mass per base block (the most output per byte
first) until the cap is spent, so a needle head's few blocks always go before a
dense head's long tail. Sinks and the window are kept even past the cap.

All masses are estimates from Quest bounds (``scoring.estimated_mass``). A coarse
granularity ranks its units by its own (coarse-metadata) bounds, but every mass is
counted in the base-granularity estimate, the finest there is: one yardstick, so the
token costs of different granularities, and the needs of different heads, compare.
The kernels read exactly the base blocks of the selection.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fluxion_dist.attention.layout import BLOCK_TOKENS, num_blocks
from fluxion_dist.config.schema import SparseConfig
from fluxion_dist.sparse.head_predictor import HeadKind
from fluxion_dist.sparse.scoring import MetadataPyramid, estimated_mass, quest_scores, unit_tokens
from fluxion_dist.sparse.selection import BlockSelection, SparseInputError, forced_blocks, selection_from_mask

_TIE = 1.0 - 1e-12  # a cumulative mass this close to the target reaches it


@dataclass(frozen=True, slots=True)
class SelectorOptions:
    retrieval_factors: tuple[int, ...] = field(default=(1,), metadata={"doc": "unit sizes (x16 tokens) for RETRIEVAL"})
    dense_factors: tuple[int, ...] = field(default=(4, 16), metadata={"doc": "unit sizes for DENSE"})
    unlabelled_factors: tuple[int, ...] = field(default=(1, 4, 16), metadata={"doc": "unit sizes without labels"})
    coarse_tolerance: float = field(default=0.1, metadata={
        "doc": "a coarser unit size wins if its token cost is within this fraction of the cheapest"})


@dataclass(frozen=True, slots=True)
class BudgetSelection:
    """The selection of one (request, layer) and what each KV head got."""

    selection: BlockSelection  # CSR rows = KV heads, base-block ids
    granularity: np.ndarray  # int64 [Hkv]: tokens per unit the head was selected at (16/64/256;
    #                          16 for LOCAL heads, which select nothing beyond the kept blocks)
    blocks_used: np.ndarray  # int64 [Hkv]: base blocks selected, sinks and window included
    budget_used: np.ndarray  # float64 [Hkv]: blocks_used / blocks in the context
    mass_kept: np.ndarray  # float64 [Hkv]: base-granularity estimated mass of the selection
    demand_blocks: np.ndarray  # int64 [Hkv]: base blocks the head asked for to reach the target
    cap_blocks: int  # the layer's cap: ceil(budget * Hkv * nb)


@dataclass(frozen=True, slots=True)
class _Plan:
    """One granularity, all heads: units ranked best first, what each adds, how many a head needs."""

    order: np.ndarray  # [Hkv, nu] unit ids, best first
    gain: np.ndarray  # [Hkv, nu] base-estimated mass each ranked unit adds
    cost: np.ndarray  # [Hkv, nu] base blocks each ranked unit adds
    need: np.ndarray  # [Hkv] units to reach the target
    need_cost: np.ndarray  # [Hkv] base blocks to reach the target


def _plan(rank_mass: np.ndarray, base_free: np.ndarray, factor: int, forced: np.ndarray,
          short: np.ndarray, take_all: bool, rows: np.ndarray) -> _Plan:
    """Rank units by this granularity's own estimate; count what they add in the base estimate.

    ``base_free [Hkv, nb]`` is the base estimate with the kept blocks zeroed and ``short``
    the mass each head still lacks after them: one yardstick for every granularity, so
    their token costs compare. Only the heads in ``rows`` (those allowed this unit
    size) are ranked; the others need nothing here.
    """
    hkv, nb = base_free.shape
    nu = rank_mass.shape[1]
    pad = nu * factor - nb
    unit_cost = np.concatenate([~forced, np.zeros(pad, bool)]).reshape(nu, factor).sum(axis=1)
    unit_blocks = np.minimum(factor, nb - np.arange(nu) * factor)
    unit_gain = np.concatenate([base_free, np.zeros((hkv, pad))], axis=1).reshape(hkv, nu, factor).sum(axis=2)
    # a partly kept unit ranks by its unkept share; units adding no block rank last (key -1)
    key = np.where(unit_cost > 0, rank_mass * (unit_cost / unit_blocks), -1.0)
    order = np.broadcast_to(np.arange(nu), (hkv, nu)).copy()
    order[rows] = np.argsort(-key[rows], axis=1, kind="stable")
    gain = np.take_along_axis(unit_gain, order, axis=1)
    cost = unit_cost[order].astype(np.int64)
    payable = int((unit_cost > 0).sum())
    if take_all:
        need = np.full(hkv, payable)
    else:
        need = (np.cumsum(gain, axis=1) < short[:, None]).sum(axis=1) + 1
        need = np.where(short > 0, np.minimum(need, payable), 0)
    need = np.where(rows, need, 0)
    ccost = np.concatenate([np.zeros((hkv, 1), np.int64), np.cumsum(cost, axis=1)], axis=1)
    need_cost = np.take_along_axis(ccost, need[:, None], axis=1)[:, 0]
    return _Plan(order, gain, cost, need, need_cost)


def _grant(gain: np.ndarray, cost: np.ndarray, room: int) -> np.ndarray:
    """Which requested units the cap admits: greedy by mass per block, then fill what still fits."""
    take = np.zeros(gain.size, dtype=bool)
    if room <= 0 or gain.size == 0:
        return take
    order = np.argsort(-(gain / cost), kind="stable")
    left = room
    # each round admits the longest affordable prefix of what is left; a unit too big for
    # the rest of the cap is skipped, not a stop, so smaller units behind it still fit
    while order.size and left > 0:
        c = cost[order]
        fits = np.cumsum(c) <= left
        n = int(np.argmin(fits)) if not fits.all() else fits.size
        take[order[:n]] = True
        left -= int(c[:n].sum())
        order = order[n:]
        order = order[cost[order] <= left]
    return take


def _affordable(factors: tuple[int, ...], share_blocks: float) -> tuple[int, ...]:
    """The unit sizes no bigger than a quarter of a head's fair share of the cap (at least 16 tokens).

    A 256-token unit is 4% of a 6k context: at a 5% budget a head could afford one,
    and the cap's leftover would go to whoever has small units. Capping the unit
    keeps a head's grant at four units or more.
    """
    kept = tuple(f for f in factors if f <= max(share_blocks / 4, 1))
    return kept or (min(min(factors), 1),)


def _candidates(kinds: np.ndarray | None, hkv: int, share_blocks: float,
                options: SelectorOptions) -> tuple[list[int], np.ndarray]:
    """The unit sizes to evaluate and ``allowed [Hkv, len(factors)]``: which a head may use."""
    if kinds is None:
        factors = sorted(set(_affordable(options.unlabelled_factors, share_blocks)))
        return factors, np.ones((hkv, len(factors)), dtype=bool)
    by_kind = {HeadKind.LOCAL: (), HeadKind.RETRIEVAL: _affordable(options.retrieval_factors, share_blocks),
               HeadKind.DENSE: _affordable(options.dense_factors, share_blocks)}
    bad = ~np.isin(kinds, list(by_kind))
    if bad.any():
        raise SparseInputError(f"unknown head labels {np.unique(kinds[bad]).tolist()}; "
                               f"allowed: {[int(k) for k in by_kind]}")
    factors = sorted({f for k in np.unique(kinds) for f in by_kind[HeadKind(int(k))]})
    allowed = np.stack([np.isin(kinds, [k for k, fs in by_kind.items() if f in fs]) for f in factors],
                       axis=1) if factors else np.zeros((hkv, 0), dtype=bool)
    return factors, allowed


def select_budgets(q: np.ndarray, pyramid: MetadataPyramid, config: SparseConfig,
                   kinds: np.ndarray | None = None, *, base_mass: np.ndarray | None = None,
                   scale: float | None = None, options: SelectorOptions = SelectorOptions()) -> BudgetSelection:
    """Select blocks for every KV head of one (request, layer).

    ``q [Hq, d]`` is the step's query, ``kinds [Hkv]`` the predictor's labels (or None),
    ``base_mass [Hkv, nb]`` the base-granularity estimate if the caller already has it.
    """
    t, hkv = pyramid.num_tokens, pyramid.num_kv_heads
    nb = num_blocks(t)
    scale = 1.0 / np.sqrt(q.shape[1]) if scale is None else scale
    if kinds is not None and kinds.shape != (hkv,):
        raise SparseInputError(f"need one head label per KV head ({hkv}); got shape {kinds.shape}")
    if not 0.0 < config.budget <= 1.0 or not 0.0 < config.mass_target <= 1.0:
        raise SparseInputError(f"SparseConfig.budget and .mass_target must be in (0, 1]; "
                               f"got {config.budget} and {config.mass_target}")
    forced = forced_blocks(t, config.sink_tokens, config.recent_tokens)
    target = config.mass_target

    factors, allowed = _candidates(kinds if target < 1.0 else None, hkv, config.budget * nb, options)

    def mass_at(f: int, rows: np.ndarray) -> np.ndarray:
        """Estimated mass at unit size ``f`` for the KV heads in ``rows`` (zeros elsewhere)."""
        lvl = pyramid.level(f)
        heads = np.flatnonzero(rows)
        g = q.shape[0] // hkv
        qs = q.reshape(hkv, g, -1)[heads].reshape(heads.size * g, -1)
        out = np.zeros((hkv, pyramid.kmin[lvl].shape[0]))
        if heads.size:
            scores = quest_scores(qs, pyramid.kmin[lvl][:, heads], pyramid.kmax[lvl][:, heads], scale)
            out[heads] = estimated_mass(scores, unit_tokens(t, f), heads.size)
        return out

    if base_mass is None:
        base_mass = mass_at(1, np.ones(hkv, bool))
    elif base_mass.shape != (hkv, nb):
        raise SparseInputError(f"base_mass must be [{hkv}, {nb}]; got {base_mass.shape}")
    forced_mass = base_mass[:, forced].sum(axis=1)
    base_free = np.where(forced[None, :], 0.0, base_mass)
    short = target * _TIE - forced_mass
    # coarse levels are scored only for the heads allowed to use them (DENSE ones, mostly)
    plans = [_plan(base_mass if f == 1 else mass_at(f, allowed[:, i]), base_free, f, forced, short,
                   target >= 1.0, allowed[:, i]) for i, f in enumerate(factors)]

    # per head: the cheapest allowed granularity, the coarsest one within tolerance
    n_forced = int(forced.sum())
    choice = np.full(hkv, -1)
    demand = np.full(hkv, n_forced, dtype=np.int64)
    if plans:
        costs = np.where(allowed, np.stack([p.need_cost for p in plans], axis=1), np.iinfo(np.int64).max)
        best = costs.min(axis=1)
        ok = allowed & (costs <= best[:, None] * (1.0 + options.coarse_tolerance))
        last = len(factors) - 1 - np.argmax(ok[:, ::-1], axis=1)
        choice = np.where(ok.any(axis=1), last, -1)
        picked = np.take_along_axis(costs, np.maximum(choice, 0)[:, None], axis=1)[:, 0]
        demand += np.where(choice >= 0, picked, 0)

    # every unit each head asked for, then one grant over the whole layer
    asked = []
    for i, p in enumerate(plans):
        want = (np.arange(p.order.shape[1])[None, :] < p.need[:, None]) & (choice == i)[:, None]
        h, r = np.nonzero(want)
        asked.append((h, p.order[h, r], p.gain[h, r], p.cost[h, r], np.full(h.size, i)))
    heads, units, gains, costs_u, levels = (
        np.concatenate(col) for col in zip(*asked)) if asked else (np.empty(0, np.int64),) * 5
    cap = int(np.ceil(config.budget * hkv * nb - 1e-9))
    take = _grant(gains.astype(np.float64), costs_u.astype(np.int64), cap - hkv * n_forced)

    mask = np.repeat(forced[None, :], hkv, axis=0)
    mass_kept = forced_mass.copy()
    granularity = np.full(hkv, BLOCK_TOKENS, dtype=np.int64)
    for i, f in enumerate(factors):
        granularity[choice == i] = f * BLOCK_TOKENS
        sel = take & (levels == i)
        h, u = heads[sel], units[sel]
        np.add.at(mass_kept, h, gains[sel])
        blk = (u[:, None] * f + np.arange(f)[None, :]).ravel()
        hh = np.repeat(h, f)
        keep = blk < nb
        mask[hh[keep], blk[keep]] = True
    blocks_used = mask.sum(axis=1).astype(np.int64)
    return BudgetSelection(selection_from_mask(mask), granularity, blocks_used, blocks_used / nb,
                           mass_kept, demand, cap)
