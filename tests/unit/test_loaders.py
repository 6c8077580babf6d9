"""Data loaders on tiny folders: valid input loads; malformed input is one CLI line naming
file, line and field, and exit status 2."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cmr.cli import main
from cmr.data import load_cmrbench, load_outcomes

from .bench_data import HUB, MODELS, write_cmrbench, write_outcomes


def test_valid_cmrbench_loads(tmp_path):
    b = load_cmrbench(write_cmrbench(tmp_path / "cb"))
    assert [e.k for e in b.experiences] == [1, 2]
    assert [c.id for c in b.cards_upto(1)] == [HUB[0]["model"], HUB[1]["model"]]
    assert len(b.cards_upto(2)) == 4
    e2 = b.experiences[1].test
    assert [e2.model_ids[j] for j in e2.labels] == [HUB[2]["model"], HUB[3]["model"], HUB[0]["model"]]
    assert e2.scores.sum(axis=1).tolist() == [1.0, 1.0, 1.0]  # one-hot


def test_valid_outcomes_load(tmp_path):
    d = load_outcomes(write_outcomes(tmp_path / "oc"))
    assert d.model_ids == MODELS and len(d.train) == 8 and len(d.test) == 4
    assert d.has_cost
    te2 = d.test.meta["id"].index("te2")
    assert np.isnan(d.test.scores[te2, MODELS.index("mid-chat")])  # the dropped pair stays unknown
    assert [c.cost for c in d.cards] == pytest.approx([0.001, 0.004, 0.005, 0.02])


def _run_bench(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def _replace_line(path, n, text):
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[n - 1] = text
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_cmrbench_bad_json_line_exits_2_naming_file_and_line(tmp_path, capsys):
    root = write_cmrbench(tmp_path / "cb")
    _replace_line(root / "e2" / "train.jsonl", 2, '{"prompt": "unterminated')
    code, err = _run_bench(capsys, ["bench", "cmr", "--policy", "random", "--data", str(root), "--out", str(tmp_path / "o")])
    assert code == 2 and len(err) == 1
    assert "e2/train.jsonl:2:" in err[0] and "invalid JSON" in err[0]
    assert not (tmp_path / "o" / "report.json").exists()


def test_cmrbench_missing_field_exits_2_naming_the_field(tmp_path, capsys):
    root = write_cmrbench(tmp_path / "cb")
    _replace_line(root / "e1" / "test.jsonl", 2, json.dumps({"model": HUB[1]["model"], "family": "vis", "domain": "Computer Vision"}))
    code, err = _run_bench(capsys, ["bench", "cmr", "--policy", "random", "--data", str(root), "--out", str(tmp_path / "o")])
    assert code == 2 and len(err) == 1
    assert "e1/test.jsonl:2:" in err[0] and "field 'prompt'" in err[0] and "missing" in err[0]


def test_cmrbench_unknown_model_exits_2(tmp_path, capsys):
    root = write_cmrbench(tmp_path / "cb")
    _replace_line(root / "e1" / "train.jsonl", 3, json.dumps({"prompt": "x", "model": "nobody/none", "family": "x", "domain": "x"}))
    code, err = _run_bench(capsys, ["bench", "cmr", "--policy", "random", "--data", str(root), "--out", str(tmp_path / "o")])
    assert code == 2 and len(err) == 1
    assert "e1/train.jsonl:3:" in err[0] and "field 'model'" in err[0] and "nobody/none" in err[0]


def test_outcomes_score_out_of_range_exits_2(tmp_path, capsys):
    root = write_outcomes(tmp_path / "oc")
    _replace_line(root / "outcomes.csv", 4, "tr0,mid-chat,1.5,0.005")
    code, err = _run_bench(capsys, ["bench", "llm", "--policy", "random", "--data", str(root), "--out", str(tmp_path / "o")])
    assert code == 2 and len(err) == 1
    assert "outcomes.csv:4:" in err[0] and "field 'score'" in err[0] and "1.5" in err[0]


def test_outcomes_unknown_prompt_id_exits_2(tmp_path, capsys):
    root = write_outcomes(tmp_path / "oc")
    _replace_line(root / "outcomes.csv", 6, "no-such-prompt,mid-chat,1.0,0.005")
    code, err = _run_bench(capsys, ["bench", "llm", "--policy", "random", "--data", str(root), "--out", str(tmp_path / "o")])
    assert code == 2 and len(err) == 1
    assert "outcomes.csv:6:" in err[0] and "field 'prompt_id'" in err[0] and "no-such-prompt" in err[0]


def test_outcomes_bad_json_and_missing_split(tmp_path, capsys):
    root = write_outcomes(tmp_path / "oc")
    _replace_line(root / "models.jsonl", 3, "{not json")
    code, err = _run_bench(capsys, ["bench", "llm", "--policy", "random", "--data", str(root), "--out", str(tmp_path / "o")])
    assert code == 2 and len(err) == 1 and "models.jsonl:3:" in err[0]
    root = write_outcomes(tmp_path / "oc2")
    _replace_line(root / "prompts.jsonl", 5, json.dumps({"id": "tr4", "prompt": "p", "task": "code"}))
    code, err = _run_bench(capsys, ["bench", "llm", "--policy", "random", "--data", str(root), "--out", str(tmp_path / "o")])
    assert code == 2 and len(err) == 1
    assert "prompts.jsonl:5:" in err[0] and "field 'split'" in err[0]


def test_not_a_data_folder_exits_2(tmp_path, capsys):
    code, err = _run_bench(capsys, ["bench", "llm", "--policy", "random", "--data", str(tmp_path / "nowhere")])
    assert code == 2 and len(err) == 1 and "nowhere" in err[0]
    code, err = _run_bench(capsys, ["bench", "cmr", "--policy", "random", "--data", str(tmp_path)])
    assert code == 2 and len(err) == 1 and "CMRBench" in err[0]
