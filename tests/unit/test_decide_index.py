"""The decision rule and the FAISS model index."""

from __future__ import annotations

import numpy as np
import pytest

from cmr.decide import Filters, choose, decide
from cmr.index import ModelIndex
from cmr.types import ModelCard


def test_choose_trades_score_against_cost():
    scores = np.array([[0.9, 0.8, 0.1]])
    costs = np.array([1.0, 0.1, 0.0])
    assert choose(scores, costs, 0.0)[0] == 0
    assert choose(scores, costs, 0.5)[0] == 1  # 0.9-0.5=0.4 < 0.8-0.05=0.75
    assert choose(scores, costs, 100.0)[0] == 2
    # per-query lambdas
    assert list(choose(np.repeat(scores, 2, 0), costs, np.array([0.0, 100.0]))) == [0, 2]


def test_ties_go_to_the_cheaper_model_and_masks_apply():
    scores = np.array([[0.5, 0.5, 0.5]])
    costs = np.array([0.3, 0.1, 0.2])
    assert choose(scores, costs, 0.0)[0] == 1
    assert choose(scores, costs, 0.0, mask=np.array([[True, False, True]]))[0] == 2


def test_decide_filters_alternatives_and_errors():
    cards = [ModelCard(id="a", domain="x", family="f", cost=1.0), ModelCard(id="b", domain="y", cost=0.2), ModelCard(id="c", domain="x", cost=0.1)]
    scores = np.array([[0.9, 0.8, 0.7], [0.1, 0.2, 0.3]])
    d = decide(scores, cards, lam=0.0, k=3, checkpoint_version=7)
    assert [x.model for x in d] == ["a", "c"]
    assert d[0].alternatives == [("b", pytest.approx(0.8)), ("c", pytest.approx(0.7))] and d[0].checkpoint_version == 7
    d = decide(scores, cards, filters=Filters(domains=["y"]))
    assert [x.model for x in d] == ["b", "b"] and d[0].alternatives == []
    assert decide(scores, cards, filters=Filters(max_cost=0.5))[0].model == "b"
    assert decide(scores, cards, filters=Filters(allow=["c", "a"], families=["f"]))[0].model == "a"
    with pytest.raises(ValueError, match="no candidate"):
        decide(scores, cards, filters=Filters(domains=["nope"]))


def test_decision_records_the_cost_weight_it_used():
    cards = [ModelCard(id="cheap", cost=0.0), ModelCard(id="dear", cost=1.0)]
    scores = np.array([[0.5, 0.9], [0.5, 0.9]])
    # per-query λ: the first query ignores cost, the second pays 0.5 per unit of cost
    a, b = decide(scores, cards, lam=np.array([0.0, 0.5]), k=2)
    assert (a.model, a.cost_weight) == ("dear", 0.0)
    assert (b.model, b.cost_weight) == ("cheap", 0.5)
    assert type(a).from_dict(a.to_dict()) == a


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_index_add_remove_search_by_id(precision):
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(50, 8)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    ids = [f"m{i}" for i in range(50)]
    index = ModelIndex(8, precision=precision)
    index.add(ids, vecs)
    names, sims = index.search(vecs[[3, 7]], k=1)
    assert names == [["m3"], ["m7"]] and np.allclose(sims[:, 0], 1.0, atol=1e-5 if precision == "fp32" else 1e-3)
    index.remove(["m3"])
    assert "m3" not in index and len(index) == 49
    names, _ = index.search(vecs[[3]], k=5)
    assert "m3" not in names[0] and len(names[0]) == 5
    # replacing a vector keeps one entry per id
    index.add(["m7"], -vecs[[7]])
    assert len(index) == 49
    assert index.search(vecs[[7]], k=49)[0][0][-1] == "m7"
    np.testing.assert_allclose(index.vectors(["m7"]), -vecs[[7]], atol=1e-6 if precision == "fp32" else 1e-3)
    with pytest.raises(ValueError):
        index.add(["x"], np.zeros((2, 8), np.float32))
    with pytest.raises(ValueError, match="precision"):
        ModelIndex(8, precision="int4")
