"""UniRoute with a learned cluster map (Jitkrittum et al., 2025, §"learned cluster map").

The K-means assignment of :mod:`cmr.policies.uniroute` is replaced by a soft map
p(k|x) = softmax(Wx + b), trained (torch, full-batch Adam) on the training models' outcomes so
that Σ_k p(k|x)·Ψ_h[k] predicts the outcome of model h on prompt x, where Ψ_h itself is computed
through the same map (assignment-weighted mean score over the model's reference prompts: its
profile answers when it has some, else its training prompts) — the map learns which prompt
groupings make the per-cluster accuracies predictive. W starts at the K-means centroids.

The map is trained once, on the first ``fit``; after that it is fixed, so every model's Ψ —
seen or new — lives in the same coordinates. A new model still joins only through its profile
vector Ψ_h: no gradient step.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import numpy as np

from cmr.data.examples import Examples
from cmr.policies.base import Count, NonNegative, Positive, config_dataclass
from cmr.policies.memory import as_queries, check_examples
from cmr.policies.uniroute import UniRouteConfig, UniRoutePolicy
from cmr.types import ModelCard


@config_dataclass
class UniRouteMapConfig(UniRouteConfig):
    """Options of :class:`UniRouteMapPolicy` (on top of UniRoute's).

    epochs: full-batch Adam steps; lr: learning rate; weight_decay: L2 on W;
    max_rows: training prompts used (a seeded subsample above it).
    """

    assign: Literal["soft"] = "soft"  # the learned map is soft by construction
    epochs: Count = 200
    lr: Positive = 0.01
    weight_decay: NonNegative = 1e-4
    max_rows: Count = 20000


class UniRouteMapPolicy(UniRoutePolicy):
    """UniRoute with a learned soft cluster map trained on the training models' outcomes."""

    name = "uniroute-map"
    Config = UniRouteMapConfig

    def __init__(self, encoder=None, config=None):
        super().__init__(encoder=encoder, config=config)
        self._W = np.zeros((0, 0), dtype=np.float64)  # [K, D]
        self._bias = np.zeros(0, dtype=np.float64)  # [K]
        self._trained = False
        # profile answers, kept so the map's reference sets can be rebuilt at training time
        self._prof_answers: dict[str, dict[str, float]] = {}

    def assignment(self, q: np.ndarray) -> np.ndarray:
        """``[n_q, K]``: softmax(Wx + b); before training, the soft K-means assignment."""
        if not self._trained:
            return super().assignment(q)
        z = as_queries(q).astype(np.float64) @ self._W.T + self._bias
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        return p / p.sum(axis=1, keepdims=True)

    def add_models(self, cards: Sequence[ModelCard]) -> None:
        for c in cards:
            if c.profile and c.id not in self._prof_answers:
                self._prof_answers[c.id] = {k: float(v) for k, v in c.profile.items()}
        super().add_models(cards)

    def fit(self, data: Examples, cards: Sequence[ModelCard]) -> None:
        """First call: cluster, train the map, then recount every model through it."""
        check_examples(data, f"{self.name}.fit")
        if self._trained or len(data) == 0:
            super().fit(data, cards)
            return
        self._ensure_clusters(data.emb)
        for c in cards:
            if c.profile and c.id not in self._prof_answers:
                self._prof_answers[c.id] = {k: float(v) for k, v in c.profile.items()}
        self._train_map(data)
        self._trained = True
        # recount everything in the learnt coordinates: profile answers and this fit's data
        K = self.n_clusters
        M = len(self._models)
        self._sum, self._cnt = np.zeros((M, K)), np.zeros((M, K))
        self._psum, self._pcnt = np.zeros((M, K)), np.zeros((M, K))
        self._psi_memo = None
        self._profiled = set()
        known_cards = [ModelCard(id=m, profile=p) for m, p in self._prof_answers.items()]
        UniRoutePolicy.add_models(self, known_cards)
        UniRoutePolicy.add_models(self, cards)
        self._count(data.emb, data.model_ids, data.scores, profile=False)

    def _train_map(self, data: Examples) -> None:
        """Fit W, b so that p(k|x)·Ψ_h predicts the outcome y(x, h) (binary cross-entropy)."""
        import torch

        cfg = self.config
        rng = np.random.default_rng(cfg.seed)
        rows = np.arange(len(data))
        if len(rows) > cfg.max_rows:
            rows = np.sort(rng.choice(len(rows), cfg.max_rows, replace=False))
        X = torch.as_tensor(np.asarray(data.emb)[rows], dtype=torch.float64)
        Y = np.asarray(data.scores, dtype=np.float64)[rows]
        mask = ~np.isnan(Y)
        keep = mask.any(axis=0)
        Y, mask = Y[:, keep], mask[:, keep]
        ids = [m for m, k in zip(data.model_ids, keep) if k]
        Yt = torch.as_tensor(np.where(mask, Y, 0.0))
        Mt = torch.as_tensor(mask.astype(np.float64))
        # reference set of each model: its profile answers (profile_only) or the training rows
        ref = self._profile_reference(ids)
        torch.manual_seed(cfg.seed)
        W = torch.nn.Parameter(torch.as_tensor(self._centroids, dtype=torch.float64) / cfg.temperature)
        b = torch.nn.Parameter(torch.zeros(len(self._centroids), dtype=torch.float64))
        opt = torch.optim.Adam([W, b], lr=cfg.lr, weight_decay=0.0)
        eps = 1e-4
        for _ in range(cfg.epochs):
            opt.zero_grad()
            P = torch.softmax(X @ W.T + b, dim=1)  # [n, K]
            psi = self._torch_psi(P, Yt, Mt, ref, W, b)  # [m, K]
            pred = (P @ psi.T).clamp(eps, 1 - eps)
            bce = -(Yt * torch.log(pred) + (1 - Yt) * torch.log(1 - pred))
            loss = (bce * Mt).sum() / Mt.sum().clamp_min(1.0) + cfg.weight_decay * (W * W).sum()
            loss.backward()
            opt.step()
        self._W = W.detach().numpy().copy()
        self._bias = b.detach().numpy().copy()

    def _profile_reference(self, ids: list[str]):
        """Profile prompts' embeddings and the answers of ``ids`` on them (None where unused)."""
        import torch

        if not (self.config.profile_only and self._profile_ids):
            return None
        row = {p: i for i, p in enumerate(self._profile_ids)}
        S = np.full((len(row), len(ids)), np.nan)
        for j, m in enumerate(ids):
            for pid, v in self._prof_answers.get(m, {}).items():
                if pid in row:
                    S[row[pid], j] = v
        has = ~np.isnan(S).all(axis=0)  # models with profile answers use them
        if not has.any():
            return None
        known = ~np.isnan(S)
        return (
            torch.as_tensor(self._profile_emb, dtype=torch.float64),
            torch.as_tensor(np.where(known, S, 0.0)),
            torch.as_tensor(known.astype(np.float64)),
            torch.as_tensor(has),
        )

    def _torch_psi(self, P, Yt, Mt, ref, W, b):
        """Ψ [m, K] through the current map, smoothed towards each model's overall mean."""
        import torch

        # fitting the map on full-information rows: a light fixed pull (serving's Ψ uses the
        # configured or empirical-Bayes pseudo-count of :meth:`psi`)
        a = 1.0 if self.config.smoothing is None else self.config.smoothing

        def smoothed(Pr, S, Km):
            s = S.T @ Pr  # [m, K]
            c = Km.T @ Pr
            overall = S.sum(0) / Km.sum(0).clamp_min(1.0)
            return (s + a * overall[:, None]) / (c + a).clamp_min(1e-9)

        psi = smoothed(P, Yt, Mt)
        if ref is not None:
            Xp, Sp, Kp, has = ref
            Pp = torch.softmax(Xp @ W.T + b, dim=1)
            psi = torch.where(has[:, None], smoothed(Pp, Sp, Kp), psi)
        return psi

    def state_dict(self) -> dict[str, Any]:
        d = super().state_dict()
        d.update(W=self._W.copy(), bias=self._bias.copy(), trained=self._trained, prof_answers={m: dict(p) for m, p in self._prof_answers.items()})
        return d

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._W = np.asarray(state["W"], dtype=np.float64).copy()
        self._bias = np.asarray(state["bias"], dtype=np.float64).copy()
        self._trained = bool(state["trained"])
        self._prof_answers = {m: dict(p) for m, p in state["prof_answers"].items()}
