"""``Examples``: labelled queries over a set of models, the one currency of training and evaluation.

Both shared formats become ``Examples``: an outcome matrix keeps its scores (NaN where a pair is
missing) and per-call costs; a CMRBench split becomes a one-hot score matrix with ``labels``
(the single correct model) and per-example ``domain``/``family`` in ``meta``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Examples:
    """Queries with known outcomes for the models in ``model_ids`` (the columns).

    Attributes:
        texts: the query texts, one per row.
        model_ids: column ids of ``scores``/``costs``.
        scores: ``[n, m]`` float32 quality in [0, 1]; NaN where the outcome is unknown.
        costs: ``[n, m]`` float32 per-call cost, or None where the data has no cost.
        labels: ``[n]`` int column of the single correct model (classification data), -1 if
            none; None for outcome matrices.
        meta: per-row fields (``id``, ``task``, ``domain``, ``family``, ...), lists of length n.
        emb: ``[n, d]`` float32 unit-norm query embeddings once encoded, else None.
    """

    texts: list[str]
    model_ids: list[str]
    scores: np.ndarray
    costs: np.ndarray | None = None
    labels: np.ndarray | None = None
    meta: dict[str, list] = field(default_factory=dict)
    emb: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def column(self) -> dict[str, int]:
        """Model id -> column index."""
        return {m: i for i, m in enumerate(self.model_ids)}

    def subset(self, idx) -> "Examples":
        """Rows ``idx`` (indices or boolean mask), same columns."""
        idx = np.asarray(idx)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        return Examples(
            texts=[self.texts[i] for i in idx],
            model_ids=list(self.model_ids),
            scores=self.scores[idx],
            costs=None if self.costs is None else self.costs[idx],
            labels=None if self.labels is None else self.labels[idx],
            meta={k: [v[i] for i in idx] for k, v in self.meta.items()},
            emb=None if self.emb is None else self.emb[idx],
        )

    def select_models(self, model_ids: list[str]) -> "Examples":
        """Same rows restricted to (and reordered as) ``model_ids``; labels outside become -1."""
        col = self.column
        cols = np.array([col[m] for m in model_ids], dtype=np.int64)
        labels = None
        if self.labels is not None:
            remap = np.full(len(self.model_ids) + 1, -1, dtype=np.int64)
            remap[cols] = np.arange(len(cols))
            labels = remap[self.labels]  # -1 maps to remap[-1] == -1
        return Examples(
            texts=list(self.texts),
            model_ids=list(model_ids),
            scores=self.scores[:, cols],
            costs=None if self.costs is None else self.costs[:, cols],
            labels=labels,
            meta={k: list(v) for k, v in self.meta.items()},
            emb=self.emb,
        )

    @staticmethod
    def concat(parts: list["Examples"]) -> "Examples":
        """Stack rows of parts that share the same columns."""
        if not parts:
            raise ValueError("nothing to concatenate")
        ids = parts[0].model_ids
        for p in parts[1:]:
            if p.model_ids != ids:
                raise ValueError("Examples.concat needs the same model columns")
        keys = set.intersection(*(set(p.meta) for p in parts))
        return Examples(
            texts=[t for p in parts for t in p.texts],
            model_ids=list(ids),
            scores=np.concatenate([p.scores for p in parts]),
            costs=None if any(p.costs is None for p in parts) else np.concatenate([p.costs for p in parts]),
            labels=None if any(p.labels is None for p in parts) else np.concatenate([p.labels for p in parts]),
            meta={k: [x for p in parts for x in p.meta[k]] for k in keys},
            emb=None if any(p.emb is None for p in parts) else np.concatenate([p.emb for p in parts]),
        )

    def best_model(self) -> np.ndarray:
        """Per row, the column of the highest known score (ties: the cheapest), -1 if none known."""
        s = np.where(np.isnan(self.scores), -np.inf, self.scores)
        if self.costs is not None:
            c = np.where(np.isnan(self.costs), np.inf, self.costs)
            # lexicographic: max score, then min cost
            top = s.max(axis=1, keepdims=True)
            c = np.where(s == top, c, np.inf)
            best = c.argmin(axis=1)
        else:
            best = s.argmax(axis=1)
        best[~np.isfinite(s).any(axis=1)] = -1
        return best
