"""The carve policy on real (small) CMRBench slices and outcome matrices, and its online path."""

from __future__ import annotations

import numpy as np
import pytest

from cmr.continual.learner import Learner
from cmr.policies.registry import make_policy
from cmr.types import FeedbackEvent, ModelCard


def _fit_e1(cmr_small, encoder, **cfg):
    """A learner whose carve policy has learnt experience 1."""
    exp = cmr_small.experiences[0]
    learner = Learner(make_policy("carve", encoder=encoder, config={"epochs": 8, **cfg}))
    live = cmr_small.cards_upto(1)
    learner.policy.add_models(cmr_small.cards_of(1))
    learner.fit(exp.train, live)
    return learner, exp, live


def _m_acc(p, data, cards):
    s = p.score(data.emb, cards)
    ids = np.array([c.id for c in cards])
    return float(np.mean(ids[s.argmax(1)] == np.array([data.model_ids[l] for l in data.labels])))


def _epoch_losses(cmr_small, encoder, **cfg):
    from cmr.continual import RecordingHooks
    from cmr.continual.learner import Learner

    exp = cmr_small.experiences[0]
    p = make_policy("carve", encoder=encoder, config={"epochs": 6, **cfg})
    live = cmr_small.cards_upto(1)
    hooks = RecordingHooks()
    Learner(p, hooks=[hooks]).train_experience(exp, live)
    return p, [m["loss"] for k, (_, _, m) in [(k, v) for k, v in hooks.log if k == "after_epoch"]]


def test_training_lowers_the_loss_and_scores_are_distributions(cmr_small, encoder):
    p, losses = _epoch_losses(cmr_small, encoder, lr=2e-3)
    assert len(losses) == 6 and losses[-1] < 0.9 * losses[0], losses
    exp, live = cmr_small.experiences[0], cmr_small.cards_upto(1)
    s = p.score(exp.test.emb, live)
    assert s.shape == (len(exp.test), len(live)) and np.all(s >= 0)
    # a softmax over the candidates: each row is a probability distribution
    np.testing.assert_allclose(s.sum(1), 1.0, atol=1e-4)
    # any candidate subset, any order
    sub = live[::7][::-1]
    assert p.score(exp.test.emb[:3], sub).shape == (3, len(sub))
    # the hierarchical variant is a distribution too (log p(domain) + log p(model | domain))
    h, hl = _epoch_losses(cmr_small, encoder, lr=2e-3, hierarchical=True)
    np.testing.assert_allclose(h.score(exp.test.emb, live).sum(1), 1.0, atol=1e-4)
    assert hl[-1] < hl[0]


def test_domain_bonus_shifts_mass_towards_the_query_domain(cmr_small, encoder):
    import dataclasses

    lr, exp, live = _fit_e1(cmr_small, encoder, epochs=0)
    p = lr.policy
    q = exp.test.emb
    base = p.score(q, live)
    p.config = dataclasses.replace(p.config, domain_bonus=1.0)
    s = p.score(q, live)
    np.testing.assert_allclose(s.sum(1), 1.0, atol=1e-4)
    # the bonus is the query's cosine to each domain's centroid: the mass on the domain nearest
    # the query (the one whose centroid it is closest to) grows, on every row
    e = p.model_embeddings([c.id for c in live])
    dom = np.array([c.domain for c in live], dtype=object)
    doms = sorted(set(dom))
    cent = np.stack([e[dom == d].sum(0) / np.linalg.norm(e[dom == d].sum(0)) for d in doms])
    import torch

    with torch.no_grad():
        z = p._project(torch.from_numpy(q), p._params).numpy()
    near = np.array(doms, dtype=object)[(z @ cent.T).argmax(1)]
    mass = lambda sc: np.array([sc[i, dom == near[i]].sum() for i in range(len(q))])  # noqa: E731
    assert np.all(mass(s) > mass(base))
    # and it trains (the bonus is part of the training softmax too)
    _, losses = _epoch_losses(cmr_small, encoder, lr=2e-3, domain_bonus=0.5)
    assert losses[-1] < 0.9 * losses[0], losses


def test_new_model_is_routable_before_any_feedback(cmr_small, encoder):
    lr, exp, live = _fit_e1(cmr_small, encoder, epochs=4)
    p = lr.policy
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
    cfg = dict(epochs=4, online_lr=0.05, online_steps=3)
    lr, exp, live = _fit_e1(cmr_small, encoder, **cfg)
    p = lr.policy
    q = exp.test.emb[:4]
    target = live[5]
    before = p.score(q, live)[:, 5]
    lr.consume([FeedbackEvent(request_id=str(i), model=target.id, reward=1.0, embedding=q[i].tolist()) for i in range(4)])
    assert np.all(p.score(q, live)[:, 5] > before)
    assert len(lr.replay.events) == 4
    # reward 0: a fresh router trained the same way moves the queries away from the model it chose
    lr2, _, _ = _fit_e1(cmr_small, encoder, **cfg)
    p2 = lr2.policy
    chosen = p2.score(q, live).argmax(1)
    before = p2.score(q, live)[np.arange(4), chosen]
    lr2.consume([FeedbackEvent(request_id=str(i), model=live[chosen[i]].id, reward=0.0, embedding=q[i].tolist()) for i in range(4)])
    assert np.all(p2.score(q, live)[np.arange(4), chosen] < before)
    # events without an embedding cannot be learnt from and change nothing
    st = p2.score(q, live)
    lr2.consume([FeedbackEvent(request_id="x", model=target.id, reward=1.0)])
    np.testing.assert_array_equal(st, p2.score(q, live))


def test_online_update_adds_unknown_models(cmr_small, encoder):
    lr, exp, live = _fit_e1(cmr_small, encoder, epochs=2)
    p = lr.policy
    lr.consume([FeedbackEvent(request_id="1", model="brand/new-model", reward=1.0, embedding=exp.test.emb[0].tolist())])
    with pytest.raises(TypeError, match="Learner"):  # only the learner trains carve: one path
        p.update([])
    s = p.score(exp.test.emb[:2], live + [ModelCard(id="brand/new-model")])
    assert np.isfinite(s).all()


def test_sampled_negatives_train(cmr_small, encoder):
    p, losses = _epoch_losses(cmr_small, encoder, lr=2e-3, negatives="sampled", n_hard=4, n_domain=2, n_random=4, remine_every=2)
    # hard negatives were mined among the live models, never the row's own model
    assert p._hard is not None and p._hard.shape[1] == 4
    assert losses[-1] < 0.9 * losses[0], losses


def test_outcome_matrices_use_a_sigmoid_quality_head(outcomes_small, encoder):
    data = outcomes_small
    p = make_policy("carve", encoder=encoder, config={"epochs": 20})
    Learner(p).fit(data.train, data.cards)
    s = p.score(data.train.emb, data.cards)
    assert p._mode == "sigmoid" and s.shape == (len(data.train), len(data.cards))
    assert np.all((s >= 0) & (s <= 1))
    # predicted mean quality per model follows each model's measured mean quality
    pred = s.mean(0)
    true = np.nanmean(data.train.scores, 0)
    rank = lambda v: np.argsort(np.argsort(v))  # noqa: E731
    assert np.corrcoef(rank(pred), rank(true))[0, 1] > 0.7


def test_domain_vote_routes_to_the_most_probable_domain(cmr_small, encoder):
    import dataclasses

    lr, exp, live = _fit_e1(cmr_small, encoder, epochs=2)
    p, q = lr.policy, exp.test.emb
    base = p.score(q, live)
    dom = np.array([c.domain or "" for c in live], dtype=object)
    doms = sorted(set(dom))
    mass = np.stack([base[:, dom == d].sum(1) for d in doms], axis=1)  # [B, n_domains]
    p.config = dataclasses.replace(p.config, domain_vote=0.5)
    s = p.score(q, live)
    col = {d: i for i, d in enumerate(doms)}
    expect = 0.5 * base + 0.5 * mass[:, [col[d] for d in dom]]
    np.testing.assert_allclose(s, expect, atol=1e-5)
    p.config = dataclasses.replace(p.config, domain_vote=0.99)
    top = p.score(q, live).argmax(1)
    best = np.array(doms, dtype=object)[mass.argmax(1)]
    # the chosen model is in the query's most probable domain, on (almost) every row: a row where
    # two domains' masses tie within the 1% left to the model term may go either way
    assert np.mean(dom[top] == best) > 0.95
    # off (0) is the softmax as before
    p.config = dataclasses.replace(p.config, domain_vote=0.0)
    np.testing.assert_allclose(p.score(q, live), base, atol=1e-6)


def test_domain_and_family_losses_add_the_log_mass_of_the_rows_own_group(cmr_small, encoder):
    import dataclasses

    import torch

    lr, exp, live = _fit_e1(cmr_small, encoder, epochs=2, leave_one_out=False)
    p, data = lr.policy, exp.train
    x = torch.from_numpy(data.emb)
    pos = torch.as_tensor([p._row[data.model_ids[l]] for l in data.labels], dtype=torch.long)
    one = torch.ones(len(data))

    def loss(**cfg):
        p.config = dataclasses.replace(p.config, **{"domain_loss": 0.0, "family_loss": 0.0, **cfg})
        with torch.no_grad():
            return float(p._loss(x, pos, one, one, None))

    s = p.score(data.emb, live)  # the same softmax over the live models, computed apart
    for key, w in (("domain", 2.0), ("family", 0.5)):
        of = {c.id: (getattr(c, key) or "\0" + c.id) for c in live}
        grp = np.array([of[c.id] for c in live], dtype=object)
        own = [of[data.model_ids[l]] for l in data.labels]
        mass = np.array([s[i, grp == g].sum() for i, g in enumerate(own)])
        # the extra term is w · mean(−log Σ_{m in the row's group} p(m))
        assert loss(**{f"{key}_loss": w}) - loss() == pytest.approx(w * float(np.mean(-np.log(mass))), rel=1e-3)
    # the sampled-negatives path adds a finite, positive term as well
    p.config = dataclasses.replace(p.config, negatives="sampled", n_hard=4, n_domain=4, n_random=4)
    p._hard = p._mine_hard(p.interactions(data))  # hard negatives of these rows, in their order
    idx = np.arange(len(data))

    def sampled(**cfg):
        p.config = dataclasses.replace(p.config, **{"domain_loss": 0.0, "family_loss": 0.0, **cfg})
        with torch.no_grad():
            return float(p._loss(x, pos, one, one, idx, None, np.random.default_rng(0)))

    for cfg in ({"domain_loss": 2.0}, {"family_loss": 2.0}):
        v = sampled(**cfg)
        assert np.isfinite(v) and v > sampled()
    # families travel with the state (a state saved before them loads with one family a model)
    st = p.state_dict()
    again = make_policy("carve", encoder=encoder, config=p.config.to_dict())
    again.load_state_dict(st)
    assert again._model_family == p._model_family and again._mfam()[1] == p._mfam()[1] < len(p._models)
    st.pop("model_family")
    again.load_state_dict(st)
    assert again._mfam()[1] == len(again._models)


def test_popularity_prior_favours_models_with_more_training_rows(cmr_small, encoder):
    import dataclasses

    lr, exp, live = _fit_e1(cmr_small, encoder, epochs=2)
    p, q = lr.policy, exp.test.emb
    ids = [c.id for c in live]
    n = np.bincount(exp.train.labels, minlength=len(exp.train.model_ids))
    per_model = dict(zip(exp.train.model_ids, n))
    counts = np.array([per_model.get(m, 0) for m in ids], dtype=np.float64)
    assert counts.max() >= 2
    base = p.score(q, live)
    p.config = dataclasses.replace(p.config, prior=1.0)
    s = p.score(q, live)
    np.testing.assert_allclose(s.sum(1), 1.0, atol=1e-4)
    # p'(m) ∝ p(m) · (1 + n_m): the ratio to the base score is (1 + n_m) up to the row's normaliser
    ratio = s / np.clip(base, 1e-30, None)
    rel = ratio / ratio[:, :1]
    np.testing.assert_allclose(rel[0], (1 + counts) / (1 + counts[0]), rtol=1e-3)
    # the counts travel with the policy's state
    again = make_policy("carve", encoder=encoder, config=p.config.to_dict())
    again.load_state_dict(p.state_dict())
    np.testing.assert_allclose(again.score(q, live), s, atol=1e-6)


def test_full_card_text_adds_family_framework_and_performance():
    card = ModelCard(id="org/tiny-bert", family="bert", domain="Natural Language Processing Fill-Mask", description="A small BERT.",
                     metadata={"api_call": "pipeline('fill-mask', model='org/tiny-bert')", "framework": "Transformers",
                               "performance": '{"dataset": "glue", "accuracy": 0.81}'})
    rich = make_policy("carve", config={})._card_doc(card)
    full = make_policy("carve", config={"card_text": "full"})._card_doc(card)
    assert full.startswith(rich) and "glue" in full and "Transformers" in full and "glue" not in rich


def test_scoring_cache_matches_the_model_embeddings_and_follows_training(cmr_small, encoder):
    import torch

    lr, exp, live = _fit_e1(cmr_small, encoder, epochs=1)
    p, q = lr.policy, exp.test.emb[:8]
    rows = torch.as_tensor([p._row[c.id] for c in live])
    s = p.score(q, live)
    assert p._emb_cache is not None  # scoring filled it
    with torch.enable_grad():
        fresh = p._model_emb(rows, p._params).detach().numpy()  # the training path, no cache
    np.testing.assert_allclose(p.model_embeddings([c.id for c in live]), fresh, atol=1e-6)
    # a training epoch moves the projection: the next scores are those of the new parameters
    lr.fit(exp.train, live)
    assert p._emb_cache is None
    s2 = p.score(q, live)
    with torch.enable_grad():
        again = p._model_emb(rows, p._params).detach().numpy()
    np.testing.assert_allclose(p.model_embeddings([c.id for c in live]), again, atol=1e-6)
    assert not np.allclose(s, s2)


def test_scoring_memo_for_the_routers_card_tuple_follows_training_and_new_models(cmr_small, encoder):
    """The router scores every query against one card tuple per hub version: carve resolves its
    rows and gathers their embeddings once for it, and the memo never serves stale scores."""
    lr, exp, live = _fit_e1(cmr_small, encoder, epochs=1)
    p, q = lr.policy, exp.test.emb[:8]
    hub = tuple(live)
    np.testing.assert_allclose(p.score(q, hub), p.score(q, list(live)), atol=1e-6)
    assert p._rows_memo[0] is hub and p.score(q[:1], hub).shape == (1, len(hub))
    lr.fit(exp.train, live)  # training moves the parameters: the memo must follow
    np.testing.assert_allclose(p.score(q, hub), p.score(q, list(live)), atol=1e-6)
    grown = hub + (ModelCard(id="memo-new", domain=live[0].domain, description="a model added after the memo"),)
    s = p.score(q, grown)  # a new hub version: the new model is added from its card and scored
    assert s.shape == (len(q), len(grown)) and np.isfinite(s).all()
    np.testing.assert_allclose(s, p.score(q, list(grown)), atol=1e-6)
    np.testing.assert_allclose(p.score(q, hub), p.score(q, list(live)), atol=1e-6)
