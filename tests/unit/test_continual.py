"""Continual machinery: replay storage, anchoring, the learner loop, hooks, online consumption.

The streams are small and synthetic (query embeddings drawn around per-model centres) so that
interference between experiences is built in and measurable; cards are embedded by the real
MiniLM encoder.
"""

from __future__ import annotations

import numpy as np
import pytest

from cmr.continual import CoresetBuffer, Interactions, RecordingHooks, ReservoirBuffer
from cmr.continual.anchoring import Anchor
from cmr.continual.learner import Learner
from cmr.continual.replay import buffer_from_state, farthest_point_order
from cmr.data.cmrbench import Experience
from cmr.data.examples import Examples
from cmr.policies.registry import make_policy
from cmr.types import FeedbackEvent, ModelCard

DIM = 384


def _unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def synthetic_stream(seed=0, n_models=5, per_model=24, noise=0.35):
    """Two experiences, each a domain of ``n_models`` models. Experience 2's query centres are
    experience 1's plus a shared shift: a router that learns e2 alone maps e1's queries to e2's
    models (built-in forgetting)."""
    rng = np.random.default_rng(seed)
    centres_a = _unit(rng.normal(size=(n_models, DIM)))
    shift = _unit(rng.normal(size=DIM)) * 0.9
    centres_b = _unit(centres_a + shift)
    cards = [ModelCard(id=f"alpha-{i}", domain="Alpha", description=f"alpha model number {i}", experience=1) for i in range(n_models)]
    cards += [ModelCard(id=f"beta-{i}", domain="Beta", description=f"beta model number {i}", experience=2) for i in range(n_models)]
    ids = [c.id for c in cards]

    def split(centres, offset, dom, n):
        lab = np.repeat(np.arange(n_models), n)
        emb = _unit(centres[lab] + noise * rng.normal(size=(len(lab), DIM)) / np.sqrt(DIM) * 8)
        scores = np.zeros((len(lab), len(ids)), np.float32)
        scores[np.arange(len(lab)), lab + offset] = 1
        return Examples(texts=[f"{dom} q{i}" for i in range(len(lab))], model_ids=ids, scores=scores,
                        labels=lab + offset, meta={"domain": [dom] * len(lab), "family": [None] * len(lab)}, emb=emb)

    exps = [
        Experience(1, split(centres_a, 0, "Alpha", per_model), split(centres_a, 0, "Alpha", 10)),
        Experience(2, split(centres_b, n_models, "Beta", per_model), split(centres_b, n_models, "Beta", 10)),
    ]
    return cards, exps


def _acc(policy, test, cards):
    s = policy.score(test.emb, cards)
    return float(np.mean(np.array([cards[j].id for j in s.argmax(1)]) == np.array([test.model_ids[l] for l in test.labels])))


def _run(config, encoder, seed=0):
    cards, exps = synthetic_stream(seed)
    # a fast learner with per-model offsets, so that interference shows within a few steps
    p = make_policy("carve", encoder=encoder, config={"epochs": 15, "lr": 5e-3, "offsets": True, "seed": seed, **config})
    snaps = []
    learner = Learner(p)
    for exp in exps:
        live = [c for c in cards if c.experience <= exp.k]
        p.add_models([c for c in cards if c.experience == exp.k])
        learner.fit(exp.train, live)
        snaps.append(p.model_embeddings([c.id for c in cards if c.experience == 1]))
    return p, cards, exps, snaps


# ---------------------------------------------------------------- replay storage
def test_coreset_budget_quota_cap_and_spread():
    rng = np.random.default_rng(0)
    n = 400
    emb = _unit(rng.normal(size=(n, 16)))
    dom = ["a"] * 300 + ["b"] * 100
    model = [f"m{i % 10}" for i in range(300)] + ["solo"] * 100
    buf = CoresetBuffer(fraction=0.1, per_model_cap=3)
    buf.add(Interactions(emb, model, np.ones(n), dom))
    kept = buf.items()
    assert len(kept) <= 40 and buf.budget == 40
    # domain "a" gets its 75% share (30) ... capped at 3 per model x 10 models = 30
    assert kept.domain.count("a") == 30
    # domain "b" has one model: the per-model cap binds
    assert kept.domain.count("b") == 3
    assert max(kept.model.count(m) for m in set(kept.model)) <= 3
    # farthest-point: the kept rows of a domain are more spread than a random pick of the same size
    a = kept.emb[np.array(kept.domain) == "a"]
    rnd = emb[rng.choice(300, len(a), replace=False)]
    min_dist = lambda x: np.min(1 - (x @ x.T) + 2 * np.eye(len(x)))  # noqa: E731
    assert min_dist(a) > min_dist(rnd)
    # state round-trip
    b2 = buffer_from_state(buf.state_dict())
    np.testing.assert_array_equal(b2.items().emb, kept.emb)
    assert b2.items().model == kept.model


def test_coreset_budget_follows_data_seen():
    rng = np.random.default_rng(1)
    buf = CoresetBuffer(fraction=0.2, per_model_cap=100)
    for k in range(3):
        emb = _unit(rng.normal(size=(50, 8)))
        buf.add(Interactions(emb, [f"m{k}-{i % 5}" for i in range(50)], np.ones(50), [f"d{k}"] * 50))
        assert len(buf) == round(0.2 * 50 * (k + 1))
    # every domain seen keeps its share
    assert sorted(set(buf.items().domain)) == ["d0", "d1", "d2"]
    assert len(CoresetBuffer(fraction=0.0).items()) == 0


def test_farthest_point_order_picks_extremes():
    x = _unit(np.array([[1, 0], [0.99, 0.1], [-1, 0], [0, 1]], dtype=np.float32))
    order = farthest_point_order(x, 3, first=0)
    assert order[0] == 0 and order[1] == 2 and order[2] == 3


def test_reservoir_capacity_and_uniformity():
    buf = ReservoirBuffer(capacity=100, seed=0)
    for s in range(0, 2000, 50):
        ids = np.arange(s, s + 50)
        buf.add(Interactions(np.tile(ids[:, None].astype(np.float32), (1, 4)), [str(i) for i in ids], np.ones(50)))
    assert len(buf) == 100 and buf.seen == 2000
    kept = np.array([int(m) for m in buf.items().model])
    assert len(set(kept)) == 100
    # a uniform sample of 0..1999: about half from each half of the stream
    assert 30 <= (kept < 1000).sum() <= 70
    b2 = buffer_from_state(buf.state_dict())
    assert b2.items().model == buf.items().model and b2.seen == 2000


# ---------------------------------------------------------------- anchoring
def test_anchor_penalty_and_new_rows_free():
    import torch

    a = Anchor()
    E = torch.zeros((3, 4), requires_grad=True)
    W = torch.zeros((2, 2), requires_grad=True)
    a.capture({"E": E, "W": W}, rows={"E"})
    grown = torch.cat([E.detach() + 1.0, torch.full((2, 4), 5.0)])  # two new rows appended
    pen = a.penalty({"E": grown, "W": W})
    assert float(pen.detach()) == pytest.approx(4.0)  # old rows moved by 1 in 4 dims; new rows ignored
    assert a.drift({"E": grown, "W": W + 2})["W"] == pytest.approx(16.0)  # 4 entries moved by 2


def test_anchoring_reduces_drift_of_old_embeddings(encoder):
    drifts = {}
    for strength in (0.0, 10.0):
        # flat softmax: e2's queries push e1's models away (hierarchical scoring would isolate them)
        p, cards, exps, snaps = _run({"replay": 0.0, "anchor": strength, "anchor_dense": strength, "hierarchical": False}, encoder)
        drifts[strength] = float(((snaps[1] - snaps[0]) ** 2).sum(1).mean())
    assert drifts[10.0] < 0.5 * drifts[0.0]


def test_replay_keeps_old_domain_accuracy_above_sequential(encoder):
    res = {}
    for replay in (0.0, 0.3):
        p, cards, exps, _ = _run({"replay": replay, "anchor": 0.0, "anchor_dense": 0.0}, encoder)
        res[replay] = _acc(p, exps[0].test, cards)
    assert res[0.3] > res[0.0] + 0.1, res


# ---------------------------------------------------------------- learner loop, hooks, online
def test_learner_trains_writes_checkpoints_and_calls_hooks(tmp_path, encoder):
    from cmr import checkpoint as ckpt

    cards, exps = synthetic_stream(0)
    p = make_policy("carve", encoder=encoder, config={"epochs": 3, "card_examples": False})
    hooks = RecordingHooks()
    learner = Learner(p, hooks=[hooks], store=tmp_path, fingerprint={"sha256": "x"})
    kept = []
    for exp in exps:
        live = [c for c in cards if c.experience <= exp.k]
        ck = learner.train_experience(exp, live)
        assert ck.version == exp.k and ck.path.is_dir()
        kept.append(len(learner.replay.experiences))
    kinds = [k for k, _ in hooks.log]
    assert kinds == (["before_experience"] + ["after_epoch"] * 3 + ["after_experience", "after_checkpoint"]) * 2
    assert ckpt.open_checkpoint(tmp_path / "v000002").fingerprint == {"experience": 2, "sha256": "x"}
    after = dict(hooks.log[-2][1][1])
    # e2 trained on its own rows plus the coreset kept after e1: 20% of 120 rows = 24, but at
    # most replay_cap=4 rows for each of the 5 models = 20
    assert after["new"] == len(exps[1].train) and after["replayed"] == kept[0] == 20


def test_learner_consume_bounded_steps_and_consolidation(tmp_path, encoder):
    cards, exps = synthetic_stream(0)
    p = make_policy("carve", encoder=encoder, config={"epochs": 3, "card_examples": False, "online_replay": 8})
    learner = Learner(p, hooks=[hooks := RecordingHooks()], store=tmp_path, consolidate_every=40, events_per_step=10)
    learner.train_experience(exps[0], [c for c in cards if c.experience == 1])
    test = exps[0].test
    events = [FeedbackEvent(request_id=str(i), model=test.model_ids[test.labels[i]], reward=1.0, embedding=test.emb[i].tolist()) for i in range(45)]
    ck = learner.consume(events)
    assert ck is not None and ck.version == 2 and ck.fingerprint.get("consolidation") is True
    steps = [m for k, (n, m) in [(k, v) for k, v in hooks.log if k == "on_events"]]
    # 45 events in steps of 10: 5 steps; each step trains on its events plus at most 8 replayed rows
    assert len(steps) == 5 and all(s["n"] <= 10 + 8 for s in steps)
    assert len(learner.replay.events) == 45


def test_learner_drives_policies_without_a_training_loop(cmr_small, encoder):
    exp = cmr_small.experiences[0]
    p = make_policy("knn", encoder=encoder)
    learner = Learner(p)
    assert not learner.trainable
    ck = learner.train_experience(exp, cmr_small.cards_upto(1))
    assert ck.path is None and ck.state is not None
    s = p.score(exp.train.emb[:5], cmr_small.cards_upto(1))
    assert s.shape == (5, len(cmr_small.cards_upto(1)))
