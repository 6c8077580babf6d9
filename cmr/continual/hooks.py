"""Typed learner hooks: one method per moment of the loop (no string dispatch).

Subclass :class:`LearnerHooks` and override only what you need; a :class:`Learner` calls every
hook object it holds, in order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from cmr.types import FeedbackEvent

if TYPE_CHECKING:  # only for annotations: keep import of this module cheap
    from cmr.checkpoint import Checkpoint
    from cmr.data.cmrbench import Experience


class LearnerHooks:
    """Callbacks around the learner's loop (each a no-op here)."""

    def before_experience(self, exp: "Experience") -> None:
        """An experience is about to be trained."""

    def after_epoch(self, exp_k: int, epoch: int, metrics: dict[str, float]) -> None:
        """One pass of training over an experience's data (plus replay) finished (``exp_k`` -1: not an experience)."""

    def after_experience(self, exp: "Experience", metrics: dict[str, Any]) -> None:
        """An experience finished training (before its checkpoint is written)."""

    def after_checkpoint(self, ckpt: "Checkpoint") -> None:
        """A checkpoint was produced (written to disk when the learner has a store)."""

    def on_events(self, events: Sequence[FeedbackEvent], metrics: dict[str, float]) -> None:
        """A batch of feedback events was learnt from online."""


class RecordingHooks(LearnerHooks):
    """Keeps a log of what happened (for tests, reports and the serving learner's status)."""

    def __init__(self) -> None:
        self.log: list[tuple[str, Any]] = []

    def before_experience(self, exp: "Experience") -> None:
        self.log.append(("before_experience", exp.k))

    def after_epoch(self, exp_k: int, epoch: int, metrics: dict[str, float]) -> None:
        self.log.append(("after_epoch", (exp_k, epoch, dict(metrics))))

    def after_experience(self, exp: "Experience", metrics: dict[str, Any]) -> None:
        self.log.append(("after_experience", (exp.k, dict(metrics))))

    def after_checkpoint(self, ckpt: "Checkpoint") -> None:
        self.log.append(("after_checkpoint", ckpt.version))

    def on_events(self, events: Sequence[FeedbackEvent], metrics: dict[str, float]) -> None:
        self.log.append(("on_events", (len(events), dict(metrics))))
