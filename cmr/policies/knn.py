"""k-nearest-neighbour routing over every labelled prompt seen so far."""

from __future__ import annotations

from typing import Any, Literal, Sequence

import numpy as np

from cmr.data.examples import Examples
from cmr.policies.base import Count, NonNegative, PolicyConfig, Positive, config_dataclass
from cmr.policies.memory import PRIOR_GRID, PRIOR_START, MemoryPolicy, OutcomeMemory, as_queries, candidate_prior, check_examples, shrink, tune_grid, tuning_sample, with_card_term
from cmr.types import ModelCard

# elements gathered per chunk of queries ([b, k, n_c] floats): bounds the scoring memory
_CHUNK_ELEMENTS = 1 << 22
#: shrinkage tried when it is tuned, largest first (ties keep the more cautious one; 10 ranks by
#: the prior, the zero router, where the neighbours predict nothing better, while a reward still
#: counts most near where it was gathered: the prior alone would carry one reward everywhere);
#: SHRINK_START before the first tuning
SHRINK_GRID = (10.0, 1.0, 0.3, 0.1, 0.03)
SHRINK_START = 1.0
#: shrinkage tried towards the per-task prior (largest: the task prior, the neighbours breaking ties)
TASK_SHRINK_GRID = (100.0, 10.0, 1.0, 0.3)


@config_dataclass
class KNNConfig(PolicyConfig):
    """Options of :class:`KNNPolicy`.

    Attributes:
        k: neighbours per query (capped at the number of stored prompts).
        weighting: ``uniform``; ``similarity`` (cosine, clipped at 0); ``softmax`` (exp(cos/temperature)).
        temperature: softmax temperature (``weighting="softmax"`` only).
        prior_weight: weight of the cosine(query, card text) term added to every score; ranks models
            with no neighbour evidence (new hub entries) and breaks ties among the rest. None: tuned
            as the memory grows (``tune_min_rows``), by leave-one-out routing quality over
            a sample of the stored prompts (informative cards, as on CMRBench, earn a large weight;
            bare model names, as in outcome matrices, earn ~0).
        shrinkage: pseudo-weight of each model's prior (its empirical-Bayes global mean), as a
            fraction of the query's whole neighbourhood weight: every model's estimate is
            ``(its known weighted outcomes + s·W·prior) / (their weight + s·W)``, so a model
            known on few rows is measured on the same scale as one known on all of them, and its
            evidence counts where it was gathered. None: tuned with ``prior_weight`` by the same
            leave-one-out.
        task_prior: where stored rows name tasks, shrink towards each model's prior within a
            task (:class:`~cmr.policies.memory.TaskPrior`) instead of its global prior: for a
            query that names a task the stored rows name, that task's; for any other query
            (no task, or one never stored), the tasks of its neighbours, each neighbour standing
            for its task's prior (:meth:`~cmr.policies.memory.TaskPrior.mixture`); each of the
            two kinds of query with a shrinkage and card weight of its own. None: chosen by the
            same leave-one-out after the task-blind settings, for each kind of query apart, and
            kept only where it beats them by one standard error (else that kind is scored
            task-blind, exactly as without tasks); no effect where no stored row names a task.
        tune_min_rows: fewest rows stored since the last tuning that re-tune (and a ``RETUNE_GROWTH``
            fraction of the memory: tunings follow the memory's growth, whatever the step size).
        tune_max_rows: stored prompts sampled for that tuning.
    """

    k: Count = 100
    weighting: Literal["uniform", "similarity", "softmax"] = "softmax"
    temperature: Positive = 0.05
    prior_weight: NonNegative | None = None
    shrinkage: Positive | None = None
    task_prior: bool | None = None
    tune_min_rows: Count = 50
    tune_max_rows: Count = 1000


class KNNPolicy(MemoryPolicy):
    """kNN: similarity-weighted mean of each model's known scores over the k nearest labelled prompts.

    Every labelled prompt from every ``fit`` (one per experience), feedback batch and model
    profile is kept in a FAISS inner-product index. For a query, a model's estimate is the
    weighted mean of its *known* scores over the neighbours (NaN outcomes are ignored; on
    one-hot CMRBench data this is the weighted label vote), shrunk towards the model's prior by
    ``shrinkage`` pseudo-weight: the prior is its global mean shrunk by empirical Bayes towards
    the average model (:meth:`OutcomeMemory.model_prior`), so a model's few rewards count near
    where they were gathered and barely elsewhere. The card similarity is mixed in with weight
    ``prior_weight`` (:func:`~cmr.policies.memory.with_card_term`), so models never seen in
    training still rank by how well their card matches the query and scores stay in the range
    of the outcomes. Weight and shrinkage are tuned by leave-one-out on the stored prompts when
    not configured.
    """

    name = "knn"
    Config = KNNConfig

    def __init__(self, encoder=None, config=None):
        super().__init__(encoder, config)
        self._index = None  # faiss.IndexFlatIP over self._mem.emb, rebuilt whenever rows change
        self._tuned_shrinkage = SHRINK_START
        self._tuned_task: tuple[float, float] | None = None  # (shrinkage, card weight) with a known task
        self._tuned_mix: tuple[float, float] | None = None  # the same, towards the neighbours' tasks

    @property
    def task_settings(self) -> tuple[float, float] | None:
        """(shrinkage, card weight) of queries whose task the memory knows, or None where they
        are scored task-blind (``task_prior`` false, or not chosen by the tuning)."""
        return self._task_config(self._tuned_task)

    @property
    def mixture_settings(self) -> tuple[float, float] | None:
        """(shrinkage, card weight) of the other queries (no task, or one the memory does not
        know), shrunk towards their neighbours' task priors; None where they are scored
        task-blind."""
        return self._task_config(self._tuned_mix)

    def _task_config(self, tuned: tuple[float, float] | None) -> tuple[float, float] | None:
        c = self.config
        if c.task_prior is False:
            return None
        if c.task_prior and c.shrinkage is not None and c.prior_weight is not None:
            return float(c.shrinkage), float(c.prior_weight)
        return tuned

    @property
    def shrinkage(self) -> float:
        """The shrinkage pseudo-count in use: the configured one, else the last tuned one."""
        return float(self.config.shrinkage) if self.config.shrinkage is not None else self._tuned_shrinkage

    def describe(self) -> dict[str, Any]:
        """The settings in use (``shrinkage``, ``prior_weight``; ``task_prior``, and with it
        ``task_shrinkage`` and ``task_prior_weight``, of queries naming a known task) and which
        were tuned; empty before any tuning when something is left to tune."""
        tuned = [n for n in ("shrinkage", "prior_weight", "task_prior") if getattr(self.config, n) is None]
        if tuned and not self._tuned_at:
            return {}
        st, sm = self.task_settings, self.mixture_settings
        got = {"shrinkage": self.shrinkage, "prior_weight": self.prior_weight, "task_prior": st is not None}
        if st is not None:
            got.update(task_shrinkage=st[0], task_prior_weight=st[1])
        got["neighbour_tasks"] = sm is not None
        if sm is not None:
            got.update(neighbour_tasks_shrinkage=sm[0], neighbour_tasks_prior_weight=sm[1])
        return {
            "chosen": ", ".join(f"{n} {v}" for n, v in got.items()),
            "why": f"{', '.join(tuned)} tuned by leave-one-out on {min(self._tuned_at, self.config.tune_max_rows)} of {self._tuned_at} stored rows"
            " (the most cautious setting unless another beats it by one standard error)" if tuned else "configured",
            **got,
        }

    # -- learning ----------------------------------------------------------------------------
    def fit(self, data: Examples, cards: Sequence[ModelCard]) -> None:
        """Add ``data``'s labelled prompts to the neighbour set (keeps all earlier ones), with
        their tasks (``data.meta["task"]``) where given."""
        check_examples(data, "knn.fit")
        self.add_models(cards)
        if self._mem.add(data.emb, data.model_ids, data.scores, data.meta.get("task")):
            self._rebuild_index()
        if (self.config.prior_weight is None or self.config.shrinkage is None or self.config.task_prior is None) and self._tune_due():
            self._tune()

    def _tune(self) -> None:
        """Leave-one-out: score a sample of stored prompts from their other neighbours and keep
        the card weight and shrinkage (those not configured) under which routing them picks the
        best known outcomes."""
        rows, cols, cmat = tuning_sample(self._mem, self._card_emb, self.config.seed, self.config.tune_max_rows)
        if len(rows) < 2 or not len(cols):
            return
        x = self._mem.emb[rows]
        k = min(self.config.k + 1, len(self._mem))
        sims, idx = self._index.search(x, k)
        self_hit = idx == rows[:, None]
        self_hit[~self_hit.any(axis=1), -1] = True  # self not retrieved (tied duplicates): drop the farthest
        first = self_hit.argmax(axis=1)  # exactly one dropped per row
        self_hit[:] = False
        self_hit[np.arange(len(rows)), first] = True
        keep = ~self_hit
        idx = idx[keep].reshape(len(rows), k - 1)
        sims = sims[keep].reshape(len(rows), k - 1)
        prior = candidate_prior(self._mem, cols)
        w = self._weights(sims.astype(np.float32))
        num, den = self._sums(idx, w, cols)
        truth = self._mem.scores[np.ix_(rows, cols)]
        sim = x @ cmat.T
        c = self.config
        shrinks = SHRINK_GRID if c.shrinkage is None else (float(c.shrinkage),)
        grid = PRIOR_GRID if c.prior_weight is None else (float(c.prior_weight),)
        total = w.sum(axis=1, keepdims=True)
        blind = [shrink(num, den, prior, a * total) for a in shrinks]
        # the setting an earlier tuning chose stays unless the new rows beat it (tune_grid)
        inc = (shrinks.index(self._tuned_shrinkage), self._tuned_weight) if self._tuned_at and self._tuned_shrinkage in shrinks else None
        i, wb = tune_grid(blind, sim, truth, grid, incumbent=inc)
        self._tuned_shrinkage, self._tuned_weight = float(shrinks[i]), wb
        # then the task-aware settings, against the task-blind choice (kept unless beaten), on
        # each row's task prior without that row
        tp = self._mem.task_prior()
        self._tuned_task = self._tuned_mix = None
        if tp is not None and c.task_prior is not False:
            tprior = tp.of(self._mem, [self._mem.tasks[r] for r in rows], cols, drop=truth)
            # the same rows as queries that name no task: their neighbours' task priors, the
            # row's own outcome left out of its task's (neighbours sharing it use tprior)
            present, vote = tp.votes(idx, w)
            mix, table = tp.blend(self._mem, present, vote, cols)
            own = np.minimum(np.searchsorted(present, tp.row_task[rows]), len(present) - 1)
            share = np.where(present[own] == tp.row_task[rows], vote[np.arange(len(rows)), own], 0.0)
            mix += share[:, None] * (tprior - table[own])
            tshrinks = TASK_SHRINK_GRID if c.shrinkage is None else shrinks
            first = [] if c.task_prior else [blind[i]]
            cgrid = (wb, *(g for g in grid if g != wb))
            for prior_of, attr in ((tprior, "_tuned_task"), (mix, "_tuned_mix")):
                ests = [shrink(num, den, prior_of, a * total) for a in tshrinks]
                j, wt = tune_grid(first + ests, sim, truth, cgrid)
                if j >= len(first):
                    setattr(self, attr, (float(tshrinks[j - len(first)]), wt))
        self._tuned_at = len(self._mem)

    def add_models(self, cards: Sequence[ModelCard]) -> None:
        """Embed the new cards (for the card prior) and add their profile answers as neighbours."""
        if self._add_cards(cards):
            self._rebuild_index()

    def _rebuild_index(self) -> None:
        import faiss  # deferred: importing cmr.policies must stay cheap

        index = faiss.IndexFlatIP(self._mem.emb.shape[1])
        index.add(self._mem.emb)
        self._index = index

    # -- scoring -----------------------------------------------------------------------------
    def _weights(self, sims: np.ndarray) -> np.ndarray:
        w = self.config.weighting
        if w == "uniform":
            return np.ones_like(sims)
        if w == "similarity":
            return np.maximum(sims, 0.0)
        z = (sims - sims.max(axis=1, keepdims=True)) / self.config.temperature
        return np.exp(z)

    def _task_groups(self, tasks: Sequence[str | None] | None, n_q: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Which queries are scored with their own task's prior (they name a task the memory
        knows and :attr:`task_settings` is set) and which with their neighbours' tasks (the
        rest, where :attr:`mixture_settings` is set); None for a group with no query."""
        if tasks is not None and len(tasks) != n_q:
            raise ValueError(f"field 'task': expected {n_q} tasks (one per query), got {len(tasks)}")
        st, sm = self.task_settings, self.mixture_settings
        tp = self._mem.task_prior() if st is not None or sm is not None else None
        if tp is None or not n_q:
            return None, None
        named = np.zeros(n_q, dtype=bool)
        if tasks is not None and st is not None:
            named = np.fromiter(((t or "") in tp.index for t in tasks), dtype=bool, count=n_q)
        mixed = ~named if sm is not None else np.zeros(n_q, dtype=bool)
        return (named if named.any() else None), (mixed if mixed.any() else None)

    def neighbour_estimate(self, q: np.ndarray, candidates: Sequence[ModelCard], tasks: Sequence[str | None] | None = None) -> np.ndarray:
        """The neighbour estimate alone (no card term) ``[n_q, n_c]``, with the back-off applied
        (towards a task prior where one is used, see ``task_prior``)."""
        q = as_queries(q)
        return self._estimate(q, candidates, tasks, *self._task_groups(tasks, len(q)))

    def _estimate(self, q, candidates, tasks, named, mixed) -> np.ndarray:
        cols = self._columns(candidates)
        prior = candidate_prior(self._mem, cols)
        seen = np.flatnonzero(cols >= 0)
        searched = self._index is not None and len(seen) and len(q)
        if searched:
            k = min(self.config.k, len(self._mem))
            sims, idx = self._index.search(q, k)
            w = self._weights(sims.astype(np.float32))
        a: float | np.ndarray = self.shrinkage
        if named is not None or (mixed is not None and searched):
            tp = self._mem.task_prior()
            prior = np.broadcast_to(prior, (len(q), len(cols))).copy()
            # float32 as the weights: a task-blind row's figures are then exactly the task-blind path's
            a = np.full((len(q), 1), self.shrinkage, dtype=np.float32)
            if named is not None:
                prior[named] = tp.of(self._mem, [t for t, u in zip(tasks, named) if u], cols)
                a[named] = self.task_settings[0]
            if mixed is not None and searched:
                prior[mixed] = tp.mixture(self._mem, idx[mixed], w[mixed], cols)
                a[mixed] = self.mixture_settings[0]
        est = np.broadcast_to(prior, (len(q), len(cols))).copy()
        if not searched:
            return est
        num, den = self._sums(idx, w, cols[seen])
        est[:, seen] = shrink(num, den, prior[..., seen], a * w.sum(axis=1, keepdims=True))
        return est

    def _columns(self, candidates: Sequence[ModelCard]) -> np.ndarray:
        """Memory column of each candidate (-1: never met). Memoised for the router's card tuple
        (one per hub version) while the memory's model list is the same object and length (it
        only ever appends; a load replaces it): not a Python loop over every model per batch."""
        mem = self._mem
        memo = self.__dict__.get("_cols_memo")
        if memo is not None and memo[0] is candidates and memo[1] is mem.model_ids and memo[2] == len(mem.model_ids):
            return memo[3]
        cols = mem.columns([c.id for c in candidates])
        if isinstance(candidates, tuple):
            cols.flags.writeable = False
            self._cols_memo = (candidates, mem.model_ids, len(mem.model_ids), cols)
        return cols

    def _sums(self, idx: np.ndarray, w: np.ndarray, kc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Weighted sums of the known scores of columns ``kc`` over neighbours ``idx`` (weights
        ``w``, both ``[n_q, k]``) and of the weights where they are known, ``[n_q, len(kc)]`` each."""
        table = self._mem.scores
        # known-mask and NaN-free copy of the table, once per table (the memory replaces its array
        # whenever rows or columns change, never writes into it): not once per request batch
        memo = self.__dict__.get("_filled")
        if memo is None or memo[0] is not table:
            isknown = ~np.isnan(table)
            memo = self._filled = (table, np.where(isknown, table, 0.0).astype(np.float32), isknown.astype(np.float32))
        vals, known = memo[1], memo[2]
        full = len(kc) == table.shape[1] and bool((kc == np.arange(len(kc))).all())  # every column, in order
        n_q, k = idx.shape
        num = np.empty((n_q, len(kc)), dtype=np.float64)
        den = np.empty_like(num)
        step = max(1, _CHUNK_ELEMENTS // max(1, k * len(kc)))
        for s in range(0, n_q, step):  # chunks of queries, vectorised within
            # the chunk's distinct neighbours once ([u, n_c], u <= b*k), and the weights as a
            # [b, u] matrix: two BLAS matmuls instead of a [b, k, n_c] gather (the serving hot spot)
            rows, inv = np.unique(idx[s : s + step], return_inverse=True)
            b = min(step, n_q - s)
            wm = np.zeros((b, len(rows)), dtype=np.float32)
            np.add.at(wm, (np.repeat(np.arange(b), k), inv.ravel()), w[s : s + step].ravel())
            sel = rows if full else np.ix_(rows, kc)
            num[s : s + step] = wm @ vals[sel]
            den[s : s + step] = wm @ known[sel]
        return num, den

    def score(self, q: np.ndarray, candidates: Sequence[ModelCard], tasks: Sequence[str | None] | None = None) -> np.ndarray:
        """Neighbour estimate mixed with the card similarity ``[n_q, n_c]`` (in [0, 1] where the
        outcomes are); ``tasks``: each query's task, if named (see ``task_prior``)."""
        q = as_queries(q)
        named, mixed = self._task_groups(tasks, len(q))
        est = self._estimate(q, candidates, tasks, named, mixed)
        if named is None and mixed is None:
            return self.with_card_term(est, q, candidates)
        cards = self.encoder is not None or self._card_emb
        groups = [(g, s[1] if cards else 0.0) for g, s in ((named, self.task_settings), (mixed, self.mixture_settings)) if g is not None]
        blind = ~np.logical_or.reduce([g for g, _ in groups])
        groups.append((blind, self.prior_weight))
        if max(cw for _, cw in groups) <= 0 or not len(candidates):
            return est
        sim = q @ self.card_embeddings(candidates).T
        # each group with its own scalar weight: the task-blind rows exactly as the task-blind path
        for g, cw in groups:
            if g.any():
                est[g] = with_card_term(est[g], sim[g], cw)
        return est

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["memory"] = self._mem.state_dict()
        state["profiled"] = sorted(self._profiled)
        state["tuned_prior_weight"] = self._tuned_weight
        state["tuned_shrinkage"] = self._tuned_shrinkage
        state["tuned_task"] = list(self._tuned_task) if self._tuned_task is not None else None
        state["tuned_mix"] = list(self._tuned_mix) if self._tuned_mix is not None else None
        state["tuned_at"] = self._tuned_at
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._mem = OutcomeMemory()
        self._mem.load_state_dict(state["memory"])
        self._profiled = set(state.get("profiled", []))
        self._tuned_weight = float(state.get("tuned_prior_weight", PRIOR_START))
        self._tuned_shrinkage = float(state.get("tuned_shrinkage", SHRINK_START))
        tuned_task = state.get("tuned_task")
        self._tuned_task = (float(tuned_task[0]), float(tuned_task[1])) if tuned_task is not None else None
        tuned_mix = state.get("tuned_mix")  # absent in checkpoints from before it
        self._tuned_mix = (float(tuned_mix[0]), float(tuned_mix[1])) if tuned_mix is not None else None
        self._tuned_at = int(state.get("tuned_at", len(self._mem)))
        self._index = None
        if len(self._mem):
            self._rebuild_index()
