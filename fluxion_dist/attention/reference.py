"""Float64 reference for every attention computation in the system.

This module is the oracle: each CPU and GPU kernel is tested against it. It is
written for clarity, not speed; everything is NumPy float64.

Shapes (one request, one layer; ``g = Hq // Hkv`` query heads per KV head,
query head ``h`` reads KV head ``h // g``):

- decode query ``q [Hq, d]``; keys and values ``k, v [T, Hkv, d]``;
- block metadata ``kmin, kmax [nb, Hkv, d]`` (Quest: channel-wise min/max of K);
- block scores ``[Hq, nb]``; per KV head ``[Hkv, nb]``;
- a selection is one sorted int array of block ids per KV head;
- a partial is ``(o [Hq, d], m [Hq], l [Hq])``: unnormalised output
  ``sum_j exp(s_j - m) v_j``, running max ``m`` and sum ``l = sum_j exp(s_j - m)``.
  An empty partial has ``m = -inf``, ``l = 0``, ``o = 0``.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from fluxion_dist.attention.layout import BLOCK_TOKENS, num_blocks


class Partial(NamedTuple):
    o: np.ndarray  # [Hq, d] unnormalised
    m: np.ndarray  # [Hq] running max of the scaled scores
    l: np.ndarray  # [Hq] sum of exp(score - m)


def _f64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def _group(hq: int, hkv: int) -> int:
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    return hq // hkv


def default_scale(head_dim: int) -> float:
    return 1.0 / np.sqrt(head_dim)


def full_attention(q, k, v, scale: float | None = None, causal: bool = True) -> np.ndarray:
    """Causal GQA attention. ``q [Tq, Hq, d]`` are the last Tq positions of ``k, v [T, Hkv, d]``."""
    q, k, v = _f64(q), _f64(k), _f64(v)
    tq, hq, d = q.shape
    t, hkv, _ = k.shape
    g = _group(hq, hkv)
    scale = default_scale(d) if scale is None else scale
    kq = np.repeat(k, g, axis=1)  # [T, Hq, d]
    vq = np.repeat(v, g, axis=1)
    s = np.einsum("qhd,thd->hqt", q, kq) * scale
    if causal:
        qpos = np.arange(t - tq, t)[:, None]
        s = np.where(np.arange(t)[None, :] <= qpos, s, -np.inf)
    s = s - s.max(axis=-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(axis=-1, keepdims=True)
    return np.einsum("hqt,thd->qhd", p, vq)


def decode_attention(q, k, v, scale: float | None = None) -> np.ndarray:
    """Attention of one new token ``q [Hq, d]`` over all of ``k, v [T, Hkv, d]``."""
    return full_attention(_f64(q)[None], k, v, scale, causal=False)[0]


def block_metadata(k, block_tokens: int = BLOCK_TOKENS) -> tuple[np.ndarray, np.ndarray]:
    """Channel-wise min and max of K per block: ``k [T, Hkv, d]`` -> ``kmin, kmax [nb, Hkv, d]``.

    The last block's statistics cover only its valid tokens.
    """
    k = _f64(k)
    t, hkv, d = k.shape
    nb = num_blocks(t, block_tokens)
    kmin = np.empty((nb, hkv, d))
    kmax = np.empty((nb, hkv, d))
    for b in range(nb):
        chunk = k[b * block_tokens:(b + 1) * block_tokens]
        kmin[b], kmax[b] = chunk.min(axis=0), chunk.max(axis=0)
    return kmin, kmax


def coarsen_metadata(kmin, kmax, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """Metadata at ``factor`` x the base granularity: min of mins, max of maxes."""
    kmin, kmax = _f64(kmin), _f64(kmax)
    nb = kmin.shape[0]
    nc = -(-nb // factor)
    cmin = np.stack([kmin[c * factor:(c + 1) * factor].min(axis=0) for c in range(nc)])
    cmax = np.stack([kmax[c * factor:(c + 1) * factor].max(axis=0) for c in range(nc)])
    return cmin, cmax


def quest_scores(q, kmin, kmax, scale: float | None = None) -> np.ndarray:
    """Quest upper bound of ``q . k * scale`` over each block: ``[Hq, nb]``.

    ``sum_c max(q_c * min_c, q_c * max_c)`` bounds the dot product of ``q`` with
    any key inside the box, so the score of a block is never below the score of
    any of its tokens.
    """
    q, kmin, kmax = _f64(q), _f64(kmin), _f64(kmax)
    hq, d = q.shape
    hkv = kmin.shape[1]
    g = _group(hq, hkv)
    scale = default_scale(d) if scale is None else scale
    lo = np.einsum("hd,bhd->hbd", q, np.repeat(kmin, g, axis=1))
    hi = np.einsum("hd,bhd->hbd", q, np.repeat(kmax, g, axis=1))
    return np.maximum(lo, hi).sum(axis=-1) * scale


def kv_head_scores(scores, num_kv_heads: int) -> np.ndarray:
    """Reduce per-query-head scores ``[Hq, nb]`` to the KV head (max over its group)."""
    scores = _f64(scores)
    g = _group(scores.shape[0], num_kv_heads)
    return scores.reshape(num_kv_heads, g, -1).max(axis=1)


def select_topk(scores, k: int) -> list[np.ndarray]:
    """Per row, the ids of the ``k`` highest scores (ties to the lower id), sorted ascending."""
    scores = _f64(scores)
    k = min(k, scores.shape[-1])
    out = []
    for row in scores:
        order = np.argsort(-row, kind="stable")[:k]
        out.append(np.sort(order).astype(np.int64))
    return out


def estimated_mass(scores) -> np.ndarray:
    """Softmax of the block scores per row: the mass each block is estimated to hold."""
    s = _f64(scores)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    return p / p.sum(axis=-1, keepdims=True)


def select_topp(scores, p: float) -> list[np.ndarray]:
    """Per row, the fewest highest-scoring blocks whose estimated mass reaches ``p``;
    ``p = 1`` takes every block (a block's mass is never exactly zero)."""
    if not 0.0 < p <= 1.0:
        raise ValueError(f"top-p mass must be in (0, 1]; got {p}")
    mass = estimated_mass(scores)
    out = []
    for row in mass:
        if p >= 1.0:
            out.append(np.arange(row.size, dtype=np.int64))
            continue
        order = np.argsort(-row, kind="stable")
        csum = np.cumsum(row[order])
        n = int(np.searchsorted(csum, p * (1 - 1e-12))) + 1
        out.append(np.sort(order[:min(n, row.size)]).astype(np.int64))
    return out


def partial_attention(q, k, v, blocks: Sequence[np.ndarray],
                      block_tokens: int = BLOCK_TOKENS,
                      scale: float | None = None) -> Partial:
    """Attention of ``q [Hq, d]`` over the tokens of the selected blocks only.

    ``blocks[h]`` lists the block ids for KV head ``h``; each is read once for
    all the query heads of its group.
    """
    q, k, v = _f64(q), _f64(k), _f64(v)
    hq, d = q.shape
    t, hkv, _ = k.shape
    g = _group(hq, hkv)
    if len(blocks) != hkv:
        raise ValueError(f"need one block list per KV head ({hkv}); got {len(blocks)}")
    scale = default_scale(d) if scale is None else scale
    o = np.zeros((hq, d))
    m = np.full(hq, -np.inf)
    l = np.zeros(hq)
    for kh in range(hkv):
        ids = np.asarray(blocks[kh], dtype=np.int64)
        if ids.size == 0:
            continue
        tok = (ids[:, None] * block_tokens + np.arange(block_tokens)[None]).ravel()
        tok = tok[tok < t]
        kk, vv = k[tok, kh], v[tok, kh]
        for h in range(kh * g, (kh + 1) * g):
            s = kk @ q[h] * scale
            m[h] = s.max()
            e = np.exp(s - m[h])
            l[h] = e.sum()
            o[h] = e @ vv
    return Partial(o, m, l)


def merge_state(partials: Sequence[Partial]) -> Partial:
    """Exact log-sum-exp merge of partials into one partial (still unnormalised)."""
    if not partials:
        raise ValueError("merge needs at least one partial")
    ms = np.stack([_f64(p.m) for p in partials])
    m = ms.max(axis=0)
    safe_m = np.where(np.isfinite(m), m, 0.0)
    w = np.where(np.isfinite(ms), np.exp(ms - safe_m), 0.0)  # [P, Hq]
    l = (w * np.stack([_f64(p.l) for p in partials])).sum(axis=0)
    o = (w[..., None] * np.stack([_f64(p.o) for p in partials])).sum(axis=0)
    return Partial(o, m, l)


def merge_partials(partials: Sequence[Partial]) -> np.ndarray:
    """Merge and normalise: the attention output ``[Hq, d]`` over the union of the partials."""
    st = merge_state(partials)
    if np.any(st.l <= 0):
        raise ValueError("a query head has no tokens in any partial")
    return st.o / st.l[:, None]


def lse(p: Partial) -> np.ndarray:
    """Log-sum-exp of a partial's scores, the form FlashInfer returns."""
    return p.m + np.log(p.l)


def block_lse(q, k, blocks: Sequence[np.ndarray], block_tokens: int = BLOCK_TOKENS,
              scale: float | None = None) -> list[np.ndarray]:
    """Exact per-query-head log-sum-exp of ``q . k * scale`` over each listed block's tokens.

    ``blocks[h]`` lists block ids for KV head ``h``; returns per KV head ``[len(blocks[h]), g]``
    (column j: query head ``h * g + j``). The softmax mass a block holds for a query head is
    ``exp(lse - lse_of_all_blocks)``: ranking blocks by it ranks them by true mass.
    """
    q, k = _f64(q), _f64(k)
    hq, d = q.shape
    t, hkv, _ = k.shape
    g = _group(hq, hkv)
    scale = default_scale(d) if scale is None else scale
    out = []
    for kh in range(hkv):
        ids = np.asarray(blocks[kh], dtype=np.int64)
        res = np.empty((ids.size, g))
        for i, blk in enumerate(ids):
            tok = np.arange(blk * block_tokens, min((blk + 1) * block_tokens, t))
            s = k[tok, kh] @ q[kh * g:(kh + 1) * g].T * scale  # [tokens, g]
            mx = s.max(axis=0)
            res[i] = mx + np.log(np.exp(s - mx).sum(axis=0))
        out.append(res)
    return out


def candidate_shares(lse_rows: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The rescoring stage's exact score of each candidate block of each KV head: the log of
    the sum over the group's query heads of the block's share of that head's candidate mass,
    ``log sum_j exp(lse[i, j] - logsumexp_i lse[i, j])`` (``block_lse`` rows in, ``[n]`` out).

    Per-head shares, summed: top-k by it keeps the most true mass of the group (the oracle's
    criterion, the mean over the group of each head's normalised mass), with the candidates'
    total standing in for the head's normaliser (a positive factor per head)."""
    out = []
    for x in lse_rows:
        x = _f64(x)
        if x.shape[0] == 0:
            out.append(np.zeros(0))
            continue
        z = x.max(axis=0) + np.log(np.exp(x - x.max(axis=0)).sum(axis=0))
        out.append(np.log(np.exp(x - z).sum(axis=1)))
    return out
