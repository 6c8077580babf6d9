"""``cmr tune llm``: Optuna over the serving cost trade-off (λ, or a calibration target) on an
outcome matrix.

The policy (``--policy``, default ``auto``: what the router serves) is fitted once on the train prompts minus two seeded
held-out parts of train: a *calibration* part and a *validation* part (never test). A trial is
either a fixed λ (``mode=lambda``) or a calibration target (``mode=share``: at most
``max_share`` of requests to models priced above ``--price``, λ computed by
``cmr.calibrate`` on the calibration part). It reports the realised validation quality and cost
(recorded outcomes and costs of the chosen models) and the share above the price. Objectives:
maximise quality, minimise cost; the policy's validation AIQ (its whole λ curve) is recorded
beside them. Each trial is one evaluation, so there is nothing for ASHA to stop early here.

Choice (validation only): the cheapest Pareto point whose quality is within ``--quality-tolerance``
of the front's best. Written as ``chosen_lambda.json`` in the calibration-file format, which
``cmr calibrate --from-file FILE --apply`` puts on the running router. Then that λ is evaluated
once on the test prompts and recorded separately.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from tune import common as tc

OBJECTIVES = ["val_quality", "val_cost"]
MODES = ["max", "min"]


def _realised(pred, truth, true_costs, card_costs, lam: float) -> tuple[float, float]:
    """(mean realised cost, mean realised quality) at ``lam``, as ``cmr bench llm`` measures them."""
    from cmr.bench import metrics

    row = metrics.sweep(pred, truth, true_costs, card_costs, [lam])[0]
    return float(row[1]), float(row[2])


def trial_lambda(config: dict[str, Any], p: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """The trial's λ: fixed, or calibrated to its share target on the calibration part."""
    from cmr import calibrate as cal

    if config["mode"] == "lambda":
        return float(10 ** config["log_lam"]), None
    t = cal.CalibrationTarget("share", max_share=float(config["max_share"]), price=p["price"])
    c = cal.calibrate(p["calib_pred"], p["card_costs"], t, mask=p["calib_known"], source="tune")
    return c.cost_weight, t.to_dict()


def llm_trial(config: dict[str, Any], payload: dict[str, Any]) -> None:
    """One Tune trial: one λ (or one calibration target) on the validation prompts."""
    import ray.tune

    from cmr import calibrate as cal

    p = payload
    try:
        lam, target = trial_lambda(config, p)
    except cal.CalibrationError as e:  # an unreachable share target is a result, not a crash
        nan = float("nan")
        ray.tune.report({"val_quality": nan, "val_cost": nan, "lam": nan, "val_share_above_price": nan,
                         "target_share": float(config["max_share"]), "infeasible": str(e)})
        return
    cost, quality = _realised(p["val_pred"], p["val_scores"], p["val_costs"], p["card_costs"], lam)
    known = ~np.isnan(p["val_scores"])
    share = cal.share_above(p["val_pred"], p["card_costs"], lam, p["price"], mask=known)
    ray.tune.report({"val_quality": quality, "val_cost": cost, "lam": lam, "val_share_above_price": share,
                     "target_share": float("nan") if target is None else target["max_share"]})


def sweep(data, encoder, *, policy: str = "knn", policy_config: dict[str, Any] | None = None, trials: int, storage: str | None,
          name: str | None, out: Path, seed: int = 0, val_fraction: float = 0.2, concurrent: int = 2, price: float | None = None,
          quality_tolerance: float = 0.01, test_eval: bool = True, address: str | None = None, num_cpus: int | None = None) -> dict[str, Any]:
    """Run the λ sweep on embedded outcome data and write the outputs under ``out``."""
    from ray import tune

    from cmr import calibrate as cal
    from cmr.bench import common, metrics
    from cmr.policies.registry import make_policy
    from tune import pareto

    if trials < 1:
        raise tc.TuneError("--trials: must be >= 1")
    if not 0.0 < val_fraction < 0.5:
        raise tc.TuneError(f"--val-fraction {val_fraction}: must be in (0, 0.5) (a calibration part of the same size is held out too)")
    t_start = time.perf_counter()
    n = len(data.train)
    n_val = max(1, int(round(val_fraction * n)))
    if n - 2 * n_val < 1:
        raise tc.TuneError(f"--val-fraction {val_fraction}: leaves no prompts to fit on ({n} train prompts)")
    perm = np.random.default_rng(seed).permutation(n)
    val, calib, fit = (data.train.subset(np.sort(perm[:n_val])), data.train.subset(np.sort(perm[n_val : 2 * n_val])),
                       data.train.subset(np.sort(perm[2 * n_val :])))
    try:
        pol = make_policy(policy, encoder=encoder, config=policy_config or None)
    except (TypeError, ValueError) as e:
        raise tc.TuneError(f"--set for policy {policy!r}: {e}") from None
    cards = data.cards
    pol.add_models(cards)
    t0 = time.perf_counter()
    from cmr.continual.learner import Learner

    Learner(pol).fit(fit, cards)
    fit_s = time.perf_counter() - t0
    card_costs = np.array([c.cost for c in cards], dtype=np.float64)
    if np.ptp(card_costs) == 0:
        raise tc.TuneError(f"--data {data.name}: every model costs the same; there is no cost trade-off to tune")
    if price is None:
        price = float(np.median(card_costs))
    if not math.isfinite(price) or price < card_costs.min():
        raise tc.TuneError(f"--price {price}: must be at least the cheapest model's cost ({card_costs.min():g})")

    def scores(part):
        return common.check_scores(pol.score(part.emb, cards), len(part), len(cards), policy).astype(np.float64)

    val_pred, calib_pred = scores(val), scores(calib)
    spread = float(np.ptp(val_pred[np.isfinite(val_pred)]))
    grid = metrics.lambda_grid(card_costs, spread, 80)
    lo, hi = float(grid[1]), float(grid[-1])
    payload = {"val_pred": val_pred, "val_scores": val.scores, "val_costs": val.costs, "card_costs": card_costs, "price": price,
               "calib_pred": calib_pred, "calib_known": ~np.isnan(calib.scores)}
    # the policy's whole validation curve: its AIQ, and the background of the plot
    curve = metrics.sweep(val_pred, val.scores, val.costs, card_costs, grid)
    singles = metrics.single_models(val.scores, val.costs, val.model_ids)
    sc = np.array([s["cost"] for s in singles])
    val_aiq = metrics.aiq(curve[:, 1], curve[:, 2], float(sc.min()), float(sc.max()))
    space = {"mode": tune.choice(["lambda", "share"]), "log_lam": tune.uniform(math.log10(lo), math.log10(hi)), "max_share": tune.uniform(0.0, 1.0)}
    points = [{"mode": "lambda", "log_lam": math.log10(lo), "max_share": 0.5}, {"mode": "share", "log_lam": math.log10(lo), "max_share": 0.2}]
    storage = tc.storage_path(storage)
    name = name or f"llm-{data.name}-{common.utc_stamp()}"
    res = tc.run_tuner(tune.with_parameters(llm_trial, payload=payload), space, objectives=OBJECTIVES, modes=MODES, asha_metric=None,
                       asha_mode="max", max_t=1, trials=trials, concurrent=concurrent, storage=storage, name=name, seed=seed,
                       points=points[: max(1, min(2, trials))], cpus_per_trial=0.5, address=address, num_cpus=num_cpus)
    t_sweep = time.perf_counter() - t_start
    rows = tc.trial_rows(res, ["val_quality", "val_cost", "lam", "val_share_above_price", "target_share"])
    done = [r for r in rows if r["val_quality"] is not None]
    if not done:
        raise tc.TuneError(f"no trial finished ({len(rows)} trials): " + "; ".join(r["error"] or "?" for r in rows))
    vals = np.array([[r["val_quality"], r["val_cost"]] for r in done])
    front = sorted([r for r, k in zip(done, pareto.pareto_mask(vals, MODES)) if k], key=lambda r: r["val_cost"])
    best_q = max(r["val_quality"] for r in front)
    chosen = min((r for r in front if r["val_quality"] >= best_q - quality_tolerance), key=lambda r: r["val_cost"])
    target = None if chosen["target_share"] is None else {"kind": "share", "max_share": chosen["target_share"], "price": price}
    calib_file = cal.Calibration(cost_weight=float(chosen["lam"]), target=target,
                                 achieved={"val_quality": chosen["val_quality"], "val_cost": chosen["val_cost"],
                                           "val_share_above_price": chosen["val_share_above_price"]},
                                 source=f"cmr tune llm ({data.name}, policy {policy}, trial {chosen['trial']})", n_prompts=len(val))
    summary: dict[str, Any] = {
        "sweep": "llm", "policy": policy, "policy_config": pol.config.to_dict(),
        "policy_choice": pol.describe().get("chosen") if hasattr(pol, "describe") else None, "dataset": data.name, "trials": len(rows), "finished": len(done),
        "errors": sum(1 for r in rows if r["error"]), "infeasible_targets": len(rows) - len(done) - sum(1 for r in rows if r["error"]), "objectives": dict(zip(OBJECTIVES, MODES)), "price": price,
        "split": {"seed": seed, "n_fit": len(fit), "n_calibration": len(calib), "n_validation": len(val)},
        "val_aiq": val_aiq, "lambda_range": [lo, hi], "fit_s": fit_s,
        "choice_rule": f"cheapest Pareto point with validation quality >= best front quality - {quality_tolerance}",
        "storage": storage, "name": name, "front": front, "chosen": chosen, "chosen_lambda": calib_file.to_dict(), "all": rows, "sweep_wall_s": t_sweep,
        "best_single_val": metrics.best_single(singles),
    }
    out.mkdir(parents=True, exist_ok=True)
    cal.write_calibration(out / "chosen_lambda.json", calib_file)
    if test_eval:
        te = data.test
        tp = scores(te)
        c_t, q_t = _realised(tp, te.scores, te.costs, card_costs, float(chosen["lam"]))
        c0, q0 = _realised(tp, te.scores, te.costs, card_costs, 0.0)
        tsingles = metrics.single_models(te.scores, te.costs, te.model_ids)
        summary["test"] = {"lam": float(chosen["lam"]), "quality": q_t, "cost": c_t, "quality_at_lambda0": q0, "cost_at_lambda0": c0,
                           "share_above_price": cal.share_above(tp, card_costs, float(chosen["lam"]), price, mask=~np.isnan(te.scores)),
                           "best_single": metrics.best_single(tsingles), "n_test": len(te)}
    summary.update(common.run_info())
    summary["wall_s"] = time.perf_counter() - t_start
    common.write_json(out / "report.json", summary)
    common.write_text(out / "pareto.md", _markdown(summary))
    fig = pareto.scatter([r["val_cost"] for r in done], [r["val_quality"] for r in done], [r["val_cost"] for r in front],
                         [r["val_quality"] for r in front], (chosen["val_cost"], chosen["val_quality"]), "mean cost per request (validation)",
                         "mean quality (validation)", f"cmr tune llm: {policy} on {data.name}",
                         color=[math.log10(max(r["lam"], 1e-12)) for r in done], clabel="log10 λ", total=len(rows),
                         not_completed={"with an infeasible target": summary["infeasible_targets"], "errored": summary["errors"]})
    ax = fig.axes[0]
    ax.plot(curve[:, 1], curve[:, 2], "-", color="0.75", lw=1, zorder=0, label=f"{policy} λ curve (val AIQ {val_aiq:.3f})")
    ax.legend(loc="best", fontsize=8)
    common.write_figure(out / "pareto.png", fig)
    return summary


def _markdown(s: dict[str, Any]) -> str:
    from tune.pareto import markdown_table

    cols = [("trial", "trial"), ("mode", "mode"), ("target_share", f"target share above {s['price']:.3g}"), ("lam", "λ"),
            ("val_quality", "quality"), ("val_cost", "cost"), ("val_share_above_price", "share above price")]
    rows = [{**r, "mode": r["config"].get("mode")} for r in s["front"]]
    b = s["best_single_val"]
    lines = [
        f"# cmr tune llm — {s['policy']}" + (f" (chose {s['policy_choice']})" if s.get("policy_choice") else "") + f" on {s['dataset']}",
        "",
        f"{s['trials']} trials (Optuna TPE, objectives: validation quality max, cost min; {s['infeasible_targets']} share targets unreachable, "
        f"{s['errors']} failed). Sweep wall time "
        f"{s['sweep_wall_s']:.0f} s; {s['date']}, {s['machine']['cpus']} CPU(s), commit {s['git_commit'] or '—'}. "
        f"Tune storage: `{s['storage']}/{s['name']}`.",
        "",
        f"Split of the train prompts (seed {s['split']['seed']}): {s['split']['n_fit']} fit the policy, {s['split']['n_calibration']} calibrate "
        f"share targets, {s['split']['n_validation']} validate. The policy's validation AIQ (whole λ curve): {s['val_aiq']:.3f}; "
        f"best single model on validation: {b['model']} (quality {b['quality']:.3f}, cost {b['cost']:.3g}).",
        "",
        f"## Pareto front (validation) — {len(s['front'])} of {s['finished']} trials, by cost",
        "",
        *markdown_table(rows, cols, nd=4),
        "",
        f"Choice: {s['choice_rule']} → trial `{s['chosen']['trial']}`, λ = {s['chosen']['lam']:.4g} → `chosen_lambda.json` "
        "(apply with `cmr calibrate --from-file chosen_lambda.json --apply`).",
    ]
    if "test" in s:
        t = s["test"]
        lines += ["", "## Test prompts — evaluated once after the choice (not used to choose)", "",
                  "| λ | quality | cost | share above price | quality at λ=0 | cost at λ=0 | best single (quality, cost) |", "|---|---|---|---|---|---|---|",
                  f"| {t['lam']:.4g} | {t['quality']:.4f} | {t['cost']:.4g} | {t['share_above_price']:.3f} | {t['quality_at_lambda0']:.4f} | "
                  f"{t['cost_at_lambda0']:.4g} | {t['best_single']['model']} ({t['best_single']['quality']:.4f}, {t['best_single']['cost']:.4g}) |"]
    return "\n".join(lines) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from tune.cli import add_sweep_arguments

    add_sweep_arguments(p)
    p.add_argument("--data", required=True, help="outcome-matrix folder or set name (e.g. routerbench)")
    p.add_argument("--policy", default="auto", help="routing policy fitted once (default auto, what the router serves)")
    p.add_argument("--price", type=float, default=None, help="price line of the share targets (default: the median model cost)")
    p.add_argument("--quality-tolerance", type=float, default=0.01, help="choice rule: quality given up for a cheaper point (default 0.01)")
    p.add_argument("--no-test", action="store_true", help="skip the one test evaluation of the chosen λ")


def run(args: argparse.Namespace) -> int:
    from cmr.bench import common
    from cmr.data.outcomes import load_outcomes
    from cmr.encoders import default_encoder
    from cmr.policies import policy_class
    from tune.cli import out_dir, sets

    root = common.resolve_outcome_dir(args.data)
    policy_class(args.policy)  # an unknown name fails before loading anything
    data = load_outcomes(root)
    encoder = default_encoder()
    common.embed(encoder, [data.train, data.test])
    trials = args.trials or (16 if args.quick else 60)
    storage = tc.storage_path(args.storage)
    name = args.name or f"llm-{data.name}-{common.utc_stamp()}"
    out = out_dir(args.out, storage, name)
    s = sweep(data, encoder, policy=args.policy, policy_config=sets(args), trials=trials, storage=storage, name=name, out=out, seed=args.seed,
              val_fraction=args.val_fraction, concurrent=args.concurrent, price=args.price, quality_tolerance=args.quality_tolerance,
              test_eval=not args.no_test, address=args.address, num_cpus=args.num_cpus)
    c = s["chosen"]
    print(f"cmr tune llm: {s['trials']} trials, front {len(s['front'])}; chosen λ = {c['lam']:.4g}: val quality {c['val_quality']:.4f} "
          f"cost {c['val_cost']:.4g} (policy val AIQ {s['val_aiq']:.3f}); wall {s['wall_s']:.0f}s")
    if "test" in s:
        t = s["test"]
        print(f"  test (evaluated once after the choice): quality {t['quality']:.4f} cost {t['cost']:.4g} (λ=0: {t['quality_at_lambda0']:.4f}, {t['cost_at_lambda0']:.4g})")
    print(f"outputs: {out} (pareto.md, pareto.png, chosen_lambda.json, report.json)")
    return 0
