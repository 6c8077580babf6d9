"""``python -m bench.seeds``: the mean ± sd tables and refused options (the runs themselves are the
benchmark commands, tested on their own)."""

from __future__ import annotations

import pytest

from bench import seeds


def test_tables_show_mean_and_sample_sd_and_the_paired_margin():
    st = seeds._stat([0.80, 0.82, 0.84])
    assert st["mean"] == pytest.approx(0.82) and st["sd"] == pytest.approx(0.02) and st["n"] == 3
    s = lambda m, sd: {"mean": m, "sd": sd, "n": 5}  # noqa: E731
    report = {"started_utc": "t", "command": "c", "seeds": [0, 1, 2, 3, 4], "embedding": "minilm", "table": {
        "routerbench/knn": {"aiq": s(0.845, 0.001), "quality_at_lambda0": s(0.878, 0.0), "zero_router_aiq": s(0.823, 0.0)},
        "routerbench/unseen0.33": {"knn": s(0.833, 0.017), "uniroute": s(0.839, 0.015), "margin": s(0.006, 0.032)},
        "cmrbench/carve": {"m_acc": s(0.224, 0.002), "f_acc": s(0.284, 0.003), "d_acc": s(0.640, 0.004)}}}
    md = seeds.render_md(report)
    assert "| routerbench | knn | 0.845 ± 0.001 | 0.878 ± 0.000 | 0.823 ± 0.000 |" in md
    assert "| routerbench, 0.33 | 0.833 ± 0.017 | 0.839 ± 0.015 | +0.006 ± 0.032 |" in md
    assert "| carve | 0.224 ± 0.002 | 0.284 ± 0.003 | 0.640 ± 0.004 |" in md


@pytest.mark.parametrize("argv, field", [(["--sets", "nope"], "--sets"), (["--seeds", "0"], "--seeds"), (["--unseen", "1.5"], "--unseen"),
                                         (["--policies", "nope"], "policy 'nope'")])
def test_refused_options_exit_2_in_one_line(argv, field, capsys, tmp_path):
    assert seeds.main([*argv, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and field in err[0]
    assert not (tmp_path / "r").exists()


def test_a_policy_row_may_carry_its_config_and_embedding():
    assert seeds._spec("carve:domain_vote=0.3@minilm+tfidf", "minilm") == ("carve", ["--set", "domain_vote=0.3", "--embedding", "minilm+tfidf"])
    assert seeds._spec("knn", "minilm") == ("knn", ["--embedding", "minilm"])
    with pytest.raises(seeds.SeedsError, match="NAME"):
        seeds._spec("knn:k", "minilm")
    with pytest.raises(seeds.SeedsError, match="unknown policy 'nope'"):
        seeds._spec("nope", "minilm")
