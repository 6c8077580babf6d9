"""``auto``: cross-validation on the train rows picks the zero router where prompts predict
nothing, a learned policy where they do, and says so (``describe``, kept in the state)."""

from __future__ import annotations

import numpy as np

from cmr.data.examples import Examples
from cmr.policies import make_policy, policy_class
from cmr.policies.auto import CANDIDATES
from cmr.types import ModelCard


def _data(signal: bool, n: int = 240, seed: int = 0, cost: bool = True) -> tuple[Examples, list[ModelCard]]:
    """Two prompt topics (random unit vectors around two centres), four models, binary outcomes:
    with ``signal`` model 0 is right on topic 0 and model 1 on topic 1; without, every model is
    right at its own rate whatever the prompt (model 3 best)."""
    rng = np.random.default_rng(seed)
    topic = rng.integers(0, 2, n)
    centres = rng.normal(size=(2, 16))
    emb = centres[topic] + 0.3 * rng.normal(size=(n, 16))
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
    if signal:
        p = np.stack([topic == 0, topic == 1, np.full(n, 0.5), np.full(n, 0.55)], axis=1).astype(float) * 0.9 + 0.05
    else:
        p = np.broadcast_to([0.4, 0.45, 0.5, 0.7], (n, 4))
    scores = (rng.random((n, 4)) < p).astype(np.float32)
    ids = [f"m{j}" for j in range(4)]
    cards = [ModelCard(id=m, cost=c if cost else 0.0) for m, c in zip(ids, (1e-4, 2e-4, 5e-4, 2e-3))]
    costs = np.broadcast_to(np.array([c.cost for c in cards], np.float32), scores.shape).copy() if cost else None
    return Examples(texts=[f"q{i}" for i in range(n)], model_ids=ids, scores=scores, costs=costs, emb=emb), cards


def _check_rule(choice: dict, margin: float) -> None:
    """The choice follows from the reported fold scores: knn is the incumbent if it beats the zero
    router by the margin + one paired SE, and the best replaces the incumbent only the same way."""
    from cmr.policies.auto import BEFORE_CHOICE

    folds, mean = {n: np.array(v) for n, v in choice["folds"].items()}, choice["mean"]

    def beyond(a, b):
        d = folds[a] - folds[b]
        return mean[a] > mean[b] + margin + d.std(ddof=1) / np.sqrt(len(d))

    incumbent = BEFORE_CHOICE if BEFORE_CHOICE in folds and beyond(BEFORE_CHOICE, "prior") else "prior"
    best = max(mean, key=mean.get)
    assert choice["chosen"] == (best if best == incumbent or beyond(best, incumbent) else incumbent), choice


def test_chooses_the_zero_router_where_prompts_predict_nothing():
    data, cards = _data(signal=False, cost=False)
    pol = make_policy("auto", config={"folds": 3})
    pol.fit(data, cards)
    choice = pol.describe()
    assert choice["chosen"] == "prior", choice
    _check_rule(choice, margin=pol.config.margin)
    # every candidate but those that read the cards' text (no encoder here)
    assert set(choice["mean"]) == {n for n, (p, _) in CANDIDATES.items() if not policy_class(p).needs_encoder} == set(CANDIDATES) - {"carve"}
    assert all(len(v) == 3 for v in choice["folds"].values())
    # the zero router's scores: one ranking of the models for every prompt (the best first)
    s = pol.score(data.emb[:20], cards)
    assert (s.argmax(axis=1) == 3).all()


def test_chooses_a_learned_policy_where_prompts_predict_and_keeps_the_choice():
    data, cards = _data(signal=True)
    pol = make_policy("auto", config={"folds": 3})
    pol.fit(data, cards)
    choice = pol.describe()
    assert choice["chosen"] != "prior" and choice["mean"][choice["chosen"]] > choice["mean"]["prior"] + 0.05, choice
    _check_rule(choice, margin=pol.config.margin)
    again = make_policy("auto")
    again.load_state_dict(pol.state_dict())
    assert again.describe() == choice
    np.testing.assert_allclose(again.score(data.emb, cards), pol.score(data.emb, cards))
    # later fits go to the chosen policy: the choice is not revisited
    more, _ = _data(signal=False, seed=1)
    again.fit(more, cards)
    assert again.describe() == choice


def _one_right(n: int = 40, m: int = 12, seed: int = 0) -> tuple[Examples, list[ModelCard]]:
    """CMRBench's shape at the size of a small served bench: two topics, one right model per
    prompt (one of the first half of the models on topic 0, of the second half on topic 1)."""
    rng = np.random.default_rng(seed)
    topic = rng.integers(0, 2, n)
    centres = rng.normal(size=(2, 16))
    emb = centres[topic] + 0.3 * rng.normal(size=(n, 16))
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
    right = np.where(topic == 0, rng.integers(0, m // 2, n), rng.integers(m // 2, m, n))
    scores = np.zeros((n, m), np.float32)
    scores[np.arange(n), right] = 1.0
    ids = [f"m{j}" for j in range(m)]
    return Examples(texts=[f"q{i}" for i in range(n)], model_ids=ids, scores=scores, costs=None, emb=emb), [ModelCard(id=i) for i in ids]


def test_before_enough_rows_knn_routes_and_learns_and_one_reward_stays_local():
    """A fit of fewer than ``min_rows`` rows does not choose: knn (its own defaults) routes and
    learns, so one reward for a new model changes no decision on the other topic (before, the
    zero router routed here, and that reward moved every one of them)."""
    from cmr.policies.auto import BEFORE_CHOICE
    from cmr.types import FeedbackEvent

    data, cards = _one_right()
    pol = make_policy("auto", config={"folds": 3})
    pol.fit(data, cards)
    assert pol.describe() == {}
    ref = make_policy(BEFORE_CHOICE)
    ref.fit(data, cards)
    np.testing.assert_allclose(pol.score(data.emb, cards), ref.score(data.emb, cards))
    # a new model with no rows, one reward of 1.0 on one prompt of topic 0
    new = ModelCard(id="new")
    live = [*cards, new]
    pol.add_models([new])
    before = pol.score(data.emb, live).argmax(axis=1)
    pol.update([FeedbackEvent(request_id="r0", model="new", reward=1.0, embedding=data.emb[0].tolist())])
    after = pol.score(data.emb, live).argmax(axis=1)
    far = np.linalg.norm(data.emb - data.emb[0], axis=1) > 1.0  # the other topic
    assert far.sum() > 10 and (after[far] == before[far]).all()
    assert after[0] == len(cards)  # where it was rewarded, the new model now leads
    # the same through a state round trip (a checkpoint taken before the choice)
    again = make_policy("auto")
    again.load_state_dict(pol.state_dict())
    assert again.describe() == {}
    np.testing.assert_allclose(again.score(data.emb, live), pol.score(data.emb, live))


def test_a_chosen_carve_learns_through_its_own_learner(cmr_small, encoder):
    """Where cards carry text, each fold hides a third of the models, which join by their cards;
    carve (trained by gradient steps) then learns through a learner of its own: experiences with
    its replay and anchor, feedback in bounded steps, all of it kept through a state round trip."""
    from cmr.continual.learner import Learner

    e1, e2 = cmr_small.experiences
    # frozen features (encoder_epochs 0): the reference below trains on the same vectors
    pol = make_policy("auto", encoder=encoder, config={"candidates": ["carve"], "min_rows": 50, "encoder_epochs": 0})
    pol.add_models(cmr_small.cards_of(1))
    pol.fit(e1.train, cmr_small.cards_upto(1))
    choice = pol.describe()
    assert set(choice["mean"]) == {"prior", "carve"} and "joining by card" in choice["why"], choice
    assert choice["why"].startswith("best mean M/F/D accuracy"), choice  # labelled rows: the continual benchmark's figures
    _check_rule(choice, margin=pol.config.margin)
    assert choice["chosen"] == "carve", choice
    # the same as carve trained by a learner on the same experiences
    ref = Learner(make_policy("carve", encoder=encoder, config=CANDIDATES["carve"][1]))
    # auto's carve settles on the most probable domain first, trained for its domain's and family's mass
    assert ref.policy.config.domain_vote > 0 and ref.policy.config.domain_loss > 0 and ref.policy.config.family_loss > 0
    ref.policy.add_models(cmr_small.cards_of(1))
    ref.fit(e1.train, cmr_small.cards_upto(1))
    for p in (pol, ref.policy):
        p.add_models(cmr_small.cards_of(2))
    pol.fit(e2.train, cmr_small.cards_upto(2))
    ref.fit(e2.train, cmr_small.cards_upto(2))
    live = cmr_small.cards_upto(2)
    np.testing.assert_allclose(pol.score(e2.test.emb, live), ref.policy.score(e2.test.emb, live), rtol=1e-5, atol=1e-6)
    state = pol.state_dict()
    assert state["inner_learner"]["experiences"] == 2  # e2 trained over e1's replay, as ref's did
    # feedback: bounded online steps through the learner (replay sampled from its own generator)
    from cmr.types import FeedbackEvent

    right = [e2.test.model_ids[i] for i in e2.test.labels[:8]]
    events = [FeedbackEvent(request_id=f"r{i}", model=m, reward=1.0, embedding=e2.test.emb[i].tolist()) for i, m in enumerate(right)]
    again = make_policy("auto", encoder=encoder)
    again.load_state_dict(state)
    assert again.describe() == choice
    np.testing.assert_allclose(again.score(e2.test.emb, live), pol.score(e2.test.emb, live), rtol=1e-5, atol=1e-6)
    before = pol.score(e2.test.emb[:8], live)
    pol.update(events)
    again.update(events)
    ref.consume(events)
    after = pol.score(e2.test.emb[:8], live)
    assert not np.allclose(after, before)
    np.testing.assert_allclose(again.score(e2.test.emb, live), pol.score(e2.test.emb, live), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ref.policy.score(e2.test.emb, live), pol.score(e2.test.emb, live), rtol=1e-5, atol=1e-6)
    # the driving learner's settings reach auto's own: 8 events, a consolidation every 4
    outer = Learner(again, events_per_step=2, consolidate_every=4)
    n0 = again.state_dict()["inner_learner"]["experiences"]
    outer.consume(events)
    assert again.state_dict()["inner_learner"]["experiences"] == n0 + 2


def test_a_state_of_an_earlier_release_naming_carve_vote_still_loads(cmr_small, encoder):
    """Earlier releases listed carve with the vote as ``carve-vote`` (and carve without it): a
    stored config or choice naming it loads as today's ``carve``, its inner state untouched."""
    e1, _ = cmr_small.experiences
    pol = make_policy("auto", encoder=encoder, config={"candidates": ["carve"], "min_rows": 50})
    pol.add_models(cmr_small.cards_of(1))
    pol.fit(e1.train, cmr_small.cards_upto(1))
    state = pol.state_dict()
    state["config"] = {**state["config"], "candidates": ["knn", "carve", "carve-vote"]}
    state["choice"] = {**state["choice"], "chosen": "carve-vote"}
    again = make_policy("auto", encoder=encoder)
    again.load_state_dict(state)
    assert again.config.candidates == ["knn", "carve"]
    live = cmr_small.cards_upto(1)
    np.testing.assert_allclose(again.score(e1.test.emb, live), pol.score(e1.test.emb, live), rtol=1e-5, atol=1e-6)


def test_labelled_rows_are_scored_as_the_continual_benchmark_scores_them():
    """Rows naming one correct model and its family and domain: the fold score is the mean of the
    benchmark's M, F and D accuracy (``metrics.routing_hits``), so landing in the right domain counts."""
    from cmr.bench import metrics
    from cmr.policies.auto import labelled_fold_score

    cards = [ModelCard(id="a", family="fa", domain="d1"), ModelCard(id="b", family="fb", domain="d1"),
             ModelCard(id="c", family="fc", domain="d2", cost=1.0)]
    ids = [c.id for c in cards]
    data = Examples(texts=["x", "y", "z"], model_ids=ids, scores=np.eye(3, dtype=np.float32)[[0, 0, 2]], labels=np.array([0, 0, 2]),
                    meta={"family": ["fa", "fa", "fc"], "domain": ["d1", "d1", "d2"]}, emb=np.zeros((3, 4), np.float32))
    # row 0: the target (M, F, D); row 1: a sibling of its domain, another family (D only);
    # row 2: a tie between the target and a cheaper wrong model, which the decision rule takes (none)
    pred = np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.5, 0.0, 0.5]])
    acc = metrics.accuracies(np.array([0, 1, 0]), cards, data)
    assert acc == {"m": 1 / 3, "f": 1 / 3, "d": 2 / 3}
    assert labelled_fold_score(pred, data, cards) == np.mean(list(acc.values()))


def _labelled(signal: bool, n: int = 300, seed: int = 0) -> tuple[Examples, list[ModelCard]]:
    """CMRBench's format: one correct model per row (8 models, 4 domains of 2); with ``signal`` the
    prompt's topic names the domain, without it the target is drawn by popularity alone."""
    rng = np.random.default_rng(seed)
    ids = [f"m{j}" for j in range(8)]
    cards = [ModelCard(id=m, family=f"f{j}", domain=f"d{j // 2}") for j, m in enumerate(ids)]
    if signal:
        topic = rng.integers(0, 4, n)
        lab = 2 * topic + rng.integers(0, 2, n)
    else:
        topic = rng.integers(0, 4, n)
        lab = rng.choice(8, n, p=[0.05, 0.05, 0.05, 0.05, 0.1, 0.1, 0.15, 0.45])
    centres = rng.normal(size=(4, 16))
    emb = centres[topic] + 0.3 * rng.normal(size=(n, 16))
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
    meta = {"family": [cards[j].family for j in lab], "domain": [cards[j].domain for j in lab]}
    return Examples(texts=[f"q{i}" for i in range(n)], model_ids=ids, scores=np.eye(8, dtype=np.float32)[lab], labels=lab, meta=meta, emb=emb), cards


def test_labelled_rows_choose_the_zero_router_without_signal_and_a_learned_policy_with_it():
    """The guarantee holds under the M/F/D score too: where prompts say nothing of the target,
    the zero router (the most popular model) is kept; where they name its domain, a learned one wins."""
    for signal in (False, True):
        data, cards = _labelled(signal)
        pol = make_policy("auto", config={"folds": 3})
        pol.fit(data, cards)
        choice = pol.describe()
        assert choice["why"].startswith("best mean M/F/D accuracy"), choice
        _check_rule(choice, margin=pol.config.margin)
        if signal:
            assert choice["chosen"] != "prior" and choice["mean"][choice["chosen"]] > choice["mean"]["prior"] + 0.1, choice
        else:
            assert choice["chosen"] == "prior", choice
            assert (pol.score(data.emb[:20], cards).argmax(axis=1) == 7).all()


class _Dense:
    """A stand-in dense encoder for synthetic vectors (a name, a dimension; cards carry no text here)."""

    name, dim = "synthetic-dense", 16

    def encode(self, texts):
        return np.zeros((len(texts), self.dim), np.float32)


def _fused(signal_in: str, n: int = 900, seed: int = 0, blur: float = 0.6, style: int = 8):
    """``_data(signal=True)``'s task in fused vectors ``[dense ; w·lexical] / sqrt(1 + w²)``: the
    topic shows only in the part ``signal_in`` names, blurred; the other part is noise (a lexical
    part of ``style`` tight clusters that have nothing to do with the topic: wording, say)."""
    from cmr.encoders.lexical import LEXICAL_WEIGHT, FusedEncoder, LexicalEncoder

    data, cards = _data(signal=True, n=n, seed=seed)
    rng = np.random.default_rng(seed + 100)
    lex = LexicalEncoder.fit([f"topic {a} about {b} things" for a in range(20) for b in range(20)], dim=8)
    encoder = FusedEncoder(_Dense(), lex, LEXICAL_WEIGHT)

    def unit(x):
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    topical = data.emb  # [n, 16], clustered by topic
    noise16, noise8 = unit(rng.normal(size=(n, 16))), unit(rng.normal(size=(n, 8)))
    topical8 = unit(topical[:, :8] + 0.1 * topical[:, 8:])
    topical = unit(topical + blur * rng.normal(size=topical.shape))
    topical8 = unit(topical8 + blur * rng.normal(size=topical8.shape))
    if style:
        noise8 = unit(rng.normal(size=(style, 8))[rng.integers(0, style, n)] + 0.1 * rng.normal(size=(n, 8)))
    dense, lexical = (topical, noise8) if signal_in == "dense" else (noise16, topical8)
    data.emb = (np.hstack([dense, LEXICAL_WEIGHT * lexical]) / np.sqrt(1 + LEXICAL_WEIGHT**2)).astype(np.float32)
    return data, cards, encoder, dense


def test_over_a_fused_encoder_the_lexical_part_is_kept_only_where_it_earns_its_place():
    """With a fused encoder the choice is measured again on the dense part alone (exactly the fused
    vector's first columns, rescaled), on the same folds. Where the topic shows only in the lexical
    part, knn on the fused vectors is kept; where it shows only in the dense part, the lexical part
    is dropped: the chosen knn then sees the dense part of every vector it is given (fit, score,
    feedback) and equals a knn over the dense vectors, also after a state round trip."""
    from cmr.policies.auto import DENSE
    from cmr.types import FeedbackEvent

    data, cards, encoder, _ = _fused("lexical")
    pol = make_policy("auto", encoder=encoder, config={"candidates": ["knn"]})
    pol.fit(data, cards)
    choice = pol.describe()
    assert set(choice["mean"]) == {"prior", "knn", "knn" + DENSE}, choice
    assert choice["chosen"] == "knn" and choice["embedding"] == "minilm+tfidf" and "lexical part kept" in choice["why"], choice
    assert all(len(v) == 3 for v in choice["folds"].values())

    data, cards, encoder, dense = _fused("dense")
    pol = make_policy("auto", encoder=encoder, config={"candidates": ["knn"]})
    pol.fit(data, cards)
    choice = pol.describe()
    assert choice["chosen"] == "knn" + DENSE and choice["embedding"] == "minilm" and "lexical part dropped" in choice["why"], choice
    ref = make_policy("knn", encoder=encoder.dense, config={**CANDIDATES["knn"][1], "seed": 0})
    ref.add_models(cards)
    dense_data = Examples(texts=data.texts, model_ids=data.model_ids, scores=data.scores, costs=data.costs, emb=dense)
    ref.fit(dense_data, cards)
    np.testing.assert_allclose(pol.score(data.emb, cards), ref.score(dense, cards), rtol=1e-5, atol=1e-6)
    events = [FeedbackEvent(request_id=f"r{i}", model="m2", reward=1.0, embedding=data.emb[i].tolist()) for i in range(5)]
    pol.update(events)
    ref.update([FeedbackEvent(request_id=e.request_id, model=e.model, reward=1.0, embedding=dense[i].tolist()) for i, e in enumerate(events)])
    np.testing.assert_allclose(pol.score(data.emb, cards), ref.score(dense, cards), rtol=1e-5, atol=1e-6)
    again = make_policy("auto", encoder=encoder)
    again.load_state_dict(pol.state_dict())
    assert again.describe() == choice
    np.testing.assert_allclose(again.score(data.emb, cards), pol.score(data.emb, cards), rtol=1e-5, atol=1e-6)
