"""The oracle: routes with the true outcomes (evaluation only, the ceiling of every router)."""

from __future__ import annotations

from typing import Annotated, Any, Sequence

import numpy as np
from pydantic import Field

from cmr.data.examples import Examples
from cmr.policies.base import PolicyConfig, RoutingPolicy, config_dataclass
from cmr.policies.memory import as_queries
from cmr.types import FeedbackEvent, ModelCard


@config_dataclass
class OracleConfig(PolicyConfig):
    """Options of :class:`OraclePolicy`.

    Attributes:
        unknown_score: score of an unknown outcome (query not revealed, model not in the revealed
            columns, or NaN); must lie below every real score so the oracle never prefers it.
    """

    unknown_score: Annotated[float, Field(lt=0, strict=False)] = -1.0


class OraclePolicy(RoutingPolicy):
    """Oracle: the true score of each candidate for revealed queries (evaluation only).

    ``reveal(data)`` remembers ``data``'s true scores keyed by the exact bytes of each query
    embedding (the bench harness calls it when ``needs_truth``); ``score`` returns them, and ``unknown_score`` (below every real score) where the
    outcome is unknown. With ``decide.choose`` it picks the best model, the cheapest among ties.
    """

    name = "oracle"
    Config = OracleConfig
    needs_truth = True

    def __init__(self, encoder=None, config=None):
        super().__init__(encoder, config)
        self._emb = np.zeros((0, 0), dtype=np.float32)
        self._scores = np.zeros((0, 0), dtype=np.float32)
        self._model_ids: list[str] = []
        self._col: dict[str, int] = {}
        self._rows: dict[bytes, list[int]] = {}  # embedding bytes -> revealed rows, in order

    def reveal(self, data: Examples) -> None:
        """Remember the true scores of ``data``'s queries (needs ``data.emb``).

        A query revealed again replaces what an earlier ``reveal`` said about it. Distinct
        queries can share an embedding (duplicate texts, or long prompts that the encoder
        truncates to the same prefix); ``score`` then hands out their rows in reveal order, so
        scoring the revealed set in one call, in its order, gives each row its own truth.
        """
        if data.emb is None:
            raise ValueError("oracle.reveal: field 'emb': the examples must be embedded (Examples.emb is None)")
        emb = np.ascontiguousarray(np.asarray(data.emb, dtype=np.float32))
        if emb.ndim != 2 or len(emb) != len(data) or data.scores.shape != (len(data), len(data.model_ids)):
            raise ValueError(f"oracle.reveal: fields 'emb'/'scores': shapes {emb.shape} and {data.scores.shape} do not match {len(data)} rows")
        if len(self._emb):  # forget what this reveal supersedes
            fresh = {r.tobytes() for r in emb}
            keep = np.fromiter((r.tobytes() not in fresh for r in self._emb), dtype=bool, count=len(self._emb))
            self._emb, self._scores = self._emb[keep], self._scores[keep]
        new = [m for m in dict.fromkeys(data.model_ids) if m not in self._col]
        for m in new:
            self._col[m] = len(self._model_ids)
            self._model_ids.append(m)
        block = np.full((len(emb), len(self._model_ids)), np.nan, dtype=np.float32)
        block[:, [self._col[m] for m in data.model_ids]] = data.scores
        if len(self._emb):
            old = np.full((len(self._scores), len(self._model_ids)), np.nan, dtype=np.float32)
            old[:, : self._scores.shape[1]] = self._scores
            self._scores = np.concatenate([old, block])
            self._emb = np.concatenate([self._emb, emb])
        else:
            self._scores, self._emb = block, emb
        self._index_rows()

    def _index_rows(self) -> None:
        rows: dict[bytes, list[int]] = {}
        for i, r in enumerate(self._emb):
            rows.setdefault(r.tobytes(), []).append(i)
        self._rows = rows

    def _lookup(self, q: np.ndarray) -> np.ndarray:
        """Revealed row of each query (-1 if none); the n-th query of a batch with a shared
        embedding gets the n-th revealed row with it (cycling)."""
        out = np.full(len(q), -1, dtype=np.int64)
        used: dict[bytes, int] = {}
        for i, r in enumerate(q):
            key = r.tobytes()
            hits = self._rows.get(key)
            if hits:
                n = used.get(key, 0)
                out[i] = hits[n % len(hits)]
                used[key] = n + 1
        return out

    def fit(self, data: Examples, cards: Sequence[ModelCard]) -> None:
        """Nothing to learn: the oracle only knows what ``reveal`` showed it."""

    def update(self, events: Sequence[FeedbackEvent]) -> None:
        """Nothing to learn from feedback."""

    def add_models(self, cards: Sequence[ModelCard]) -> None:
        """Nothing to prepare: models without revealed outcomes score ``unknown_score``."""

    def score(self, q: np.ndarray, candidates: Sequence[ModelCard], tasks: Sequence[str | None] | None = None) -> np.ndarray:
        """True scores ``[n_q, n_c]``; ``unknown_score`` where the outcome was not revealed."""
        q = as_queries(q)
        rows = self._lookup(q)
        cols = np.fromiter((self._col.get(c.id, -1) for c in candidates), dtype=np.int64, count=len(candidates))
        out = np.full((len(q), len(candidates)), self.config.unknown_score, dtype=np.float64)
        r, c = rows >= 0, cols >= 0
        if r.any() and c.any():
            s = self._scores[np.ix_(rows[r], cols[c])].astype(np.float64)
            out[np.ix_(r, c)] = np.where(np.isnan(s), self.config.unknown_score, s)
        return out

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(truth_emb=self._emb.copy(), truth_scores=self._scores.copy(), truth_model_ids=list(self._model_ids))
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._emb = np.ascontiguousarray(np.asarray(state["truth_emb"], dtype=np.float32))
        self._scores = np.asarray(state["truth_scores"], dtype=np.float32).copy()
        self._model_ids = list(state["truth_model_ids"])
        self._col = {m: i for i, m in enumerate(self._model_ids)}
        self._index_rows()
