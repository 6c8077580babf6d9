"""UniRoute (Jitkrittum et al., 2025, "Universal Model Routing for Efficient LLM Inference").

Every model h is a vector Ψ_h ∈ [0,1]^K: its mean score (1 − error) on the representative
prompts of each of K clusters. A query x gets a cluster assignment p(k|x) and the predicted
quality Σ_k p(k|x)·Ψ_h[k]; the decision rule argmin_h [γ(x,h) + λ·c(h)] with γ = 1 − quality is
exactly ``cmr.decide`` (argmax quality − λ·cost). A new model joins by answering the profile
prompts once (its card's ``profile``): no gradient step, just a K-vector.

Clusters: K-means (``faiss.Kmeans``, spherical) over the profile prompts when the policy knows
them when it first needs clusters (``set_profile_prompts`` before ``fit``/``add_models``, as in
``cmr bench llm --unseen``), else over the first fit data. They are then fixed: every model's Ψ
lives in the same coordinates.

Ψ of a model comes from its profile answers when it has some (``profile_only``, the paper: all
models, seen or new, are described on the same prompts), otherwise from every labelled prompt
it was seen on (fit data and feedback). Per cluster, Ψ is shrunk by an empirical-Bayes
pseudo-count (``smoothing``) towards the cluster's pooled mean (the average model there): a
model's rewards and fit rows count in the clusters they were gathered in, so a few rewards in
one cluster neither carry to the others nor outweigh what the cluster's other models are known
to score. A model with profile answers (the paper's case: described on the same prompts as every
model) is pulled lightly towards its own mean answer instead. A model with no data at all gets
the average model's Ψ.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import numpy as np

from cmr.data.examples import Examples
from cmr.policies.base import Count, NonNegative, PolicyConfig, Positive, RoutingPolicy, config_dataclass
from cmr.policies.memory import as_queries, check_examples, eb_pseudo_counts
from cmr.types import ModelCard


@config_dataclass
class UniRouteConfig(PolicyConfig):
    """Options of :class:`UniRoutePolicy`.

    n_clusters: K (capped so each cluster has about ``min_cluster_size`` prompts).
    min_cluster_size: prompts per cluster the cap aims at.
    niter: K-means iterations.
    assign: "hard" (nearest centroid, the paper's K-means router) or "soft" (softmax over
        centroid similarities at ``temperature``).
    smoothing: pseudo-count pulling a model's estimate in a cluster towards the cluster's pooled
        mean. None: per cluster by empirical Bayes, the within-model over the between-model
        variance of the models' means there (:func:`~cmr.policies.memory.eb_fit`; within-model
        variance taken as that of 0/1 outcomes: exact for correctness, an upper bound for graded
        scores in [0, 1], so never less cautious).
    profile_only: describe a model by its profile answers alone when it has any.
    card_weight: weight of cosine(query, card text) added to the score (0 = the paper's rule).
    """

    n_clusters: Count = 20
    min_cluster_size: Count = 8
    niter: Count = 25
    assign: Literal["hard", "soft"] = "hard"
    temperature: Positive = 0.05
    smoothing: NonNegative | None = None
    profile_only: bool = False
    card_weight: NonNegative = 0.0


class UniRoutePolicy(RoutingPolicy):
    """UniRoute: each model is its per-cluster accuracy on profile prompts (K-means clusters)."""

    name = "uniroute"
    Config = UniRouteConfig

    def __init__(self, encoder=None, config=None):
        super().__init__(encoder=encoder, config=config)
        self._centroids = np.zeros((0, 0), dtype=np.float32)
        self._models: list[str] = []
        self._col: dict[str, int] = {}
        # per model x cluster: sums and counts of known scores (assignment-weighted)
        self._sum = np.zeros((0, 0))  # from fit data and feedback
        self._cnt = np.zeros((0, 0))
        self._psum = np.zeros((0, 0))  # from profile answers
        self._pcnt = np.zeros((0, 0))
        self._profiled: set[str] = set()
        self._psi_memo: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def n_clusters(self) -> int:
        return len(self._centroids)

    # -- clusters ----------------------------------------------------------------------------
    def _kmeans(self, x: np.ndarray) -> None:
        import faiss  # deferred: importing cmr.policies must stay cheap

        x = np.ascontiguousarray(x, dtype=np.float32)
        k = max(1, min(self.config.n_clusters, len(x) // self.config.min_cluster_size))
        km = faiss.Kmeans(
            x.shape[1], k, niter=self.config.niter, seed=self.config.seed, spherical=True,
            min_points_per_centroid=1, max_points_per_centroid=1 << 20, verbose=False,
        )
        km.train(x)
        self._centroids = np.ascontiguousarray(km.centroids, dtype=np.float32)
        K = len(self._centroids)
        M = len(self._models)
        self._sum, self._cnt = np.zeros((M, K)), np.zeros((M, K))
        self._psum, self._pcnt = np.zeros((M, K)), np.zeros((M, K))
        self._psi_memo = None

    def _ensure_clusters(self, fallback: np.ndarray) -> None:
        """Cluster once: the profile prompts when known, else ``fallback`` (the first fit data)."""
        if self.n_clusters:
            return
        src = self._profile_emb if len(self._profile_ids) >= 2 else fallback
        self._kmeans(src)

    def assignment(self, q: np.ndarray) -> np.ndarray:
        """``[n_q, K]`` cluster membership p(k|x) of query embeddings."""
        sims = as_queries(q).astype(np.float64) @ self._centroids.T.astype(np.float64)
        if self.config.assign == "soft":
            z = (sims - sims.max(axis=1, keepdims=True)) / self.config.temperature
            p = np.exp(z)
            return p / p.sum(axis=1, keepdims=True)
        p = np.zeros(sims.shape)
        p[np.arange(len(sims)), sims.argmax(axis=1)] = 1.0
        return p

    # -- statistics --------------------------------------------------------------------------
    def _register(self, ids: Sequence[str]) -> np.ndarray:
        new = [m for m in dict.fromkeys(ids) if m not in self._col]
        if new:
            for m in new:
                self._col[m] = len(self._models)
                self._models.append(m)
            K = self.n_clusters
            grow = np.zeros((len(new), K))
            self._sum, self._cnt = np.concatenate([self._sum.reshape(-1, K), grow]), np.concatenate([self._cnt.reshape(-1, K), grow])
            self._psum, self._pcnt = np.concatenate([self._psum.reshape(-1, K), grow]), np.concatenate([self._pcnt.reshape(-1, K), grow])
            self._psi_memo = None
        return np.array([self._col[m] for m in ids], dtype=np.int64)

    def _count(self, emb: np.ndarray, ids: Sequence[str], scores: np.ndarray, profile: bool) -> None:
        """Add assignment-weighted score sums and counts of ``ids`` over rows ``emb``."""
        cols = self._register(ids)
        P = self.assignment(emb)  # [n, K]
        s = np.asarray(scores, dtype=np.float64)
        known = ~np.isnan(s)
        add_s = np.where(known, s, 0.0).T @ P  # [m, K]
        add_c = known.astype(np.float64).T @ P
        S, C = (self._psum, self._pcnt) if profile else (self._sum, self._cnt)
        np.add.at(S, cols, add_s)
        np.add.at(C, cols, add_c)
        self._psi_memo = None

    def counts(self) -> tuple[np.ndarray, np.ndarray]:
        """The score sums and (assignment-weighted) counts ``[M, K]`` that Ψ is computed from:
        each model's profile answers (``profile_only``, where it has some), else all its data."""
        use_p = self._pcnt.sum(axis=1) > 0
        if not self.config.profile_only:
            use_p = np.zeros(len(self._models), dtype=bool)
        S = np.where(use_p[:, None], self._psum, self._sum + (0.0 if self.config.profile_only else self._psum))
        C = np.where(use_p[:, None], self._pcnt, self._cnt + (0.0 if self.config.profile_only else self._pcnt))
        return S, C

    def _psi_table(self) -> tuple[np.ndarray, np.ndarray]:
        """Ψ of every known model ``[M, K]`` and of the average model ``[K]``; memoised until the
        counts change (scoring is per request, counting per learner step)."""
        if self._psi_memo is not None:
            return self._psi_memo
        K = self.n_clusters
        S, C = self.counts()
        has = C.sum(axis=1) > 0
        # each cluster's estimate is pulled towards the cluster's pooled mean (the average model
        # there), not the model's own overall mean: a model known from a few rewards in one
        # cluster stays an average model in every other (one known everywhere, as from
        # full-information rows, is hardly moved: its own counts dominate)
        ctot = C.sum(axis=0)
        pooled = np.where(ctot > 0, S.sum(axis=0) / np.where(ctot > 0, ctot, 1.0), 0.0)  # [K]
        a = cluster_pseudo_counts(S, C) if self.config.smoothing is None else np.full(K, float(self.config.smoothing))
        # an infinite pseudo-count (the models' means there spread no more than sampling
        # explains): every model is the pooled mean there
        fin = np.isfinite(a)
        a = np.where(fin, a, 0.0)
        denom = C + a[None, :]
        Q = np.where(fin[None, :] & (denom > 0), (S + a[None, :] * pooled[None, :]) / np.where(denom > 0, denom, 1.0), pooled[None, :])
        # a model with profile answers is the paper's case: described on the same prompts as every
        # other, its clusters are pulled lightly (``smoothing``, else one answer's worth) towards
        # its own mean answer (a strong model joining by profile stays strong where it answered
        # little; the empirical-Bayes pull above cost RouterDC7's unseen models 1 point)
        pc = self._pcnt.sum(axis=1)
        prof = pc > 0
        if prof.any():
            ap = 1.0 if self.config.smoothing is None else float(self.config.smoothing)
            own = (self._psum.sum(axis=1) / np.where(prof, pc, 1.0))[:, None]
            Qp = np.where(C + ap > 0, (S + ap * own) / np.where(C + ap > 0, C + ap, 1.0), own)
            Q = np.where(prof[:, None], Qp, Q)
        avg = Q[has].mean(axis=0) if has.any() else np.zeros(K)
        Q = np.where(has[:, None], Q, avg)  # a model registered without any data: average model
        self._psi_memo = (Q, avg)
        return self._psi_memo

    def psi(self, ids: Sequence[str]) -> np.ndarray:
        """Ψ ``[n, K]``: per-cluster mean score of each model (average model for unknown ids)."""
        K = self.n_clusters
        if not self._models:
            return np.zeros((len(ids), K))
        Q, avg = self._psi_table()
        cols = np.fromiter((self._col.get(m, -1) for m in ids), dtype=np.int64, count=len(ids))
        out = np.broadcast_to(avg, (len(ids), K)).copy()
        seen = cols >= 0
        out[seen] = Q[cols[seen]]
        return out

    # -- learning ----------------------------------------------------------------------------
    def fit(self, data: Examples, cards: Sequence[ModelCard]) -> None:
        """Cluster (once), then count ``data``'s known scores per model and cluster."""
        check_examples(data, f"{self.name}.fit")
        if len(data) == 0:
            self.add_models(cards)
            return
        self._ensure_clusters(data.emb)
        self.add_models(cards)
        self._count(data.emb, data.model_ids, data.scores, profile=False)

    def add_models(self, cards: Sequence[ModelCard]) -> None:
        """New models: their profile answers become their Ψ (no training step)."""
        if self.config.card_weight > 0:
            self.card_embeddings(cards)
        prof = self.profile_examples([c for c in cards if c.id not in self._profiled])
        if prof is not None:
            self._ensure_clusters(prof.emb)
            self._profiled.update(prof.model_ids)
            self._count(prof.emb, prof.model_ids, prof.scores, profile=True)
        if self.n_clusters:
            self._register([c.id for c in cards])

    # update(): the base class turns feedback into one-column Examples and calls fit — for
    # UniRoute that is exactly "count the revealed score in the query's cluster".

    # -- scoring -----------------------------------------------------------------------------
    def score(self, q: np.ndarray, candidates: Sequence[ModelCard], tasks: Sequence[str | None] | None = None) -> np.ndarray:
        """Σ_k p(k|x)·Ψ_h[k] (+ ``card_weight``·cosine(x, card)) ``[n_q, n_c]``."""
        q = as_queries(q)
        ids = [c.id for c in candidates]
        if self.n_clusters:
            out = self.assignment(q) @ self.psi(ids).T
        else:
            out = np.zeros((len(q), len(ids)))
        if self.config.card_weight > 0 and len(candidates):
            out = out + self.config.card_weight * (q @ self.card_embeddings(candidates).T)
        return out.astype(np.float64)

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        d = super().state_dict()
        d.update(
            centroids=self._centroids.copy(),
            models=list(self._models),
            sum=self._sum.copy(), cnt=self._cnt.copy(), psum=self._psum.copy(), pcnt=self._pcnt.copy(),
            profiled=sorted(self._profiled),
        )
        return d

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._centroids = np.ascontiguousarray(np.asarray(state["centroids"], dtype=np.float32))
        self._models = list(state["models"])
        self._col = {m: i for i, m in enumerate(self._models)}
        for k in ("sum", "cnt", "psum", "pcnt"):
            setattr(self, f"_{k}", np.asarray(state[k], dtype=np.float64).copy())
        self._profiled = set(state["profiled"])
        self._psi_memo = None



def cluster_pseudo_counts(S: np.ndarray, C: np.ndarray) -> np.ndarray:
    """Empirical-Bayes pseudo-count ``[K]`` of each cluster from the models' score sums ``S`` and
    (assignment-weighted) counts ``C`` there ``[M, K]`` (:func:`~cmr.policies.memory.eb_pseudo_counts`)."""
    return eb_pseudo_counts(S, C)
