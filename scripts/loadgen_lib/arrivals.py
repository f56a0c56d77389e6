"""When to send: arrival times for a request rate and a burstiness, as ``vllm bench serve``.

Inter-arrival gaps follow a gamma distribution with shape ``burstiness`` and
mean ``1 / rate``. ``burstiness == 1`` is a Poisson process; below 1 requests
come in bursts, above 1 more evenly. An infinite rate sends everything at once
(bounded by ``--max-concurrency`` if given).
"""

from __future__ import annotations

import math

import numpy as np


def arrival_offsets(n: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Seconds after the start at which each of n requests is sent; the first goes at 0."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not rate > 0:
        raise ValueError(f"request rate must be > 0 (or inf), got {rate}")
    if not burstiness > 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness}")
    if n == 0:
        return []
    if math.isinf(rate):
        return [0.0] * n
    gaps = np.random.default_rng(seed).gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n - 1)
    return [0.0, *np.cumsum(gaps).tolist()]
