"""Benchmark metrics on hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cmr.bench import metrics as M

NAN = float("nan")


# -- continual ---------------------------------------------------------------------------------


def test_forgetting_hand_computed():
    # test set 1: best 0.8 (after e1), final 0.5 -> 0.3; test set 2: best 0.6 (after e2), final 0.6 -> 0
    a = np.array([[0.8, NAN, NAN], [0.7, 0.6, NAN], [0.5, 0.6, 0.9]])
    assert M.forgetting(a) == pytest.approx((0.3 + 0.0) / 2)
    assert M.final_average(a) == pytest.approx((0.5 + 0.6 + 0.9) / 3)


def test_forgetting_uses_best_ever_not_first():
    # accuracy on test 1 rises after e2 (0.4 -> 0.9) then drops to 0.2: forgetting is 0.7
    a = np.array([[0.4, NAN, NAN], [0.9, 0.5, NAN], [0.2, 0.5, 0.1]])
    assert M.forgetting(a) == pytest.approx((0.7 + 0.0) / 2)


def test_forgetting_negative_when_accuracy_grows_and_zero_for_one_experience():
    assert M.forgetting(np.array([[0.2, NAN], [0.5, 0.3]])) == pytest.approx(-0.3)
    assert M.forgetting(np.array([[0.7]])) == 0.0
    with pytest.raises(ValueError):
        M.forgetting(np.zeros((2, 3)))


def test_matrix_to_json_turns_nan_into_null():
    assert M.matrix_to_json(np.array([[0.5, NAN], [0.25, 1.0]])) == [[0.5, None], [0.25, 1.0]]


def test_routing_hits_target_always_counts_a_missing_label_never():
    from cmr.data import Examples
    from cmr.types import ModelCard

    cards = [ModelCard(id="a", family="x", domain="code"), ModelCard(id="b", family=None, domain="code"),
             ModelCard(id="c", family=None, domain=None), ModelCard(id="d", family="x", domain="math")]
    # targets a, c, c, c, a, with the requests' own labels (the requests for c lack a family)
    data = Examples(texts=["q"] * 5, model_ids=["a", "c"], scores=np.zeros((5, 2), np.float32), labels=np.array([0, 1, 1, 1, 0]),
                    meta={"family": ["x", None, None, None, "y"], "domain": ["code", "math", "math", "math", "code"]})
    hits = M.routing_hits([3, 1, 2, 3, 0], cards, data)
    assert hits["m"].tolist() == [False, False, True, False, True]
    # d shares a's family; b and the request both lack one: no hit; the target itself is always a
    # hit, even where its card lacks the label or disagrees with the request's (last row)
    assert hits["f"].tolist() == [True, False, True, False, True]
    assert hits["d"].tolist() == [False, False, True, True, True]
    assert M.accuracies([3, 1, 2, 3, 0], cards, data) == pytest.approx({"m": 0.4, "f": 0.6, "d": 0.6})


# -- hull, AIQ, QNC ----------------------------------------------------------------------------


def test_pareto_hull_drops_dominated_and_concave_points():
    # (2, 0.5) is dominated by (1, 0.6); (3, 0.65) lies below the chord (1, 0.6)-(4, 0.9)
    h = M.pareto_hull([1, 2, 3, 4, 5], [0.6, 0.5, 0.65, 0.9, 0.85])
    assert h.tolist() == [[1.0, 0.6], [4.0, 0.9]]


def test_pareto_hull_keeps_concave_points_and_best_of_equal_cost():
    h = M.pareto_hull([0, 1, 1, 2], [0.0, 0.8, 0.3, 1.0])
    assert h.tolist() == [[0.0, 0.0], [1.0, 0.8], [2.0, 1.0]]


def test_aiq_hand_computed():
    # hull (0, 0.5) -> (1, 0.9), flat 0.9 to c_max = 2: area 0.7 + 0.9 = 1.6 over width 2
    assert M.aiq([0, 1], [0.5, 0.9], 0.0, 2.0) == pytest.approx(0.8)
    # a dominated point changes nothing
    assert M.aiq([0, 1, 1.5], [0.5, 0.9, 0.7], 0.0, 2.0) == pytest.approx(0.8)


def test_aiq_flat_left_of_cheapest_point_and_clipped_outside_range():
    # single point at cost 1 over [0, 2]: flat at 0.6 on both sides
    assert M.aiq([1.0], [0.6], 0.0, 2.0) == pytest.approx(0.6)
    # hull (0, 0) -> (4, 1) seen through [1, 3]: mean of the line over [1, 3] = 0.5
    assert M.aiq([0.0, 4.0], [0.0, 1.0], 1.0, 3.0) == pytest.approx(0.5)


def test_aiq_equal_cost_is_best_quality():
    assert M.aiq([0.0, 0.0], [0.4, 0.7], 0.0, 0.0) == pytest.approx(0.7)
    with pytest.raises(ValueError):
        M.aiq([0.0], [0.5], 1.0, 0.0)


def test_qnc_interpolates_on_the_hull():
    # hull (1, 0.5) -> (3, 0.9): quality 0.7 is reached at cost 2; target model costs 4 -> 0.5
    assert M.qnc([1, 3], [0.5, 0.9], 0.7, 4.0) == pytest.approx(0.5)
    # already reached at the cheapest point: that point's cost, no credit for the flat left part
    assert M.qnc([1, 3], [0.5, 0.9], 0.4, 4.0) == pytest.approx(0.25)
    assert M.qnc([1, 3], [0.5, 0.9], 0.95, 4.0) is None


# -- λ sweep -----------------------------------------------------------------------------------


def test_lambda_grid_spans_from_no_effect_to_cheapest():
    g = M.lambda_grid(np.array([1.0, 2.0, 4.0]), score_range=1.0, n=50)
    assert g[0] == 0.0 and len(g) == 50 and np.all(np.diff(g) > 0)
    assert g[1] * 4.0 <= 1e-3 + 1e-12  # penalty on the dearest model is ≤ 0.1 % of the score spread
    assert g[-1] * 1.0 >= 10.0  # cheapest gap (1.0) times λ beats any score gap
    assert M.lambda_grid(np.array([0.0, 0.0]), 1.0).tolist() == [0.0]


def test_sweep_masks_unknown_pairs_and_uses_realised_outcomes():
    # two prompts, three models; model 2 is the router's favourite but unknown on prompt 0
    pred = np.array([[0.2, 0.5, 0.9], [0.2, 0.5, 0.9]])
    true = np.array([[1.0, 0.0, NAN], [0.0, 1.0, 1.0]], dtype=np.float32)
    cost = np.array([[1.0, 2.0, 3.0], [1.5, 2.5, 3.5]], dtype=np.float32)
    card = np.array([1.0, 2.0, 3.0])
    curve = M.sweep(pred, true, cost, card, [0.0, 100.0])
    # λ=0: prompt 0 -> model 1 (model 2 masked), prompt 1 -> model 2
    assert curve[0].tolist() == pytest.approx([0.0, (2.0 + 3.5) / 2, (0.0 + 1.0) / 2])
    # huge λ: the cheapest model everywhere
    assert curve[1].tolist() == pytest.approx([100.0, (1.0 + 1.5) / 2, (1.0 + 0.0) / 2])


def test_single_models_best_single_and_oracle_point():
    true = np.array([[1.0, 1.0, 0.0], [0.0, 1.0, NAN], [1.0, 0.0, 1.0]], dtype=np.float32)
    cost = np.array([[1.0, 2.0, 0.5], [1.0, 2.0, 0.5], [1.0, 2.0, 0.5]], dtype=np.float32)
    s = M.single_models(true, cost, ["a", "b", "c"])
    assert [x["quality"] for x in s] == pytest.approx([2 / 3, 2 / 3, 0.5])
    assert s[2]["n"] == 2
    # a and b tie on quality: the cheaper wins
    assert M.best_single(s) == {"model": "a", "quality": pytest.approx(2 / 3), "cost": pytest.approx(1.0)}
    # oracle: prompt 0 -> a (tie a/b at 1, a cheaper), prompt 1 -> b, prompt 2 -> c (tie a/c, c cheaper)
    c, q = M.oracle_point(true, cost)
    assert q == pytest.approx(1.0) and c == pytest.approx((1.0 + 2.0 + 0.5) / 3)


def test_zero_router_aiq_matches_hull_of_single_models():
    # three single models: (1, 0.5), (2, 0.6), (3, 0.9); (2, 0.6) lies under the chord -> hull has 2 points
    costs, quals = [1.0, 2.0, 3.0], [0.5, 0.6, 0.9]
    expected = (0.5 + 0.9) / 2  # straight line over the whole range
    assert M.aiq(costs, quals, 1.0, 3.0) == pytest.approx(expected)
    assert math.isclose(M.qnc(costs, quals, 0.9, 3.0), 1.0)
