"""Shared pieces of the memory-based baselines (kNN, cluster): a growing table of labelled
prompts, the per-model prior, and the card-similarity term.

The table is dense (``[N, M]`` float32, NaN = unknown): on CMRBench every training row knows
every model's outcome (one-hot), so a sparse layout would store as much, and dense rows make the
neighbour gathers plain numpy fancy indexing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from cmr.data.examples import Examples
from cmr.policies.base import RoutingPolicy
from cmr.types import ModelCard

#: card-term weight before the first tuning
PRIOR_START = 0.1
#: a tuned policy re-tunes once its memory has grown by this fraction (and by ``tune_min_rows``)
#: since the last tuning, whatever the size of each update: a feedback stream changes what the
#: card weight should be as it grows (partial-feedback knn measured against 0.25 and 0: README)
RETUNE_GROWTH = 0.05


def check_examples(data: Examples, who: str) -> None:
    """Fail with a clear message when ``data`` cannot be learnt from (no embeddings, bad shapes)."""
    if data.emb is None:
        raise ValueError(f"{who}: field 'emb': the examples must be embedded before fit (Examples.emb is None)")
    emb = np.asarray(data.emb)
    scores = np.asarray(data.scores)
    if emb.ndim != 2 or emb.shape[0] != len(data):
        raise ValueError(f"{who}: field 'emb': expected shape ({len(data)}, dim), got {emb.shape}")
    if scores.shape != (len(data), len(data.model_ids)):
        raise ValueError(f"{who}: field 'scores': expected shape ({len(data)}, {len(data.model_ids)}), got {scores.shape}")


def as_queries(q: np.ndarray) -> np.ndarray:
    """Query embeddings as a C-contiguous float32 ``[n_q, d]`` array (a single vector becomes one row)."""
    q = np.asarray(q, dtype=np.float32)
    if q.ndim == 1:
        q = q[None, :]
    if q.ndim != 2:
        raise ValueError(f"field 'q': expected query embeddings of shape (n_q, dim), got {q.shape}")
    return np.ascontiguousarray(q)


class OutcomeMemory:
    """Every labelled prompt seen so far: unit-norm embeddings ``[N, d]`` and a score table
    ``[N, M]`` over the union of model columns met so far (NaN where the outcome is unknown).

    Rows arrive in batches (one per ``fit``, profile or feedback batch); a model first met in a
    later batch is unknown (NaN) for all earlier rows. Rows that know no outcome at all carry no
    information and are dropped.
    """

    def __init__(self) -> None:
        self.emb = np.zeros((0, 0), dtype=np.float32)
        self.scores = np.zeros((0, 0), dtype=np.float32)
        self.model_ids: list[str] = []
        self.tasks: list[str] = []  # per row; "" = none named
        self._col: dict[str, int] = {}
        self._prior: tuple[np.ndarray, float] | None = None  # derived; cleared whenever rows change
        self._task_prior: TaskPrior | None = None  # derived, as _prior

    def __len__(self) -> int:
        return len(self.emb)

    def add(self, emb: np.ndarray, model_ids: Sequence[str], scores: np.ndarray, tasks: Sequence[str] | None = None) -> int:
        """Append rows (``tasks``: each row's task, "" or None for none); returns how many were kept."""
        emb = np.asarray(emb, dtype=np.float32)
        scores = np.asarray(scores, dtype=np.float32)
        if tasks is not None and len(tasks) != len(scores):
            raise ValueError(f"field 'task': expected {len(scores)} tasks, got {len(tasks)}")
        keep = ~np.isnan(scores).all(axis=1) if scores.shape[1] else np.zeros(len(scores), bool)
        emb, scores = emb[keep], scores[keep]
        tasks = [str(t or "") for t, k in zip(tasks, keep) if k] if tasks is not None else [""] * len(emb)
        if not len(emb):
            return 0
        if len(self.emb) and emb.shape[1] != self.emb.shape[1]:
            raise ValueError(f"field 'emb': dimension {emb.shape[1]} differs from the {self.emb.shape[1]} seen before")
        new = [m for m in dict.fromkeys(model_ids) if m not in self._col]
        for m in new:
            self._col[m] = len(self.model_ids)
            self.model_ids.append(m)
        if new:  # widen the existing rows: the new models' outcomes there are unknown
            grown = np.full((len(self.scores), len(self.model_ids)), np.nan, dtype=np.float32)
            grown[:, : self.scores.shape[1]] = self.scores
            self.scores = grown
        block = np.full((len(emb), len(self.model_ids)), np.nan, dtype=np.float32)
        block[:, [self._col[m] for m in model_ids]] = scores
        self.scores = np.concatenate([self.scores, block]) if len(self.scores) else block
        self.emb = np.ascontiguousarray(np.concatenate([self.emb, emb]) if len(self.emb) else emb)
        self.tasks = self.tasks + tasks  # a new list: memos keyed on the old one see the change
        self._prior = self._task_prior = None
        return int(len(emb))

    def columns(self, model_ids: Sequence[str]) -> np.ndarray:
        """Column of each id in the table, -1 for models never met."""
        col = self._col
        return np.fromiter((col.get(m, -1) for m in model_ids), dtype=np.int64, count=len(model_ids))

    def model_prior(self) -> tuple[np.ndarray, float]:
        """Per-column prior score (NaN where a model has no known outcome) and the population
        mean (the prior of a model never seen: an average model; 0 when nothing is known).

        A model's prior is its mean known score shrunk towards the population mean by empirical
        Bayes, ``(n·mean + b·pop) / (n + b)``: ``b`` is the within-model variance over the
        between-model variance, both estimated from the table, so a model known from a handful of
        rewards stays near an average model until its evidence outweighs the spread between models.
        Memoised: scoring calls it once per request batch."""
        if self._prior is None:
            self._prior = self._compute_prior()
        return self._prior

    def _compute_prior(self) -> tuple[np.ndarray, float]:
        if not self.scores.size:
            return np.zeros(0, dtype=np.float64), 0.0
        known = ~np.isnan(self.scores)
        n = known.sum(axis=0).astype(np.float64)
        vals = np.where(known, self.scores, 0.0).astype(np.float64)
        s = vals.sum(axis=0)
        mean = np.full(len(n), np.nan)
        np.divide(s, n, out=mean, where=n > 0)
        has = n > 0
        if not has.any():
            return mean, 0.0
        shrunk, pop = eb_shrink(mean, n, (vals * vals).sum(axis=0))
        return np.where(has, shrunk, np.nan), pop

    def task_prior(self) -> "TaskPrior | None":
        """Each model's prior within each task named by the stored rows (:class:`TaskPrior`), or
        None when no row names a task. Memoised as :meth:`model_prior`."""
        if self._task_prior is None and any(self.tasks):
            self._task_prior = TaskPrior.fit(self)
        return self._task_prior

    def state_dict(self) -> dict[str, Any]:
        return {"emb": self.emb.copy(), "scores": self.scores.copy(), "model_ids": list(self.model_ids), "tasks": list(self.tasks)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.emb = np.ascontiguousarray(np.asarray(state["emb"], dtype=np.float32))
        self.scores = np.asarray(state["scores"], dtype=np.float32).copy()
        self.model_ids = list(state["model_ids"])
        self.tasks = [str(t) for t in state.get("tasks", [""] * len(self.emb))]
        self._col = {m: i for i, m in enumerate(self.model_ids)}
        self._prior = self._task_prior = None
        if len(self.tasks) != len(self.emb):
            raise ValueError(f"field 'tasks': {len(self.tasks)} tasks for {len(self.emb)} rows")
        if self.scores.shape != (len(self.emb), len(self.model_ids)) and len(self.emb):
            raise ValueError(f"field 'scores': shape {self.scores.shape} does not match {len(self.emb)} rows x {len(self.model_ids)} models")


def eb_shrink(mean: np.ndarray, n: np.ndarray, sumsq: np.ndarray) -> tuple[np.ndarray, float]:
    """Empirical-Bayes shrinkage of per-model means ``mean`` over ``n`` outcomes (sum of squares
    ``sumsq``; models with ``n`` = 0 are ignored): one-way random-effects ANOVA estimates of the
    within-model variance σ² and the between-model variance τ² (unbalanced, so a model known from
    one outcome hardly moves them), the population mean weighted by precision, and each mean
    pulled towards it with pseudo-count σ²/τ². Returns (shrunk means, population mean); no
    spread between models beyond what sampling explains gives every model the population mean."""
    b, pop = eb_fit(mean, n, sumsq)
    if not np.isfinite(b):
        return np.full(len(mean), pop), pop
    return (np.where(n > 0, mean, pop) * n + b * pop) / (n + b), pop


def eb_fit(mean: np.ndarray, n: np.ndarray, sumsq: np.ndarray) -> tuple[float, float]:
    """The pseudo-count σ²/τ² and the population mean of :func:`eb_shrink` (pseudo-count
    infinite where the means spread no more than sampling explains)."""
    has = n > 0
    nm, xm = n[has], mean[has]
    big_n, m = float(nm.sum()), int(has.sum())
    sigma2 = float((sumsq[has] - nm * xm**2).sum() / (big_n - m)) if big_n > m else 0.0
    grand = float((nm * xm).sum() / big_n)
    tau2 = 0.0
    if m > 1 and big_n > 0:
        ssb = float((nm * (xm - grand) ** 2).sum())
        tau2 = max(0.0, (ssb - (m - 1) * sigma2) / (big_n - float((nm**2).sum()) / big_n))
    if tau2 <= 0.0:
        return float("inf"), grand
    wts = 1.0 / (tau2 + sigma2 / nm)
    return sigma2 / tau2, float((wts * xm).sum() / wts.sum())


def eb_pseudo_counts(S: np.ndarray, C: np.ndarray, SS: np.ndarray | None = None) -> np.ndarray:
    """:func:`eb_fit`'s pseudo-count σ²/τ² for every column at once: ``S``, ``C`` and ``SS``
    ``[G, K]`` are the groups' (models', tasks') sums of outcomes, their counts (fractional counts
    allowed) and sums of squares in each of ``K`` columns; ``SS`` None takes the sum of squares as
    the sum (exact for 0/1 outcomes, an upper bound for graded scores in [0, 1]). Infinite where a
    column's group means spread no more than sampling explains (or fewer than two groups have
    outcomes there)."""
    SS = S if SS is None else SS
    n = np.where(C > 0, C, 0.0)
    has = n > 0
    mean = np.where(has, S / np.where(has, n, 1.0), 0.0)
    big_n = n.sum(axis=0)
    m = has.sum(axis=0).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        sigma2 = np.where(big_n > m, (np.where(has, SS, 0.0).sum(axis=0) - (n * mean**2).sum(axis=0)) / (big_n - m), 0.0)
        grand = np.where(big_n > 0, (n * mean).sum(axis=0) / np.where(big_n > 0, big_n, 1.0), 0.0)
        ssb = (n * (mean - grand[None, :]) ** 2).sum(axis=0)
        spread = big_n - np.where(big_n > 0, (n**2).sum(axis=0) / np.where(big_n > 0, big_n, 1.0), 0.0)
        tau2 = np.where((m > 1) & (spread > 0), np.maximum(0.0, (ssb - (m - 1) * sigma2) / np.where(spread > 0, spread, 1.0)), 0.0)
        return np.where(tau2 > 0, np.maximum(sigma2, 0.0) / np.where(tau2 > 0, tau2, 1.0), np.inf)


def shrink(num: np.ndarray, den: np.ndarray, prior: np.ndarray, a: float | np.ndarray) -> np.ndarray:
    """``(num + a·prior) / (den + a)``: weighted sums of known outcomes (``num``) and of their
    weights (``den``) pulled towards ``prior`` ``[n_c]`` by pseudo-weight ``a`` (a scalar or one
    per query, ``[n_q, 1]``; ``prior`` may be one row per query, ``[n_q, n_c]``); no evidence
    (``den`` = 0) gives the prior."""
    p = prior if prior.ndim == 2 else prior[None, :]
    tot = den + a
    ok = tot > 0
    return np.where(ok, (num + a * p) / np.where(ok, tot, 1.0), p)


def candidate_prior(memory: OutcomeMemory, cols: np.ndarray) -> np.ndarray:
    """Back-off value of each candidate ``[n_c]``: its global mean known score, else the average
    model's (candidates never met, or met without any known outcome)."""
    mean, avg = memory.model_prior()
    out = np.full(len(cols), avg, dtype=np.float64)
    seen = cols >= 0
    if seen.any():
        m = mean[cols[seen]]
        out[seen] = np.where(np.isnan(m), avg, m)
    return out


@dataclass
class TaskPrior:
    """Each model's prior within each task: its mean known score over the stored rows of that
    task, pulled towards its global prior (:meth:`OutcomeMemory.model_prior`) with the model's
    empirical-Bayes pseudo-count ``b`` across tasks (:func:`eb_fit`: tasks on which a model does
    no differently than sampling explains, or a single task, give its global prior). A model with
    no known outcome in a task (one that joined by profile answers naming no task, or a model never
    met) takes its global prior plus the task's offset ``delta``: how much better or worse the
    models known there do in that task than overall, so it is compared on the task's scale with
    the models known there (a hard task's known models would otherwise all rank below it). Rows
    that name no task do not count.

    Attributes:
        index: task -> row of ``n``/``s``.
        n: ``[T, M]`` known outcomes per task and model column.
        s: ``[T, M]`` their sum.
        b: ``[M]`` pseudo-count per model (inf: the global prior alone).
        row_task: ``[N]`` each stored row's task (its row of ``n``; ``T`` where it names none).
        delta: ``[T]`` each task's offset: the outcome-weighted mean, over the models known in
            the task, of their mean there minus their global prior.
        bounds: the lowest and highest stored outcome (an offset prior stays within them).
    """

    index: dict[str, int]
    n: np.ndarray
    s: np.ndarray
    b: np.ndarray
    row_task: np.ndarray
    delta: np.ndarray
    bounds: tuple[float, float]

    @classmethod
    def fit(cls, memory: "OutcomeMemory") -> "TaskPrior":
        names = sorted({t for t in memory.tasks if t})
        index = {t: i for i, t in enumerate(names)}
        rows = np.array([i for i, t in enumerate(memory.tasks) if t], dtype=np.int64)
        onehot = np.zeros((len(names), len(rows)))
        onehot[[index[memory.tasks[i]] for i in rows], np.arange(len(rows))] = 1.0
        scores = memory.scores[rows].astype(np.float64)
        known = ~np.isnan(scores)
        vals = np.where(known, scores, 0.0)
        n, s, ss = onehot @ known, onehot @ vals, onehot @ (vals * vals)
        b = eb_pseudo_counts(s, n, ss)
        row_task = np.full(len(memory.tasks), len(names), dtype=np.int64)
        row_task[rows] = [index[memory.tasks[i]] for i in rows]
        g = memory.model_prior()[0]
        ok = (n > 0) & np.isfinite(g)[None, :]
        gap = np.where(ok, s / np.maximum(n, 1.0) - np.where(np.isfinite(g), g, 0.0)[None, :], 0.0)
        w = np.where(ok, n, 0.0)
        delta = (w * gap).sum(axis=1) / np.maximum(w.sum(axis=1), 1.0)
        known = memory.scores[~np.isnan(memory.scores)]
        return cls(index, n, s, b, row_task, delta, (float(known.min()), float(known.max())))

    def names(self, ids: np.ndarray) -> list[str]:
        """The task of each row id of ``n``/``s`` (``T``, a row naming none: "")."""
        names = list(self.index)
        return [names[i] if i < len(names) else "" for i in ids]

    def votes(self, idx: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The tasks of the neighbours ``idx`` (stored rows, weights ``w``, ``[n_q, k]`` each):
        ``(present [u], share [n_q, u])``, the task ids among them (``T``: a row naming none) and
        each one's share of a query's neighbour weight (a row of zeros where the weights sum to
        0). Only the tasks present are kept: clients name tasks, and a table over all of them
        per request would grow with whatever they named."""
        present, inv = np.unique(self.row_task[idx], return_inverse=True)
        vote = np.zeros((len(idx), len(present)), dtype=np.float64)
        np.add.at(vote, (np.repeat(np.arange(len(idx)), idx.shape[1]), inv.ravel()), w.ravel())
        tot = vote.sum(axis=1, keepdims=True)
        return present, vote / np.where(tot > 0, tot, 1.0)

    def mixture(self, memory: "OutcomeMemory", idx: np.ndarray, w: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """``[n_q, n_c]``: the prior of queries whose own task is not known, their neighbours'
        task priors weighted as the neighbours (:meth:`votes`; the global prior where the
        weights sum to 0). Each neighbour stands for its task's prior rather than its own noisy
        outcomes: the neighbourhood says which task the query is like, the task's many rows how
        each model does there."""
        return self.blend(memory, *self.votes(idx, w), cols)[0]

    def blend(self, memory: "OutcomeMemory", present: np.ndarray, vote: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`mixture` from :meth:`votes`' ``(present, share)``; also returns the present
        tasks' priors ``[u, n_c]`` (the tuning corrects a row's own task with them)."""
        table = self.of(memory, self.names(present), cols)
        out = vote @ table
        none = vote.sum(axis=1) <= 0
        if none.any():
            out[none] = candidate_prior(memory, cols)
        return out, table

    def of(self, memory: "OutcomeMemory", tasks: Sequence[str | None], cols: np.ndarray, drop: np.ndarray | None = None) -> np.ndarray:
        """Prior ``[n_q, n_c]`` of candidate columns ``cols`` (-1: never met) for queries of
        ``tasks``: the task's where the memory knows the task, else the global one
        (:func:`candidate_prior`). ``drop`` ``[n_q, n_c]``: the queries' own known scores, left
        out of their task's sums (leave-one-out tuning on stored rows)."""
        glob = candidate_prior(memory, cols)
        out = np.broadcast_to(glob, (len(tasks), len(cols))).copy()
        ti = np.array([self.index.get(t or "", -1) for t in tasks], dtype=np.int64)
        hit, seen = np.flatnonzero(ti >= 0), np.flatnonzero(cols >= 0)
        if not len(hit):
            return out
        # a model with no outcome in the task: its global prior on the task's scale
        out[hit] = np.clip(glob[None, :] + self.delta[ti[hit]][:, None], *self.bounds)
        if not len(seen):
            return out
        c = cols[seen]
        n, s = self.n[np.ix_(ti[hit], c)], self.s[np.ix_(ti[hit], c)]
        if drop is not None:
            d = drop[np.ix_(hit, seen)]
            k = ~np.isnan(d)
            n, s = n - k, s - np.where(k, d, 0.0)
        b, g = self.b[c][None, :], glob[seen][None, :]
        fin = np.isfinite(b) & (n + np.where(np.isfinite(b), b, 0.0) > 0)
        bb = np.where(fin, b, 1.0)
        got = np.where(fin, (s + bb * g) / np.where(fin, n + bb, 1.0), g)
        block = out[np.ix_(hit, seen)]
        out[np.ix_(hit, seen)] = np.where(n > 0, got, block)
        return out


#: card-term weights tried when a policy tunes its own (``prior_weight=None``)
PRIOR_GRID = (0.0, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)


def tuning_sample(memory: OutcomeMemory, card_emb: dict[str, np.ndarray], seed: int, max_rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows and columns on which a policy tunes its card-term weight: a seeded sample of at most
    ``max_rows`` stored rows, and the columns of models whose card is embedded (the live hub).
    Returns ``(rows, cols, card matrix [n_cols, d])``."""
    cols = np.array([j for j, m in enumerate(memory.model_ids) if m in card_emb], dtype=np.int64)
    n = len(memory)
    rows = np.sort(np.random.default_rng(seed).choice(n, min(n, max_rows), replace=False)) if n else np.zeros(0, np.int64)
    cmat = np.stack([card_emb[memory.model_ids[j]] for j in cols]) if len(cols) else np.zeros((0, memory.emb.shape[1]), np.float32)
    return rows, cols, cmat


def with_card_term(est: np.ndarray, card_sim: np.ndarray, w: float) -> np.ndarray:
    """``(est + w·card_sim⁺) / (1 + w)``: the card similarity (clipped to [0, 1]) mixed into the
    outcome estimate, so a score stays in the range of the outcomes (a calibrated [0, 1] where
    rewards are) whatever the weight."""
    if w <= 0:
        return est
    return (est + w * np.clip(card_sim, 0.0, 1.0)) / (1.0 + w)


def tune_prior_weight(est: np.ndarray, card_sim: np.ndarray, truth: np.ndarray, grid: Sequence[float] = PRIOR_GRID) -> float:
    """The weight ``w`` of ``grid`` whose routing, argmax of ``with_card_term(est, card_sim, w)``
    (the one decision rule, no cost), has the highest mean known true score on held-out rows
    (``truth``, NaN = unknown, such rows do not count). Ties go to the smaller weight."""
    return tune_grid([est], card_sim, truth, grid)[1]


def tune_grid(ests: Sequence[np.ndarray], card_sim: np.ndarray, truth: np.ndarray, grid: Sequence[float] = PRIOR_GRID,
              incumbent: tuple[int, float] | None = None) -> tuple[int, float]:
    """Best (index into ``ests``, card weight of ``grid``) by the routing quality of
    ``tune_prior_weight``; ties go to the earlier estimate and the smaller weight. The first pair
    (``ests[0]``, ``grid[0]``: the most cautious, the prior alone where the grids reach it) is
    kept unless some pair beats it by more than one standard error of their paired per-row
    difference, either in routing quality or in the squared error of the scores over every known
    outcome (what the cost-aware choices of a λ sweep rest on); of those, the first that the best
    of them does not beat in routing quality by one standard error is taken. The best of many
    pairs on few noisy rows would otherwise be noise (e.g. a card weight on bare model names, or
    a small shrinkage) preferred to the more cautious settings. ``incumbent`` (the pair an earlier
    tuning chose) is kept unless that pick beats it by one standard error the same way: as the
    memory grows, a fresh leave-one-out sample would otherwise flip between near-equal settings."""
    from cmr.decide import choose

    rows = np.arange(len(card_sim))
    sim = np.clip(card_sim, 0.0, 1.0)
    zero = np.zeros(card_sim.shape[1])
    known = ~np.isnan(truth)
    tried: list[tuple[int, float, np.ndarray, np.ndarray]] = []  # (estimate, weight, choice's outcome, -squared error) per row
    for i, est in enumerate(ests):
        for w in grid:
            # the choice under with_card_term(est, card_sim, w): its positive 1/(1 + w) changes none
            got = truth[rows, choose(est + w * sim if w > 0 else est, zero, 0.0)]
            err = np.where(known, (with_card_term(est, card_sim, w) - np.nan_to_num(truth)) ** 2, 0.0).sum(axis=1)
            tried.append((i, float(w), got, -err / np.maximum(known.sum(axis=1), 1)))

    def mean(x: np.ndarray) -> float:
        ok = ~np.isnan(x)
        return float(x[ok].mean()) if ok.any() else -np.inf

    def beats(a: np.ndarray, b: np.ndarray) -> bool:
        d = a - b
        d = d[~np.isnan(d)]
        return d.size > 1 and float(d.mean()) > float(d.std(ddof=1) / np.sqrt(d.size))

    base = tried[0]
    ok = [t for t in tried if beats(t[2], base[2]) or beats(t[3], base[3])] or [base]
    best = max(ok, key=lambda t: mean(t[2]))  # the first of ties
    # the one-standard-error rule: the first (most cautious) of them that the best does not beat
    pick = next(t for t in ok if t is best or not beats(best[2], t[2]))
    inc = next((t for t in tried if (t[0], t[1]) == incumbent), None) if incumbent is not None else None
    if inc is not None and not (beats(pick[2], inc[2]) or beats(pick[3], inc[3])):
        pick = inc
    return pick[0], pick[1]


class MemoryPolicy(RoutingPolicy):
    """Base of the memory-based baselines (knn, cluster): an ``OutcomeMemory``, the models whose
    profile answers are stored, and the card-prior weight (configured, else tuned on fit)."""

    def __init__(self, encoder=None, config=None):
        super().__init__(encoder, config)
        self._mem = OutcomeMemory()
        self._profiled: set[str] = set()
        self._tuned_weight = PRIOR_START
        self._tuned_at = 0  # memory rows at the last tuning

    @property
    def prior_weight(self) -> float:
        """The card-term weight in use: the configured one, else the last tuned one."""
        if self.config.prior_weight is not None:
            return float(self.config.prior_weight)
        return self._tuned_weight if self.encoder is not None or self._card_emb else 0.0

    def _tune_due(self) -> bool:
        """Whether the memory grew enough since the last tuning to tune again (``RETUNE_GROWTH``)."""
        grown = len(self._mem) - self._tuned_at
        return grown >= self.config.tune_min_rows and grown >= RETUNE_GROWTH * self._tuned_at

    def with_card_term(self, est: np.ndarray, q: np.ndarray, candidates: Sequence[ModelCard]) -> np.ndarray:
        """``est`` mixed with the card similarity of each candidate (:func:`with_card_term`)."""
        w = self.prior_weight
        if w > 0 and len(candidates):
            return with_card_term(est, q @ self.card_embeddings(candidates).T, w)
        return est

    def _add_cards(self, cards: Sequence[ModelCard]) -> bool:
        """Embed new cards (for the card prior) and store their profile answers not stored yet;
        returns whether the memory grew."""
        if self.encoder is not None and (self.config.prior_weight is None or self.config.prior_weight > 0):
            self.card_embeddings(cards)
        prof = self.profile_examples([c for c in cards if c.profile and c.id not in self._profiled])
        if prof is None:
            return False
        self._profiled.update(prof.model_ids)
        return bool(self._mem.add(prof.emb, prof.model_ids, prof.scores, prof.meta.get("task")))
