"""``python -m bench.forgetting``: carve's forgetting split into what it forgot and what later models
took, on a tiny CMRBench; refused options."""

from __future__ import annotations

import json

import pytest

from bench import forgetting
from tests.unit.bench_data import write_cmrbench


def test_each_experience_is_scored_among_its_own_hub_and_the_grown_one(tmp_path):
    write_cmrbench(tmp_path / "data" / "cmrbench")
    out = tmp_path / "r"
    assert forgetting.main(["--data-root", str(tmp_path / "data"), "--test", "--out", str(out)]) == 0
    rep = json.loads((out / "report-test.json").read_text())
    assert set(rep["runs"]) == {"continual", "joint"}
    assert rep["runs"]["joint"]["config"]["joint"] is True and rep["runs"]["continual"]["config"]["domain_vote"] > 0
    cells = rep["runs"]["continual"]["cells"]
    assert [(c["k"], c["j"]) for c in cells] == [(1, 1), (2, 1), (2, 2)]
    for c in cells:
        # routed among fewer models (its own hub) a request can only gain: its model is among them
        assert c["m_own_hub"] >= c["m"] - 1e-9
        # nothing joined after the last experience, and nothing after j before k > j
        assert c["to_later"] == 0.0 if c["k"] == c["j"] else 0.0 <= c["to_later"] <= 1.0
    # the benchmark's own figures: the final row's mean is its final M-Acc
    last = [c for c in cells if c["k"] == 2]
    assert rep["runs"]["continual"]["final"]["m_acc"] == pytest.approx(sum(c["m"] for c in last) / len(last))
    assert rep["runs"]["continual"]["final_own_hub"]["m"] == pytest.approx(sum(c["m_own_hub"] for c in last) / len(last))
    assert rep["probe"]["pairs"]["1-2"]["n"] == 5  # the test rows whose model joined in experience 1 or 2
    md = (out / "report-test.md").read_text()
    assert "| continual |" in md and "| joint |" in md and "| 1-2 |" in md


def test_forgetting_own_hub_is_best_ever_minus_final_over_earlier_experiences():
    cells = [{"k": 1, "j": 1, "x": 0.5}, {"k": 2, "j": 1, "x": 0.7}, {"k": 2, "j": 2, "x": 0.9},
             {"k": 3, "j": 1, "x": 0.4}, {"k": 3, "j": 2, "x": 0.8}, {"k": 3, "j": 3, "x": 0.1}]
    assert forgetting._forgetting_own_hub(cells, "x") == pytest.approx(((0.7 - 0.4) + (0.9 - 0.8)) / 2)


def test_a_missing_data_root_or_bad_option_exits_2_in_one_line(tmp_path, capsys):
    assert forgetting.main(["--data-root", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--data-root" in err[0]
    write_cmrbench(tmp_path / "data" / "cmrbench")
    assert forgetting.main(["--data-root", str(tmp_path / "data"), "--set", "nokey", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--set" in err[0]
    assert forgetting.main(["--data-root", str(tmp_path / "data"), "--set", "epochs=many", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--set" in err[0] and "epochs" in err[0]
    assert not (tmp_path / "r").exists()
