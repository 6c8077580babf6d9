"""Calibration of the cost weight λ (``cmr/calibrate.py``): targets hold on the calibration set
exactly and on held-out prompts within tolerance; λ is the smallest that meets them; bad targets
are one clear error; the router applies the calibration published in the state store and uses it
for requests that give no cost weight."""

from __future__ import annotations


import numpy as np
import pytest

from cmr import calibrate as cal
from cmr.calibrate import CalibrationError, CalibrationTarget


def _synthetic(n: int, m: int = 8, seed: int = 0):
    """Scores where quality grows with price (the trade-off λ has to make), plus noise."""
    rng = np.random.default_rng(seed)
    costs = np.sort(rng.uniform(0.1, 10.0, m))
    base = np.log1p(costs) / np.log1p(costs.max())
    return base[None, :] * rng.uniform(0.5, 1.0, (n, 1)) + 0.15 * rng.standard_normal((n, m)), costs


@pytest.mark.parametrize("share", [0.0, 0.1, 0.35, 0.8])
def test_share_target_exact_minimal_and_held_out(share):
    s, c = _synthetic(4000)
    cal_s, held = s[:2000], s[2000:]
    price = float(np.median(c))
    lam, got = cal.lambda_for_share(cal_s, c, share, price)
    assert got <= share + 1e-12  # exact on the calibration prompts
    assert got == pytest.approx(cal.share_above(cal_s, c, lam, price))
    if lam > 0:  # minimal: a slightly smaller λ breaks the target
        assert cal.share_above(cal_s, c, lam * (1 - 1e-6), price) > share
    assert abs(cal.share_above(held, c, lam, price) - share) <= 0.03  # held-out, within tolerance
    # the chosen cost never increases with λ, so the share curve is non-increasing
    shares = [cal.share_above(cal_s, c, x, price) for x in np.linspace(0, 2 * lam + 0.1, 30)]
    assert all(a >= b for a, b in zip(shares, shares[1:]))


def test_budget_target_exact_and_held_out():
    s, c = _synthetic(4000, seed=1)
    full = cal.cost_per_1k(s[:2000], c, 0.0)
    floor = 1000 * c.min()
    for budget in (full * 1.1, 0.5 * (full + floor), floor * 1.2):
        lam, got = cal.lambda_for_budget(s[:2000], c, budget)
        assert got <= budget * (1 + 1e-9)
        if lam > 0:
            assert got >= 0.97 * budget or cal.cost_per_1k(s[:2000], c, lam * 0.999) > budget
        held = cal.cost_per_1k(s[2000:], c, lam)
        assert abs(held - budget) / budget <= 0.05 or lam == 0.0


def test_calibrate_with_a_mask_and_non_finite_scores():
    s, c = _synthetic(500, seed=2)
    s[0, 3] = -np.inf
    s[1, 2] = np.nan
    mask = np.ones_like(s, dtype=bool)
    mask[:, -1] = False  # the priciest model is never a candidate
    out = cal.calibrate(s, c, CalibrationTarget("share", max_share=0.2, price=float(c[4])), mask=mask)
    assert out.achieved["share_above_price"] <= 0.2 and out.n_prompts == 500 and out.cost_weight >= 0


@pytest.mark.parametrize(
    "target, field",
    [
        (dict(kind="share", max_share=1.5, price=1.0), "max_share"),
        (dict(kind="share", max_share=-0.1, price=1.0), "max_share"),
        (dict(kind="share", max_share=0.2), "price"),
        (dict(kind="share", max_share=0.2, price=float("nan")), "price"),
        (dict(kind="budget"), "budget_per_1k"),
        (dict(kind="budget", budget_per_1k=-3.0), "budget_per_1k"),
        (dict(kind="cheap"), "kind"),
    ],
)
def test_bad_targets_name_the_field(target, field):
    with pytest.raises(CalibrationError, match=field):
        CalibrationTarget.from_dict(target)


def test_impossible_targets_are_clear_errors():
    s, c = _synthetic(200)
    with pytest.raises(CalibrationError, match="field 'price'.*below every model's cost"):
        cal.lambda_for_share(s, c, 0.1, price=float(c.min()) / 2)
    with pytest.raises(CalibrationError, match="field 'budget_per_1k'.*cheapest"):
        cal.lambda_for_budget(s, c, budget_per_1k=1000 * float(c.min()) / 2)
    with pytest.raises(CalibrationError, match="shape"):
        cal.calibrate(s[:, :3], c, CalibrationTarget("budget", budget_per_1k=5000.0))
    with pytest.raises(CalibrationError, match="no prompts"):
        cal.lambda_for_share(s[:0], c, 0.1, 1.0)


def test_calibration_file_round_trip_and_malformed(tmp_path):
    p = tmp_path / "serve" / cal.CALIBRATION_FILE
    assert cal.read_calibration(p) is None
    c = cal.Calibration(cost_weight=0.25, target={"kind": "budget", "budget_per_1k": 3.0}, achieved={"cost_per_1k": 2.9}, source="t", n_prompts=7)
    cal.write_calibration(p, c)
    assert cal.read_calibration(p) == c
    assert [x.name for x in p.parent.iterdir()] == [cal.CALIBRATION_FILE]  # no temp file left behind
    p.write_text('{"cost_weight": -1}')
    with pytest.raises(CalibrationError, match="cost_weight"):
        cal.read_calibration(p)
    p.write_text("{not json")
    with pytest.raises(CalibrationError, match="invalid JSON"):
        cal.read_calibration(p)


def test_calibration_in_the_store_and_legacy_file_migrated_once(tmp_path, capsys):
    """``apply`` checks before it stores; an older install's calibration.json is moved into the
    store once; ``cmr calibrate --apply`` refuses a bad λ or store in one line, storing nothing."""
    from cmr.cli import main
    from cmr.published import open_published_store

    serve = tmp_path / "serve"
    old = cal.Calibration(cost_weight=0.75, source="old install")
    cal.write_calibration(serve / cal.CALIBRATION_FILE, old)
    store = open_published_store(None, serve / "published.sqlite")
    try:
        assert cal.applied(store) is None  # no legacy folder given: the file is not looked at
        assert cal.applied(store, serve) == old
        assert not (serve / cal.CALIBRATION_FILE).exists() and (serve / (cal.CALIBRATION_FILE + ".migrated")).exists()
        cal.write_calibration(serve / cal.CALIBRATION_FILE, cal.Calibration(cost_weight=9.0))  # once: the store wins now
        assert cal.applied(store, serve) == old
        for bad in (-1.0, float("nan"), float("inf")):
            with pytest.raises(CalibrationError, match="cost_weight"):
                cal.apply(store, cal.Calibration(cost_weight=bad))
        with pytest.raises(CalibrationError, match="calibration"):
            cal.apply(store, cal.Calibration(cost_weight=1.0, achieved={"x": float("nan")}))
        assert cal.applied(store) == old
        assert main(["calibrate", "--lambda", "-2", "--home", str(tmp_path), "--apply"]) == 2
        assert "cost_weight" in capsys.readouterr().err
        assert main(["calibrate", "--lambda", "2", "--home", str(tmp_path), "--apply", "--store", "mysql://x"]) == 2
        assert "--store" in capsys.readouterr().err
        assert cal.applied(store) == old
        assert main(["calibrate", "--lambda", "2", "--home", str(tmp_path), "--apply", "--store", "sqlite"]) == 0
        assert cal.applied(store).cost_weight == 2.0
    finally:
        store.close()


def test_real_routerbench_share_holds_on_held_out_prompts(outcomes_small, encoder):
    """knn fitted on half of a RouterBench train slice, λ calibrated on the other half, checked
    on the test prompts (never used to choose anything)."""
    from cmr.policies.registry import make_policy

    data = outcomes_small
    fit, calib = data.train.subset(np.arange(60)), data.train.subset(np.arange(60, 120))
    pol = make_policy("knn", encoder=encoder)
    pol.add_models(data.cards)
    pol.fit(fit, data.cards)
    costs = np.array([c.cost for c in data.cards])
    price = float(np.sort(costs)[len(costs) // 2])
    sc = cal.score_prompts(pol, calib.emb, data.cards)
    out = cal.calibrate(sc, costs, CalibrationTarget("share", max_share=0.3, price=price))
    assert out.achieved["share_above_price"] <= 0.3
    held = cal.share_above(cal.score_prompts(pol, data.test.emb, data.cards), costs, out.cost_weight, price)
    assert held <= 0.3 + 0.15  # 60 held-out prompts: a loose tolerance
    lam0 = cal.share_above(sc, costs, 0.0, price)
    assert lam0 > 0.3 or out.cost_weight == 0.0  # the target actually constrained something (or was already met)


def test_cli_bad_input_is_one_line(capsys):
    from cmr.cli import main

    for argv, msg in [
        (["calibrate", "--max-share", "0.2", "--data", "routerbench"], "--price"),
        (["calibrate", "--max-share", "2", "--price", "1", "--data", "routerbench"], "max_share"),
        (["calibrate", "--lambda", "-1"], "cost_weight"),
        (["calibrate", "--budget", "3", "--lambda", "1"], "exactly one"),
        (["calibrate", "--budget", "3"], "--logged or --data"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("cmr: error:") and msg in err[0], (argv, err)


@pytest.fixture(scope="module")
def mini_bench(tmp_path_factory, data_root):
    """A CMRBench-format folder: 2 experiences, 25 train / 10 test prompts, the hub cut to the
    models they name plus 20 others."""
    from tests.unit.bench_data import write_mini_cmrbench

    out = tmp_path_factory.mktemp("mini_bench_cal")
    write_mini_cmrbench(data_root / "cmrbench", out, n_train=25, n_test=10)
    return out


def test_router_uses_the_calibrated_lambda_from_logged_traffic(tmp_path, mini_bench, encoder, capsys):
    """Route logged traffic, calibrate on it with ``cmr calibrate --logged --apply``; the router
    re-reads the file: requests without a cost weight get that λ, an explicit one still wins,
    and ``status()`` (``/healthz``) names the λ and its source."""
    from cmr.cli import main
    from cmr.data.io import read_jsonl
    from cmr.types import ModelCard
    from services.config import AppArgs
    from services.routing import RouteRequest, RouterCore

    args = AppArgs(home=str(tmp_path), bench=str(mini_bench), tiny_models=False, profile_size=0, learner={"enabled": False})
    core = RouterCore(args, encoder)
    # CMRBench cards cost nothing: add priced copies of the hub's cards so λ has something to trade
    base = core.models()
    priced = [ModelCard(id=f"priced/{c.id}", family=c.family, domain=c.domain, description=c.description, cost=1.0 + i % 3)
              for i, c in enumerate(base[:15])]
    core.register(priced)
    prompts = [o["prompt"] for k in (1, 2) for split in ("train", "test") for _, o in read_jsonl(mini_bench / f"e{k}" / f"{split}.jsonl")]
    logged, held = prompts[:50], prompts[50:]
    assert core.status()["cost_weight"] == 0.0 and core.status()["calibration"] is None
    core.route([RouteRequest(query=q) for q in logged])  # recorded: the traffic to calibrate on
    price = 0.5
    cmd = ["calibrate", "--logged", "--home", str(tmp_path), "--max-share", "0.1", "--price", str(price), "--apply"]
    # 50 logged prompts are too few to trust: refused in one line, nothing written
    assert main(cmd) == 2
    err = capsys.readouterr().err
    assert "only 50 prompts (minimum 100" in err and "--force" in err and "95% interval" in err
    assert cal.applied(core.published) is None
    assert main(cmd + ["--force"]) == 0
    out = capsys.readouterr().out
    assert "λ = " in out and "applied: state store" in out and "held out: share above price" in out and "warning: only 50 prompts" in out
    lam = core.check_calibration()
    st = core.status()
    assert st["cost_weight"] == lam and st["calibration"]["source"].startswith("logged:") and st["calibration"]["n_prompts"] == 50
    assert st["calibration"]["achieved"]["share_above_price"] <= 0.1
    held_out = st["calibration"]["held_out"]
    assert held_out["n"] == 50 and 0 <= held_out["interval"][0] <= held_out["share_above_price"] <= held_out["interval"][1] <= 1
    costs = {c.id: c.cost for c in core.models()}
    dec = core.route([RouteRequest(query=q, record=False) for q in held])
    assert np.mean([costs[d.model] > price for d in dec]) <= 0.1 + 0.15
    # an explicit cost weight still wins over the calibrated default
    explicit = core.route([RouteRequest(query=q, lam=0.0, record=False) for q in held])
    assert [d.utility for d in explicit] == [d.score for d in explicit]
    # a manual λ, then a malformed stored value: the router keeps the last good λ
    assert main(["calibrate", "--lambda", "7.5", "--home", str(tmp_path), "--apply"]) == 0
    assert core.check_calibration() == 7.5 and core.status()["calibration"]["source"] == "manual"
    core.published.put_setting(cal.SETTING, {"cost_weight": -1})
    assert core.check_calibration() == 7.5
    core.close()


def test_wilson_interval_and_held_out_check():
    """The interval covers what few prompts cannot rule out; the held-out check routes each
    prompt with a λ fitted without it, so a target met exactly in-sample can miss held out."""
    assert cal.wilson_interval(0, 14)[0] == 0.0 and 0.2 < cal.wilson_interval(0, 14)[1] < 0.25
    lo, hi = cal.wilson_interval(500, 1000)
    assert 0.46 < lo < 0.5 < hi < 0.54
    rng = np.random.default_rng(0)
    s, c = rng.random((400, 6)), np.array([0.1, 0.2, 0.5, 1.0, 2.0, 3.0])
    target = CalibrationTarget("share", max_share=0.2, price=0.6)
    out = cal.calibrate(s, c, target)
    h = out.held_out
    assert h["n"] == 400 and h["interval"][0] <= h["share_above_price"] <= h["interval"][1]
    assert abs(h["share_above_price"] - 0.2) < 0.08  # held out it lands near the target, not exactly on it
    b = cal.calibrate(s, c, CalibrationTarget("budget", budget_per_1k=800.0)).held_out
    assert b["n"] == 400 and b["interval"][0] <= b["cost_per_1k"] <= b["interval"][1]
    assert cal.held_out_check(s[:1], c, target) == {}


def test_share_with_prompts_that_have_no_cheap_candidate():
    """With a candidate mask, a prompt may have no model under the price: it stays above it at any
    λ and counts against the share; only more such prompts than the share allows is an error."""
    s, c = _synthetic(1000, seed=3)
    price = float(c[3])
    mask = np.ones_like(s, dtype=bool)
    mask[:50, :4] = False  # 5% of prompts: only models above the price
    lam, got = cal.lambda_for_share(s, c, 0.2, price, mask=mask)
    assert 0.05 <= got <= 0.2
    with pytest.raises(CalibrationError, match="field 'max_share'.*50 of 1000 prompts"):
        cal.lambda_for_share(s, c, 0.03, price, mask=mask)
