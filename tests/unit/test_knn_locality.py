"""A few rewards on one model move only the queries near them (issue 18, item 1).

The served router is the knn policy trained on CMRBench plus cards of served models it has no
rows for; feedback then arrives on one of those. Before the fix a single reward of 1.0 made that
model's global mean 1.0, which every query with no neighbour evidence for it backed off to: it
won unrelated queries with scores above 1.
"""

from __future__ import annotations

import numpy as np
import pytest

from cmr.decide import choose
from cmr.policies import make_policy
from cmr.types import FeedbackEvent, ModelCard

SERVED = [
    ModelCard(id="tiny-gpt2-a", family="tiny-gpt2", domain="text-generation", cost=0.002,
              description="Tiny randomly initialised GPT-2 (2 layers, width 64) for offline chat tests."),
    ModelCard(id="tiny-gpt2-b", family="tiny-gpt2", domain="text-generation", cost=0.0045,
              description="Tiny randomly initialised GPT-2 (3 layers, width 96) for offline chat tests."),
]
REWARDED_QUERY = "Write a short friendly reply to my message: hello, how are you today?"


@pytest.fixture(scope="module")
def bench2(data_root, encoder):
    """CMRBench e1 and e2 whole (train embedded), the hub cut to the models they name: the
    served router's memory at the scale it has (thousands of prompts, not a toy)."""
    from cmr.data import load_cmrbench

    bench = load_cmrbench(data_root / "cmrbench")
    exps = bench.experiences[:2]
    named = {e.train.model_ids[i] for e in exps for part in (e.train, e.test) for i in part.labels}
    bench.cards = [c for c in bench.cards if c.id in named]
    ids = [c.id for c in bench.cards]
    bench.experiences = [type(e)(e.k, e.train.select_models(ids), e.test.select_models(ids)) for e in exps]
    for e in bench.experiences:
        e.train.emb = encoder.encode(e.train.texts)
    return bench


@pytest.fixture(scope="module", params=[None, 0.3, 0.0, "s0.03"], ids=["tuned", "card0.3", "card0", "s0.03"])
def served_knn(bench2, encoder, request):
    """knn as first start trains it; the card weight tuned (the default) or fixed: the tuned one
    depends on the data, and the guarantee must not."""
    policy = make_policy("knn", encoder, {"shrinkage": 0.03} if request.param == "s0.03" else {"prior_weight": request.param})
    for exp in bench2.experiences:
        policy.fit(exp.train, list(bench2.cards) + SERVED)
    return policy


def _unrelated(policy, bench2, encoder, anchor: np.ndarray, n: int = 50) -> np.ndarray:
    """n test prompts of CMRBench unrelated to the rewarded query: cosine < 0.3 to it, and the
    rewarded query would not be among their 20 nearest stored prompts."""
    texts = [t for e in bench2.experiences for t in e.test.texts[:150]]
    emb = encoder.encode(texts)
    sims, _ = policy._index.search(emb, 20)
    far = emb[((emb @ anchor) < 0.3) & ((emb @ anchor) < sims[:, -1])]
    assert len(far) >= n, f"only {len(far)} unrelated prompts"
    return far[:n]


@pytest.mark.parametrize("rewards", [(1.0,), (1.0, 0.0), (1.0, 1.0, 1.0)])
def test_rewards_on_one_model_move_only_nearby_queries(served_knn, bench2, encoder, rewards):
    policy = make_policy("knn", encoder)
    policy.load_state_dict(served_knn.state_dict())
    cards = tuple(bench2.cards) + tuple(SERVED)
    target = cards.index(SERVED[1])
    q = encoder.encode([REWARDED_QUERY])[0]
    far = _unrelated(policy, bench2, encoder, q)
    before = policy.score(far, cards)
    near_before = policy.score(q, cards)[0, target]

    policy.update([FeedbackEvent(request_id=f"r{i}", model=SERVED[1].id, reward=r, query=REWARDED_QUERY,
                                 embedding=q.tolist()) for i, r in enumerate(rewards)])
    after = policy.score(far, cards)
    zero = np.zeros(len(cards))
    won = choose(after, zero, 0.0) == target
    assert not won.any(), f"{SERVED[1].id} took {int(won.sum())} of {len(far)} unrelated queries"
    assert after.min() >= 0.0 and after.max() <= 1.0, (after.min(), after.max())
    # unrelated queries: the choice does not change at all
    assert (choose(after, zero, 0.0) == choose(before, zero, 0.0)).all()
    # the query it was rewarded on: its score moves with the rewards
    near_after = policy.score(q, cards)[0, target]
    if np.mean(rewards) > 0.5:
        assert near_after > near_before + 0.05, (near_before, near_after)


def test_scores_stay_in_unit_interval_with_card_term(served_knn, bench2, encoder):
    """The card-similarity term does not push a score outside the range of the rewards."""
    cards = tuple(bench2.cards) + tuple(SERVED)
    texts = [t for e in bench2.experiences for t in e.test.texts][:40]
    s = served_knn.score(encoder.encode(texts), cards)
    assert served_knn.prior_weight >= 0
    assert s.min() >= 0.0 and s.max() <= 1.0, (s.min(), s.max())
