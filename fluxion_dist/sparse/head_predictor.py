"""Head-property predictor: label each KV head local, retrieval or dense from its block mass.

Input is the estimated softmax mass per (KV head, base block) of the current step
(``scoring.estimated_mass`` of the Quest scores the step computes anyway). Three
features per head, all vectorised over the heads of a layer:

- locality: mass in the always-kept blocks (sinks + recent window). A head whose
  mass lives there needs nothing else (StreamingLLM / DuoAttention streaming heads).
- concentration: of the mass outside those blocks ("far" mass), the share the top
  ``k`` far blocks hold, rescaled so a flat profile reads 0 and a few needles read ~1.
- entropy: normalised entropy of the far mass (0: one block, 1: flat). It catches
  retrieval heads whose needles outnumber ``k``.

Features are an exponential moving average over decode steps (consecutive steps see
nearly the same profile; a single noisy step should not flip a head), and the label
is a threshold rule on the averaged features: local if locality is high, else
retrieval if the far mass is concentrated, else dense.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np

from fluxion_dist.sparse.selection import SparseInputError


class HeadKind(IntEnum):
    LOCAL = 0  # sinks + recent window suffice
    RETRIEVAL = 1  # a few far blocks hold the mass: fine granularity, few blocks
    DENSE = 2  # mass spread widely: coarse granularity, a larger budget


@dataclass(frozen=True, slots=True)
class PredictorConfig:
    decay: float = field(default=0.7, metadata={"doc": "EMA weight of the past steps' features"})
    local_threshold: float = field(default=0.8, metadata={"doc": "locality at or above: LOCAL"})
    concentration_threshold: float = field(default=0.5, metadata={
        "doc": "rescaled top-k share of the far mass at or above: RETRIEVAL"})
    entropy_threshold: float = field(default=0.6, metadata={
        "doc": "normalised far-mass entropy at or below: RETRIEVAL"})
    top_fraction: float = field(default=0.02, metadata={"doc": "k of the concentration, as a fraction of far blocks"})
    top_min: int = field(default=8, metadata={"doc": "k of the concentration is at least this many blocks"})

    def __post_init__(self) -> None:
        for name, value in (("decay", self.decay), ("local_threshold", self.local_threshold),
                            ("concentration_threshold", self.concentration_threshold),
                            ("entropy_threshold", self.entropy_threshold), ("top_fraction", self.top_fraction)):
            if not 0.0 <= value <= 1.0:
                raise SparseInputError(f"PredictorConfig.{name} must be in [0, 1]; got {value}")
        if self.top_min < 1:
            raise SparseInputError(f"PredictorConfig.top_min must be >= 1; got {self.top_min}")


@dataclass(frozen=True, slots=True)
class HeadFeatures:
    """Per-KV-head features, ``[Hkv]`` float64 each; also the predictor's EMA state."""

    locality: np.ndarray
    concentration: np.ndarray
    entropy: np.ndarray
    steps: int  # decode steps averaged so far


@dataclass(frozen=True, slots=True)
class HeadPrediction:
    kinds: np.ndarray  # int8 [Hkv], HeadKind values
    features: HeadFeatures  # the averaged features: pass back as ``state`` next step


def measure_features(mass: np.ndarray, forced: np.ndarray, config: PredictorConfig) -> HeadFeatures:
    """One step's features from ``mass [Hkv, nb]`` (rows sum to 1) and the kept-block mask ``forced [nb]``."""
    if mass.ndim != 2 or forced.shape != (mass.shape[1],):
        raise SparseInputError(f"mass must be [Hkv, nb] and forced [nb]; got {mass.shape} and {forced.shape}")
    hkv = mass.shape[0]
    far = mass[:, ~forced]
    n = far.shape[1]
    locality = np.clip(mass[:, forced].sum(axis=1), 0.0, 1.0)
    if n < 2:
        # nothing (or one block) to choose from: no profile to speak of
        return HeadFeatures(locality, np.zeros(hkv), np.ones(hkv), 1)
    total = far.sum(axis=1)
    p = far / np.maximum(total, np.finfo(np.float64).tiny)[:, None]
    k = min(max(config.top_min, int(np.ceil(config.top_fraction * n))), n - 1)
    top = np.partition(p, n - k, axis=1)[:, n - k:].sum(axis=1)
    flat = k / n
    concentration = np.clip((top - flat) / (1.0 - flat), 0.0, 1.0)
    plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    entropy = np.clip(-plogp.sum(axis=1) / np.log(n), 0.0, 1.0)
    return HeadFeatures(locality, concentration, entropy, 1)


def blend(prev: HeadFeatures | None, new: HeadFeatures, decay: float) -> HeadFeatures:
    """EMA of features; the first step (``prev is None``) is taken as is."""
    if prev is None:
        return new
    if prev.locality.shape != new.locality.shape:
        raise SparseInputError(f"predictor state for {prev.locality.shape[0]} heads given "
                               f"{new.locality.shape[0]} heads")
    w = 1.0 - decay
    return HeadFeatures(decay * prev.locality + w * new.locality,
                        decay * prev.concentration + w * new.concentration,
                        decay * prev.entropy + w * new.entropy, prev.steps + 1)


def classify(features: HeadFeatures, config: PredictorConfig) -> np.ndarray:
    """Threshold rule on the features: ``int8 [Hkv]`` of HeadKind values."""
    retrieval = ((features.concentration >= config.concentration_threshold)
                 | (features.entropy <= config.entropy_threshold))
    kinds = np.where(features.locality >= config.local_threshold, HeadKind.LOCAL,
                     np.where(retrieval, HeadKind.RETRIEVAL, HeadKind.DENSE))
    return kinds.astype(np.int8)


def predict_heads(mass: np.ndarray, forced: np.ndarray, state: HeadFeatures | None = None,
                  config: PredictorConfig = PredictorConfig()) -> HeadPrediction:
    """Label the KV heads of one (request, layer) for this step; keep ``.features`` for the next."""
    features = blend(state, measure_features(mass, forced, config), config.decay)
    return HeadPrediction(classify(features, config), features)
