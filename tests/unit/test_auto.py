"""``auto``: cross-validation on the train rows picks the zero router where prompts predict
nothing, a learned policy where they do, and says so (``describe``, kept in the state)."""

from __future__ import annotations

import numpy as np

from cmr.data.examples import Examples
from cmr.policies import make_policy
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


def test_chooses_the_zero_router_where_prompts_predict_nothing():
    data, cards = _data(signal=False, cost=False)
    pol = make_policy("auto", config={"folds": 3})
    pol.fit(data, cards)
    choice = pol.describe()
    assert choice["chosen"] == "prior", choice
    assert set(choice["mean"]) == set(CANDIDATES) and all(len(v) == 3 for v in choice["folds"].values())
    # the zero router's scores: one ranking of the models for every prompt (the best first)
    s = pol.score(data.emb[:20], cards)
    assert (s.argmax(axis=1) == 3).all()


def test_chooses_a_learned_policy_where_prompts_predict_and_keeps_the_choice():
    data, cards = _data(signal=True)
    pol = make_policy("auto", config={"folds": 3})
    pol.fit(data, cards)
    choice = pol.describe()
    assert choice["chosen"] != "prior" and choice["mean"][choice["chosen"]] > choice["mean"]["prior"] + 0.05, choice
    again = make_policy("auto")
    again.load_state_dict(pol.state_dict())
    assert again.describe() == choice
    np.testing.assert_allclose(again.score(data.emb, cards), pol.score(data.emb, cards))
    # later fits go to the chosen policy: the choice is not revisited
    more, _ = _data(signal=False, seed=1)
    again.fit(more, cards)
    assert again.describe() == choice
