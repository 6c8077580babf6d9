"""Zero-shot routing: cosine similarity between the query and each model's card text."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from cmr.data.examples import Examples
from cmr.policies.base import PolicyConfig, RoutingPolicy, config_dataclass
from cmr.policies.memory import as_queries
from cmr.types import FeedbackEvent, ModelCard


@config_dataclass
class ZeroShotConfig(PolicyConfig):
    """Options of :class:`ZeroShotPolicy` (none beyond the seed)."""


class ZeroShotPolicy(RoutingPolicy):
    """Zero-shot: cosine(query embedding, card-text embedding); no learning.

    Needs only the cards, so it routes to a model the moment it joins the hub.
    """

    name = "zeroshot"
    Config = ZeroShotConfig

    def fit(self, data: Examples, cards: Sequence[ModelCard]) -> None:
        """Embed the cards; the labelled queries are not used."""
        self.add_models(cards)

    def update(self, events: Sequence[FeedbackEvent]) -> None:
        """Feedback is not used (the policy has nothing to learn)."""

    def score(self, q: np.ndarray, candidates: Sequence[ModelCard], tasks: Sequence[str | None] | None = None) -> np.ndarray:
        """Cosine similarity ``[n_q, n_c]`` (embeddings are unit-norm)."""
        q = as_queries(q)
        if not len(candidates):
            return np.zeros((len(q), 0), dtype=np.float64)
        return (q @ self.card_embeddings(candidates).T).astype(np.float64)
