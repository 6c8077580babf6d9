"""Behaviour of the baseline policies (random, oracle, zeroshot, knn, cluster) on real data slices."""

from __future__ import annotations

import numpy as np
import pytest

from cmr.data import Examples
from cmr.decide import choose
from cmr.policies import make_policy
from cmr.types import FeedbackEvent, ModelCard


def _realised(policy, data, cards, lam=0.0) -> float:
    """Mean true score of the model the policy routes each test row to."""
    s = policy.score(data.test.emb, cards)
    pick = choose(s, np.array([c.cost for c in cards]), lam)
    return float(np.nanmean(data.test.scores[np.arange(len(pick)), pick]))


def _cmr_accuracy(policy, bench) -> tuple[float, float]:
    """(M-Acc, D-Acc) over the test rows of every experience of the slice, after fitting all."""
    cards = bench.cards_upto(bench.experiences[-1].k)
    for exp in bench.experiences:
        policy.fit(exp.train, bench.cards_upto(exp.k))
    m, d = [], []
    for exp in bench.experiences:
        pick = choose(policy.score(exp.test.emb, cards), np.zeros(len(cards)), 0.0)
        target = [exp.test.model_ids[i] for i in exp.test.labels]
        m += [cards[j].id == t for j, t in zip(pick, target)]
        d += [cards[j].domain == dom for j, dom in zip(pick, exp.test.meta["domain"])]
    return float(np.mean(m)), float(np.mean(d))


# -- learning policies beat random ---------------------------------------------------------------
@pytest.mark.parametrize("name", ["knn", "cluster"])
def test_learners_beat_random_on_held_out_outcomes(name, encoder, outcomes_small):
    data = outcomes_small
    rand = make_policy("random", encoder=encoder, config={"seed": 3})
    learner = make_policy(name, encoder=encoder)
    learner.fit(data.train, data.cards)
    # random's expected quality is the mean score over models; average several seeded draws
    rand_q = np.mean([_realised(rand, data, data.cards) for _ in range(5)])
    got = _realised(learner, data, data.cards)
    assert got > rand_q + 0.05, (got, rand_q)


@pytest.mark.parametrize("name", ["knn", "cluster"])
def test_learners_beat_random_on_cmrbench_slice(name, encoder, cmr_small):
    m_rand, d_rand = _cmr_accuracy(make_policy("random", encoder=encoder), cmr_small)
    m, d = _cmr_accuracy(make_policy(name, encoder=encoder), cmr_small)
    assert m > m_rand and d > d_rand + 0.15, (m, d, m_rand, d_rand)


# -- oracle --------------------------------------------------------------------------------------
def test_oracle_picks_the_best_and_cheapest(encoder, outcomes_small):
    data = outcomes_small
    oracle = make_policy("oracle")
    oracle.reveal(data.test)
    cards = data.cards
    costs = np.array([c.cost for c in cards])
    s = oracle.score(data.test.emb, cards)
    truth = data.test.select_models([c.id for c in cards])
    pick = choose(s, costs, 0.0)
    best = np.nanmax(truth.scores, axis=1)
    np.testing.assert_array_equal(truth.scores[np.arange(len(pick)), pick], best)
    # among the models with the best score it takes the cheapest
    tied_cost = np.where(truth.scores == best[:, None], costs[None, :], np.inf).min(axis=1)
    np.testing.assert_array_equal(costs[pick], tied_cost)
    # it beats every single model
    assert truth.scores[np.arange(len(pick)), pick].mean() >= np.nanmean(truth.scores, axis=0).max()
    # with a cost weight its choice maximises the true utility
    lam = 5.0
    util = truth.scores - lam * costs[None, :]
    pick = choose(oracle.score(data.test.emb, cards), costs, lam)
    np.testing.assert_allclose(util[np.arange(len(pick)), pick], util.max(axis=1))


def test_oracle_unknown_outcomes_rank_below_known(encoder, cmr_small):
    test = cmr_small.experiences[0].test
    oracle = make_policy("oracle")
    oracle.reveal(test)
    cards = cmr_small.cards_upto(2)
    pick = choose(oracle.score(test.emb, cards), np.zeros(len(cards)), 0.0)
    assert [cards[j].id for j in pick] == [test.model_ids[i] for i in test.labels]  # M-Acc 1
    unseen_query = cmr_small.experiences[1].test.emb[:3]
    assert (oracle.score(unseen_query, cards) == oracle.config.unknown_score).all()
    ghost = ModelCard(id="oracle/ghost")
    s = oracle.score(test.emb[:4], [ghost, *cards])
    assert (s[:, 0] < s[:, 1:].max(axis=1)).all()


def test_oracle_with_shared_embeddings_and_re_reveal(encoder, outcomes_small):
    """Distinct prompts may share one embedding (repeated or truncated texts): scoring the revealed
    rows in one call, in order, still gives each its own truth; a second reveal replaces the first."""
    test = outcomes_small.test
    arc = test.subset(np.flatnonzero(np.array(test.meta["task"]) == "arc-challenge"))
    arc.emb = np.repeat(arc.emb[:1], len(arc), axis=0)  # the collision this test is about
    oracle = make_policy("oracle")
    oracle.reveal(arc)
    cards = outcomes_small.cards
    np.testing.assert_array_equal(oracle.score(arc.emb, cards), np.nan_to_num(arc.select_models([c.id for c in cards]).scores, nan=-1.0))
    flipped = arc.subset(np.arange(len(arc)))
    flipped.scores = 1.0 - flipped.scores
    oracle.reveal(flipped)
    np.testing.assert_array_equal(oracle.score(arc.emb, cards), np.nan_to_num(flipped.select_models([c.id for c in cards]).scores, nan=-1.0))
    assert oracle.state_dict()["truth_emb"].shape[0] == len(arc)  # superseded rows are dropped


# -- zero-shot -----------------------------------------------------------------------------------
def test_zeroshot_routes_by_card_text(encoder):
    cards = [
        ModelCard(id="acme/speech-synth", domain="Text-to-Speech", description="Converts written text into natural spoken audio in English."),
        ModelCard(id="acme/dog-classifier", domain="Image Classification", description="Classifies photos of dogs by breed."),
        ModelCard(id="acme/en-fr", domain="Translation", description="Translates English sentences into French."),
        ModelCard(id="acme/sql-coder", domain="Text Generation", description="Writes SQL queries for a database from questions."),
    ]
    queries = [
        "Read this paragraph aloud to me with a natural voice.",
        "What breed is the dog in this picture?",
        "How do you say 'good morning, my friend' in French?",
        "Write a query that returns all customers who ordered last month from the orders table.",
    ]
    pol = make_policy("zeroshot", encoder=encoder)
    pol.add_models(cards)
    pick = pol.score(encoder.encode(queries), cards).argmax(axis=1)
    assert list(pick) == [0, 1, 2, 3]


# -- kNN -----------------------------------------------------------------------------------------
def test_knn_ignores_unknown_outcomes(encoder):
    texts = ["sort a list in python", "reverse a string in python", "capital of france", "largest planet in the solar system"]
    emb = encoder.encode(texts)
    nan = np.nan
    # model "b" is known on one prompt only: its estimate must be that score, not diluted by NaNs
    # (shrinkage towards the prior ~ off)
    scores = np.array([[0.0, nan], [0.0, nan], [1.0, 1.0], [1.0, nan]], dtype=np.float32)
    data = Examples(texts=texts, model_ids=["a", "b"], scores=scores, emb=emb)
    pol = make_policy("knn", config={"k": 4, "weighting": "uniform", "prior_weight": 0.0, "shrinkage": 1e-9})
    pol.fit(data, [])
    q, cards = encoder.encode(["how to sort numbers in python"]), [ModelCard(id="a"), ModelCard(id="b")]
    np.testing.assert_allclose(pol.score(q, cards)[0], [0.5, 1.0], rtol=1e-6)
    # with shrinkage, b's one outcome weighs as one row of the four: pulled towards its prior
    pol = make_policy("knn", config={"k": 4, "weighting": "uniform", "prior_weight": 0.0, "shrinkage": 1.0})
    pol.fit(data, [])
    s = pol.score(q, cards)[0]
    prior, _ = pol._mem.model_prior()
    np.testing.assert_allclose(s[1], (1.0 + 4 * prior[1]) / (1 + 4), rtol=1e-6)
    assert s[1] < 1.0


def test_knn_similarity_weighting_prefers_close_neighbours(encoder):
    texts = ["sort a list in python", "sort an array in python", "capital of france", "largest planet in the solar system"]
    scores = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], dtype=np.float32)
    data = Examples(texts=texts, model_ids=["coder", "trivia"], scores=scores, emb=encoder.encode(texts))
    pol = make_policy("knn", config={"k": 4, "weighting": "softmax", "temperature": 0.05, "prior_weight": 0.0, "shrinkage": 0.03})
    pol.fit(data, [])
    s = pol.score(encoder.encode(["how do I sort a python list?", "what is the capital city of france?"]), [ModelCard(id="coder"), ModelCard(id="trivia")])
    assert s[0, 0] > 0.9 and s[1, 1] > 0.9


def test_knn_learns_from_partial_feedback(encoder, outcomes_small):
    data = outcomes_small
    pol = make_policy("knn", encoder=encoder, config={"k": 10})
    pol.fit(data.train, data.cards)
    # MBPP prompts: the few-shot ARC/Winogrande prompts share one truncated embedding per task,
    # so hundreds of training rows tie with them at similarity 1
    q = data.test.emb[np.array(data.test.meta["task"]) == "mbpp"][:5]
    assert len(q) == 5
    before = pol.score(q, data.cards)
    worst = before.argmin(axis=1)  # per query, the model kNN rates lowest
    events = [
        FeedbackEvent(request_id=f"fb{i}", model=data.cards[j].id, reward=1.0, embedding=q[i].tolist())
        for i, j in enumerate(worst)
        for _ in range(5)  # several successes: the feedback rows become the nearest neighbours
    ]
    pol.update(events)
    after = pol.score(q, data.cards)
    rows = np.arange(len(q))
    assert (after[rows, worst] > before[rows, worst]).all()
    # and failures of the model it rates highest pull that model down
    best = after.argmax(axis=1)
    pol.update([FeedbackEvent(request_id=f"bad{i}", model=data.cards[j].id, reward=0.0, embedding=q[i].tolist()) for i, j in enumerate(best) for _ in range(5)])
    assert (pol.score(q, data.cards)[rows, best] < after[rows, best]).all()


def test_knn_keeps_earlier_experiences(encoder, cmr_small):
    """Fit once per experience: prompts of the first stay in the neighbour set."""
    first, second = cmr_small.experiences
    pol = make_policy("knn", encoder=encoder, config={"k": 1, "prior_weight": 0.0})
    pol.fit(first.train, cmr_small.cards_upto(1))
    pol.fit(second.train, cmr_small.cards_upto(2))
    cards = cmr_small.cards_upto(2)
    pick = pol.score(first.train.emb, cards).argmax(axis=1)
    target = [first.train.model_ids[i] for i in first.train.labels]
    # its own prompt is each query's nearest neighbour (duplicated prompts may carry another label)
    assert np.mean([cards[j].id == t for j, t in zip(pick, target)]) > 0.9


@pytest.mark.parametrize("name", ["knn", "cluster"])
def test_unseen_model_ranked_by_card_prior(name, encoder, outcomes_small):
    data = outcomes_small
    pol = make_policy(name, encoder=encoder, config={"prior_weight": 0.1})
    pol.fit(data.train, data.cards)
    new = [
        ModelCard(id="new/python-coder", description="Writes Python functions from a natural-language description of the task."),
        ModelCard(id="new/speech", description="Transcribes spoken audio recordings into text."),
    ]
    q = encoder.encode(["Write a python function to find the maximum element of a list."])
    s = pol.score(q, new)
    assert np.isfinite(s).all() and s[0, 0] > s[0, 1]


@pytest.mark.parametrize("name", ["knn", "cluster"])
def test_profile_answers_route_a_new_model(name, encoder, outcomes_small):
    """UniRoute's protocol: a new model joins with its scores on the profile prompts; the policy
    then routes it where it answered well (here: good on one task, bad on the others)."""
    data = outcomes_small
    tasks = np.array(data.train.meta["task"])
    task = tasks[0]
    pol = make_policy(name, encoder=encoder, config={"prior_weight": 0.0})
    pol.fit(data.train, data.cards)
    pids = list(data.train.meta["id"])
    pol.set_profile_prompts(pids, data.train.emb)
    newcomer = ModelCard(id="new/specialist", profile={p: float(t == task) for p, t in zip(pids, tasks)})
    pol.add_models([newcomer])
    s = pol.score(data.test.emb, [newcomer])[:, 0]
    on_task = np.array(data.test.meta["task"]) == task
    assert on_task.any() and (~on_task).any()
    # (estimates shrink towards the newcomer's empirical-Bayes prior: a gap, not 0 vs 1)
    assert s[on_task].mean() > s[~on_task].mean() + 0.25, (s[on_task].mean(), s[~on_task].mean())
    # re-adding the same card does not count its profile twice
    state = pol.state_dict()["memory"]["scores"].shape
    pol.add_models([newcomer])
    assert pol.state_dict()["memory"]["scores"].shape == state


@pytest.mark.parametrize("name", ["knn", "cluster"])
def test_card_weight_is_tuned_by_leave_one_out(name, encoder, cmr_small, outcomes_small):
    """Informative cards (CMRBench descriptions) earn a large card weight, bare model names
    (RouterBench) a small one; a configured weight is used as given. (Cluster may instead keep
    the global mean alone, smoothing tuned to its largest value, where any positive card weight
    decides among the one-hot outcomes' near-equal priors.)"""
    bare = make_policy(name, encoder=encoder)
    bare.fit(outcomes_small.train, outcomes_small.cards)
    rich = make_policy(name, encoder=encoder)
    for exp in cmr_small.experiences:
        rich.fit(exp.train, cmr_small.cards_upto(exp.k))
    decisive = rich.prior_weight >= 1.0 or (rich.prior_weight > 0 and getattr(rich, "smoothing", 0.0) >= 1e6)
    assert bare.prior_weight <= 0.1 and decisive, (bare.prior_weight, rich.prior_weight)
    fixed = make_policy(name, encoder=encoder, config={"prior_weight": 0.25})
    fixed.fit(outcomes_small.train, outcomes_small.cards)
    assert fixed.prior_weight == 0.25


# -- cluster -------------------------------------------------------------------------------------
def test_cluster_soft_and_hard_assignment(encoder, outcomes_small):
    data = outcomes_small
    hard = make_policy("cluster", encoder=encoder, config={"n_clusters": 8, "soft": False})
    soft = make_policy("cluster", encoder=encoder, config={"n_clusters": 8, "soft": True, "temperature": 0.05})
    hard.fit(data.train, data.cards)
    soft.fit(data.train, data.cards)
    w_hard, w_soft = hard.cluster_weights(data.test.emb), soft.cluster_weights(data.test.emb)
    assert set(np.unique(w_hard)) <= {0.0, 1.0} and (w_hard.sum(axis=1) == 1).all()
    np.testing.assert_allclose(w_soft.sum(axis=1), 1.0)
    assert ((w_soft > 0) & (w_soft < 1)).any()
    # both route well above random
    assert _realised(hard, data, data.cards) > 0.6 and _realised(soft, data, data.cards) > 0.6


def test_cluster_is_seeded(encoder, outcomes_small):
    data = outcomes_small
    a, b = (make_policy("cluster", encoder=encoder, config={"n_clusters": 8, "seed": 7}) for _ in range(2))
    a.fit(data.train, data.cards)
    b.fit(data.train, data.cards)
    np.testing.assert_array_equal(a.score(data.test.emb, data.cards), b.score(data.test.emb, data.cards))


# -- random --------------------------------------------------------------------------------------
def test_random_is_seeded_uniform_and_position_free():
    cards = [ModelCard(id=f"m{i}") for i in range(50)]
    q = np.random.default_rng(0).standard_normal((40, 8)).astype(np.float32)
    a, b, c = (make_policy("random", config={"seed": s}) for s in (1, 1, 2))
    sa, sb, sc = a.score(q, cards), b.score(q, cards), c.score(q, cards)
    np.testing.assert_array_equal(sa, sb)
    assert not np.array_equal(sa, sc)
    assert sa.min() >= 0 and sa.max() < 1 and abs(sa.mean() - 0.5) < 0.03
    assert not np.array_equal(a.score(q, cards), sa)  # each call draws afresh
    # a model's score does not depend on where it sits in the candidate list
    perm = np.random.default_rng(1).permutation(len(cards))
    state = b.state_dict()
    x = b.score(q, cards)
    b.load_state_dict(state)
    np.testing.assert_array_equal(b.score(q, [cards[i] for i in perm]), x[:, perm])
    # picks spread over all models
    assert len(np.unique(sa.argmax(axis=1))) > 20


def test_random_restored_stream_continues():
    cards = [ModelCard(id=f"m{i}") for i in range(5)]
    q = np.ones((3, 4), np.float32)
    p = make_policy("random", config={"seed": 11})
    p.score(q, cards)
    state = p.state_dict()
    expected = [p.score(q, cards) for _ in range(3)]
    r = make_policy("random")  # a different seed in its config: the saved state wins
    r.load_state_dict(state)
    for e in expected:
        np.testing.assert_array_equal(r.score(q, cards), e)


def test_fit_without_embeddings_is_a_clear_error(cmr_small):
    data = cmr_small.experiences[0].train.subset(np.arange(3))
    data.emb = None
    for name in ("knn", "cluster"):
        with pytest.raises(ValueError, match="'emb'"):
            make_policy(name, config={"prior_weight": 0.0}).fit(data, [])


@pytest.mark.parametrize("step", [8, 64])
def test_knn_tunes_as_feedback_accumulates_whatever_the_step(step, encoder, outcomes_small):
    """Tuning follows how much the memory grew, not the size of one update: small learner steps
    (the served learner's) tune as often as large ones."""
    from cmr.types import FeedbackEvent

    data = outcomes_small.train
    pol = make_policy("knn", encoder=encoder, config={"tune_min_rows": 20})
    pol.add_models(outcomes_small.cards)
    rng = np.random.default_rng(0)
    events = [FeedbackEvent(request_id=f"r{i}", model=data.model_ids[j], reward=float(data.scores[i, j]), query=data.texts[i],
                            embedding=data.emb[i].tolist()) for i in range(len(data)) for j in [rng.integers(len(data.model_ids))]]
    tunings = []
    for s in range(0, len(events), step):
        pol.update(events[s : s + step])
        tunings.append(pol._tuned_at)
    assert pol._tuned_at >= 100 and len(set(tunings) - {0}) >= 2, tunings
