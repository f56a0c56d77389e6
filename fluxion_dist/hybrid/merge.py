"""Exact log-sum-exp merge of batch partials on the host (``reference.merge_state`` semantics).

Used by the CPU path, where no GPU merges. Float64 inside: the partials are float32, and the
merge must not be what limits the agreement with the reference.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from fluxion_dist.cpu.attention import BatchPartial
from fluxion_dist.errors import FluxionError


class EmptyAttentionError(FluxionError, ValueError):
    """A query head attended no token in any partial (a selection left a row empty)."""


def merge_batch_partials(parts: Sequence[BatchPartial]) -> np.ndarray:
    """Merge and normalise partials ``(o [B,Hq,d], m [B,Hq], l [B,Hq])`` -> float32 ``[B, Hq, d]``."""
    if not parts:
        raise EmptyAttentionError("merge needs at least one partial")
    ms = np.stack([np.asarray(p.m, np.float64) for p in parts])  # [P, B, Hq]
    m = ms.max(axis=0)
    safe = np.where(np.isfinite(m), m, 0.0)
    w = np.where(np.isfinite(ms), np.exp(ms - safe), 0.0)
    l = (w * np.stack([np.asarray(p.l, np.float64) for p in parts])).sum(axis=0)
    if np.any(l <= 0):
        b, h = np.argwhere(l <= 0)[0]
        raise EmptyAttentionError(f"request {b}, query head {h} has no token in any partial")
    o = np.zeros(parts[0].o.shape, dtype=np.float64)
    for i, p in enumerate(parts):
        # an empty partial's o is 0 by contract, but its weight is 0 anyway: skip NaN-free garbage
        o += np.where(w[i][..., None] > 0, w[i][..., None] * p.o, 0.0)
    return (o / l[..., None]).astype(np.float32)
