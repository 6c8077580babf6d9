"""UniRoute: models as per-cluster accuracy vectors; a new model joins through its profile
answers (no training step); the learned cluster map fits the training outcomes."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from cmr.decide import choose
from cmr.policies import make_policy
from cmr.policies.memory import eb_fit
from cmr.policies.uniroute import cluster_pseudo_counts
from cmr.types import FeedbackEvent


def _unseen_split(data, hidden: int = 0, n_prof: int = 40):
    """The llm protocol's --unseen order: profile prompts first, seen cards, fit, then the new card."""
    prof, rest = data.train.subset(np.arange(n_prof)), data.train.subset(np.arange(n_prof, len(data.train)))
    ids = prof.meta["id"]
    cards = [
        dataclasses.replace(c, profile={ids[i]: float(prof.scores[i, j]) for i in np.flatnonzero(~np.isnan(prof.scores[:, j]))})
        for j, c in enumerate(data.cards)
    ]
    seen = [c for j, c in enumerate(cards) if j != hidden]
    return prof, rest, seen, cards[hidden]


@pytest.mark.parametrize("name", ["uniroute", "uniroute-map"])
def test_new_model_joins_through_its_profile_vector(name, outcomes_small):
    prof, rest, seen, new = _unseen_split(outcomes_small)
    policy = make_policy(name, config={"seed": 0, **({"epochs": 40} if name == "uniroute-map" else {})})
    policy.set_profile_prompts(prof.meta["id"], prof.emb)
    policy.add_models(seen)
    policy.fit(rest.select_models([c.id for c in seen]), seen)
    before = policy.psi([c.id for c in seen])
    policy.add_models([new])
    # the newcomer's Ψ is the assignment-weighted mean of its profile answers, pulled by one
    # answer's worth towards its mean answer (the paper's smoothing) ...
    y = prof.scores[:, outcomes_small.model_ids.index(new.id)].astype(np.float64)
    known = ~np.isnan(y)
    P = policy.assignment(prof.emb[known])
    expected = (P.T @ y[known] + y[known].mean()) / (P.sum(axis=0) + 1.0)
    np.testing.assert_allclose(policy.psi([new.id])[0], expected, rtol=1e-9)
    # ... nothing else moved (no training step: the seen models are profiled too), and the score
    # is Σ_k p(k|x)·Ψ[k]
    np.testing.assert_array_equal(policy.psi([c.id for c in seen]), before)
    q = outcomes_small.test.emb
    np.testing.assert_allclose(policy.score(q, [new])[:, 0], policy.assignment(q) @ expected, rtol=1e-9)


def test_clusters_come_from_the_profile_prompts(outcomes_small):
    prof, rest, seen, _ = _unseen_split(outcomes_small, n_prof=40)
    with_profile = make_policy("uniroute", config={"min_cluster_size": 8})
    with_profile.set_profile_prompts(prof.meta["id"], prof.emb)
    with_profile.fit(rest, outcomes_small.cards)
    assert with_profile.n_clusters == 40 // 8  # capped by the 40 profile prompts, not the 80 fit rows
    plain = make_policy("uniroute", config={"min_cluster_size": 8})
    plain.fit(rest, outcomes_small.cards)
    assert plain.n_clusters == len(rest) // 8


def test_routes_better_than_a_random_model(outcomes_small):
    data = outcomes_small
    policy = make_policy("uniroute", config={"n_clusters": 4, "min_cluster_size": 4})
    policy.fit(data.train, data.cards)
    s = policy.score(data.test.emb, data.cards)
    truth = data.test.scores.astype(np.float64)
    ch = choose(s, np.zeros(len(data.cards)), 0.0)
    routed = np.nanmean(truth[np.arange(len(truth)), ch])
    assert routed > np.nanmean(truth)  # mean over every (prompt, model): a random router


def test_learned_map_fits_training_outcomes_better_than_its_kmeans_start(outcomes_small):
    data = outcomes_small

    def train_bce(epochs):
        p = make_policy("uniroute-map", config={"epochs": epochs, "lr": 0.05, "n_clusters": 6, "min_cluster_size": 4, "seed": 0})
        p.fit(data.train, data.cards)
        pred = np.clip(p.score(data.train.emb, data.cards), 1e-4, 1 - 1e-4)
        y = data.train.scores.astype(np.float64)
        k = ~np.isnan(y)
        return float(-(y[k] * np.log(pred[k]) + (1 - y[k]) * np.log(1 - pred[k])).mean())

    assert train_bce(60) < train_bce(1) - 0.005


def test_feedback_moves_the_chosen_models_cluster_estimate(outcomes_small):
    data = outcomes_small
    policy = make_policy("uniroute", config={"n_clusters": 4, "min_cluster_size": 4})
    policy.fit(data.train, data.cards)
    m = data.cards[0].id
    x = data.test.emb[0]
    k = int(policy.assignment(x).argmax())
    before = policy.psi([m])[0]
    policy.update([FeedbackEvent(request_id=f"r{i}", model=m, reward=1.0, embedding=x.tolist()) for i in range(20)])
    after = policy.psi([m])[0]
    assert after[k] > before[k]
    others = np.arange(len(before)) != k
    # other clusters move only through their pooled means and pseudo-counts, far less
    assert np.abs(after[others] - before[others]).max() < after[k] - before[k]


def test_cluster_pseudo_counts_are_eb_fit_per_cluster():
    """The vectorised per-cluster pseudo-count is :func:`eb_fit` of each cluster's model means."""
    rng = np.random.default_rng(0)
    C = rng.integers(0, 30, (40, 6)).astype(float)
    S = rng.binomial(C.astype(int), rng.uniform(0.1, 0.9, (40, 1))).astype(float)
    a = cluster_pseudo_counts(S, C)
    for k in range(6):
        n = C[:, k]
        b, _ = eb_fit(np.where(n > 0, S[:, k] / np.maximum(n, 1), 0.0), n, S[:, k])
        assert a[k] == pytest.approx(b, rel=1e-9)
    # models that do not differ beyond sampling: infinite (every model is the pooled mean there)
    same = np.full((40, 1), 10.0)
    assert np.isinf(cluster_pseudo_counts(same * 0.5, same)[0])
