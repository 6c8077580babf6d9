"""One learning path: the benchmark's partial-feedback protocol and the served learner actor run
the same learner code, so one event stream gives the same parameters either way (no Ray: the
actor's logic runs in-process)."""

from __future__ import annotations

import numpy as np

from cmr import checkpoint
from cmr.bench.cmr_protocol import _stream_partial
from cmr.continual import LearnerHooks
from cmr.continual.learner import CONSOLIDATE_EVERY, EVENTS_PER_STEP, Learner
from cmr.hub import HubStore, ModelHub
from cmr.policies.registry import make_policy
from cmr.types import Decision


class _Events(LearnerHooks):
    """Keeps the feedback events the learner was given, in order."""

    def __init__(self) -> None:
        self.events = []

    def on_events(self, events, metrics) -> None:
        self.events.extend(events)


def test_benchmark_and_served_learner_learn_identical_parameters(tmp_path, encoder, cmr_small):
    from services.config import AppArgs, LearnerArgs
    from services.learner import LearnerActor
    from services.routing import checkpoint_root
    from services.store import DecisionStore

    # the served learner's defaults are the learner's own (what the benchmarks run)
    assert (LearnerArgs().events_per_step, LearnerArgs().consolidate_every) == (EVENTS_PER_STEP, CONSOLIDATE_EVERY)
    # small steps and consolidations, so that both happen on this short stream
    steps = {"events_per_step": 4, "consolidate_every": 12}
    config = {"epochs": 2, "online_replay": 8}
    args = AppArgs(home=str(tmp_path), bench=None, tiny_models=False, profile_size=0, policy="carve", policy_config=config,
                   learner={"enabled": False, "poll_s": 0, **steps})
    e1, e2 = cmr_small.experiences[:2]

    # benchmark path: experience 1 learnt (its checkpoint is where the served learner starts) ...
    kept = _Events()
    bench = Learner(make_policy("carve", encoder=encoder, config=config), hooks=[kept], store=checkpoint_root(args), **steps)
    bench.policy.add_models(cmr_small.cards_of(1))
    bench.train_experience(e1, cmr_small.cards_upto(1))
    bench.store = None  # from here on its checkpoints stay in memory
    # ... then experience 2 by partial feedback, as `cmr bench cmr --feedback partial` runs it; the
    # hub lists cards in id order, so they join in that order here too (rows line up)
    live = cmr_small.cards_upto(2)
    bench.policy.add_models(sorted(cmr_small.cards_of(2), key=lambda c: c.id))
    _stream_partial(bench, e2.train, live, np.array([c.cost for c in live]), e2.k, batch=8, seed=0)
    events = kept.events
    assert len(events) == len(e2.train) and {e.reward for e in events} == {0.0, 1.0}

    # served path: the same cards in the hub, the same events in the feedback log, one learner step
    ModelHub(HubStore(args.state_dir() / "hub.sqlite")).add(live)
    store = DecisionStore(args.state_dir() / "decisions.sqlite")
    store.record([Decision(model=e.model, score=0.5, utility=0.5, request_id=e.request_id) for e in events],
                 [e.query for e in events], np.array([e.embedding for e in events], np.float32), [e.cost for e in events])
    for e in events:
        store.add_feedback(e.request_id, e.reward)
    actor = LearnerActor(args.to_dict(), encoder=encoder)
    try:
        version = actor.step()
    finally:
        actor.stop()
    # every consolidation inside the step wrote a checkpoint on top of experience 1's
    assert version == checkpoint.latest(checkpoint_root(args)).version >= 1 + len(events) // steps["consolidate_every"] > 2

    served, ours = actor.policy.state_dict(), bench.policy.state_dict()
    assert served["models"] == ours["models"]
    for name, value in ours["params"].items():
        np.testing.assert_array_equal(served["params"][name], value, err_msg=name)
    np.testing.assert_array_equal(served["proto"], ours["proto"])
    # and the learner's own state: replay buffers, random generator, counters
    s, o = actor.learner.state_dict(), bench.state_dict()
    assert (s["rng"], s["experiences"], s["since_consolidation"]) == (o["rng"], o["experiences"], o["since_consolidation"])
    np.testing.assert_array_equal(s["replay"]["events"]["items"]["emb"], o["replay"]["events"]["items"]["emb"])
