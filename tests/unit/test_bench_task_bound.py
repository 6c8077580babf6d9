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
    assert f"| per-task prior | {rep['per-task prior']:.4f} |" in (tmp_path / "r" / "report.md").read_text()


def test_an_unknown_set_exits_2_in_one_line(tmp_path, capsys):
    assert task_bound.main(["--data-root", str(tmp_path), "--sets", "nope", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--sets" in err[0] and "nope" in err[0]
    assert not (tmp_path / "r").exists()
