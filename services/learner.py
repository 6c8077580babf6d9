"""``LearnerActor``: a detached, named Ray actor that learns online from feedback.

It reads feedback events from the decision store after the offset of its last checkpoint, feeds
them to the continual learner (``cmr.continual.learner.Learner.consume``: bounded online steps,
replay and consolidation for trainable policies, ``policy.update`` for the others), hears of hub
registrations (new cards are added to the policy before learning), and writes the next
checkpoint version (``cmr.checkpoint``). Routers see the new version and swap to it. The consumed
offset is stored in the checkpoint's fingerprint, so a restarted learner resumes exactly where
its last checkpoint ended.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from cmr import checkpoint
from cmr.continual.hooks import RecordingHooks
from cmr.continual.learner import Learner
from cmr.hub import HubStore
from services.config import AppArgs
from services.routing import checkpoint_root
from services.store import DecisionStore

log = logging.getLogger("cmr.serve.learner")


class LearnerActor:
    """Consumes feedback into the policy and writes versioned checkpoints (thread-safe ``step``)."""

    def __init__(self, args: dict[str, Any], encoder=None):
        self.args = AppArgs.from_dict(args)
        if encoder is None:
            from cmr.encoders import default_encoder

            encoder = default_encoder()
        self.encoder = encoder
        state = self.args.state_dir()
        self.store = DecisionStore(state / "decisions.sqlite")
        self.root = checkpoint_root(self.args)
        self.hub = HubStore(state / "hub.sqlite")
        self._lock = threading.Lock()
        self._wake = threading.Event()
        ck = checkpoint.latest(self.root)
        if ck is None:
            raise checkpoint.CheckpointError(f"{self.root}: no valid checkpoint to learn from")
        self.policy = checkpoint.load_policy(ck.path, encoder=encoder)
        self.version = ck.version
        # a consolidation checkpoint may lack the offset: the store's cursor is written after each save
        self.offset = int(ck.fingerprint.get("offset", self.store.cursor("learner")))
        self.hooks = RecordingHooks()
        la = self.args.learner
        self.learner = Learner(self.policy, hooks=[self.hooks], store=self.root, consolidate_every=la.consolidate_every,
                               events_per_step=la.events_per_step)
        self._hub_version = -1
        self.steps = 0
        self.events_learnt = 0
        self._stop = False
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        # wake on notify, or every poll_s: feedback written while nobody nudged is still learnt
        while not self._stop:
            self._wake.wait(self.args.learner.poll_s or None)
            self._wake.clear()
            try:
                self.step()
            except Exception:  # keep the loop alive; the error is logged with its traceback
                log.exception("learner step failed")

    def notify(self) -> None:
        """New feedback or a registration arrived: learn soon (returns at once)."""
        self._wake.set()

    def step(self) -> int | None:
        """Learn from every waiting event; returns the new checkpoint version, or None if idle."""
        with self._lock:
            if self.hub.version() != self._hub_version:
                # new hub entries become policy arms (card embeddings, profile answers)
                self._hub_version = self.hub.version()
                self.policy.add_models([c for c, _, _ in self.hub.load()])
            events = self.store.events(after=self.offset)
            if len(events) < self.args.learner.min_events:
                return None
            self.learner.consume(events)
            self.offset = int(events[-1].offset)
            self.version = self.learner.checkpoint({"offset": self.offset, "events": len(events), "created": time.time()}).version
            self.store.set_cursor("learner", self.offset)
            self.steps += 1
            self.events_learnt += len(events)
            log.info("learnt %d feedback events -> checkpoint v%d", len(events), self.version)
            return self.version

    def status(self) -> dict[str, Any]:
        return {"checkpoint_version": self.version, "offset": self.offset, "steps": self.steps, "events_learnt": self.events_learnt,
                "waiting": self.store.last_offset() - self.offset, "checkpoints_written": sum(1 for k, _ in self.hooks.log if k == "after_checkpoint")}

    def stop(self) -> None:
        self._stop = True
        self._wake.set()


def get_or_create_learner(args: AppArgs):
    """The app's learner actor, created detached on first call (the same one for every replica)."""
    import ray

    la = args.learner
    cls = ray.remote(LearnerActor)
    return cls.options(name=la.name, namespace=la.namespace, lifetime="detached", get_if_exists=True,
                       num_cpus=0, max_concurrency=4).remote(args.to_dict())


def learner_handle(args: AppArgs):
    """The running learner actor, or None."""
    import ray

    try:
        return ray.get_actor(args.learner.name, namespace=args.learner.namespace)
    except ValueError:
        return None
