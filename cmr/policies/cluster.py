"""Cluster routing: K-means over prompt embeddings, per-cluster per-model mean known score."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from cmr.data.examples import Examples
from cmr.policies.base import Count, NonNegative, PolicyConfig, Positive, config_dataclass
from cmr.policies.memory import PRIOR_GRID, PRIOR_START, RETUNE_GROWTH, MemoryPolicy, OutcomeMemory, as_queries, candidate_prior, check_examples, tune_grid, tuning_sample
from cmr.types import ModelCard

#: smoothing pseudo-counts tried when it is tuned, largest first (ties keep the more cautious
#: one; 1e6 is the global mean alone); SMOOTH_START before the first tuning
SMOOTH_GRID = (1e6, 30.0, 10.0, 3.0, 1.0)
SMOOTH_START = 1.0
# card-term weight before any tuning (too few rows yet): enough to rank models nothing is known of


@config_dataclass
class ClusterConfig(PolicyConfig):
    """Options of :class:`ClusterPolicy`.

    Attributes:
        n_clusters: K-means centroids (capped at the number of stored prompts).
        niter: K-means iterations.
        soft: score with a softmax over centroid similarities instead of the nearest centroid.
        temperature: softmax temperature for ``soft``.
        smoothing: pseudo-count pulling each cluster's mean towards the model's global mean
            (a cluster with no known outcome of a model falls back to the global mean). None:
            tuned with ``prior_weight`` by the same leave-one-out (``SMOOTH_GRID``, whose
            largest value is the global mean alone: the zero router where clusters predict
            nothing better).
        prior_weight: weight of the cosine(query, card text) term added to every score; None:
            tuned as the memory grows (``tune_min_rows``) by leave-one-out routing quality
            over a sample of the stored prompts (as in kNN).
        tune_min_rows: fewest rows stored since the last tuning that re-tune ``prior_weight`` (and a
            ``RETUNE_GROWTH`` fraction of the memory).
        tune_max_rows: stored prompts sampled for that tuning.
    """

    n_clusters: Count = 64
    niter: Count = 25
    soft: bool = False
    temperature: Positive = 0.05
    smoothing: NonNegative | None = None
    prior_weight: NonNegative | None = None
    tune_min_rows: Count = 50
    tune_max_rows: Count = 1000


class ClusterPolicy(MemoryPolicy):
    """Cluster: K-means over all prompts seen; a model's score is its mean known score in the query's cluster.

    Every ``fit`` re-clusters all prompts stored so far (seeded ``faiss.Kmeans``, spherical), then
    keeps per-cluster sums of each model's known scores and counts (label frequency on CMRBench).
    A cluster's estimate is smoothed towards the model's global mean known score (or the average
    model's for one never seen); ``soft`` mixes the clusters by a softmax over centroid
    similarities. A weight × cosine(query, card text) is added, as in kNN (``prior_weight``, or
    tuned by leave-one-out when None). Profile answers
    of new models are assigned to the current centroids and feed that model's cluster means.
    """

    name = "cluster"
    Config = ClusterConfig

    def __init__(self, encoder=None, config=None):
        super().__init__(encoder, config)
        self._centroids = np.zeros((0, 0), dtype=np.float32)
        self._assign = np.zeros(0, dtype=np.int64)
        self._sum = np.zeros((0, 0), dtype=np.float64)  # [K, M] sum of known scores
        self._cnt = np.zeros((0, 0), dtype=np.float64)  # [K, M] number of known scores
        self._tuned_smoothing = SMOOTH_START
        self._clustered_at = 0  # memory size at the last K-means

    # -- learning ----------------------------------------------------------------------------
    def fit(self, data: Examples, cards: Sequence[ModelCard]) -> None:
        """Add ``data``'s prompts and recount per-cluster means; re-cluster everything seen so far
        when the memory grew by ``RETUNE_GROWTH`` since the last clustering. Feedback arrives in
        small batches: re-running K-means on each would cost a full clustering per learner step
        and move every cluster boundary (other models' queries changing hands) for one reward."""
        check_examples(data, "cluster.fit")
        self.add_models(cards)
        self._mem.add(data.emb, data.model_ids, data.scores)
        if len(self._mem):
            if not len(self._centroids) or len(self._mem) - self._clustered_at >= RETUNE_GROWTH * max(self._clustered_at, 1):
                self._recluster()
            self._recount()
            if (self.config.prior_weight is None or self.config.smoothing is None) and self._tune_due():
                self._tune()

    @property
    def smoothing(self) -> float:
        """The smoothing pseudo-count in use: the configured one, else the last tuned one."""
        return float(self.config.smoothing) if self.config.smoothing is not None else self._tuned_smoothing

    def _per_cluster(self, kc: np.ndarray, prior: np.ndarray, a: float | None = None) -> np.ndarray:
        """``[K, len(kc)]`` smoothed per-cluster mean of columns ``kc`` (``prior`` where unknown)."""
        a = self.smoothing if a is None else a
        p = prior[None, :]
        tot = self._cnt[:, kc] + a
        ok = tot > 0
        return np.where(ok, (self._sum[:, kc] + a * p) / np.where(ok, tot, 1.0), p)

    def _tune(self) -> None:
        """Leave-one-out: each sampled prompt is scored with its own outcomes taken out of its
        cluster's counts; keep the card weight and smoothing (those not configured) under which
        routing them picks the best outcomes."""
        rows, cols, cmat = tuning_sample(self._mem, self._card_emb, self.config.seed, self.config.tune_max_rows)
        if len(rows) < 2 or not len(cols):
            return
        x = self._mem.emb[rows]
        prior = candidate_prior(self._mem, cols)
        w = self.cluster_weights(x)  # [n, K]
        own = self._assign[rows]
        s = self._mem.scores[np.ix_(rows, cols)]
        known = ~np.isnan(s)
        p = prior[None, :]
        wo = w[np.arange(len(rows)), own][:, None]
        smooths = SMOOTH_GRID if self.config.smoothing is None else (self.smoothing,)
        ests = []
        for a in smooths:
            full = self._per_cluster(cols, prior, a)  # [K, n_c]
            tot = self._cnt[np.ix_(own, cols)] - known + a
            ok = tot > 0
            loo = np.where(ok, (self._sum[np.ix_(own, cols)] - np.where(known, s, 0.0) + a * p) / np.where(ok, tot, 1.0), p)
            ests.append(w @ full + wo * (loo - full[own]))  # swap the own cluster's estimate for its LOO one
        grid = PRIOR_GRID if self.config.prior_weight is None else (self.prior_weight,)
        i, self._tuned_weight = tune_grid(ests, x @ cmat.T, s, grid)
        self._tuned_smoothing = float(smooths[i])
        self._tuned_at = len(self._mem)

    def add_models(self, cards: Sequence[ModelCard]) -> None:
        """Embed the new cards (for the card prior) and count their profile answers in the clusters."""
        if self._add_cards(cards):
            if not len(self._centroids):
                self._recluster()
            self._recount()

    def _recluster(self) -> None:
        import faiss  # deferred: importing cmr.policies must stay cheap

        x = self._mem.emb
        k = min(self.config.n_clusters, len(x))
        km = faiss.Kmeans(
            x.shape[1], k, niter=self.config.niter, seed=self.config.seed, spherical=True,
            min_points_per_centroid=1, max_points_per_centroid=1 << 20, verbose=False,
        )
        km.train(x)
        self._centroids = np.ascontiguousarray(km.centroids, dtype=np.float32)
        self._clustered_at = len(x)

    def _recount(self) -> None:
        """Assign every stored prompt to its nearest centroid and sum known scores per cluster."""
        x, s = self._mem.emb, self._mem.scores
        self._assign = (x @ self._centroids.T).argmax(axis=1)
        onehot = np.zeros((len(x), len(self._centroids)), dtype=np.float64)
        onehot[np.arange(len(x)), self._assign] = 1.0
        known = ~np.isnan(s)
        self._sum = onehot.T @ np.where(known, s, 0.0).astype(np.float64)
        self._cnt = onehot.T @ known.astype(np.float64)

    # -- scoring -----------------------------------------------------------------------------
    def cluster_weights(self, q: np.ndarray) -> np.ndarray:
        """``[n_q, K]`` membership of each query: one-hot nearest centroid, or softmax when ``soft``."""
        sims = as_queries(q) @ self._centroids.T
        if self.config.soft:
            z = (sims - sims.max(axis=1, keepdims=True)) / self.config.temperature
            p = np.exp(z.astype(np.float64))
            return p / p.sum(axis=1, keepdims=True)
        p = np.zeros(sims.shape, dtype=np.float64)
        p[np.arange(len(sims)), sims.argmax(axis=1)] = 1.0
        return p

    def score(self, q: np.ndarray, candidates: Sequence[ModelCard], tasks: Sequence[str | None] | None = None) -> np.ndarray:
        """Cluster estimate (smoothed, backed off) + card weight × cosine(query, card) ``[n_q, n_c]``."""
        q = as_queries(q)
        cols = self._mem.columns([c.id for c in candidates])
        prior = candidate_prior(self._mem, cols)
        est = np.broadcast_to(prior, (len(q), len(cols))).copy()
        seen = np.flatnonzero(cols >= 0)
        if len(self._centroids) and len(seen) and len(q):
            est[:, seen] = self.cluster_weights(q) @ self._per_cluster(cols[seen], prior[seen])
        return self.with_card_term(est, q, candidates)

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            memory=self._mem.state_dict(),
            profiled=sorted(self._profiled),
            centroids=self._centroids.copy(),
            assign=self._assign.copy(),
            cluster_sum=self._sum.copy(),
            cluster_count=self._cnt.copy(),
            tuned_prior_weight=self._tuned_weight,
            tuned_smoothing=self._tuned_smoothing,
            tuned_at=self._tuned_at,
            clustered_at=self._clustered_at,
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._mem = OutcomeMemory()
        self._mem.load_state_dict(state["memory"])
        self._profiled = set(state.get("profiled", []))
        self._centroids = np.ascontiguousarray(np.asarray(state["centroids"], dtype=np.float32))
        self._assign = np.asarray(state["assign"], dtype=np.int64).copy()
        self._sum = np.asarray(state["cluster_sum"], dtype=np.float64).copy()
        self._cnt = np.asarray(state["cluster_count"], dtype=np.float64).copy()
        self._tuned_weight = float(state.get("tuned_prior_weight", PRIOR_START))
        self._tuned_smoothing = float(state.get("tuned_smoothing", SMOOTH_START))
        self._tuned_at = int(state.get("tuned_at", len(self._mem)))
        self._clustered_at = int(state.get("clustered_at", len(self._mem)))
