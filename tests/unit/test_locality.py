"""Issue 18's floor for every policy a router can serve: after rewards on one model, it wins no
query whose nearest stored prompts it was never rewarded on.

The served router trains its policy on CMRBench at first start, then learns from feedback on
models it has no rows for (here: two tiny chat models, as ``cmr serve`` creates). Any policy
``policy:`` may name is held to it, not only the default (``test_knn_locality.py`` covers knn's
settings in depth). Before this test, one reward made uniroute, uniroute-map and linucb send all
50 unrelated queries to the rewarded model, thompson 42.
"""

from __future__ import annotations

import numpy as np
import pytest

from cmr.continual.learner import Learner
from cmr.decide import choose
from cmr.policies import make_policy
from cmr.types import FeedbackEvent
from tests.unit.test_knn_locality import REWARDED_QUERY, SERVED, bench2  # noqa: F401  (fixture)

#: every registered policy that learns from feedback and can be served; ``zeroshot`` never
#: learns, ``random`` and ``oracle`` are benchmark references
LEARNING = ["knn", "cluster", "uniroute", "uniroute-map", "linucb", "thompson", "carve", "auto"]
#: bandits: a score carries an exploration bonus that narrows with each observation (LinUCB) or
#: is a fresh posterior draw (Thompson), so it need not rise where the model was rewarded
EXPLORING = {"linucb", "thompson"}


@pytest.fixture(scope="module", params=LEARNING)
def trained(bench2, request):  # noqa: F811
    """(name, state) of the policy as the router's first start trains it (e1, e2 in order)."""
    from cmr.encoders import default_encoder

    # auto's carve with frozen features: a tuned encoder (encoder_epochs, served) is fixed while
    # rewards arrive, but tuning it on e1 and e2 whole takes minutes on CI's 2 cores
    policy = make_policy(request.param, default_encoder(), {"seed": 0, **({"encoder_epochs": 0} if request.param == "auto" else {})})
    learner = Learner(policy)  # carve trains only through it; the others' fit, as the served learner runs them
    for exp in bench2.experiences:
        learner.fit(exp.train, list(bench2.cards) + SERVED)
    return request.param, policy.state_dict()


def _hard_cluster(policy, x: np.ndarray) -> np.ndarray | None:
    """The cluster each row of ``x`` is routed by, for a policy that routes by hard clusters
    (its neighbourhood: a reward counts for its whole cluster); else None."""
    inner = getattr(policy, "_inner", policy)  # auto: the policy it chose
    assign = getattr(inner, "cluster_weights", None) or getattr(inner, "assignment", None)
    if assign is None:
        return None
    w = assign(x)
    return w.argmax(axis=1) if np.allclose(w.max(axis=1), 1.0) else None


def _unrelated(policy, bench2, encoder, anchor: np.ndarray, n: int = 50) -> np.ndarray:  # noqa: F811
    """n CMRBench test prompts unrelated to the rewarded query: cosine < 0.3 to it, below their
    20th nearest stored (train) prompt, so it would not be among their neighbours, and (for a
    policy routing by hard clusters) in another cluster than it."""
    stored = np.concatenate([e.train.emb for e in bench2.experiences])
    texts = [t for e in bench2.experiences for t in e.test.texts[:300]]
    emb = encoder.encode(texts)
    kth = np.sort(emb @ stored.T, axis=1)[:, -20]
    sim = emb @ anchor
    keep = (sim < 0.3) & (sim < kth)
    own = _hard_cluster(policy, np.vstack([anchor[None, :], emb]))
    if own is not None:
        keep &= own[1:] != own[0]
    far = emb[keep]
    assert len(far) >= n, f"only {len(far)} unrelated prompts"
    return far[:n]


@pytest.mark.parametrize("rewards", [(1.0,), (1.0, 1.0, 1.0)])
def test_rewards_on_one_model_move_only_nearby_queries_for_every_served_policy(trained, bench2, encoder, rewards):  # noqa: F811
    name, state = trained
    policy = make_policy(name, encoder, {"seed": 0, **({"encoder_epochs": 0} if name == "auto" else {})})
    policy.load_state_dict(state)
    cards = tuple(bench2.cards) + tuple(SERVED)
    target = cards.index(SERVED[1])
    q = encoder.encode([REWARDED_QUERY])[0]
    far = _unrelated(policy, bench2, encoder, q)
    zero = np.zeros(len(cards))
    before = choose(policy.score(far, cards), zero, 0.0)
    near_before = policy.score(q, cards)[0, target]
    events = [FeedbackEvent(request_id=f"r{i}", model=SERVED[1].id, reward=r, query=REWARDED_QUERY, embedding=q.tolist())
              for i, r in enumerate(rewards)]
    Learner(policy).consume(events)  # the served learner's step (carve's online update; update() for the rest)
    after = policy.score(far, cards)
    won = choose(after, zero, 0.0) == target
    assert not won.any(), f"{name}: {SERVED[1].id} took {int(won.sum())} of {len(far)} unrelated queries"
    # other models' queries: a few may change hands (the pooled and empirical-Bayes priors move
    # with every new row), not a landslide; Thompson draws its whole posterior afresh each round
    if name != "thompson":
        changed = int((choose(after, zero, 0.0) != before).sum())
        assert changed <= len(far) // 5, f"{name}: {changed} of {len(far)} unrelated queries changed hands"
    if name not in EXPLORING:
        assert policy.score(q, cards)[0, target] > near_before, f"{name}: no rise where it was rewarded"
