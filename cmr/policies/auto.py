"""``auto``: picks a policy and its configuration per workload by k-fold cross-validation on the
training data it is given, the zero router (each model's global prior) among the candidates."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Literal, Sequence

import numpy as np
from pydantic import Field, field_validator

from cmr.data.examples import Examples
from cmr.policies.base import Count, NonNegative, PolicyConfig, RoutingPolicy, Size, config_dataclass
from cmr.types import ModelCard

#: the candidates, simplest first (ties go to the earlier): name -> (policy, config); ``carve``
#: only where there is an encoder (it reads the cards' text), with its domain vote: it settles on
#: the most probable domain first (the weight chosen on validation splits of CMRBench's train, where
#: scoring each experience's train rows before learning them favoured a vote too:
#: docs/results/carve-vote-prequential/), and trained for the mass of a row's domain and family
#: (docs/results/carve-domain-loss/); on cards without domains or families, or outcome rows, these
#: are no-ops.
#: ``prior`` is the zero router: every prompt scored by each model's global (empirical-Bayes)
#: mean, so its λ sweep walks the single models' quality–cost hull; the rest shrink towards it.
#: ``task-prior`` scores by each model's prior within the query's task (the global one for a
#: query naming no task, or one the training rows never named: then it is ``prior``).
CANDIDATES: dict[str, tuple[str, dict[str, Any]]] = {
    "prior": ("knn", {"k": 1, "prior_weight": 0.0, "shrinkage": 1e9, "task_prior": False}),
    "task-prior": ("knn", {"k": 1, "prior_weight": 0.0, "shrinkage": 1e9, "task_prior": True}),
    "cluster": ("cluster", {}),
    "knn": ("knn", {}),
    "knn-k20": ("knn", {"k": 20}),
    "uniroute": ("uniroute", {}),
    "uniroute-map": ("uniroute-map", {}),
    "linucb": ("linucb", {}),
    "carve": ("carve", {"domain_vote": 0.3, "domain_loss": 2.0, "family_loss": 1.0}),
}
#: names of earlier releases (a stored config or choice naming one still loads): carve without
#: the vote was a candidate of its own, the vote was ``carve-vote``
LEGACY = {"carve-vote": "carve"}
CandidateName = Literal[tuple(CANDIDATES)]


@config_dataclass
class AutoConfig(PolicyConfig):
    """Options of :class:`AutoPolicy`.

    Attributes:
        folds: cross-validation folds over the training rows.
        cv_rows: training rows sampled (seeded) for the cross-validation; the chosen candidate
            is then fitted on all of them.
        margin: how much a candidate's mean fold score must exceed the incumbent's (knn where it
            beats the zero router so, else the zero router ``prior``), beyond one standard error
            of their paired fold differences, to be chosen over it.
        min_rows: fewest rows a fit must bring to choose on (fold scores of a few dozen rows
            are noise); until one does, :data:`BEFORE_CHOICE` routes and learns.
        candidates: which of :data:`CANDIDATES` to choose among (the zero router ``prior`` always
            is); e.g. leave out ``carve`` for a shorter first training.
        encoder_epochs: where ``carve`` is chosen, its ``encoder_epochs`` (fine-tuning the dense
            encoder at each labelled fit, ``cmr.encoders.tuned``); the folds choose without it
            (k tunings would multiply the first start's time). 0 = frozen features: a first start
            several times shorter on CPU, for fewer points of M-Acc (README, CMRBench floor).
    """

    folds: Count = 3
    cv_rows: Count = 4000
    margin: NonNegative = 0.002
    min_rows: Count = 200
    candidates: list[CandidateName] = Field(default_factory=lambda: list(CANDIDATES))
    encoder_epochs: Size = 1

    @field_validator("candidates", mode="before")
    @classmethod
    def _legacy_names(cls, v: Any) -> Any:
        return list(dict.fromkeys(LEGACY.get(n, n) for n in v)) if isinstance(v, list) else v


#: a candidate key's suffix for the dense view: where the encoder is fused with a lexical part
#: (``embedding: minilm+tfidf``, or ``auto`` where it fused), the choice is also measured on the
#: dense part alone, which the fused vector holds exactly (its first ``dense.dim`` columns, rescaled)
DENSE = "@minilm"


def dense_view(encoder):
    """``(dense encoder, map)`` where ``encoder`` is fused: ``map`` takes its vectors (``[..., dim]``)
    to the dense part's unit vectors; None for any other encoder."""
    from cmr.encoders.lexical import FusedEncoder

    return (encoder.dense, encoder.dense_of) if isinstance(encoder, FusedEncoder) else None


#: what routes and learns until a fit brings ``min_rows`` rows to choose on: knn with its own
#: defaults, whose leave-one-out shrinks towards the zero router on little data and whose
#: estimates stay local (the zero router would let one reward for a new model move every query)
BEFORE_CHOICE = "knn"


def fold_score(pred: np.ndarray, scores: np.ndarray, costs: np.ndarray | None, card_costs: np.ndarray) -> float:
    """The benchmark's figure of a router on held-out rows: AIQ of its λ sweep over the single
    models' cost range (``cmr.bench.metrics``), or its quality where every model costs the same."""
    from cmr.bench import metrics

    if costs is None or np.ptp(card_costs) == 0:
        return float(metrics.sweep(pred, scores, np.zeros_like(scores), card_costs, [0.0])[0, 2])
    costs = np.where(np.isnan(costs), card_costs[None, :], costs)
    lams = metrics.lambda_grid(card_costs, float(np.ptp(pred)), 40)
    curve = metrics.sweep(pred, scores, costs, card_costs, lams)
    sc = np.array([s["cost"] for s in metrics.single_models(scores, costs, list(range(scores.shape[1])))])
    return metrics.aiq(curve[:, 1], curve[:, 2], float(sc.min()), float(sc.max()))


def labelled_fold_score(pred: np.ndarray, data: Examples, cards: Sequence[ModelCard]) -> float:
    """The continual benchmark's figures of a router on held-out labelled rows (one correct model
    each, CMRBench's format): the mean of its model, family and domain accuracy
    (``cmr.bench.metrics.routing_hits``), so a router that misses the model but lands in its
    domain counts for what the benchmark reports too."""
    from cmr.bench import metrics
    from cmr.decide import choose

    hits = metrics.routing_hits(choose(pred, np.array([c.cost for c in cards], dtype=np.float64)), cards, data)
    return float(np.mean([h.mean() for h in hits.values()]))


class AutoPolicy(RoutingPolicy):
    """Chooses among :data:`CANDIDATES` on the first fit with enough rows, then is that policy.

    The choice: each candidate is fitted on k−1 folds of (a sample of) the training rows and
    scored on the held-out fold by :func:`fold_score` (by :func:`labelled_fold_score` where the rows
    name their correct model and its family or domain). The incumbent is :data:`BEFORE_CHOICE`
    if it beats the zero router by ``margin`` plus one standard error of the paired fold
    differences, else the zero router; the best mean replaces the incumbent only if it beats it
    the same way. Until a fit
    brings ``min_rows`` rows, :data:`BEFORE_CHOICE` routes (what it learnt is not carried into the
    chosen policy, which is fitted on the choosing fit's rows). Where models join
    by profile answers (profile prompts set), or else by their card's text (a description or
    domain, read through the encoder), each fold hides a third of those models from training
    and adds them after, so the choice is measured on how the workload grows. Later fits,
    feedback and new models go to the chosen policy (it keeps learning; the choice is not
    revisited); a policy trained by gradient steps (``carve``) learns through a
    :class:`~cmr.continual.learner.Learner` of its own, in the folds as after the choice, whose
    replay and anchor are kept in the state. What was chosen and why
    (every candidate's fold scores) is :meth:`describe`, kept in the state (so in checkpoints).

    Where the encoder is fused with a lexical part, the choice is then measured again on the
    same folds over the dense part of the vectors alone (key suffixed :data:`DENSE`), and that twin
    replaces it where it beats it by the margin and one standard error (the lexical part hurts on
    this workload); a chosen dense view is what the policy sees of every vector it is given.
    """

    name = "auto"
    Config = AutoConfig

    def __init__(self, encoder=None, config=None):
        super().__init__(encoder, config)
        self._choice: dict[str, Any] = {}
        self._cards: dict[str, ModelCard] = {}
        self._learner_options: dict[str, int] = {}
        self._view = None  # the dense view's map once a dense view is chosen
        self._set_inner(self._candidate(BEFORE_CHOICE))

    @property
    def encoder(self):
        """The encoder queries are embedded with: the chosen policy's once it tuned its own
        (carve's ``encoder_epochs``; over a dense view, fused again with the same lexical part)."""
        from cmr.encoders.tuned import is_tuned

        base = self.__dict__.get("_encoder")
        inner = getattr(self.__dict__.get("_inner"), "encoder", None)
        if base is None or inner is None or inner is base or not is_tuned(inner):
            return base
        if self.__dict__.get("_view") is None:
            return inner
        memo = self.__dict__.get("_fused_memo")
        if memo is None or memo[0] is not inner or memo[1] != inner.name:
            memo = (inner, inner.name, base.with_dense(inner))
            self._fused_memo = memo
        return memo[2]

    @encoder.setter
    def encoder(self, value) -> None:
        self.__dict__["_encoder"] = value

    def _candidate(self, key: str, final: bool = False) -> RoutingPolicy:
        """A fresh candidate ``key`` (a :data:`CANDIDATES` name, suffixed :data:`DENSE` for the dense
        view); ``final``: the one chosen (carve then tunes its encoder, ``encoder_epochs``)."""
        from cmr.policies.registry import make_policy

        name, dense = key.removesuffix(DENSE), key.endswith(DENSE)
        policy, cfg = CANDIDATES[LEGACY.get(name, name)]
        if final and policy == "carve" and self.config.encoder_epochs:
            cfg = {**cfg, "encoder_epochs": self.config.encoder_epochs}
        view = dense_view(self.encoder) if dense else None
        inner = make_policy(policy, view[0] if view else self.encoder, {**cfg, "seed": self.config.seed})
        if self._profile_ids:
            inner.set_profile_prompts(self._profile_ids, view[1](self._profile_emb) if view else self._profile_emb, self._profile_tasks)
        return inner

    def _seen(self, data: Examples) -> Examples:
        """``data`` as the chosen view sees it."""
        return data if self._view is None or data.emb is None else replace(data, emb=self._view(data.emb))

    def _set_inner(self, inner: RoutingPolicy) -> None:
        """Route with ``inner``; one trained by gradient steps (``carve``) learns through a
        :class:`~cmr.continual.learner.Learner` of its own, which holds its replay and anchor."""
        from cmr.continual.learner import Learner, Trainable

        self._inner = inner
        self._learner = Learner(inner, **self._learner_options) if isinstance(inner, Trainable) else None

    def configure_learner(self, **options: int) -> None:
        """The settings of the learner that drives this policy (events per step, consolidation),
        passed on to the chosen policy's own learner; called by :class:`~cmr.continual.learner.Learner`."""
        self._learner_options = dict(options)
        for name, value in options.items() if self._learner is not None else ():
            setattr(self._learner, name, value)

    def describe(self) -> dict[str, Any]:
        """What was chosen and why: ``chosen``, its ``policy`` and ``config``, and each
        candidate's mean and per-fold scores (empty before the choice)."""
        return dict(self._choice)

    # -- learning ----------------------------------------------------------------------------
    def set_profile_prompts(self, ids, emb, tasks=None) -> None:
        super().set_profile_prompts(ids, emb, tasks)
        self._inner.set_profile_prompts(ids, self._profile_emb if self._view is None else self._view(self._profile_emb), tasks)

    def add_models(self, cards: Sequence[ModelCard]) -> None:
        """Keep the cards (candidates are built from them) and pass them on."""
        if not self._choice:
            self._cards.update((c.id, c) for c in cards)
        self._inner.add_models(cards)

    def fit(self, data: Examples, cards: Sequence[ModelCard]) -> None:
        self.add_models(cards)
        if not self._choice and len(data) >= self.config.min_rows:
            self._choose(data)
        data = self._seen(data)
        if self._learner is not None:
            self._learner.fit(data, cards)
        else:
            self._inner.fit(data, cards)

    def update(self, events) -> None:
        """Feedback goes to the policy that routes (partial feedback is not chosen on): through
        its own learner's bounded steps and consolidations where it trains by gradient steps."""
        if self._view is not None:
            events = [replace(e, embedding=None if e.embedding is None else self._view(e.embedding).tolist()) for e in events]
        if self._learner is not None:
            self._learner.consume(events)
        else:
            self._inner.update(events)

    def _choose(self, data: Examples) -> None:
        from cmr.continual.learner import Learner
        from cmr.policies.registry import policy_class

        cfg = self.config
        rng = np.random.default_rng(cfg.seed)
        rows = rng.permutation(len(data))[: cfg.cv_rows]
        folds = np.array_split(rows, min(cfg.folds, len(rows)))
        cards = list(self._cards.values())
        card_of = {c.id: c for c in cards}
        card_costs = np.array([card_of[m].cost if m in card_of else 0.0 for m in data.model_ids], dtype=np.float64)
        cand_cards = cards + [ModelCard(id=m) for m in data.model_ids if m not in card_of]
        names = [n for n in CANDIDATES if (n == "prior" or n in cfg.candidates)
                 and (self.encoder is not None or not policy_class(CANDIDATES[n][0]).needs_encoder)]
        # rows that name their one correct model and its family or domain are scored as the
        # continual benchmark scores them; outcome rows by AIQ (or quality)
        labelled = data.labels is not None and bool({"family", "domain"} & set(data.meta))
        # models join by their profile answers here (the policy was given profile prompts and
        # some cards carry answers), or else by their card's text (a description or domain the
        # encoder reads): each fold hides a third of those models from training and adds them
        # afterwards, as the workload will
        how, joining = "profile", [m for m in data.model_ids if m in card_of and card_of[m].profile] if self._profile_ids else []
        if not joining and self.encoder is not None:
            how, joining = "card", [m for m in data.model_ids if m in card_of and (card_of[m].description or card_of[m].domain)]
        splits = []  # (training part, held-out part, its cards, hidden models, training cards) per fold
        for i, held in enumerate(folds):
            part = data.subset(np.concatenate([f for j, f in enumerate(folds) if j != i]))
            test = data.subset(held)
            hide = set(rng.choice(joining, max(1, round(len(joining) / 3)), replace=False)) if len(joining) > 1 else set()
            if hide:
                part = part.select_models([m for m in part.model_ids if m not in hide])
            splits.append((part, test, [card_of.get(m) or ModelCard(id=m) for m in test.model_ids], hide,
                           [c for c in cand_cards if c.id not in hide]))
        view = dense_view(self.encoder)

        def folds_of(key: str) -> list[float]:
            """Candidate ``key``'s score on each held-out fold (the dense view's vectors for a key suffixed DENSE)."""
            seen = (lambda d: replace(d, emb=view[1](d.emb))) if key.endswith(DENSE) else (lambda d: d)
            out = []
            for part, test, test_cards, hide, fit_cards in splits:
                cand = self._candidate(key)
                cand.add_models(fit_cards)
                Learner(cand).fit(seen(part), fit_cards)  # the one learning path: plain fit, or carve's epochs
                cand.add_models([card_of[m] for m in hide])
                pred = np.asarray(cand.score(seen(test).emb, test_cards, tasks=test.meta.get("task")), dtype=np.float64)
                out.append(labelled_fold_score(pred, test, test_cards) if labelled else
                           fold_score(pred, test.scores.astype(np.float64), None if test.costs is None else test.costs.astype(np.float64), card_costs))
            return out

        per: dict[str, list[float]] = {n: folds_of(n) for n in names}
        means = {n: float(np.mean(v)) for n, v in per.items()}
        best = max(names, key=lambda n: means[n])  # max keeps the earliest among ties

        def beyond(a: str, b: str) -> tuple[bool, float]:
            """Does ``a`` beat ``b`` by the margin plus one standard error of their paired fold differences?"""
            d = np.array(per[a]) - np.array(per[b])
            se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0
            return means[a] > means[b] + cfg.margin + se, se

        # the incumbent: what routed before the choice, if it beats the zero router beyond noise;
        # the best replaces it only beyond noise too (a near-tie on one split's folds is not
        # evidence, and the incumbent is the policy measured most widely)
        incumbent = BEFORE_CHOICE if BEFORE_CHOICE in per and beyond(BEFORE_CHOICE, "prior")[0] else "prior"
        wins, se = beyond(best, incumbent)
        chosen = best if best == incumbent or wins else incumbent
        # a fused encoder: the choice is measured on the dense part alone too, on the same folds,
        # and that twin replaces it where it is better beyond noise (the lexical part hurts here)
        lexical = ""
        if view is not None and chosen != "prior":
            twin = chosen + DENSE
            per[twin] = folds_of(twin)
            means[twin] = float(np.mean(per[twin]))
            drop = beyond(twin, chosen)[0]
            lexical = f"; the lexical part {'dropped: its dense twin beats it' if drop else 'kept: its dense twin does not beat it'} beyond noise"
            chosen = twin if drop else chosen
        policy, ccfg = CANDIDATES[chosen.removesuffix(DENSE)]
        self._choice = {
            "chosen": chosen,
            "policy": policy,
            "config": {**ccfg, **({"encoder_epochs": cfg.encoder_epochs} if policy == "carve" and cfg.encoder_epochs else {}), "seed": cfg.seed},
            "why": f"best mean {'M/F/D accuracy' if labelled else 'AIQ' if np.ptp(card_costs) > 0 and data.costs is not None else 'quality'} over {len(folds)} folds of {len(rows)} training rows"
            + (f", {len(hide)} of {len(joining)} models joining by {how} in each" if hide else "")
            + ("" if chosen.removesuffix(DENSE) == best else f" ({best} not beyond {'the zero router' if incumbent == 'prior' else incumbent} by margin {cfg.margin} + one standard error {se:.3g})")
            + lexical,
            # what the chosen policy reads of a query (the zero router reads none of it)
            "embedding": "minilm+tfidf" if view is not None and chosen != "prior" and not chosen.endswith(DENSE) else "minilm",
            "mean": means,
            "folds": per,
        }
        inner = self._candidate(chosen, final=True)
        inner.add_models(cards)
        self._view = view[1] if view is not None and chosen.endswith(DENSE) else None
        self._set_inner(inner)
        self._cards = {}

    # -- scoring -----------------------------------------------------------------------------
    def score(self, q: np.ndarray, candidates: Sequence[ModelCard], tasks: Sequence[str | None] | None = None) -> np.ndarray:
        """The chosen policy's scores (:data:`BEFORE_CHOICE`'s before the choice), of the chosen view of ``q``."""
        return self._inner.score(q if self._view is None else self._view(q), candidates, tasks)

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["choice"] = self._choice
        state["cards"] = [c.to_dict() for c in self._cards.values()]
        state["inner"] = self._inner.state_dict()
        if self._learner is not None:
            state["inner_learner"] = self._learner.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._choice = dict(state.get("choice") or {})
        self._cards = {c.id: c for c in (ModelCard.from_dict(dict(d)) for d in state.get("cards", []))}
        # the state's own config wins (a checkpoint from before BEFORE_CHOICE holds the zero router's)
        chosen = self._choice.get("chosen", BEFORE_CHOICE)
        view = dense_view(self.encoder) if chosen.endswith(DENSE) else None
        self._view = view[1] if view else None
        self._set_inner(self._candidate(chosen, final=bool(self._choice)))
        self._inner.load_state_dict(state["inner"])
        if self._learner is not None:
            self._learner.load_state_dict(state.get("inner_learner"))
