"""``cmr bench online``: the bandit replay, its report, and models that join mid-stream."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cmr.cli import main
from tests.unit.bench_data import write_cmrbench


def test_online_report_on_an_outcome_matrix(tmp_path, data_root):
    out = tmp_path / "run"
    rc = main([
        "bench", "online", "--data", str(data_root / "routing" / "routerbench"), "--policy", "linucb", "--policy", "thompson",
        "--set", "linucb:alpha=0.2", "--lam", "sweep", "--limit", "160", "--batch-size", "16", "--out", str(out),
    ])
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["stream"]["n"] == 160 and rep["stream"]["warm_rows"] == 16 and rep["lam"] == "sweep"
    assert rep["policies"]["linucb"]["config"]["alpha"] == 0.2  # scoped --set reached linucb only
    assert rep["policies"]["thompson"]["config"]["noise"] > 0
    assert set(rep["baselines"]) == {"knn"}
    for name, r in {**rep["policies"], **rep["baselines"]}.items():
        steps, cum = np.array(r["curve"] or r["curve_after_warm"]).T
        assert (np.diff(cum) >= -1e-9).all(), name  # regret vs the oracle is never negative
        assert 0.0 <= r["mean_regret_after_warm"] <= 1.0
        assert 0.0 <= r["test"]["aiq"] <= r["test"]["oracle_aiq"] + 1e-9
    for name in ("linucb", "thompson"):
        r = rep["policies"][name]
        assert r["curve"][-1] == [160, pytest.approx(r["cum_regret"])]
        assert set(rep["verdict"][name]) == {"baseline", "ahead", "ahead_cumulative_after_warm", "ahead_on_test"}
    assert (out / "regret.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "cmr bench online" in (out / "report.md").read_text()


def test_models_joining_mid_stream_are_routed_before_any_feedback(tmp_path, encoder):
    from cmr.bench.common import embed
    from cmr.bench.online import load_stream, replay
    from cmr.policies import make_policy

    d = load_stream(str(write_cmrbench(tmp_path / "cmr")), seed=0)
    stream = d["stream"]
    embed(encoder, [stream])
    starts = [at for at, _ in d["segments"]]
    assert starts == [0, 4]  # experience 2 (two new models) starts at row 4
    new_ids = {c.id for c in d["segments"][1][1]}
    # the new models' columns are unknown (NaN) before they join, known after
    cols = [stream.column[m] for m in new_ids]
    assert np.isnan(stream.scores[:4, cols]).all() and not np.isnan(stream.scores[4:, cols]).any()
    policy = make_policy("linucb", encoder=encoder)
    r = replay(policy, stream, d["segments"], lam=0.0, batch_size=1)
    target = np.array(stream.model_ids, dtype=object)[stream.labels]
    first_new = next(i for i in range(4, len(stream)) if target[i] in new_ids)
    # one request at a time: the first request for a new model is routed to it from its card alone
    assert r["reward"][first_new] == 1.0 and r["regret"][first_new] == 0.0
    assert np.isfinite(r["regret"]).all()


def test_online_on_a_cmrbench_folder(tmp_path):
    root = write_cmrbench(tmp_path / "cmr")
    out = tmp_path / "run"
    assert main(["bench", "online", "--data", str(root), "--policy", "thompson", "--baseline", "zeroshot", "--batch-size", "2", "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    t = rep["policies"]["thompson"]["test"]
    assert t["equal_cost"] and 0.0 <= t["aiq"] <= 1.0  # equal costs: AIQ is the routed accuracy (M-Acc)


@pytest.mark.parametrize("bad, message", [(["--warm", "1.5"], "--warm"), (["--policy", "no-such-policy"], "no-such-policy"), (["--lam", "-1"], "--lam"), (["--lam", "cheap"], "--lam")])
def test_bad_options_fail_with_one_line(tmp_path, capsys, bad, message):
    root = write_cmrbench(tmp_path / "cmr")
    args = ["bench", "online", "--data", str(root), "--policy", "linucb", "--out", str(tmp_path / "run"), *bad]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
