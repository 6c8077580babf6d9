"""LinUCB and Thompson sampling: sublinear regret on a stationary problem, arms that join
mid-stream, vectorised scoring over many arms, exact restore of the sampler."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from cmr.decide import choose
from cmr.policies import make_policy
from cmr.types import FeedbackEvent, ModelCard

BANDITS = ["linucb", "thompson"]


def _problem(seed: int, n: int, d: int = 16, arms: int = 4):
    """Stationary linear bandit: unit contexts, Bernoulli rewards with mean 0.5 + 0.4·w_a·x."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    W = rng.standard_normal((arms, d))
    W /= np.linalg.norm(W, axis=1, keepdims=True)
    mean = 0.5 + 0.4 * X @ W.T
    draws = (rng.random(mean.shape) < mean).astype(float)
    return X.astype(np.float32), mean, draws


def _run(policy, X, mean, draws, cards, batch: int = 8) -> np.ndarray:
    """Route in batches, reveal only the chosen arm's reward; per-step expected regret."""
    costs = np.zeros(len(cards))
    regret = np.empty(len(X))
    for b0 in range(0, len(X), batch):
        q = X[b0 : b0 + batch]
        ch = choose(policy.score(q, cards), costs, 0.0)
        rows = np.arange(b0, b0 + len(q))
        regret[rows] = mean[rows].max(axis=1) - mean[rows, ch]
        policy.update(
            [FeedbackEvent(request_id=str(i), model=cards[j].id, reward=float(draws[i, j]), embedding=X[i].tolist()) for i, j in zip(rows, ch)]
        )
    return regret


@pytest.mark.parametrize("name", BANDITS)
def test_regret_is_sublinear_on_a_stationary_problem(name):
    X, mean, draws = _problem(seed=3, n=2400, d=6)
    cards = [ModelCard(id=f"arm-{a}") for a in range(mean.shape[1])]
    policy = make_policy(name, encoder=None, config={"dim": 6, "seed": 0})
    regret = _run(policy, X, mean, draws, cards)
    third = len(regret) // 3
    first, last = regret[:third].mean(), regret[-third:].mean()
    uniform = (mean.max(axis=1, keepdims=True) - mean).mean()  # a router choosing at random
    # cumulative regret bends: the last third costs far less per step than the first ...
    assert last < 0.5 * first, (first, last)
    # ... so the total after 3T is well under 3x the total after T (linear growth)
    assert regret.sum() < 2.0 * regret[:third].sum()
    assert last < 0.2 * uniform, (last, uniform)


@pytest.mark.parametrize("name", BANDITS)
def test_model_added_mid_stream_is_routable_before_feedback(name, encoder):
    """A new arm with profile answers is chosen where its profile says it is best, at once."""
    X, mean, draws = _problem(seed=5, n=900, d=16, arms=3)
    cards = [ModelCard(id=f"arm-{a}") for a in range(3)]
    policy = make_policy(name, encoder=encoder, config={"dim": 16, "seed": 0, "card_weight": 0.0})
    _run(policy, X[:600], mean[:600], draws[:600], cards)
    # the newcomer is perfect on the first half of the space (x_0 > 0) and useless elsewhere
    prof_X = X[600:750]
    ids = [f"p{i}" for i in range(len(prof_X))]
    policy.set_profile_prompts(ids, prof_X)
    newcomer = ModelCard(id="late-arm", profile={p: float(x[0] > 0) for p, x in zip(ids, prof_X)})
    policy.add_models([newcomer])
    q = X[750:]
    s = policy.score(q, [*cards, newcomer])
    assert np.isfinite(s).all()
    picked = choose(s, np.zeros(4), 0.0) == 3
    good = q[:, 0] > 0.3
    bad = q[:, 0] < -0.3
    assert picked[good].mean() > 0.6 and picked[bad].mean() < 0.2, (picked[good].mean(), picked[bad].mean())


@pytest.mark.parametrize("name", BANDITS)
def test_card_only_newcomer_gets_a_finite_optimistic_prior(name, encoder, outcomes_small):
    """Without a profile, a new arm starts from the pooled model nudged by its card: finite,
    and LinUCB's confidence bonus is widest for it (it is the arm known least)."""
    data = outcomes_small
    newcomer = ModelCard(id="org/fresh-model", description="a general assistant")

    def scored(**cfg):
        policy = make_policy(name, encoder=encoder, config={"seed": 0, **cfg})
        policy.fit(data.train, data.cards)
        policy.add_models([newcomer])
        return policy.score(data.test.emb, [*data.cards, newcomer])

    s = scored()
    assert s.shape == (len(data.test), len(data.cards) + 1) and np.isfinite(s).all()
    if name == "linucb":
        bonus = s - scored(alpha=0.0)  # alpha 0: the posterior mean alone
        assert (bonus[:, -1] > 0).all() and (bonus[:, -1] >= bonus[:, :-1].max(axis=1)).all()


def test_thousands_of_arms_score_in_one_batched_call():
    X, mean, draws = _problem(seed=9, n=200, d=16, arms=3)
    cards = [ModelCard(id=f"m{i}") for i in range(3000)]
    policy = make_policy("linucb", encoder=None, config={"dim": 8})
    data_cards = cards[:3]
    _run(policy, X, mean, draws, data_cards)
    policy.add_models(cards)
    s = policy.score(X[:5], cards)
    assert s.shape == (5, 3000) and np.isfinite(s).all()
    # arms without data share the prior: identical scores
    assert np.allclose(s[:, 3:], s[:, 3:4])


def test_thompson_sample_is_fixed_between_updates_and_restores_exactly():
    X, mean, draws = _problem(seed=11, n=200, d=16, arms=3)
    cards = [ModelCard(id=f"arm-{a}") for a in range(3)]
    policy = make_policy("thompson", encoder=None, config={"dim": 16, "seed": 4})
    _run(policy, X[:100], mean[:100], draws[:100], cards)
    a = policy.score(X[100:120], cards)
    np.testing.assert_array_equal(a, policy.score(X[100:120], cards))
    restored = make_policy("thompson", encoder=None, config={"dim": 16, "seed": 4})
    restored.load_state_dict(copy.deepcopy(policy.state_dict()))
    for p in (policy, restored):
        _run(p, X[100:160], mean[100:160], draws[100:160], cards)
    b = policy.score(X[160:], cards)
    np.testing.assert_array_equal(b, restored.score(X[160:], cards))
    assert not np.array_equal(a, policy.score(X[100:120], cards))  # a new round drew a new sample


def test_fit_warm_start_beats_cold_start(outcomes_small):
    """Warm start from full-information data: the fitted LinUCB routes the held-out prompts
    better than one that has seen nothing."""
    data = outcomes_small
    warm = make_policy("linucb", encoder=None, config={"alpha": 0.0})
    warm.fit(data.train, data.cards)
    cold = make_policy("linucb", encoder=None, config={"alpha": 0.0})
    costs = np.array([c.cost for c in data.cards])
    truth = np.nan_to_num(data.test.scores)
    q_warm = truth[np.arange(len(truth)), choose(warm.score(data.test.emb, data.cards), costs, 0.0)].mean()
    q_cold = truth[np.arange(len(truth)), choose(cold.score(data.test.emb, data.cards), costs, 0.0)].mean()
    assert q_warm > q_cold
