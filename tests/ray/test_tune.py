"""``cmr tune``: real Ray Tune (Optuna + ASHA) 2-trial sweeps on small slices; the Pareto files and
the chosen config / λ load back into ``cmr bench``, ``cmr train``, ``cmr serve`` and the router."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

pytestmark = pytest.mark.ray


def test_cmr_sweep_two_trials(ray_session, cmr_small, encoder, tmp_path):
    from cmr.bench import common
    from cmr.policies.carve import CarveConfig
    from services.config import load_args, read_config
    from tune import cmr_sweep

    out = tmp_path / "out"
    s = cmr_sweep.sweep(cmr_small, encoder, trials=2, quick=True, storage=str(tmp_path / "storage"), name="t", out=out, concurrent=2,
                        base={"epochs": 1}, check_splits=2)
    assert s["trials"] == 2 and s["finished_all_experiences"] >= 1 and s["front"]
    # the default config is the first trial, and every finished trial reported per experience
    assert s["default_trial"] is not None
    # a front's best other than the served carve is checked on a second split, and chosen only if it holds
    if s["check"] is not None:
        assert [x["seed"] for x in s["check"]["splits"]] == [0, 1]
        assert (s["chosen"]["trial"] == s["default_trial"]["trial"]) != s["check"]["holds"]
    else:
        assert s["chosen"]["trial"] == s["default_trial"]["trial"]
    for r in s["all"]:
        if r["obj_d_acc"] is not None:
            assert r["iterations"] == len(cmr_small.experiences) and 0.0 <= r["obj_d_acc"] <= 1.0 and r["obj_train_s"] > 0
    # validation came out of the train splits: the counts add up to the train sizes; one row of a
    # model each where the slice has models with two rows or more
    assert s["validation"]["per_model"] is True
    assert [a + b for a, b in zip(s["validation"]["n_fit"], s["validation"]["n_val"])] == [len(e.train) for e in cmr_small.experiences]
    # outputs
    md = (out / "pareto.md").read_text()
    assert "Pareto front (validation)" in md and "Test splits — evaluated once after the choice" in md
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(s["test"]) == {"chosen", "served"}
    assert (tmp_path / "storage" / "t").is_dir()  # Tune's own results under the storage path
    # the chosen config loads where the task says it must
    chosen = json.loads((out / "chosen_config.json").read_text())
    assert chosen == s["chosen_config"] and CarveConfig.from_dict(chosen).to_dict() == chosen
    for k in cmr_sweep.KNOBS:
        # a knob fixed with --set is not swept and stays as set
        assert chosen[k] == (1 if k == "epochs" else s["chosen"]["config"][k])
    assert "epochs" not in s["search_space"] and {"domain_vote", "domain_loss", "family_loss"} <= set(s["search_space"])
    # the first trial is the carve the router serves (auto's, with its vote and losses)
    served = cmr_sweep.served()
    assert served["domain_vote"] > 0 and all(s["default_trial"]["config"][k] == v for k, v in served.items())
    assert s["embedding"] == "minilm"  # what the fixture's encoder is
    _, cfg = common.policy_spec(argparse.Namespace(policy="carve", config=str(out / "chosen_config.json"), sets=[], seed=0))
    assert cfg.to_dict() == chosen  # cmr bench cmr --config
    from cmr.cli import build_parser

    a = build_parser().parse_args(["train", "--out", str(tmp_path / "ck"), "--config", str(out / "chosen_config.json")])
    assert a.config.endswith("chosen_config.json")  # cmr train --config
    args = load_args(read_config(out / "chosen_serve.yaml"))
    assert args.policy == "carve" and args.policy_config == chosen and args.embedding == "minilm"  # cmr serve --config


def test_the_served_carve_is_measured_on_validation_even_when_asha_stopped_it(cmr_small, encoder):
    from tune import cmr_sweep

    payload = cmr_sweep.trial_payload(cmr_small, encoder, {"seed": 0, **cmr_sweep.served(), "epochs": 1}, {"epochs"}, 0.2, 0)
    keys = ["val_m_acc", "val_d_acc", *cmr_sweep.OBJECTIVES]
    row = cmr_sweep._served_row(payload, keys)
    assert cmr_sweep._is_served(row, {"epochs"}) and row["iterations"] == len(cmr_small.experiences)
    assert 0.0 <= row["obj_d_acc"] <= 1.0 and row["obj_d_acc"] == row["val_d_acc"] and row["obj_train_s"] > 0
    # the same figures as a trial of the same config reports through Tune's callback
    seen: list[dict] = []
    cmr_sweep.validate(payload, {}, seen.append)
    assert [s["experience"] for s in seen] == [e.k for e in cmr_small.experiences]
    assert seen[-1]["obj_d_acc"] == row["obj_d_acc"] and seen[-1]["obj_m_acc"] == row["obj_m_acc"]


def test_a_choice_that_does_not_hold_on_further_splits_gives_way_to_the_served_carve(cmr_small, encoder, monkeypatch):
    from tune import cmr_sweep

    fixed = {"epochs"}
    payload = cmr_sweep.trial_payload(cmr_small, encoder, {"seed": 0, **cmr_sweep.served(), "epochs": 1}, fixed, 0.2, 0)
    keys = list(cmr_sweep.OBJECTIVES)
    served = cmr_sweep._served_row(payload, keys)
    trial = {"config": {**cmr_sweep.default_point(fixed), "lr": 1e-3}, **{k: served[k] for k in keys}}
    trial["obj_d_acc"] += 0.1  # ahead on the sweep's own split
    # on the further splits (each its own seeded validation split of the same data), the served
    # carve is ahead by more than that: the trial's mean objective falls below
    calls = []

    def fake_validate(pl, config, report):
        calls.append((len(pl["bench"].experiences[0].test), config))
        ahead = config == {}
        report({"obj_d_acc": 0.8 if ahead else 0.6, "obj_m_acc": 0.5, "obj_forgetting_d": 0.0, "obj_train_s": 1.0})

    monkeypatch.setattr(cmr_sweep, "validate", fake_validate)
    c = cmr_sweep.confirm(cmr_small, encoder, payload, trial, served, fixed, 0.2, 0, 3)
    assert [x["seed"] for x in c["splits"]] == [0, 1, 2] and len(calls) == 4
    assert {tuple(sorted(cfg)) for _, cfg in calls} == {(), tuple(sorted(trial["config"]))}
    assert c["splits"][0]["chosen"]["obj_d_acc"] == served["obj_d_acc"] + 0.1  # the sweep's own split: the rows given
    first = (cmr_sweep._objective(c["splits"][0]["chosen"]), cmr_sweep._objective(c["splits"][0]["served"]))
    assert c["mean_objective"] == {"chosen": pytest.approx((first[0] + 2 * 0.55) / 3), "served": pytest.approx((first[1] + 2 * 0.65) / 3)}
    assert not c["holds"]
    # ahead on every split: it holds
    monkeypatch.setattr(cmr_sweep, "validate", lambda pl, config, report: report(
        {"obj_d_acc": 0.6 if config == {} else 0.8, "obj_m_acc": 0.5, "obj_forgetting_d": 0.0, "obj_train_s": 1.0}))
    assert cmr_sweep.confirm(cmr_small, encoder, payload, trial, served, fixed, 0.2, 0, 3)["holds"]


def test_llm_sweep_two_trials_and_apply(ray_session, outcomes_small, encoder, tmp_path, capsys):
    from cmr.calibrate import applied, read_calibration
    from cmr.published import open_published_store
    from cmr.cli import main
    from tune import llm_sweep

    out = tmp_path / "out"
    s = llm_sweep.sweep(outcomes_small, encoder, trials=2, storage=str(tmp_path / "storage"), name="l", out=out, val_fraction=0.25)
    assert s["trials"] == 2 and s["finished"] == 2 and s["front"]
    modes = sorted(r["config"]["mode"] for r in s["all"])
    assert modes == ["lambda", "share"]  # the two seeded points: a fixed λ and a calibration target
    share_row = next(r for r in s["all"] if r["config"]["mode"] == "share")
    assert share_row["target_share"] == pytest.approx(0.2)
    q = [r["val_quality"] for r in s["front"]]
    c = [r["val_cost"] for r in s["front"]]
    assert all(np.diff(c) >= 0) and all(np.diff(q) >= 0)  # a front sorted by cost never falls in quality
    assert (out / "pareto.png").exists() and "Pareto front (validation)" in (out / "pareto.md").read_text()
    calib = read_calibration(out / "chosen_lambda.json")
    assert calib.cost_weight == pytest.approx(s["chosen"]["lam"]) and "test" in s
    home = tmp_path / "home"
    assert main(["calibrate", "--from-file", str(out / "chosen_lambda.json"), "--home", str(home), "--apply"]) == 0
    store = open_published_store(None, home / "serve" / "published.sqlite")
    assert applied(store).cost_weight == pytest.approx(calib.cost_weight)
    store.close()
    assert "applied: state store" in capsys.readouterr().out
