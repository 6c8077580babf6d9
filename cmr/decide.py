"""The decision rule, in one place: argmax over candidates of (score − λ·cost), with filters and top-k.

Benchmarks and the served router both call this, so a benchmark number is a number about the
served router.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from cmr.types import Decision, ModelCard


@dataclass
class Filters:
    """Candidate filter: keep cards matching every given constraint (None = no constraint)."""

    domains: list[str] | None = None
    families: list[str] | None = None
    max_cost: float | None = None
    allow: list[str] | None = None
    deny: list[str] = field(default_factory=list)

    def mask(self, cards: Sequence[ModelCard]) -> np.ndarray:
        keep = np.ones(len(cards), dtype=bool)
        if self.domains is not None:
            s = set(self.domains)
            keep &= np.fromiter((c.domain in s for c in cards), bool, len(cards))
        if self.families is not None:
            s = set(self.families)
            keep &= np.fromiter((c.family in s for c in cards), bool, len(cards))
        if self.max_cost is not None:
            keep &= np.fromiter((c.cost <= self.max_cost for c in cards), bool, len(cards))
        if self.allow is not None:
            s = set(self.allow)
            keep &= np.fromiter((c.id in s for c in cards), bool, len(cards))
        if self.deny:
            s = set(self.deny)
            keep &= np.fromiter((c.id not in s for c in cards), bool, len(cards))
        return keep

    def is_empty(self) -> bool:
        return self.domains is None and self.families is None and self.max_cost is None and self.allow is None and not self.deny


def utilities(scores: np.ndarray, costs: np.ndarray, lam: float | np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """``scores − λ·costs`` with masked-out candidates at −inf. ``costs`` is ``[n_c]`` or ``[n_q, n_c]``;
    ``lam`` a scalar or one value per query."""
    lam = np.asarray(lam, dtype=np.float64)
    if lam.ndim == 1:
        lam = lam[:, None]
    u = scores.astype(np.float64) - lam * np.asarray(costs, dtype=np.float64)
    if mask is not None:
        u = np.where(mask, u, -np.inf)
    return u


def choose(scores: np.ndarray, costs: np.ndarray, lam: float | np.ndarray = 0.0, mask: np.ndarray | None = None) -> np.ndarray:
    """Index of the chosen candidate per query (``[n_q]``); ties go to the cheaper candidate."""
    u = utilities(scores, costs, lam, mask)
    c = np.broadcast_to(np.asarray(costs, dtype=np.float64), u.shape)
    top = u.max(axis=1, keepdims=True)
    # among ties at the top utility, prefer the cheapest (stable for equal costs)
    tie_cost = np.where(u >= top - 1e-12, c, np.inf)
    return tie_cost.argmin(axis=1)


def decide(
    scores: np.ndarray,
    candidates: Sequence[ModelCard],
    lam: float | np.ndarray = 0.0,
    filters: Filters | None = None,
    k: int = 3,
    checkpoint_version: int | None = None,
    costs: np.ndarray | None = None,
) -> list[Decision]:
    """Decisions for a batch of queries: the chosen model plus the next ``k − 1`` by utility.

    ``costs``: the candidates' costs when the caller already holds them as an array (the router's
    card table), else read from the cards. Raises ``ValueError`` when the filters leave no candidate.
    """
    if costs is None:
        costs = np.fromiter((c.cost for c in candidates), np.float64, len(candidates))
    mask = None
    if filters is not None and not filters.is_empty():
        m = filters.mask(candidates)
        if not m.any():
            raise ValueError("no candidate model matches the filters")
        mask = np.broadcast_to(m, scores.shape)
    u = utilities(scores, costs, lam, mask)
    best = choose(scores, costs, lam, mask)
    k = max(1, min(k, len(candidates)))
    top = np.argpartition(-u, k - 1, axis=1)[:, :k] if k < len(candidates) else np.tile(np.arange(len(candidates)), (len(u), 1))
    lams = np.broadcast_to(np.asarray(lam, dtype=np.float64), (len(u),))
    out = []
    for i in range(len(u)):
        order = top[i][np.argsort(-u[i, top[i]], kind="stable")]
        alts = [(candidates[j].id, float(scores[i, j])) for j in order if j != best[i] and np.isfinite(u[i, j])][: k - 1]
        j = best[i]
        out.append(Decision(model=candidates[j].id, score=float(scores[i, j]), utility=float(u[i, j]), alternatives=alts, checkpoint_version=checkpoint_version,
                            cost_weight=float(lams[i])))
    return out
