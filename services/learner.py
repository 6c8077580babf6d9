"""``LearnerActor``: a detached, named Ray actor that learns online from feedback.

It reads feedback events from the decision store after the offset of its last checkpoint, feeds
them to the continual learner (``cmr.continual.learner.Learner.consume``: bounded online steps,
replay and consolidation for trainable policies, ``policy.update`` for the others), hears of hub
registrations (new cards are added to the policy before learning), writes the next checkpoint
version (``cmr.checkpoint``, under ``AppArgs.checkpoints``) and, once it is whole, publishes it in
the state store (``cmr.published``). Routers on every node swap to the published version.

Exactly once: every checkpoint the learner writes (consolidations inside ``consume`` included)
records in its fingerprint the offset range it applied, ``applied = [after, upto]`` (events with
``after < offset <= upto``), and the version it was built on (``base``). A restarted learner loads
the newest checkpoint that verifies and resumes after its ``offset``; events it had applied in
memory but not checkpointed died with the process and are applied again, once. It resumes from the
newest *published* version that verifies: a version written but not published (killed in between)
is left out of the chain, and its events are applied again by the next version, once. A failed step
reloads that checkpoint too, so a half-applied batch is never applied twice. :func:`audit` walks
the ``base`` chain of the newest valid checkpoint and counts how often each stored event was
applied (target: every event ≤ its offset exactly once). After each step the learner prunes old
versions (``LearnerArgs.keep_checkpoints``, :func:`cmr.checkpoint.prune`); the audit then covers
the kept chain, from the oldest kept version's applied range on.

The actor is created with ``max_restarts=-1`` (Ray restarts it after a crash), and the router holds
it through :class:`LearnerClient`, which re-creates it if it was killed for good.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from typing import Any

from cmr import checkpoint
from cmr.continual.hooks import LearnerHooks, RecordingHooks
from cmr.continual.learner import Learner
from cmr.published import PublishedStoreProtocol, load_served, publish
from services.config import AppArgs
from services.routing import checkpoint_root, served_checkpoint
from services.store import open_decisions, open_hub, open_published

log = logging.getLogger("cmr.serve.learner")


class _Publish(LearnerHooks):
    """Publishes every checkpoint the learner writes (consolidations included), once written whole."""

    def __init__(self, store: PublishedStoreProtocol, root):
        self.store, self.root = store, root

    def after_checkpoint(self, ckpt) -> None:
        publish(self.store, self.root, ckpt)


class LearnerActor:
    """Consumes feedback into the policy and writes versioned checkpoints (thread-safe ``step``)."""

    def __init__(self, args: dict[str, Any], encoder=None):
        self.args = AppArgs.from_dict(args)
        if encoder is None:
            from cmr.encoders import default_encoder

            # the router's encoder: the card and profile vectors this learner writes into a
            # checkpoint are compared with the router's query vectors, so both come from one model
            encoder = default_encoder(backend=self.args.encoder, threads=self.args.encoder_threads)
        self.encoder = encoder
        self.store = open_decisions(self.args)
        self.root = checkpoint_root(self.args)
        self.published = open_published(self.args)
        self.hub = open_hub(self.args)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self.instance = uuid.uuid4().hex[:12]  # a new one per (re)start: restarts are visible in status()
        self.started = time.time()
        self._load()
        self.steps = 0
        self.events_learnt = 0
        self.failures = 0
        self.last_error: dict[str, Any] | None = None  # the newest failed step: when and what (the console shows it)
        self.pruned = 0
        self.checkpoint_bytes = 0  # written by this instance: the cost the schedule bounds
        self._stop = False
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _load(self) -> None:
        """(Re)load the newest published checkpoint that verifies: policy, learner state, version, offset."""
        ck = load_served(self.published, self.args.policy, adopt=self.root)
        if ck is None:
            raise checkpoint.CheckpointError(f"{self.root}: no published checkpoint to learn from")
        self.hooks = RecordingHooks()
        la = self.args.learner
        self.learner = Learner.resume(ck, encoder=self.encoder, hooks=[self.hooks, _Publish(self.published, self.root)], store=self.root,
                                      consolidate_every=la.consolidate_every, events_per_step=la.events_per_step)
        self.policy = self.learner.policy
        self.version = self.base = ck.version
        # an old consolidation checkpoint may lack the offset: the store's cursor is written after each save
        self.offset = self.saved_offset = int(ck.fingerprint.get("offset", self.store.cursor("learner")))
        self._unsaved, self._unsaved_since = 0, None  # events learnt since the last checkpoint, since when
        self._hub_version = -1
        log.info("learner %s on checkpoint v%d, offset %d", self.instance, self.version, self.offset)

    def _loop(self) -> None:
        # wake on notify, or every poll_s: feedback written while nobody nudged is still learnt
        while not self._stop:
            wait = self.args.learner.poll_s or None
            if self._unsaved_since is not None:  # and when the unsaved events are due in a checkpoint
                due = max(0.0, self._unsaved_since + self.args.learner.checkpoint_every_s - time.monotonic())
                wait = due if wait is None else min(wait, due)
            self._wake.wait(wait)
            self._wake.clear()
            try:
                self.step(save=False)
                # every poll, not only after learning: Ray stops exporting a process's series
                # when it reports nothing for a while, and an idle learner's lag is still news
                self._metrics()
            except Exception as e:  # keep the loop alive; the error is logged with its traceback
                log.exception("learner step failed; reloading the last checkpoint")
                self.failures += 1
                self.last_error = {"time": time.time(), "error": f"{type(e).__name__}: {e}"[:500]}
                try:
                    with self._lock:
                        self._load()  # a half-applied batch must not be applied again on top of itself
                except Exception:
                    log.exception("learner reload failed")

    def notify(self) -> None:
        """New feedback or a registration arrived: learn soon (returns at once)."""
        self._wake.set()

    def step(self, save: bool = True) -> int | None:
        """Learn from every waiting event, then write a checkpoint of what is unsaved: always
        (``save``), or when the schedule says (``LearnerArgs.checkpoint_every_events`` /
        ``checkpoint_every_s``: the loop). Returns the version written, or None."""
        with self._lock:
            if self.hub.version() != self._hub_version:
                # new hub entries become policy arms (card embeddings, profile answers)
                self._hub_version = self.hub.version()
                self.policy.add_models([c for c, _, _ in self.hub.load()])
            la = self.args.learner
            events = self.store.events(after=self.offset)
            written = None
            if len(events) >= la.min_events:
                for i in range(0, len(events), la.events_per_step):
                    part = events[i : i + la.events_per_step]
                    upto = int(part[-1].offset)
                    # a consolidation checkpoint written inside consume() covers exactly the events so far
                    self.learner.fingerprint = {"offset": upto, "applied": [self.saved_offset, upto], "base": self.base}
                    if self._unsaved_since is None:
                        self._unsaved_since = time.monotonic()
                    self._unsaved += len(part)
                    ck = self.learner.consume(part)
                    self.offset = upto
                    if ck is not None:
                        written = self._saved(ck)
                self.learner.fingerprint = {}
                self.steps += 1
                self.events_learnt += len(events)
            due = self._unsaved_since is not None and (save or self._unsaved >= la.checkpoint_every_events
                                                        or time.monotonic() - self._unsaved_since >= la.checkpoint_every_s)
            if due:
                ck = self.learner.checkpoint({"offset": self.offset, "applied": [self.saved_offset, self.offset], "base": self.base,
                                              "events": self._unsaved, "created": time.time(), "learner": self.instance,
                                              "encoder": self.policy.encoder.name})
                written = self._saved(ck)
            if written is not None:
                self.store.set_cursor("learner", self.saved_offset)
                self._prune()
                log.info("learnt up to offset %d -> checkpoint v%d", self.saved_offset, written)
            if events or written is not None:
                self._metrics()
            return written

    def _saved(self, ck) -> int:
        """A checkpoint of everything learnt so far was written (and published by the hook)."""
        self.version = self.base = ck.version
        self.saved_offset = self.offset
        self._unsaved, self._unsaved_since = 0, None
        self.checkpoint_bytes += sum(f.stat().st_size for f in ck.path.iterdir()) if ck.path is not None else 0
        return ck.version

    def _prune(self) -> None:
        """Keep the newest ``keep_checkpoints`` valid versions (0: all); a failure only logs."""
        la = self.args.learner
        keep = la.keep_checkpoints
        if keep <= 0:
            return
        try:
            gone = checkpoint.prune(self.root, keep, max_bytes=la.keep_checkpoint_bytes, max_age_s=la.keep_checkpoint_age_s)
        except OSError:
            log.exception("pruning old checkpoints failed")
            return
        self.pruned += len(gone)
        if gone:
            log.info("pruned checkpoints v%d..v%d (keeping the newest %d valid)", gone[0], gone[-1], keep)

    def _metrics(self) -> None:
        from services import metrics

        metrics.checkpoint_version(self.version, role="learner")
        metrics.learner_lag(self.store.last_offset() - self.saved_offset)

    def status(self) -> dict[str, Any]:
        # offset / waiting: what the checkpoints hold and what they do not yet (durable lag);
        # applied_offset: what the policy in memory has learnt (ahead by the unsaved events)
        return {"checkpoint_version": self.version, "offset": self.saved_offset, "applied_offset": self.offset, "unsaved": self._unsaved,
                "steps": self.steps, "events_learnt": self.events_learnt, "checkpoint_bytes": self.checkpoint_bytes,
                "waiting": self.store.last_offset() - self.saved_offset, "instance": self.instance, "started": self.started,
                "pid": os.getpid(), "node": _node_id(), "failures": self.failures, "last_error": self.last_error, "pruned": self.pruned,
                "checkpoints_written": sum(1 for k, _ in self.hooks.log if k == "after_checkpoint")}

    def stop(self) -> None:
        self._stop = True
        self._wake.set()


def _node_id() -> str | None:
    """The Ray node this runs on (None outside Ray)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def _create(args: AppArgs):
    import ray

    la = args.learner
    cls = ray.remote(LearnerActor)
    # max_restarts=-1: Ray restarts a crashed learner, which resumes from its last checkpoint
    opts = {"num_cpus": 0, **la.actor_options}
    return cls.options(name=la.name, namespace=la.namespace, lifetime="detached", get_if_exists=True,
                       max_concurrency=4, max_restarts=-1, **opts).remote(args.to_dict())


class _Method:
    def __init__(self, client: "LearnerClient", name: str):
        self.client, self.name = client, name

    def remote(self, *a: Any, **kw: Any):
        h = self.client.handle()
        ref = getattr(h, self.name).remote(*a, **kw)
        ref.future().add_done_callback(lambda f: self.client._seen(f, h))
        return ref


class LearnerClient:
    """The router's hold on the learner: ``client.notify.remote()``, ``client.status.remote()`` as
    on an actor handle, but a learner killed for good (``ray.kill``, or restarts exhausted) is
    re-created on the next call; it resumes from its last checkpoint, so nothing is lost."""

    def __init__(self, args: AppArgs):
        self.args = args
        self._handle = None
        self._lock = threading.Lock()
        self.recreated = 0

    def handle(self):
        with self._lock:
            if self._handle is None:
                self._handle = _create(self.args)
            return self._handle

    def _seen(self, fut, h) -> None:
        # runs in Ray's callback thread once the call finished: a dead actor is dropped here
        from ray.exceptions import ActorDiedError

        try:
            exc = fut.exception()
        except BaseException:  # cancelled
            return
        if isinstance(exc, ActorDiedError):
            with self._lock:
                if self._handle is h:
                    log.warning("learner actor died (%s); re-creating it on the next call", type(exc).__name__)
                    self._handle = None
                    self.recreated += 1

    def __getattr__(self, name: str) -> _Method:
        if name.startswith("_"):
            raise AttributeError(name)
        return _Method(self, name)


def get_or_create_learner(args: AppArgs) -> LearnerClient:
    """The app's learner (one detached actor for every replica), created on first call and
    re-created when it is gone."""
    c = LearnerClient(args)
    c.handle()
    return c


def learner_handle(args: AppArgs):
    """The running learner actor, or None."""
    import ray

    try:
        return ray.get_actor(args.learner.name, namespace=args.learner.namespace)
    except ValueError:
        return None


def audit(args: AppArgs) -> dict[str, Any]:
    """Which stored feedback events the served checkpoint has learnt, and how often.

    Walks ``base`` links from the newest published checkpoint that verifies back to the first-start one,
    adding up the ``applied`` offset ranges; every stored event at or below that checkpoint's
    offset should be covered exactly once. Returns counts and the offending offsets (first 20).

    After retention (``LearnerArgs.keep_checkpoints``) the walk stops at the oldest kept version
    of the chain: ``audited_from_version``; its ``applied`` range starts at
    ``audited_from_offset``, and only events after it are audited (``before_chain`` counts the
    earlier ones, learnt by pruned versions; ``pruned_upto``: the chain's newest removed version).
    A base missing *inside* the kept window is a broken chain.
    """
    root = checkpoint_root(args)
    store = open_decisions(args)
    try:
        offsets = [e.offset for e in store.events(after=0, limit=10**9)]
    finally:
        store.close()
    ck = served_checkpoint(args)
    out: dict[str, Any] = {"accepted": len(offsets), "checkpoint_version": None, "chain": [], "broken": None,
                           "audited_from_version": None, "audited_from_offset": 0, "pruned_upto": None, "before_chain": 0}
    if ck is None:
        return {**out, "learnt": 0, "waiting": len(offsets), "lost": [], "duplicated": [], "n_lost": 0, "n_duplicated": 0}
    upto = int(ck.fingerprint.get("offset", 0))
    ranges: list[tuple[int, int]] = []
    v, fp = ck.version, ck.fingerprint
    start = 0  # where the audited chain begins: its oldest applied range's start
    while True:
        out["chain"].append(v)
        start = 0
        if "applied" in fp:
            a, b = fp["applied"]
            ranges.append((int(a), int(b)))
            start = int(a)
        elif int(fp.get("offset", 0)) > 0:
            out["broken"] = f"v{v} has offset {fp['offset']} but no applied range"
            ranges.append((0, int(fp["offset"])))
        if "base" not in fp:
            break
        v = int(fp["base"])
        # the chain is read from fingerprint.json alone: a base whose weights are corrupt still
        # tells which events its successor's state contains (the learner held them in memory)
        fp = checkpoint.read_fingerprint(root, v)
        if fp is None:
            left = checkpoint.versions(root)
            if v not in left and (not left or v < left[0]):
                out["pruned_upto"] = v  # retention removed it and everything older: not a break
            else:
                out["broken"] = f"base v{v} has no readable fingerprint"
            break
    import bisect

    keys = sorted(o for o in offsets if start < o <= upto)
    hits = [0] * len(keys)
    for a, b in ranges:  # events with a < offset <= b
        for j in range(bisect.bisect_right(keys, a), bisect.bisect_right(keys, b)):
            hits[j] += 1
    counts = dict(zip(keys, hits))
    lost = sorted(o for o, c in counts.items() if c == 0)
    dup = sorted(o for o, c in counts.items() if c > 1)
    out["chain"].reverse()
    out["audited_from_version"], out["audited_from_offset"] = out["chain"][0], start
    out["before_chain"] = sum(1 for o in offsets if o <= start)
    return {**out, "checkpoint_version": ck.version, "offset": upto, "learnt": sum(1 for c in counts.values() if c == 1),
            "waiting": sum(1 for o in offsets if o > upto), "n_lost": len(lost), "n_duplicated": len(dup), "lost": lost[:20],
            "duplicated": dup[:20]}
