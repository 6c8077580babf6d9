"""The carve policy on real (small) CMRBench slices and outcome matrices, and its online path."""

from __future__ import annotations

import numpy as np
import pytest

from cmr.policies.registry import make_policy
from cmr.types import FeedbackEvent, ModelCard


def _fit_e1(cmr_small, encoder, **cfg):
    exp = cmr_small.experiences[0]
    p = make_policy("carve", encoder=encoder, config={"epochs": 8, **cfg})
    live = cmr_small.cards_upto(1)
    p.add_models(cmr_small.cards_of(1))
    p.fit(exp.train, live)
    return p, exp, live


def _m_acc(p, data, cards):
    s = p.score(data.emb, cards)
    ids = np.array([c.id for c in cards])
    return float(np.mean(ids[s.argmax(1)] == np.array([data.model_ids[l] for l in data.labels])))


def test_config_round_trip_and_validation():
    from cmr.policies.carve import CarveConfig

    c = CarveConfig(replay=0.1, anchor=0.0, hierarchical=False)
    assert CarveConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="head"):
        make_policy("carve", config={"head": "bogus"})
    with pytest.raises(ValueError, match="unknown option"):
        make_policy("carve", config={"nope": 1})


def test_training_fits_its_data_and_scores_are_distributions(cmr_small, encoder):
    p, exp, live = _fit_e1(cmr_small, encoder)
    before = make_policy("carve", encoder=encoder, config={"epochs": 0})
    before.add_models(live)
    before.fit(exp.train, live)
    # training moves routing towards the labelled models (measured on the training rows)
    assert _m_acc(p, exp.train, live) > _m_acc(before, exp.train, live) + 0.2
    s = p.score(exp.test.emb, live)
    assert s.shape == (len(exp.test), len(live)) and np.all(s >= 0)
    # hierarchical softmax over the candidates: each row is a probability distribution
    np.testing.assert_allclose(s.sum(1), 1.0, atol=1e-4)
    # any candidate subset, any order
    sub = live[::7][::-1]
    assert p.score(exp.test.emb[:3], sub).shape == (3, len(sub))


def test_new_model_is_routable_before_any_feedback(cmr_small, encoder):
    p, exp, live = _fit_e1(cmr_small, encoder, epochs=4)
    card = ModelCard(id="acme/whale-song-transcriber", domain="Audio Automatic Speech Recognition",
                     description="Transcribes recordings of humpback whale songs into symbolic sequences of whale song units.",
                     metadata={"api_call": "pipeline('automatic-speech-recognition', model='acme/whale-song-transcriber')"})
    q = encoder.encode(["I have hours of hydrophone recordings of humpback whales singing; transcribe the whale songs into units."])
    cands = live + [card]
    s = p.score(q, cands)
    assert np.isfinite(s).all()
    # among the ~1,000 models of the hub, the card that describes this request ranks near the top
    rank = int((s[0] > s[0, -1]).sum())
    assert rank < 3, rank
    # and it is the top choice once candidates are filtered to its domain (as ``decide`` filters do)
    same = [c for c in cands if c.domain == card.domain]
    assert same[int(p.score(q, same).argmax())].id == card.id


def test_online_update_pulls_and_pushes(cmr_small, encoder):
    p, exp, live = _fit_e1(cmr_small, encoder, epochs=4, online_lr=0.05, online_steps=3)
    q = exp.test.emb[:4]
    target = live[5]
    before = p.score(q, live)[:, 5]
    ev = [FeedbackEvent(request_id=str(i), model=target.id, reward=1.0, embedding=q[i].tolist()) for i in range(4)]
    p.update(ev)
    mid = p.score(q, live)[:, 5]
    assert np.all(mid > before)
    p.update([FeedbackEvent(request_id=str(i), model=target.id, reward=0.0, embedding=q[i].tolist()) for i in range(4)])
    assert np.all(p.score(q, live)[:, 5] < mid)
    assert len(p.events) == 8
    # events without an embedding cannot be learnt from and change nothing
    st = p.score(q, live)
    p.update([FeedbackEvent(request_id="x", model=target.id, reward=1.0)])
    np.testing.assert_array_equal(st, p.score(q, live))


def test_online_update_adds_unknown_models(cmr_small, encoder):
    p, exp, live = _fit_e1(cmr_small, encoder, epochs=2)
    p.update([FeedbackEvent(request_id="1", model="brand/new-model", reward=1.0, embedding=exp.test.emb[0].tolist())])
    s = p.score(exp.test.emb[:2], live + [ModelCard(id="brand/new-model")])
    assert np.isfinite(s).all()


def test_sampled_negatives_train(cmr_small, encoder):
    p, exp, live = _fit_e1(cmr_small, encoder, negatives="sampled", n_hard=4, n_domain=2, n_random=4, remine_every=2)
    assert p._hard is not None and p._hard.shape[1] == 4
    before = make_policy("carve", encoder=encoder, config={"epochs": 0})
    before.add_models(live)
    before.fit(exp.train, live)
    assert _m_acc(p, exp.train, live) > _m_acc(before, exp.train, live) + 0.2


def test_outcome_matrices_use_a_sigmoid_quality_head(outcomes_small, encoder):
    data = outcomes_small
    p = make_policy("carve", encoder=encoder, config={"epochs": 20})
    p.fit(data.train, data.cards)
    s = p.score(data.train.emb, data.cards)
    assert p._mode == "sigmoid" and s.shape == (len(data.train), len(data.cards))
    assert np.all((s >= 0) & (s <= 1))
    # predicted mean quality per model follows each model's measured mean quality
    pred = s.mean(0)
    true = np.nanmean(data.train.scores, 0)
    rank = lambda v: np.argsort(np.argsort(v))  # noqa: E731
    assert np.corrcoef(rank(pred), rank(true))[0, 1] > 0.7
