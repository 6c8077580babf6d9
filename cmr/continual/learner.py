"""The learner: the one continual training loop, with replay and anchoring as its parts.

Everything that teaches a policy goes through a :class:`Learner`: the benchmark (``cmr bench
cmr`` full and partial feedback, ``cmr bench online``), ``cmr train``, the served router's first
start and the learner actor (``services/learner.py``). So a benchmark figure is a figure about
the served learner: same steps, same replay draws, same random generator, same epochs.

The split follows Avalanche: the loop is here; the storage policy (what is kept for replay) is a
:class:`~cmr.continual.replay.Replay` over two buffers; the anchor
(:class:`~cmr.continual.anchoring.Anchor`) adds an L2 pull to the last anchor point to the loss.
A policy that implements :class:`Trainable` names its default parts (``continual_parts``, from
its config) and is trained epoch by epoch; any other policy just gets ``fit`` (labelled data)
and ``update`` (feedback events). The learner's state (replay buffers, anchor snapshot, random
generator, counters) travels in every checkpoint it writes, under ``"learner"``.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, Sequence, runtime_checkable

import numpy as np

from cmr.checkpoint import Checkpoint, load_policy, save
from cmr.continual.anchoring import Anchor
from cmr.continual.hooks import LearnerHooks
from cmr.continual.replay import Interactions, Replay
from cmr.data.cmrbench import Experience
from cmr.data.examples import Examples
from cmr.types import FeedbackEvent, ModelCard

#: the learner's defaults (the serving ``LearnerArgs`` takes its defaults from these)
EVENTS_PER_STEP = 32
CONSOLIDATE_EVERY = 1000
CONSOLIDATE_EPOCHS = 2

Penalty = Callable[[dict[str, Any]], Any]


@runtime_checkable
class Trainable(Protocol):
    """What a policy implements to be trained by the learner's loop (gradient steps)."""

    @property
    def num_epochs(self) -> int: ...

    def continual_parts(self) -> tuple[Replay | None, Anchor | None]:
        """The replay and anchor the learner uses by default (from the policy's config)."""

    def interactions(self, data: Examples) -> Interactions:
        """The training triples of a batch of labelled data."""

    def begin_experience(self, cards: Sequence[ModelCard] | None, new: Interactions | None = None) -> None:
        """Before the epochs: add the live models (None: keep them), take in ``new``."""

    def anchored(self) -> tuple[dict[str, Any], set[str]]:
        """The tensors to anchor (by name; empty before any parameter exists) and which of them are per-model rows."""

    def train_epoch(self, items: Interactions, epoch: int, rng: np.random.Generator, penalty: Penalty | None) -> dict[str, float]:
        """One pass over ``items``; ``penalty(params)`` is added to every batch's loss."""

    def end_experience(self) -> None:
        """After the epochs."""

    def online_step(self, items: Interactions, replay: Interactions, penalty: Penalty | None) -> dict[str, float]:
        """A bounded update from feedback ``items`` plus a ``replay`` sample."""


class Learner:
    """Trains a policy over experiences (:meth:`fit`, :meth:`train_experience`) and feedback
    events (:meth:`consume`); writes checkpoints.

    Args:
        policy: any routing policy.
        hooks: typed callbacks, called in order.
        store: checkpoint root; None keeps checkpoints in memory only.
        events_per_step: events per bounded online step.
        consolidate_every: events between consolidations in :meth:`consume` (a few epochs over
            the replay from an anchor at the current parameters, then a checkpoint).
        consolidate_epochs: epochs of one consolidation.
        fingerprint: data fingerprint stored with every checkpoint.

    ``replay`` and ``anchor`` are the policy's ``continual_parts()`` (None for a policy without a
    training loop); replace them before training to plug in others. The random generator is
    seeded with the policy config's ``seed``.
    """

    def __init__(
        self,
        policy,
        hooks: Sequence[LearnerHooks] = (),
        store: Path | str | None = None,
        events_per_step: int = EVENTS_PER_STEP,
        consolidate_every: int = CONSOLIDATE_EVERY,
        consolidate_epochs: int = CONSOLIDATE_EPOCHS,
        fingerprint: dict[str, Any] | None = None,
    ):
        self.policy = policy
        self.trainable = isinstance(policy, Trainable)
        self.replay, self.anchor = policy.continual_parts() if self.trainable else (None, None)
        self.hooks = list(hooks)
        self.store = Path(store) if store is not None else None
        self.events_per_step = max(1, events_per_step)
        self.consolidate_every = consolidate_every
        self.consolidate_epochs = consolidate_epochs
        self.fingerprint = dict(fingerprint or {})
        self.rng = np.random.default_rng(getattr(policy.config, "seed", 0))
        # a policy that trains its choice through a learner of its own (auto) takes these settings
        configure = getattr(policy, "configure_learner", None)
        if configure is not None:
            configure(events_per_step=self.events_per_step, consolidate_every=consolidate_every, consolidate_epochs=consolidate_epochs)
        self.experiences = 0  # anchor points so far (experiences and consolidations)
        self._since_consolidation = 0
        self._version = 0

    @classmethod
    def resume(cls, ck: Checkpoint, encoder=None, **kwargs: Any) -> "Learner":
        """The policy of checkpoint ``ck`` with the learner state saved beside it."""
        learner = cls(load_policy(ck.path, encoder=encoder), **kwargs)
        learner.load_state_dict(ck.load_state().get("learner"))
        return learner

    # ------------------------------------------------------------------ experiences
    def train_experience(self, exp: Experience, cards: Sequence[ModelCard] | None = None) -> Checkpoint:
        """Train on one experience's train split; ``cards`` = the live hub (default: the models
        its labels name). Returns the checkpoint written (or kept in memory)."""
        for h in self.hooks:
            h.before_experience(exp)
        if cards is None:
            cards = [ModelCard(id=m) for m in exp.train.model_ids]
        t0 = time.perf_counter()
        metrics = self._fit(exp.k, exp.train, cards)
        metrics["train_seconds"] = time.perf_counter() - t0
        for h in self.hooks:
            h.after_experience(exp, metrics)
        return self.checkpoint({"experience": exp.k, **self.fingerprint})

    def fit(self, data: Examples, cards: Sequence[ModelCard]) -> dict[str, Any]:
        """Learn one experience's labelled ``data`` (``cards`` = the live hub): the loop of
        :meth:`train_experience` without its hooks around the experience or a checkpoint."""
        return self._fit(-1, data, cards)

    def _penalty(self) -> Penalty | None:
        return self.anchor.penalty if self.anchor is not None else None

    def _epochs(self, k: int, cards, new: Interactions | None, items: Interactions, epochs: int) -> dict[str, float]:
        """begin → anchor → ``epochs`` passes over ``items`` → end; the replay keeps ``new``."""
        p = self.policy
        p.begin_experience(cards, new)
        if self.anchor is not None:
            params, rows = p.anchored()
            if params and self.experiences > 0:
                self.anchor.capture(params, rows)
            else:
                self.anchor.clear()
        last: dict[str, float] = {}
        for epoch in range(epochs):
            last = p.train_epoch(items, epoch, self.rng, self._penalty())
            for h in self.hooks:
                h.after_epoch(k, epoch, last)
        p.end_experience()
        if self.replay is not None and new is not None:
            self.replay.experiences.add(new)
        self.experiences += 1
        return last

    def _fit(self, k: int, data: Examples, cards: Sequence[ModelCard]) -> dict[str, Any]:
        p = self.policy
        if not self.trainable:
            p.fit(data, cards)
            return {}
        tune = getattr(p, "tune_encoder", None)
        if tune is not None and data.labels is not None:
            held = self.replay.items() if self.replay is not None else None
            if tune(data, held, cards):
                # the policy's encoder changed: this experience's rows and the replay are
                # encoded again, so every vector the head trains on comes from one encoder
                data = replace(data, emb=p.encoder.encode(data.texts))
                if self.replay is not None:
                    self.replay.reembed(p.encoder)
        new = p.interactions(data)
        # the replay as it was before this experience (begin_experience does not change it)
        items = Interactions.concat([new, self.replay.experiences.items()]) if self.replay is not None else new
        last = self._epochs(k, cards, new, items, p.num_epochs)
        return {"new": len(new), "replayed": len(items) - len(new), **{f"last_{a}": b for a, b in last.items()}}

    # ------------------------------------------------------------------ online
    def consume(self, events: Iterable[FeedbackEvent]) -> Checkpoint | None:
        """Learn from feedback events in bounded steps (``events_per_step`` events + a fixed
        replay sample each); every ``consolidate_every`` events consolidate and checkpoint.
        Returns the last checkpoint written, or None."""
        ckpt = None
        chunk: list[FeedbackEvent] = []
        for e in events:
            chunk.append(e)
            if len(chunk) == self.events_per_step:
                ckpt = self._step(chunk) or ckpt
                chunk = []
        if chunk:
            ckpt = self._step(chunk) or ckpt
        return ckpt

    def _step(self, events: list[FeedbackEvent]) -> Checkpoint | None:
        p = self.policy
        metrics: dict[str, float] = {}
        if not self.trainable:
            p.update(events)
        elif len(items := Interactions.from_events(events)):
            replay = self.replay.sample(self.rng) if self.replay is not None else Interactions.empty(0)
            metrics = p.online_step(items, replay, self._penalty())
            if self.replay is not None:
                self.replay.events.add(items)
        for h in self.hooks:
            h.on_events(events, metrics)
        self._since_consolidation += len(events)
        if self._since_consolidation >= self.consolidate_every:
            self._since_consolidation = 0
            return self.consolidate()
        return None

    def consolidate(self) -> Checkpoint:
        """A few epochs over the replay (training coreset + event reservoir) from an anchor at
        the current parameters, then a checkpoint."""
        if self.trainable:
            items = self.replay.items() if self.replay is not None else Interactions.empty(0)
            self._epochs(-1, None, None, items, self.consolidate_epochs)
        return self.checkpoint({"consolidation": True, **self.fingerprint})

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Replay buffers, anchor snapshot, random generator and counters (numpy and JSON-able)."""
        return {"experiences": self.experiences, "since_consolidation": self._since_consolidation,
                "rng": self.rng.bit_generator.state,
                "replay": None if self.replay is None else self.replay.state_dict(),
                "anchor": None if self.anchor is None else self.anchor.state_dict()}

    def load_state_dict(self, d: dict[str, Any] | None) -> None:
        if not d:
            return
        self.experiences, self._since_consolidation = int(d["experiences"]), int(d["since_consolidation"])
        self.rng.bit_generator.state = d["rng"]
        if self.replay is not None and d.get("replay"):
            self.replay.load_state_dict(d["replay"])
        if self.anchor is not None and d.get("anchor"):
            self.anchor.load_state_dict(d["anchor"])

    def checkpoint(self, fingerprint: dict[str, Any]) -> Checkpoint:
        """Write (or keep in memory) the policy's and the learner's state and tell the hooks."""
        extra = {"learner": self.state_dict()}
        if "encoder" in fingerprint and getattr(self.policy, "encoder", None) is not None:
            # a policy that tunes its encoder while it learns embeds with new weights by now
            fingerprint = {**fingerprint, "encoder": self.policy.encoder.name}
        if self.store is not None:
            ck = save(self.store, self.policy, fingerprint, extra)
        else:
            self._version += 1
            ck = Checkpoint(version=self._version, path=None, policy=self.policy.name, fingerprint=fingerprint,
                            state={**self.policy.state_dict(), **extra})
        for h in self.hooks:
            h.after_checkpoint(ck)
        return ck
