"""Random routing: seeded uniform scores, the floor every router must beat."""

from __future__ import annotations

import copy
import hashlib
from typing import Any, Sequence

import numpy as np

from cmr.data.examples import Examples
from cmr.policies.base import PolicyConfig, RoutingPolicy, config_dataclass
from cmr.policies.memory import as_queries
from cmr.types import FeedbackEvent, ModelCard

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on a uint64 array: a bijection whose outputs look uniform."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _id_hash(model_ids: Sequence[str]) -> np.ndarray:
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(m.encode("utf-8"), digest_size=8).digest(), "little") for m in model_ids),
        dtype=np.uint64,
        count=len(model_ids),
    )


@config_dataclass
class RandomConfig(PolicyConfig):
    """Options of :class:`RandomPolicy` (only the seed)."""


class RandomPolicy(RoutingPolicy):
    """Random: seeded uniform scores in [0, 1); learns nothing.

    Each ``score`` call draws one 64-bit key from the policy's generator; a candidate's score is
    a hash of (key, query row, model id). So the scores of a model do not depend on its position
    in the candidate list, and the generator's state (part of ``state_dict``) fixes the stream:
    a restored policy continues with exactly the scores the original would have given.
    """

    name = "random"
    Config = RandomConfig

    def __init__(self, encoder=None, config=None):
        super().__init__(encoder, config)
        self._rng = np.random.default_rng(self.config.seed)

    def fit(self, data: Examples, cards: Sequence[ModelCard]) -> None:
        """Nothing to learn."""

    def update(self, events: Sequence[FeedbackEvent]) -> None:
        """Nothing to learn."""

    def add_models(self, cards: Sequence[ModelCard]) -> None:
        """Any card is routable as it is: nothing to prepare."""

    def score(self, q: np.ndarray, candidates: Sequence[ModelCard], tasks: Sequence[str | None] | None = None) -> np.ndarray:
        """Uniform [0, 1) scores ``[n_q, n_c]``; advances the generator by one draw per call."""
        q = as_queries(q)
        key = self._rng.integers(0, np.iinfo(np.int64).max, dtype=np.int64, endpoint=True)
        with np.errstate(over="ignore"):  # uint64 arithmetic wraps modulo 2**64 by design
            rows = _mix64(np.arange(len(q), dtype=np.uint64) * _GOLDEN + np.uint64(key))
            h = _mix64(rows[:, None] ^ _id_hash([c.id for c in candidates])[None, :])
        return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["rng"] = copy.deepcopy(self._rng.bit_generator.state)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        rng = np.random.default_rng(self.config.seed)
        if "rng" in state:
            if state["rng"].get("bit_generator") != type(rng.bit_generator).__name__:
                raise ValueError(f"field 'rng': expected a {type(rng.bit_generator).__name__} state, got {state['rng'].get('bit_generator')!r}")
            rng.bit_generator.state = copy.deepcopy(state["rng"])
        self._rng = rng
