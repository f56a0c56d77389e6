"""The Fluxion policy of ``fluxion_dist.sparse`` as a quality-harness :class:`~quality.policies.Policy`.

Only the public facade ``sparse.decide`` is used, with ``SparseConfig(policy="fluxion")``;
the head predictor's running state is kept per layer and reset per sequence, as the
decode worker does per request. Importing this module fails with ImportError where
``fluxion_dist.sparse`` is absent, which ``policies.fluxion_policy`` turns into "skip".
"""

from __future__ import annotations

import numpy as np

from fluxion_dist.config.schema import SparseConfig
from fluxion_dist.quality.policies import StepView
from fluxion_dist.sparse import HeadFeatures, build_pyramid, decide


class FluxionPolicy:
    def __init__(self, budget: float = 0.05, mass_target: float = 0.95) -> None:
        self.config = SparseConfig(policy="fluxion", budget=budget, mass_target=mass_target)
        self.name = "fluxion"
        self._state: dict[int, HeadFeatures | None] = {}

    def start_sequence(self) -> None:
        self._state = {}

    def select(self, view: StepView) -> np.ndarray:
        pyramid = build_pyramid(view.kmin, view.kmax, view.num_tokens)
        d = decide(view.q, pyramid, self.config, state=self._state.get(view.layer), scale=view.scale)
        self._state[view.layer] = d.state
        hkv, nb = view.true_block_mass.shape
        mask = np.zeros((hkv, nb), dtype=bool)
        for h, ids in enumerate(d.selection.head_lists()):
            mask[h, ids] = True
        return mask
