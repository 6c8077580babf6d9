"""``python -m bench.task_bound``: task-level routing, its ceiling from the test outcomes, and the
per-prompt learners beside them, on a tiny outcome set; refused options."""

from __future__ import annotations

import json

import pytest

from bench import task_bound
from tests.unit.bench_data import write_outcomes


def test_reports_the_task_ceiling_beside_the_routers(tmp_path):
    write_outcomes(tmp_path / "data" / "routing" / "tiny")
    assert task_bound.main(["--data-root", str(tmp_path / "data"), "--sets", "tiny", "--out", str(tmp_path / "r")]) == 0
    rep = json.loads((tmp_path / "r" / "report.json").read_text())["sets"]["tiny"]
    figures = [k for k, v in rep.items() if isinstance(v, float)]
    assert {"zero router", "per-task prior", "task ceiling (test means)", "knn (served default)"} <= set(figures)
    assert all(0.0 <= rep[k] <= 1.0 for k in figures)
    # every model is right or wrong by task here: the train task prior is the ceiling, and routing
    # each task to its cheapest right model beats every single model on cost
    assert rep["metric"] == "AIQ"
    assert rep["per-task prior"] == pytest.approx(rep["task ceiling (test means)"])
    assert rep["zero router"] < rep["per-task prior"] - 0.05
    # a task of a few prompts is one cluster: its cluster ceilings are its task ceiling
    for c in task_bound.CLUSTERS:
        assert rep[f"cluster ceiling (test means, {c} clusters a task)"] == pytest.approx(rep["task ceiling (test means)"])
    assert f"| per-task prior | {rep['per-task prior']:.4f} |" in (tmp_path / "r" / "report.md").read_text()


def test_an_unknown_set_exits_2_in_one_line(tmp_path, capsys):
    assert task_bound.main(["--data-root", str(tmp_path), "--sets", "nope", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--sets" in err[0] and "nope" in err[0]
    assert not (tmp_path / "r").exists()


def test_the_cluster_ceiling_routes_each_region_of_a_task_by_its_own_outcomes():
    import numpy as np

    rng = np.random.default_rng(0)
    # one task, two well-separated regions of 40 prompts; model 0 right in the first, model 1 in the second
    emb = np.concatenate([rng.normal(0, 0.01, (40, 4)) + [1, 0, 0, 0], rng.normal(0, 0.01, (40, 4)) + [0, 1, 0, 0]])
    scores = np.zeros((80, 2))
    scores[:40, 0] = 1.0
    scores[40:, 1] = 1.0
    scores[0, 1] = np.nan  # a missing outcome is left out of its region's mean
    pred = task_bound.cluster_ceiling(emb, scores, ["t"] * 80, np.array([0.5, 0.5]), per_task=2, seed=0)
    assert np.allclose(pred[:40], [1.0, 0.0]) and np.allclose(pred[40:], [0.0, 1.0])
    # one cluster: the task's means
    one = task_bound.cluster_ceiling(emb, scores, ["t"] * 80, np.array([0.5, 0.5]), per_task=1, seed=0)
    assert np.allclose(one, np.nanmean(scores, axis=0))
