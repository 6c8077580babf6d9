"""Shared machinery of the linear contextual bandits (LinUCB, Thompson sampling).

Every arm (model) is a Bayesian ridge regression over the same low-rank features of the query
embedding: a fixed projection to ``dim`` whitened components (PCA of the first data seen, padded
with random orthogonal directions when that data is too small) plus a bias. Per arm the policy
keeps only the sufficient statistics ``A_a = Σ φφᵀ`` and ``b_a = Σ r·φ`` (``[M, f, f]`` and
``[M, f]`` with ``f = dim + 1``), so thousands of arms cost a few megabytes and every operation is
a batched matrix op over all arms at once.

Prior of an arm (what makes a model routable before any feedback):
- its mean is the *pooled* regression over every arm's data (the average model) plus
  ``card_weight`` times the card-similarity term ``x·(c_a − c̄)`` written in feature space, so a
  new model starts as "the average model, nudged by how well its card matches the query";
- a card with ``profile`` answers (UniRoute's representative prompts) adds those answers as
  ordinary observations of that arm.

Reward = quality − ``lam``·cost. Keep ``lam = 0`` when the decision rule (``cmr.decide``) applies
the cost weight itself, as every benchmark does when it sweeps λ: then the score stays a quality
estimate and λ is not counted twice.
"""

from __future__ import annotations

import zlib
from typing import Annotated, Any, Literal, Sequence

import numpy as np
from pydantic import Field

from cmr.data.examples import Examples
from cmr.policies.base import Count, Integer, NonNegative, PolicyConfig, Positive, RoutingPolicy, config_dataclass
from cmr.policies.memory import as_queries, check_examples
from cmr.types import FeedbackEvent, ModelCard

# element budget of the temporaries of one vectorised block (keeps memory ~ tens of MB)
_BLOCK_ELEMS = 4_000_000


@config_dataclass
class BanditConfig(PolicyConfig):
    """Options shared by the linear bandits.

    dim: projected feature dimension (the bias is added on top).
    projection: "pca" (from the first ``pca_rows`` query embeddings seen) or "random".
    pca_rows: online events buffered before the projection is fixed (``fit`` fixes it at once).
    reg: prior precision of every arm's weights (ridge strength), in observations. None: per
        weight by empirical Bayes (``LinearBanditPolicy._reg``), at least 1: an arm known from a
        few rewards stays near the average model until its evidence outweighs the spread
        between arms.
    lam: cost weight folded into the learnt reward (quality − lam·cost); see module doc.
    card_weight: weight of the card-similarity prior mean.
    """

    dim: Count = 16
    projection: Literal["pca", "random"] = "pca"
    pca_rows: Annotated[Integer, Field(ge=2)] = 64
    reg: Positive | None = None
    lam: NonNegative = 0.0
    card_weight: NonNegative = 1.0



class LinearBanditPolicy(RoutingPolicy):
    """Base of LinUCB and Thompson sampling: per-arm ridge statistics over shared features.

    Subclasses implement :meth:`_arm_scores` (how the posterior becomes a score).
    """

    Config = BanditConfig

    def __init__(self, encoder=None, config=None):
        super().__init__(encoder=encoder, config=config)
        self._arms: list[str] = []
        self._arm_idx: dict[str, int] = {}
        f = self.config.dim + 1
        self._A = np.zeros((0, f, f), dtype=np.float64)
        self._b = np.zeros((0, f), dtype=np.float64)
        self._n = np.zeros(0, dtype=np.int64)
        self._proj: np.ndarray | None = None  # [D, dim]
        self._mu: np.ndarray | None = None  # [D]
        self._sigma: np.ndarray | None = None  # [dim] whitening scales
        self._profiled: set[str] = set()
        # online observations waiting for the projection: (emb [n,D], arm ids, rewards [n,m])
        self._pending: list[tuple[np.ndarray, list[str], np.ndarray]] = []
        self._cache: dict[str, Any] = {}

    # -- features ----------------------------------------------------------------------------
    def _init_projection(self, X: np.ndarray) -> None:
        """Fix the feature map from embeddings ``X`` (PCA, whitened; random padding)."""
        cfg = self.config
        X = np.asarray(X, dtype=np.float64)
        D = X.shape[1]
        dim = cfg.dim
        rng = np.random.default_rng(cfg.seed)
        self._mu = X.mean(axis=0)
        cols, sig = np.zeros((D, 0)), np.zeros(0)
        if cfg.projection == "pca" and len(X) >= 2:
            # eigen-decomposition of the D x D covariance: far cheaper than an SVD of n x D data
            Xc = X - self._mu
            w, V = np.linalg.eigh(Xc.T @ Xc / (len(X) - 1))
            w, V = w[::-1], V[:, ::-1]
            S = np.sqrt(np.maximum(w, 0.0))
            k = int(min(dim, (S > 1e-6 * max(S[0], 1e-12)).sum()))
            cols, sig = V[:, :k], S[:k]
        if cols.shape[1] < min(dim, D):
            # pad with random directions orthogonal to the PCA ones (QR keeps the PCA columns)
            R = rng.standard_normal((D, min(dim, D) - cols.shape[1]))
            Q, _ = np.linalg.qr(np.concatenate([cols, R], axis=1))
            pad = Q[:, cols.shape[1] : min(dim, D)]
            # MiniLM vectors are unit-norm: a random direction carries ~1/sqrt(D) of it
            floor = sig[-1] if sig.size else 1.0 / np.sqrt(D)
            pad_sig = np.maximum((X - self._mu) @ pad, 0).std(axis=0) if len(X) > 1 else np.zeros(pad.shape[1])
            cols = np.concatenate([cols, pad], axis=1)
            sig = np.concatenate([sig, np.maximum(pad_sig, floor)])
        if cols.shape[1] < dim:  # embeddings narrower than dim: the extra features stay 0
            cols = np.concatenate([cols, np.zeros((D, dim - cols.shape[1]))], axis=1)
            sig = np.concatenate([sig, np.ones(dim - len(sig))])
        # scale so that |φ| ~ 1 (the usual LinUCB normalisation): the prior N(0, I/reg) then
        # predicts rewards of order 1, not of order sqrt(dim)
        self._proj, self._sigma = cols, sig * np.sqrt(dim)
        self._cache.clear()

    def _features(self, q: np.ndarray) -> np.ndarray:
        """``[n, dim + 1]``: whitened projection (scaled by 1/sqrt(dim)) of the query embeddings plus a bias."""
        z = ((np.asarray(q, dtype=np.float64) - self._mu) @ self._proj) / self._sigma
        return np.concatenate([z, np.ones((len(z), 1))], axis=1)

    def _card_term(self, C: np.ndarray) -> np.ndarray:
        """Weights ``[n, f]`` whose features-dot approximates ``x·c`` for card embeddings ``C``."""
        C = np.asarray(C, dtype=np.float64)
        return np.concatenate([(C @ self._proj) * self._sigma, (C @ self._mu)[:, None]], axis=1)

    # -- arms --------------------------------------------------------------------------------
    def _register(self, ids: Sequence[str]) -> np.ndarray:
        """Arm indices of ``ids``, creating arms (zero statistics) for new ones."""
        new = [m for m in dict.fromkeys(ids) if m not in self._arm_idx]
        if new:
            f = self.config.dim + 1
            for m in new:
                self._arm_idx[m] = len(self._arms)
                self._arms.append(m)
            self._A = np.concatenate([self._A, np.zeros((len(new), f, f))])
            self._b = np.concatenate([self._b, np.zeros((len(new), f))])
            self._n = np.concatenate([self._n, np.zeros(len(new), dtype=np.int64)])
            self._on_new_arms(len(new))
            self._cache.clear()
        return np.array([self._arm_idx[m] for m in ids], dtype=np.int64)

    def _on_new_arms(self, k: int) -> None:
        """Hook for subclasses keeping per-arm state (Thompson's noise)."""

    def _card_matrix(self, ids: Sequence[str]) -> np.ndarray | None:
        """Card embeddings of ``ids`` (id-only cards where no card was given), None without an encoder."""
        if self.encoder is None or self.config.card_weight == 0:
            return None
        missing = [ModelCard(id=m) for m in dict.fromkeys(ids) if m not in self._card_emb]
        if missing:  # arms met only through feedback: their id words are all we know
            self.card_embeddings(missing)
        return np.stack([self._card_emb[m] for m in ids]) if len(ids) else np.zeros((0, self.encoder.dim), np.float32)

    # -- learning ----------------------------------------------------------------------------
    def _observe(self, emb: np.ndarray, ids: Sequence[str], R: np.ndarray) -> None:
        """Add observations: rows ``emb`` [n, D], columns ``ids``, rewards ``R`` [n, m] (NaN = unseen)."""
        if len(emb) == 0:
            return
        self._register(ids)
        if self._proj is None:
            self._pending.append((np.asarray(emb, np.float32), list(ids), np.asarray(R, np.float64)))
            if sum(len(p[0]) for p in self._pending) < self.config.pca_rows:
                return
            pending, self._pending = self._pending, []
            self._init_projection(np.concatenate([p[0] for p in pending]))
            for e, i, r in pending:
                self._accumulate(e, i, r)
            return
        self._accumulate(emb, ids, R)

    def _accumulate(self, emb: np.ndarray, ids: Sequence[str], R: np.ndarray) -> None:
        idx = self._register(ids)
        R = np.asarray(R, dtype=np.float64)
        mask = np.isfinite(R)
        Rz = np.where(mask, R, 0.0)
        Phi = self._features(emb)
        M = mask.astype(np.float64)
        f = Phi.shape[1]
        A_add = np.empty((len(ids), f, f))
        full = mask.all(axis=0)
        if full.any():  # columns observed on every row share one Gram matrix
            A_add[full] = Phi.T @ Phi
        part = np.flatnonzero(~full)
        step = max(1, _BLOCK_ELEMS // max(1, len(Phi) * f))
        for s in range(0, len(part), step):
            cols = part[s : s + step]
            A_add[cols] = np.einsum("nm,ni,nj->mij", M[:, cols], Phi, Phi, optimize=True)
        # duplicate ids in one call: np.add.at accumulates each occurrence
        np.add.at(self._A, idx, A_add)
        np.add.at(self._b, idx, (M * Rz).T @ Phi)
        np.add.at(self._n, idx, mask.sum(axis=0))
        self._cache.clear()

    def _rewards(self, scores: np.ndarray, costs: np.ndarray | None) -> np.ndarray:
        if costs is None or self.config.lam == 0:
            return np.asarray(scores, dtype=np.float64)
        return np.asarray(scores, dtype=np.float64) - self.config.lam * np.nan_to_num(np.asarray(costs, dtype=np.float64))

    def fit(self, data: Examples, cards: Sequence[ModelCard]) -> None:
        """Warm start from full-information data: every known (query, model) outcome is an
        observation of that arm. Called again, it keeps adding (statistics only grow)."""
        check_examples(data, f"{self.name}.fit")
        self.add_models(cards)
        if self._proj is None and len(data) > 0:
            pending, self._pending = self._pending, []
            X = data.emb if not pending else np.concatenate([p[0] for p in pending] + [data.emb])
            self._init_projection(X)
            for e, i, r in pending:
                self._accumulate(e, i, r)
        self._observe(data.emb, data.model_ids, self._rewards(data.scores, data.costs))

    def update(self, events: Sequence[FeedbackEvent]) -> None:
        """Bandit feedback: each event reveals the reward of the chosen model only."""
        events = [e for e in events if e.embedding is not None]
        if not events:
            return
        ids = sorted({e.model for e in events})
        col = {m: j for j, m in enumerate(ids)}
        R = np.full((len(events), len(ids)), np.nan)
        rows = np.arange(len(events))
        cj = np.array([col[e.model] for e in events])
        R[rows, cj] = [e.reward - self.config.lam * e.cost for e in events]
        self._observe(np.asarray([e.embedding for e in events], dtype=np.float32), ids, R)
        self._after_update()

    def _after_update(self) -> None:
        """Hook: Thompson draws a fresh posterior sample per update round."""

    def add_models(self, cards: Sequence[ModelCard]) -> None:
        """New arms: card embedding for the prior, profile answers as observations."""
        if self.encoder is not None and self.config.card_weight != 0:
            self.card_embeddings(cards)
        self._register([c.id for c in cards])
        prof = self.profile_examples([c for c in cards if c.id not in self._profiled])
        if prof is not None:
            self._profiled.update(prof.model_ids)
            self._observe(prof.emb, prof.model_ids, self._rewards(prof.scores, prof.costs))

    # -- posterior ---------------------------------------------------------------------------
    def _posterior(self) -> dict[str, np.ndarray]:
        """Per known arm: precision Cholesky factor, inverse precision and posterior mean."""
        if "post" in self._cache:
            return self._cache["post"]
        prior = self._prior_means(self._arms)  # [M, f]
        reg = self._reg()
        P = self._A + np.diag(reg)
        L = np.linalg.cholesky(P)
        Pinv = np.linalg.inv(P)
        theta = np.einsum("mij,mj->mi", Pinv, self._b + reg * prior)
        post = {"L": L, "Pinv": Pinv, "theta": theta}
        self._cache["post"] = post
        return post

    def _reg(self) -> np.ndarray:
        """Prior precision of each weight ``[f]`` (memoised with the posterior): ``reg`` on every
        weight; unset, per weight by empirical Bayes, σ²/τ² with τ² the spread of that weight's
        estimates between the arms known from at least ``f`` observations (sampling noise left
        in: it can only widen τ², so never more cautious than the data supports) and σ² the
        rewards' variance taken as that of 0/1 outcomes at the pooled mean (an upper bound for
        graded ones); at least 1, and 1 until five arms (every arm, when fewer) are that well known. Where the arms do
        not differ along a weight (one-hot data: every arm's slope near zero), an arm known from
        a few rewards cannot move it far (issue 18: a reward counts where it was gathered);
        where they do differ (a bias, a topic some arms are better at), it learns freely."""
        f = self.config.dim + 1
        if self.config.reg is not None:
            return np.full(f, float(self.config.reg))
        if "reg" not in self._cache:
            n = self._A[:, -1, -1] if len(self._arms) else np.zeros(0)  # the bias feature counts rows
            lam = np.ones(f)
            rich = n >= f
            if rich.sum() >= min(5, max(2, len(n))):  # a spread needs a few arms to be measured
                est = np.linalg.solve(self._A[rich] + np.eye(f), self._b[rich][:, :, None])[:, :, 0]  # per-arm ridge
                p = float(np.clip(self._b[:, -1].sum() / max(n.sum(), 1.0), 0.0, 1.0))
                sigma2 = max(p * (1.0 - p), 1e-6)
                tau2 = est.var(axis=0, ddof=1)
                cap = max(1.0, float(n.max()))
                with np.errstate(divide="ignore"):
                    lam = np.clip(np.where(tau2 > 0, sigma2 / np.where(tau2 > 0, tau2, 1.0), cap), 1.0, cap)
            self._cache["reg"] = lam
        return self._cache["reg"]

    def _pooled(self) -> np.ndarray:
        """Ridge regression over all arms' data pooled: the average model."""
        if "pooled" not in self._cache:
            f = self.config.dim + 1
            if len(self._arms) == 0:
                self._cache["pooled"] = np.zeros(f)
            else:
                # a numerical ridge over every arm's rows pooled (not the per-arm prior of ``_reg``)
                self._cache["pooled"] = np.linalg.solve(self._A.sum(0) + (self.config.reg or 1.0) * np.eye(f), self._b.sum(0))
        return self._cache["pooled"]

    def _prior_means(self, ids: Sequence[str]) -> np.ndarray:
        """Prior weight means ``[n, f]``: pooled model + card-similarity term centred on the hub."""
        base = np.broadcast_to(self._pooled(), (len(ids), self.config.dim + 1)).copy()
        C = self._card_matrix(ids)
        if C is None or not self._arms:
            return base
        if "card_mean" not in self._cache:
            self._cache["card_mean"] = self._card_matrix(self._arms).mean(axis=0, keepdims=True)
        return base + self.config.card_weight * self._card_term(C - self._cache["card_mean"])

    # -- scoring -----------------------------------------------------------------------------
    def score(self, q: np.ndarray, candidates: Sequence[ModelCard], tasks: Sequence[str | None] | None = None) -> np.ndarray:
        q = as_queries(q)
        n_q, n_c = len(q), len(candidates)
        if n_c == 0:
            return np.zeros((n_q, 0), dtype=np.float32)
        if self.encoder is not None and self.config.card_weight != 0:
            self.card_embeddings(candidates)  # memoise the real cards before id-only fallbacks
        ids = [c.id for c in candidates]
        if self._proj is None:
            # no features yet: the prior alone, in the full embedding space (zero-shot)
            C = self._card_matrix(ids)
            if C is None or not self._arms:
                return np.zeros((n_q, n_c), dtype=np.float32)
            cm = self._card_matrix(self._arms).mean(axis=0)
            return (self.config.card_weight * (q @ (C - cm).T)).astype(np.float32)
        Phi = self._features(q)
        known = np.array([m in self._arm_idx for m in ids])
        f = Phi.shape[1]
        theta = np.empty((n_c, f))
        Pinv = np.empty((n_c, f, f))
        L = np.empty((n_c, f, f))
        if known.any():
            post = self._posterior()
            k = np.array([self._arm_idx[m] for m, kn in zip(ids, known) if kn])
            theta[known], Pinv[known], L[known] = post["theta"][k], post["Pinv"][k], post["L"][k]
        if (~known).any():
            unk = [m for m, kn in zip(ids, known) if not kn]
            theta[~known] = self._prior_means(unk)
            Pinv[~known] = np.diag(1.0 / self._reg())
            L[~known] = np.diag(np.sqrt(self._reg()))
        out = self._arm_scores(Phi, ids, theta, Pinv, L)
        return np.nan_to_num(out, nan=0.0, posinf=1e6, neginf=-1e6).astype(np.float32)

    def _arm_scores(self, Phi: np.ndarray, ids: list[str], theta: np.ndarray, Pinv: np.ndarray, L: np.ndarray) -> np.ndarray:
        raise RuntimeError(f"{type(self).__name__} must implement _arm_scores")

    @staticmethod
    def _quad(Phi: np.ndarray, Pinv: np.ndarray) -> np.ndarray:
        """``φ_qᵀ Pinv_c φ_q`` for all queries × candidates ``[n_q, n_c]``, in memory-bounded blocks."""
        n_q, f = Phi.shape
        out = np.empty((n_q, len(Pinv)))
        step = max(1, _BLOCK_ELEMS // max(1, n_q * f))
        for s in range(0, len(Pinv), step):
            T = np.matmul(Phi[None], Pinv[s : s + step])  # [B, n_q, f]
            out[:, s : s + step] = np.einsum("bqf,qf->qb", T, Phi)
        return out

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        d = super().state_dict()
        D = 0 if self._proj is None else self._proj.shape[0]
        d.update(
            arms=list(self._arms),
            A=self._A.copy(),
            b=self._b.copy(),
            n=self._n.copy(),
            proj=np.zeros((0, 0)) if self._proj is None else self._proj.copy(),
            mu=np.zeros(D) if self._mu is None else self._mu.copy(),
            sigma=np.zeros(0) if self._sigma is None else self._sigma.copy(),
            profiled=sorted(self._profiled),
            pending=[{"emb": e.copy(), "ids": list(i), "R": r.copy()} for e, i, r in self._pending],
        )
        return d

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._arms = list(state["arms"])
        self._arm_idx = {m: i for i, m in enumerate(self._arms)}
        self._A = np.asarray(state["A"], dtype=np.float64).copy()
        self._b = np.asarray(state["b"], dtype=np.float64).copy()
        self._n = np.asarray(state["n"], dtype=np.int64).copy()
        proj = np.asarray(state["proj"], dtype=np.float64)
        if proj.size:
            self._proj = proj.copy()
            self._mu = np.asarray(state["mu"], dtype=np.float64).copy()
            self._sigma = np.asarray(state["sigma"], dtype=np.float64).copy()
        else:
            self._proj = self._mu = self._sigma = None
        self._profiled = set(state.get("profiled", []))
        self._pending = [(np.asarray(p["emb"], np.float32), list(p["ids"]), np.asarray(p["R"], np.float64)) for p in state.get("pending", [])]
        self._cache = {}


def stable_hash(s: str) -> int:
    """Process-independent 32-bit hash (Python's ``hash`` is salted per process)."""
    return zlib.crc32(s.encode("utf-8"))
