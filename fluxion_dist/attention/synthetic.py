"""Structured synthetic KV for fast CPU tests of sparse-attention policies.

Random Gaussian keys give every head the same, featureless attention, so a policy
test on them proves nothing. Here each KV head gets a planted softmax-mass profile
(a :class:`HeadMix`): mass on the first tokens (sinks), on the recent window
(decaying with distance), on a few far "needle" blocks whose keys align with the
query, and spread over everything else. The ground truth comes back with the data.

How the mass is planted exactly: KV head ``h`` has a unit direction ``u_h``; each
key is ``bg_t + a_t u_h`` with the background ``bg_t`` orthogonal to ``u_h``, and
each query of the group is ``(u_h + nu)/scale`` with ``nu`` orthogonal to ``u_h``.
So the scaled logit of token ``t`` is ``a_t + nu . bg_t``: the planted offset ``a_t``
plus Gaussian noise (``logit_noise``) that differs per query head.
Offsets are ``log(mass_c / n_c)`` for a token of component ``c`` with ``n_c`` tokens,
so the true masses match the mix up to that noise.

Values are ``mu_h + N(0, 1)``: a shared mean (what a dense, aggregating head
returns) plus per-token detail (what a retrieval head must fetch exactly).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np

from fluxion_dist.attention.layout import BLOCK_TOKENS, num_blocks

HeadKindName = Literal["local", "retrieval", "dense"]
PatternName = Literal["sink_local", "needle", "uniform"]


@dataclass(frozen=True, slots=True)
class HeadMix:
    """Planted share of the softmax mass per component of one KV head (normalised on use).

    A component with no tokens (e.g. needles in a context too short to hold one)
    gets no mass; the others are renormalised.
    """

    sink: float = 0.0  # the first ``sink_tokens`` tokens
    local: float = 0.0  # the last ``recent_tokens`` tokens, decaying with distance
    needle: float = 0.0  # a few tokens in each of a few far blocks
    spread: float = 0.0  # every token not in another component

    def __post_init__(self) -> None:
        parts = (self.sink, self.local, self.needle, self.spread)
        if min(parts) < 0 or sum(parts) <= 0:
            raise ValueError(f"a head mix needs non-negative shares with a positive sum; got {self}")

    @property
    def kind(self) -> HeadKindName:
        """The label a head predictor should give a head with this mix (its dominant share)."""
        shares = {"local": self.sink + self.local, "retrieval": self.needle, "dense": self.spread}
        return max(shares, key=shares.__getitem__)


PRESETS: dict[PatternName, HeadMix] = {
    "sink_local": HeadMix(sink=0.35, local=0.6, spread=0.05),
    "needle": HeadMix(sink=0.1, local=0.05, needle=0.75, spread=0.1),
    "uniform": HeadMix(spread=1.0),
}


@dataclass(frozen=True, slots=True)
class SyntheticKV:
    """One request, one layer: a decode query, its KV, and what was planted."""

    q: np.ndarray  # float32 [Hq, d]
    k: np.ndarray  # float32 [T, Hkv, d]
    v: np.ndarray  # float32 [T, Hkv, d]
    scale: float  # the softmax scale the logits were planted for (1/sqrt(d))
    mixes: tuple[HeadMix, ...]  # per KV head
    kinds: tuple[HeadKindName, ...]  # per KV head: the label a predictor should give
    needle_blocks: tuple[np.ndarray, ...]  # per KV head: sorted base-block ids (int64) of its needles
    needle_tokens: tuple[np.ndarray, ...]  # per KV head: sorted token ids (int64) of its needles
    directions: np.ndarray  # float32 [Hkv, d]: u_h, for drifting queries
    key_noise: float  # std of the keys' background part

    @property
    def num_tokens(self) -> int:
        return self.k.shape[0]


def _resolve(head: PatternName | HeadMix) -> HeadMix:
    if isinstance(head, HeadMix):
        return head
    if head not in PRESETS:
        raise ValueError(f"unknown head pattern {head!r}; allowed: {sorted(PRESETS)} or a HeadMix")
    return PRESETS[head]


def _orthogonal(rng: np.random.Generator, u: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Gaussian samples with their component along unit ``u`` removed."""
    x = rng.standard_normal(shape + u.shape)
    return x - (x @ u)[..., None] * u


def _offsets(mix: HeadMix, t: int, sinks: np.ndarray, local: np.ndarray,
             needles: np.ndarray, recent_tokens: int) -> np.ndarray:
    """Planted logit offset per token: ``log`` of its share of the head's mass."""
    # local mass decays with distance from the query, as in real streaming heads
    local_w = np.exp(-(t - 1 - local) / max(recent_tokens / 4, 1.0))
    parts = [(mix.sink, sinks, np.ones(sinks.size)), (mix.local, local, local_w),
             (mix.needle, needles, np.ones(needles.size))]
    # tokens of a component without a share are ordinary tokens of the spread
    spread = np.ones(t, dtype=bool)
    for share, idx, _ in parts:
        if share > 0:
            spread[idx] = False
    total = sum(share for share, idx, _ in parts if idx.size) + mix.spread
    logit = np.empty(t)
    for share, idx, w in parts:
        if share > 0 and idx.size:
            logit[idx] = np.log(share * w / w.sum())
    rest = np.flatnonzero(spread)
    if rest.size:
        # a head planted with no spread still has other tokens: a tiny mass, not -inf
        logit[rest] = np.log(max(mix.spread, 1e-6 * total) / rest.size)
    return logit - logit.max()


def make_synthetic_kv(num_tokens: int, heads: Sequence[PatternName | HeadMix], *,
                      group_size: int = 4, head_dim: int = 64, seed: int = 0,
                      sink_tokens: int = 4, recent_tokens: int = 128, needles: int = 3,
                      tokens_per_needle: int = 2, key_noise: float = 0.3,
                      logit_noise: float = 0.3, value_mean: float = 1.0) -> SyntheticKV:
    """KV for ``len(heads)`` KV heads of ``group_size`` query heads each, ``num_tokens`` long.

    ``heads`` names a preset (``sink_local``, ``needle``, ``uniform``) or gives a
    :class:`HeadMix` per KV head. Needle blocks are drawn among base blocks that
    lie wholly outside the sinks and the recent window; each holds
    ``tokens_per_needle`` aligned tokens. Any ``num_tokens >= 1`` works: a context too
    short for a component simply has none of it.

    ``key_noise`` is the std of the background part of the keys. It sets how loose
    Quest's per-block bounds are (the bound exceeds the best token's logit by about
    ``0.8 * sqrt(d) * 1.8 * key_noise``), i.e. how hard the heads are to tell apart from
    block metadata alone. ``logit_noise`` is the std of the per-token, per-query-head
    logit noise around the planted profile.
    """
    if num_tokens < 1 or group_size < 1 or head_dim < 2 or not heads or key_noise <= 0:
        raise ValueError(f"need num_tokens, group_size >= 1, head_dim >= 2, a head, key_noise > 0; "
                         f"got {num_tokens}, {group_size}, {head_dim}, {len(heads)} heads, {key_noise}")
    mixes = tuple(_resolve(h) for h in heads)
    rng = np.random.default_rng(seed)
    t, hkv, d = num_tokens, len(mixes), head_dim
    scale = 1.0 / np.sqrt(d)
    sinks = np.arange(min(sink_tokens, t))
    local = np.arange(max(sinks.size, t - recent_tokens), t)
    nb = num_blocks(t)
    first_free = -(-sinks.size // BLOCK_TOKENS)
    last_free = (t - recent_tokens) // BLOCK_TOKENS if recent_tokens else nb
    far_blocks = np.arange(first_free, min(last_free, nb))
    far_blocks = far_blocks[(far_blocks + 1) * BLOCK_TOKENS <= t]

    u = rng.standard_normal((hkv, d))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    q = np.empty((hkv, group_size, d))
    k = np.empty((t, hkv, d))
    v = np.empty((t, hkv, d))
    needle_blocks, needle_tokens = [], []
    for h, mix in enumerate(mixes):
        if mix.needle > 0 and far_blocks.size:
            blk = np.sort(rng.choice(far_blocks, size=min(needles, far_blocks.size), replace=False))
            off = np.stack([rng.choice(BLOCK_TOKENS, size=min(tokens_per_needle, BLOCK_TOKENS), replace=False)
                            for _ in blk])
            tok = np.sort((blk[:, None] * BLOCK_TOKENS + off).ravel())
        else:
            blk, tok = np.empty(0, np.int64), np.empty(0, np.int64)
        needle_blocks.append(blk.astype(np.int64))
        needle_tokens.append(tok.astype(np.int64))
        a = _offsets(mix, t, sinks, local, tok, recent_tokens)
        k[:, h] = key_noise * _orthogonal(rng, u[h], (t,)) + a[:, None] * u[h]
        # nu . bg_t has std |nu| * key_noise: scale nu so that is logit_noise
        nu = _orthogonal(rng, u[h], (group_size,)) / np.sqrt(d - 1)
        q[h] = (u[h] + logit_noise / key_noise * nu) / scale
        v[:, h] = value_mean * rng.standard_normal(d) + rng.standard_normal((t, d))
    return SyntheticKV(
        q=q.reshape(hkv * group_size, d).astype(np.float32), k=k.astype(np.float32),
        v=v.astype(np.float32), scale=float(scale), mixes=mixes,
        kinds=tuple(m.kind for m in mixes), needle_blocks=tuple(needle_blocks),
        needle_tokens=tuple(needle_tokens), directions=u.astype(np.float32),
        key_noise=float(key_noise))


def drifted_queries(kv: SyntheticKV, steps: int, drift: float = 0.1, seed: int = 0, *,
                    topic_every: int = 0, topic_shift: float = 0.0) -> np.ndarray:
    """``[steps, Hq, d]`` float32 queries of consecutive decode steps around ``kv.q``.

    Each step's query is ``kv.q`` plus fresh noise orthogonal to the head's planted
    direction that moves every logit by Gaussian noise of std ``drift``: the planted
    profile holds while the exact scores move (consecutive steps select mostly, not
    exactly, the same blocks). With ``topic_every`` N > 0, every N steps a new "topic"
    starts: a persistent component of the same kind, moving every logit by noise of std
    ``topic_shift``, held until the next switch, so the selections among the non-planted
    tokens jump at each switch (what a cache of the last steps' blocks loses).
    """
    if topic_every < 0 or topic_shift < 0:
        raise ValueError(f"topic_every and topic_shift must be >= 0; got {topic_every}, {topic_shift}")
    rng = np.random.default_rng(seed)
    hq, d = kv.q.shape
    g = hq // kv.directions.shape[0]
    u = np.repeat(kv.directions.astype(np.float64), g, axis=0)  # [Hq, d]

    def orthogonal_logit_noise(std: float) -> np.ndarray:
        x = rng.standard_normal((hq, d))
        x -= (x * u).sum(axis=1, keepdims=True) * u
        return std / kv.key_noise * x / np.sqrt(d - 1) / kv.scale

    out = np.empty((steps, hq, d))
    topic = np.zeros((hq, d))
    for s in range(steps):
        if topic_every and s % topic_every == 0:
            topic = orthogonal_logit_noise(topic_shift)
        out[s] = kv.q + topic + orthogonal_logit_noise(drift)
    return out.astype(np.float32)
