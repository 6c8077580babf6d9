"""Thompson sampling: per-model linear posteriors over shared low-rank query features.

Each update round draws one weight sample per arm from its Gaussian posterior
N(θ_a, noise²·P_a⁻¹) and scores with it; between updates the sample is fixed, so scoring is a
pure function of the state (repeatable, permutation-equivariant). The generator's state is part
of ``state_dict``: a restored policy draws exactly the samples the original would have.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from cmr.policies.bandit_base import BanditConfig, LinearBanditPolicy, stable_hash
from cmr.policies.base import NonNegative, config_dataclass


@config_dataclass
class ThompsonConfig(BanditConfig):
    """``noise``: reward noise scale; posterior samples have covariance noise²·P⁻¹."""

    noise: NonNegative = 0.1


class ThompsonPolicy(LinearBanditPolicy):
    """Contextual bandit, linear Thompson sampling per model over shared PCA features."""

    name = "thompson"
    Config = ThompsonConfig

    def __init__(self, encoder=None, config=None):
        super().__init__(encoder=encoder, config=config)
        self._rng = np.random.default_rng(self.config.seed)
        self._round = 0
        self._z = np.zeros((0, self.config.dim + 1))  # standard-normal draw per known arm

    def _on_new_arms(self, k: int) -> None:
        self._z = np.concatenate([self._z, self._rng.standard_normal((k, self.config.dim + 1))])

    def _after_update(self) -> None:
        self._round += 1
        self._z = self._rng.standard_normal(self._z.shape)

    def _arm_scores(self, Phi, ids, theta, Pinv, L):
        f = Phi.shape[1]
        idx = np.array([self._arm_idx.get(m, -1) for m in ids], dtype=np.int64)
        z = np.empty((len(ids), f))
        z[idx >= 0] = self._z[idx[idx >= 0]]
        for j in np.flatnonzero(idx < 0):
            # a card never registered: a draw tied to (seed, round, id), so scoring stays repeatable
            z[j] = np.random.default_rng([self.config.seed, self._round, stable_hash(ids[j])]).standard_normal(f)
        # θ + noise·L⁻ᵀz has covariance noise²·(L Lᵀ)⁻¹ = noise²·P⁻¹
        delta = np.linalg.solve(np.swapaxes(L, 1, 2), z[:, :, None])[:, :, 0]
        return Phi @ (theta + self.config.noise * delta).T

    def state_dict(self) -> dict[str, Any]:
        d = super().state_dict()
        d.update(rng=json.dumps(self._rng.bit_generator.state), round=self._round, z=self._z.copy())
        return d

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._rng = np.random.default_rng(self.config.seed)
        self._rng.bit_generator.state = json.loads(state["rng"])
        self._round = int(state["round"])
        self._z = np.asarray(state["z"], dtype=np.float64).copy()
