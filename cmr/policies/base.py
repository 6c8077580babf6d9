"""The routing-policy interface.

A policy scores a batch of query embeddings against *any* candidate set of model cards: the
hub changes over time, so a policy never owns a fixed model table. Models it has never seen
must still get a finite score (from their card, their profile, or a prior).
"""

from __future__ import annotations

import numbers
from abc import ABC, abstractmethod
from dataclasses import asdict
from typing import Annotated, Any, ClassVar, Sequence

import numpy as np
from pydantic import BeforeValidator, ConfigDict, Field, ValidationError
from pydantic.dataclasses import dataclass as _pydantic_dataclass

from cmr.data.examples import Examples
from cmr.encoders.base import Encoder
from cmr.errors import ConfigError, validation_line
from cmr.types import FeedbackEvent, ModelCard

# Field types of policy configs: ints, bools and strings are strict (``k=true`` or ``epochs=2.5``
# is an error, not a silent cast; numpy integers, as Tune samples them, are ints); floats also
# take ints and numeric strings (YAML reads ``1e-3`` as a string), never NaN or infinity.
Real = Annotated[float, Field(strict=False)]
Positive = Annotated[float, Field(gt=0, strict=False)]
NonNegative = Annotated[float, Field(ge=0, strict=False)]
Fraction = Annotated[float, Field(ge=0, le=1, strict=False)]
Integer = Annotated[int, BeforeValidator(lambda x: int(x) if isinstance(x, numbers.Integral) and not isinstance(x, bool) else x)]
Count = Annotated[Integer, Field(ge=1)]
Size = Annotated[Integer, Field(ge=0)]


def config_dataclass(cls):
    """Decorator of every policy config: a pydantic dataclass, so that each field is checked
    against its type hint and ``Field`` bounds when the config is built (no hand-written checks);
    unknown keys are refused. Subclasses are decorated again."""
    return _pydantic_dataclass(cls, config=ConfigDict(strict=True, extra="forbid", allow_inf_nan=False))


@config_dataclass
class PolicyConfig:
    """Base for per-policy configs: typed, range-checked dataclasses with a dict/JSON round-trip."""

    seed: Size = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PolicyConfig":
        """Build and check a config; a bad value is one ``ConfigError`` line naming the field."""
        if not isinstance(d, dict):
            raise ConfigError(f"{cls.__name__}: a policy config must be an object, got {type(d).__name__}")
        try:
            return cls(**d)
        except ValidationError as e:
            raise ConfigError(validation_line(e, cls.__name__)) from None


class RoutingPolicy(ABC):
    """Scores queries against candidate models; learns offline (``fit``) and online (``update``).

    Subclasses set ``name`` and ``Config`` and implement ``score``; most also override ``fit``,
    ``add_models`` and the state methods.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type[PolicyConfig]] = PolicyConfig
    #: evaluation-only policies that must be shown the ground truth (the oracle)
    needs_truth: ClassVar[bool] = False
    #: policies that read the cards' text, so cannot run on embeddings alone (no encoder)
    needs_encoder: ClassVar[bool] = False

    def __init__(self, encoder: Encoder | None = None, config: PolicyConfig | dict | None = None):
        self.encoder = encoder
        # a config object of another class (or built unchecked) is re-read through the checks
        self.config = self.Config.from_dict(config if isinstance(config, dict) else asdict(config) if config is not None else {})
        self._card_emb: dict[str, np.ndarray] = {}
        self._profile_ids: list[str] = []
        self._profile_emb = np.zeros((0, 0), dtype=np.float32)
        self._profile_tasks: list[str] = []  # each profile prompt's task, "" = none

    # -- learning ----------------------------------------------------------------------------
    def fit(self, data: Examples, cards: Sequence[ModelCard]) -> None:
        """Learn from a new batch of labelled queries (``data.emb`` set). Called once per
        experience: policies keep what they learnt before. ``cards`` is the live hub."""
        self.add_models(cards)

    def update(self, events: Sequence[FeedbackEvent]) -> None:
        """Learn from partial feedback: only the chosen model's reward is known.

        The default turns the events into ``Examples`` whose scores are NaN except for the
        chosen model, and calls ``fit``; policies with a true online rule override it.
        """
        events = [e for e in events if e.embedding is not None]
        if not events:
            return
        models = sorted({e.model for e in events})
        col = {m: i for i, m in enumerate(models)}
        scores = np.full((len(events), len(models)), np.nan, dtype=np.float32)
        costs = np.zeros_like(scores)
        for i, e in enumerate(events):
            scores[i, col[e.model]] = e.reward
            costs[i, col[e.model]] = e.cost
        data = Examples(
            texts=[e.query for e in events],
            model_ids=models,
            scores=scores,
            costs=costs,
            emb=np.asarray([e.embedding for e in events], dtype=np.float32),
            # the task each request named: feedback teaches per-task priors too
            meta={"task": [e.task or "" for e in events]} if any(e.task for e in events) else {},
        )
        self.fit(data, [ModelCard(id=m) for m in models if m not in self._card_emb])

    def add_models(self, cards: Sequence[ModelCard]) -> None:
        """The hub grew: make these models routable (default: embed their cards)."""
        self.card_embeddings(cards)

    def set_profile_prompts(self, ids: Sequence[str], emb: np.ndarray, tasks: Sequence[str | None] | None = None) -> None:
        """The representative prompts that a new model answers when it joins (UniRoute).

        A card's ``profile`` maps these ids to the model's score on them. ``tasks``: each
        prompt's task where known (a model's profile answers then teach its per-task priors).
        """
        if tasks is not None and len(tasks) != len(ids):
            raise ValueError(f"field 'task': expected {len(ids)} tasks (one per profile prompt), got {len(tasks)}")
        self._profile_ids = list(ids)
        self._profile_emb = np.asarray(emb, dtype=np.float32)
        self._profile_tasks = [str(t or "") for t in tasks] if tasks is not None else [""] * len(self._profile_ids)

    def profile_examples(self, cards: Sequence[ModelCard]) -> Examples | None:
        """The profile answers of ``cards`` as ``Examples`` over those cards (NaN = not answered),
        or None when no card answered any known profile prompt."""
        if not self._profile_ids:
            return None
        cards = [c for c in cards if c.profile]
        if not cards:
            return None
        row = {p: i for i, p in enumerate(self._profile_ids)}
        scores = np.full((len(row), len(cards)), np.nan, dtype=np.float32)
        for j, c in enumerate(cards):
            for pid, v in c.profile.items():
                if pid in row:
                    scores[row[pid], j] = v
        keep = ~np.isnan(scores).all(axis=1)
        if not keep.any():
            return None
        costs = np.broadcast_to(np.array([c.cost for c in cards], dtype=np.float32), scores.shape).copy()
        return Examples(
            texts=[p for p, k in zip(self._profile_ids, keep) if k],
            model_ids=[c.id for c in cards],
            scores=scores[keep],
            costs=costs[keep],
            meta={"id": [p for p, k in zip(self._profile_ids, keep) if k]}
            | ({"task": [t for t, k in zip(self._profile_tasks, keep) if k]} if any(self._profile_tasks) else {}),
            emb=self._profile_emb[keep],
        )

    # -- scoring -----------------------------------------------------------------------------
    @abstractmethod
    def score(self, q: np.ndarray, candidates: Sequence[ModelCard], tasks: Sequence[str | None] | None = None) -> np.ndarray:
        """Predicted quality ``[n_q, n_c]`` of each candidate for each query embedding.

        ``tasks``: each query's task (``""``/None where it names none), the same vocabulary as
        the training rows' ``meta["task"]``; None: no query names one. Policies that learn from
        tasks (knn) use them; the others ignore them, and every policy scores a query that names
        no task, or a task it never saw, as it would without tasks."""

    def describe(self) -> dict[str, Any]:
        """What the policy chose while learning and why (JSON-able), for reports and health
        checks; empty for a policy that makes no such choice."""
        return {}

    # -- helpers -----------------------------------------------------------------------------
    def card_embeddings(self, cards: Sequence[ModelCard]) -> np.ndarray:
        """Unit-norm card-text embeddings ``[n, dim]``, memoised by model id."""
        # the router scores every batch against the same card tuple (one per hub version): stack
        # it once (tuples are immutable; a memoised vector is never replaced, only added). Checked
        # first: even scanning the tuple for new ids is a Python loop over every model per batch
        memo = getattr(self, "_card_stack", None)
        if isinstance(cards, tuple) and memo is not None and memo[0] is cards and memo[1] is self._card_emb:
            return memo[2]
        new = [c for c in cards if c.id not in self._card_emb]
        if new:
            if self.encoder is None:
                raise RuntimeError(f"policy {self.name!r} needs an encoder to embed model cards")
            vecs = self.encoder.encode([c.text() for c in new])
            for c, v in zip(new, vecs):
                self._card_emb[c.id] = v
        if not cards:
            return np.zeros((0, self.encoder.dim if self.encoder else 0), dtype=np.float32)
        out = np.stack([self._card_emb[c.id] for c in cards])
        if isinstance(cards, tuple):
            out.flags.writeable = False  # shared between batches: a caller must not change it
            self._card_stack = (cards, self._card_emb, out)
        return out

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to restore the policy (numpy arrays and JSON-able values)."""
        ids = list(self._card_emb)
        return {
            "config": self.config.to_dict(),
            "card_ids": ids,
            "card_emb": np.stack([self._card_emb[i] for i in ids]) if ids else np.zeros((0, 0), np.float32),
            "profile_ids": list(self._profile_ids),
            "profile_emb": self._profile_emb,
            "profile_tasks": list(self._profile_tasks),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.config = self.Config.from_dict(dict(state["config"]))
        self._card_emb = {m: np.asarray(v, dtype=np.float32) for m, v in zip(state["card_ids"], state["card_emb"])}
        self._profile_ids = list(state.get("profile_ids", []))
        self._profile_emb = np.asarray(state.get("profile_emb", np.zeros((0, 0))), dtype=np.float32)
        self._profile_tasks = [str(t) for t in state.get("profile_tasks", [""] * len(self._profile_ids))]  # absent before
