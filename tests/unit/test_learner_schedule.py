"""The served learner checkpoints on a schedule (every N events or T seconds, whichever first),
not per step; events learnt in between are in memory only, so a restart learns them again, once;
retention keeps versions by count, total size and age."""

from __future__ import annotations

import time

from cmr import checkpoint
from cmr.policies.registry import make_policy
from cmr.types import Decision, ModelCard


def _served(tmp_path, encoder, **learner):
    from cmr.hub import HubStore, ModelHub
    from services.config import AppArgs
    from services.routing import bootstrap
    from services.store import DecisionStore

    args = AppArgs(home=str(tmp_path), bench=None, tiny_models=False, profile_size=0,
                   learner={"enabled": False, "poll_s": 0, **learner})
    bootstrap(args, encoder)
    ModelHub(HubStore(args.state_dir() / "hub.sqlite")).add([ModelCard(id="m1", description="translation"),
                                                            ModelCard(id="m2", description="summaries")])
    store = DecisionStore(args.state_dir() / "decisions.sqlite")
    n = [0]

    def feed(k: int) -> None:
        ds = [Decision(model=f"m{1 + (n[0] + i) % 2}", score=0.5, utility=0.5, request_id=f"r{n[0] + i}") for i in range(k)]
        qs = [f"query {n[0] + i}" for i in range(k)]
        store.record(ds, qs, encoder.encode(qs), [0.0] * k)
        for d in ds:
            store.add_feedback(d.request_id, 0.6)
        n[0] += k
    return args, feed


def test_checkpoint_every_n_events_or_t_seconds(tmp_path, encoder):
    from services.learner import LearnerActor, audit

    args, feed = _served(tmp_path, encoder, checkpoint_every_events=5, checkpoint_every_s=0.4)
    learner = LearnerActor(args.to_dict(), encoder=encoder)
    try:
        feed(3)
        assert learner.step(save=False) is None  # 3 < 5 events and not 0.4 s yet: in memory only
        s = learner.status()
        assert (s["applied_offset"], s["offset"], s["unsaved"], s["waiting"], s["checkpoint_version"]) == (3, 0, 3, 3, 1)
        feed(2)
        assert learner.step(save=False) == 2  # the 5th event: due by count
        assert (learner.status()["offset"], learner.status()["waiting"]) == (5, 0)
        feed(1)
        assert learner.step(save=False) is None
        time.sleep(0.45)
        assert learner.step(save=False) == 3  # nothing new, but the unsaved event is due by time
        assert checkpoint.read_fingerprint(learner.root, 3)["applied"] == [5, 6]
        # unsaved events die with the learner; its successor learns them again, once
        feed(2)
        assert learner.step(save=False) is None and learner.status()["unsaved"] == 2
    finally:
        learner.stop()
    again = LearnerActor(args.to_dict(), encoder=encoder)
    try:
        assert again.status()["offset"] == 6 and again.step() == 4
    finally:
        again.stop()
    a = audit(args)
    assert (a["learnt"], a["n_lost"], a["n_duplicated"], a["waiting"], a["broken"]) == (8, 0, 0, 0, None), a


def test_retention_by_count_size_and_age(tmp_path):
    root = tmp_path / "ck"
    for _ in range(5):
        checkpoint.save(root, make_policy("random"))
    size = sum(f.stat().st_size for f in checkpoint.version_dir(root, 5).iterdir())
    assert checkpoint.prune(root, keep=10, max_bytes=int(size * 3.5)) == [1, 2]  # 3 fit in the bytes
    assert checkpoint.prune(root, keep=10, max_bytes=1) == [3, 4]  # the newest is always kept
    assert checkpoint.versions(root) == [5]
    checkpoint.save(root, make_policy("random"))
    time.sleep(0.3)
    checkpoint.save(root, make_policy("random"))
    assert checkpoint.prune(root, keep=10, max_age_s=0.2) == [5, 6] and checkpoint.versions(root) == [7]
