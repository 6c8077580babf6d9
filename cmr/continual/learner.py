"""The learner: the continual training loop, kept apart from its hooks and its replay storage.

``Learner(policy, buffer, hooks)`` drives any :class:`~cmr.policies.base.RoutingPolicy`:

* a policy with a trainable loop (the :class:`Trainable` protocol: ``interactions``,
  ``begin_experience``, ``train_epoch``, ``end_experience``, ``online_step``) is trained epoch
  by epoch on the new data plus what its replay buffer kept, with the hooks called around;
* any other policy just gets ``fit`` (experiences) and ``update`` (events).

The benchmark harness reaches this loop through ``policy.fit`` (a trainable policy's ``fit``
runs a :class:`Learner` over itself); ``cmr train`` and the serving learner actor build one
directly, with a checkpoint root so every experience (and every consolidation) is written.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence, runtime_checkable

import numpy as np

from cmr.checkpoint import Checkpoint, save
from cmr.continual.hooks import LearnerHooks
from cmr.continual.replay import Interactions, ReplayBuffer, ReservoirBuffer
from cmr.data.cmrbench import Experience
from cmr.data.examples import Examples
from cmr.types import FeedbackEvent, ModelCard


@runtime_checkable
class Trainable(Protocol):
    """What a policy exposes so that the learner can run its training loop."""

    buffer: ReplayBuffer

    @property
    def num_epochs(self) -> int: ...

    def interactions(self, data: Examples) -> Interactions: ...

    def replay_items(self) -> Interactions: ...

    def begin_experience(self, cards: Sequence[ModelCard], new: Interactions | None = None) -> None: ...

    def train_epoch(self, items: Interactions, epoch: int) -> dict[str, float]: ...

    def end_experience(self, new: Interactions) -> None: ...

    def online_step(self, items: Interactions, replay: Interactions) -> dict[str, float]: ...


class Learner:
    """Trains a policy over experiences and feedback events; writes checkpoints.

    Args:
        policy: any routing policy.
        buffer: replay storage for *online* events (default: the policy's own ``events``
            reservoir when it has one, else a fresh reservoir). Experience-level replay is the
            policy's ``buffer`` (its coreset), saved inside its checkpoints.
        hooks: typed callbacks, called in order.
        store: checkpoint root; None keeps checkpoints in memory only.
        consolidate_every: events between consolidations in :meth:`consume` (a few epochs
            over the replay, re-anchoring, a new checkpoint).
        events_per_step: events per bounded online step.
        consolidate_epochs: epochs of one consolidation.
        fingerprint: data fingerprint stored with every checkpoint.
    """

    def __init__(
        self,
        policy,
        buffer: ReplayBuffer | None = None,
        hooks: Sequence[LearnerHooks] = (),
        store: Path | str | None = None,
        consolidate_every: int = 1000,
        events_per_step: int = 32,
        consolidate_epochs: int = 2,
        fingerprint: dict[str, Any] | None = None,
        seed: int = 0,
    ):
        self.policy = policy
        own = getattr(policy, "events", None)
        self.buffer = buffer if buffer is not None else (own if own is not None else ReservoirBuffer(seed=seed))
        self.hooks = list(hooks)
        self.store = Path(store) if store is not None else None
        self.consolidate_every = consolidate_every
        self.events_per_step = max(1, events_per_step)
        self.consolidate_epochs = consolidate_epochs
        self.fingerprint = dict(fingerprint or {})
        self._since_consolidation = 0
        self._version = 0
        self._rng = np.random.default_rng(seed)

    @property
    def trainable(self) -> bool:
        return isinstance(self.policy, Trainable)

    # ------------------------------------------------------------------ experiences
    def train_experience(self, exp: Experience, cards: Sequence[ModelCard] | None = None) -> Checkpoint:
        """Train on one experience's train split; ``cards`` = the live hub (default: the models
        its labels name). Returns the checkpoint written (or kept in memory)."""
        for h in self.hooks:
            h.before_experience(exp)
        if cards is None:
            cards = [ModelCard(id=m) for m in exp.train.model_ids]
        t0 = time.perf_counter()
        metrics = self._train(exp.k, exp.train, cards)
        metrics["train_seconds"] = time.perf_counter() - t0
        for h in self.hooks:
            h.after_experience(exp, metrics)
        return self.checkpoint({"experience": exp.k, **self.fingerprint})

    def train_examples(self, data: Examples, cards: Sequence[ModelCard]) -> dict[str, Any]:
        """The loop of :meth:`train_experience` without hooks or checkpoint (what ``fit`` runs)."""
        return self._train(None, data, cards)

    def _train(self, k: int | None, data: Examples, cards: Sequence[ModelCard]) -> dict[str, Any]:
        p = self.policy
        if not self.trainable:
            p.fit(data, cards)
            return {}
        new = p.interactions(data)
        p.begin_experience(cards, new)
        items = Interactions.concat([new, p.replay_items()])
        last: dict[str, float] = {}
        for epoch in range(p.num_epochs):
            last = p.train_epoch(items, epoch)
            for h in self.hooks:
                h.after_epoch(k if k is not None else -1, epoch, last)
        p.end_experience(new)
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
        if self.trainable:
            items = Interactions.from_events(events)
            if len(items):
                n = getattr(p.config, "online_replay", 32)
                replay = Interactions.concat([self.buffer.sample(n // 2, self._rng), p.buffer.sample(n - n // 2, self._rng)])
                metrics = p.online_step(items, replay)
                if hasattr(p, "absorb"):
                    p.absorb(items)
                self.buffer.add(items)
            else:
                metrics = {}
        else:
            p.update(events)
            metrics = {}
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
        p = self.policy
        if self.trainable:
            live = getattr(p, "_live", None) or []
            cards = [ModelCard(id=m) for m in live]
            p.begin_experience(cards)
            items = Interactions.concat([p.replay_items(), self.buffer.items()])
            for epoch in range(self.consolidate_epochs):
                m = p.train_epoch(items, epoch)
                for h in self.hooks:
                    h.after_epoch(-1, epoch, m)
            # the events are already in the event reservoir; the coreset gets nothing new
            p.end_experience(Interactions.empty(0))
        return self.checkpoint({"consolidation": True, **self.fingerprint})

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self, fingerprint: dict[str, Any]) -> Checkpoint:
        """Write (or keep in memory) the policy's state and tell the hooks."""
        if self.store is not None:
            ck = save(self.store, self.policy, fingerprint)
        else:
            self._version += 1
            ck = Checkpoint(version=self._version, path=None, policy=self.policy.name, fingerprint=fingerprint, state=self.policy.state_dict())
        for h in self.hooks:
            h.after_checkpoint(ck)
        return ck
