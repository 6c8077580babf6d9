"""LinUCB: per-model linear upper confidence bounds over shared low-rank query features.

score(x, a) = θ_aᵀφ(x) + α·sqrt(φ(x)ᵀ P_a⁻¹ φ(x)), with θ_a, P_a the ridge posterior of arm a
(see :mod:`cmr.policies.bandit_base`): optimism in the face of uncertainty, so an arm that was
rarely chosen (or just joined the hub) gets tried where its prior looks competitive.
"""

from __future__ import annotations


import numpy as np

from cmr.policies.bandit_base import BanditConfig, LinearBanditPolicy
from cmr.policies.base import NonNegative, config_dataclass


@config_dataclass
class LinUCBConfig(BanditConfig):
    """``alpha``: width of the confidence bonus (0 = greedy ridge regression)."""

    alpha: NonNegative = 0.1


class LinUCBPolicy(LinearBanditPolicy):
    """Contextual bandit, LinUCB per model over shared PCA features of the query embedding."""

    name = "linucb"
    Config = LinUCBConfig

    def _arm_scores(self, Phi, ids, theta, Pinv, L):
        mean = Phi @ theta.T
        if self.config.alpha == 0:
            return mean
        return mean + self.config.alpha * np.sqrt(np.maximum(self._quad(Phi, Pinv), 0.0))
