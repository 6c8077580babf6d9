"""``cmr tune cmr``: Optuna + ASHA over the continual router's (carve) knobs.

Objective: the CMRBench continual protocol, trained on the train splits *minus* a validation
part carved out of each (seeded: one row of each model with two or more, up to
``--val-fraction``, so every validation target keeps a training row as every test target has;
a random part where models have one row each), scored on those validation parts — never on test. One Tune
iteration is one experience: after experience k the trial reports M/F/D-Acc averaged over the
validation sets 1..k, forgetting so far and cumulative training time, so ASHA can stop a bad
trial after its first experiences. At the last experience it also reports the objectives
(``obj_*``) Optuna optimises jointly: maximise D-Acc and M-Acc, minimise D forgetting and training
time. The Pareto front over those four is written as ``pareto.md`` / ``pareto.png``; the chosen
config (rule below) as ``chosen_config.json`` (a carve config: ``cmr bench cmr --config``,
``cmr train --config``) and ``chosen_serve.yaml`` (``cmr serve --config``: ``policy_config``).
Then the chosen config — and the served carve, for reference — is run once on the real protocol
(full train splits, test splits) and recorded separately (``pareto.md``, ``report.json``).

The search starts from what the router serves: the first trial is ``auto``'s carve (its domain vote
and its domain and family losses) on the served embedding (``--embedding``, default ``auto``: MiniLM
fused with TF-IDF fitted on the train prompts and cards where they are texts enough), and the
vote and both losses are swept with the other knobs. A knob fixed with ``--set`` is not swept.

Choice rule (validation only): among Pareto trials with D forgetting ≤ ``--max-forgetting``, the
highest mean of D-Acc and M-Acc (ties: less training time). That trial is the best of many on one
split, so unless it is the served carve it is run again beside the served carve on further split
seeds (``--check-splits``, 3 splits in all by default); where its mean of D- and M-Acc over the
splits is not above the served carve's, the served carve is the choice.

Carve's replay has no separate per-domain quota knob: the coreset gives each domain its share of
everything seen × ``replay`` (the budget), and ``replay_cap`` caps rows per model.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tune import common as tc

OBJECTIVES = ["obj_d_acc", "obj_m_acc", "obj_forgetting_d", "obj_train_s"]
MODES = ["max", "max", "min", "min"]
#: the carve knobs swept (CarveConfig fields)
KNOBS = ("replay", "replay_cap", "anchor", "anchor_dense", "temperature", "negatives", "n_hard", "n_domain", "n_random", "lr", "epochs",
         "domain_vote", "domain_loss", "family_loss")


def search_space(quick: bool, fixed: Any = ()) -> dict[str, Any]:
    """Carve's knobs as Tune distributions (converted for Optuna by ``OptunaSearch``), but those
    in ``fixed`` (set with ``--set``)."""
    from ray import tune

    space = {
        "replay": tune.uniform(0.0, 0.5),  # coreset budget, fraction of the data seen
        "replay_cap": tune.randint(1, 9),  # rows per model in the coreset
        "anchor": tune.loguniform(1e-2, 10.0),  # anchoring of model/domain embeddings
        "anchor_dense": tune.loguniform(1e-3, 3.0),  # anchoring of the projection
        "temperature": tune.loguniform(0.02, 0.2),
        "negatives": tune.choice(["full", "sampled"]),  # full softmax over the live hub, or a mix:
        "n_hard": tune.randint(4, 33),  # mined hard negatives
        "n_domain": tune.randint(0, 17),  # same-domain negatives
        "n_random": tune.randint(4, 33),  # random far negatives
        "lr": tune.loguniform(1e-4, 3e-3),
        "epochs": tune.randint(2, 8) if quick else tune.randint(2, 16),
        "domain_vote": tune.uniform(0.0, 0.6),  # a candidate's domain's summed probability in its score
        "domain_loss": tune.uniform(0.0, 4.0),  # training asks for the row's domain's mass
        "family_loss": tune.uniform(0.0, 2.0),  # ... and its family's
    }
    return {k: v for k, v in space.items() if k not in fixed}


def served() -> dict[str, Any]:
    """The carve options the router serves by default (``auto``'s carve candidate)."""
    from cmr.policies.auto import CANDIDATES

    return dict(CANDIDATES["carve"][1])


def default_point(fixed: Any = ()) -> dict[str, Any]:
    """The served carve's values of the swept knobs: the first trial, so the front is read against it."""
    from cmr.policies.carve import CarveConfig

    d = CarveConfig.from_dict(served()).to_dict()
    p = {k: d[k] for k in KNOBS if k not in fixed}
    if p.get("negatives") == "auto":
        p["negatives"] = "full"  # auto = full below 20,000 live models (CMRBench has 2,315)
    return p


def trial_metrics(summary: dict[str, Any], last: bool) -> dict[str, Any]:
    """What a trial reports to Tune after an experience (``cmr_protocol.evaluate``'s summary): the
    validation metrics so far and the objectives, NaN before the last experience (Tune wants every
    metric in every result)."""
    f, g = summary["final"], summary["forgetting"]
    out = {**{f"val_{m}_acc": f[f"{m}_acc"] for m in "mfd"}, **{f"val_forgetting_{m}": g[m] for m in "mfd"},
           "train_s": summary["train_s"], "experience": summary["experience"], **{k: float("nan") for k in OBJECTIVES}}
    if last:
        out.update(obj_d_acc=out["val_d_acc"], obj_m_acc=out["val_m_acc"], obj_forgetting_d=out["val_forgetting_d"], obj_train_s=out["train_s"])
    return out


def trial_payload(bench, encoder, base: dict[str, Any], fixed: Any, val_fraction: float, seed: int) -> dict[str, Any]:
    """What every trial gets: the validation split, the embeddings its texts need (no encoder
    in the trial), the fixed config ``base`` (validated here: a bad --set fails before Ray starts)."""
    from cmr.bench.cmr_protocol import validation_split
    from cmr.policies.carve import CarveConfig, CarvePolicy

    CarveConfig.from_dict(base)
    # one held-out row per model with two or more (up to the fraction), so every validation target
    # keeps a training row as every test target does; a split of models with one row each falls
    # back to a plain random part
    val = validation_split(bench, val_fraction, seed, per_model=True)
    per_model = all(len(e.test) for e in val.experiences)
    if not per_model:
        val = validation_split(bench, val_fraction, seed)
    rec = tc.RecordingEncoder(encoder)
    CarvePolicy(encoder=rec, config=CarveConfig.from_dict(base)).add_models(bench.cards)  # the card texts carve embeds
    return {"bench": val, "table": rec.table, "encoder_name": encoder.name, "dim": encoder.dim, "base": base,
            "fixed": sorted(fixed), "per_model": per_model}


def cmr_trial(config: dict[str, Any], payload: dict[str, Any]) -> None:
    """One Tune trial: a carve router with ``config`` through the validation protocol."""
    import ray.tune

    validate(payload, config, ray.tune.report)


def validate(payload: dict[str, Any], config: dict[str, Any], report) -> None:
    """Carve with ``payload``'s fixed config and ``config`` through the validation protocol;
    ``report(trial_metrics(...))`` after each experience."""
    from cmr.bench import cmr_protocol
    from cmr.policies.carve import CarveConfig, CarvePolicy

    enc = tc.PrecomputedEncoder(payload["table"], payload["encoder_name"], payload["dim"])
    cfg = CarveConfig.from_dict({**payload["base"], **config})
    bench = payload["bench"]
    last = bench.experiences[-1].k
    cmr_protocol.evaluate(bench, CarvePolicy(encoder=enc, config=cfg), on_experience=lambda s: report(trial_metrics(s, s["experience"] == last)))


def _is_served(row: dict[str, Any], fixed: Any) -> bool:
    return all(row["config"].get(k) == v for k, v in default_point(fixed).items())


def _measure(payload: dict[str, Any], config: dict[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """``keys`` of the last report of ``validate`` (in-process, no Tune)."""
    last: dict[str, Any] = {}
    validate(payload, config, last.update)
    return {k: last.get(k) for k in keys}


def _served_row(payload: dict[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """The served carve through the validation protocol in-process: a row like a trial's."""
    return {"trial": "served (re-run: stopped early in the sweep)", "config": default_point(payload["fixed"]),
            "iterations": len(payload["bench"].experiences), "error": None, **_measure(payload, {}, keys)}


def choose(rows: list[dict[str, Any]], max_forgetting: float) -> dict[str, Any] | None:
    """The chosen front row: forgetting within bound, best mean of D and M accuracy, then faster."""
    ok = [r for r in rows if r["obj_forgetting_d"] <= max_forgetting] or sorted(rows, key=lambda r: r["obj_forgetting_d"])[:1]
    return max(ok, key=lambda r: (_objective(r), -r["obj_train_s"])) if ok else None


def _objective(row: dict[str, Any]) -> float:
    return 0.5 * (row["obj_d_acc"] + row["obj_m_acc"])


def confirm(bench, encoder, payload: dict[str, Any], chosen: dict[str, Any], served_row: dict[str, Any], fixed: Any,
            val_fraction: float, seed: int, n_splits: int) -> dict[str, Any]:
    """The chosen trial against the served carve on ``n_splits`` validation splits: the sweep's own
    (seed ``seed``, rows given) and seeds ``seed + 1 ...``; ``holds`` when the chosen config's mean
    objective (mean of D- and M-Acc) over them is above the served carve's."""
    keys = ["obj_d_acc", "obj_m_acc", "obj_forgetting_d", "obj_train_s"]
    splits = [{"seed": seed, "chosen": {k: chosen[k] for k in keys}, "served": {k: served_row[k] for k in keys}}]
    for s in range(seed + 1, seed + n_splits):
        pl = trial_payload(bench, encoder, payload["base"], fixed, val_fraction, s)
        splits.append({"seed": s, "chosen": _measure(pl, chosen["config"], keys), "served": _measure(pl, {}, keys)})
    mean = {label: float(np.mean([_objective(x[label]) for x in splits])) for label in ("chosen", "served")}
    return {"splits": splits, "mean_objective": mean, "holds": mean["chosen"] > mean["served"]}


def sweep(bench, encoder, *, trials: int, quick: bool, storage: str | None, name: str | None, out: Path, seed: int = 0,
          val_fraction: float = 0.2, concurrent: int = 2, max_forgetting: float = 0.06, base: dict[str, Any] | None = None,
          test_eval: bool = True, address: str | None = None, num_cpus: int | None = None, check_splits: int = 3) -> dict[str, Any]:
    """Run the sweep on an embedded ``bench`` and write the outputs under ``out``; returns the summary."""
    from ray import tune

    from cmr.bench import common
    from cmr.encoders.lexical import embedding_of
    from cmr.policies.carve import CarveConfig
    from tune import pareto

    if trials < 1:
        raise tc.TuneError("--trials: must be >= 1")
    if check_splits < 1:
        raise tc.TuneError("--check-splits: must be >= 1")
    if not 0.0 < val_fraction < 1.0:
        raise tc.TuneError(f"--val-fraction {val_fraction}: must be in (0, 1)")
    t_start = time.perf_counter()
    fixed = set(base or {})
    payload = trial_payload(bench, encoder, {"seed": seed, **served(), **(base or {})}, fixed, val_fraction, seed)
    val, base, per_model = payload["bench"], payload["base"], payload["per_model"]
    storage = tc.storage_path(storage)
    name = name or f"cmr-carve-{common.utc_stamp()}"
    grid = tc.run_tuner(tune.with_parameters(cmr_trial, payload=payload), search_space(quick, fixed), objectives=OBJECTIVES, modes=MODES,
                        asha_metric="val_d_acc", asha_mode="max", max_t=len(val.experiences), trials=trials, concurrent=concurrent,
                        storage=storage, name=name, seed=seed, points=[default_point(fixed)], address=address, num_cpus=num_cpus)
    t_sweep = time.perf_counter() - t_start
    keys = ["val_m_acc", "val_f_acc", "val_d_acc", "val_forgetting_d", "train_s", *OBJECTIVES]
    rows = tc.trial_rows(grid, keys)
    done = [r for r in rows if r["obj_d_acc"] is not None]
    if not done and all(r["error"] for r in rows):
        raise tc.TuneError(f"every trial failed ({len(rows)} trials): " + "; ".join(r["error"] for r in rows))
    if not any(_is_served(r, fixed) for r in done):
        # ASHA may stop the served carve after an early experience: the front is read against
        # it, so it runs once more here, in-process, on the same validation split
        done.append(_served_row(payload, keys))
    vals = np.array([[r[k] for k in OBJECTIVES] for r in done], dtype=np.float64)
    front = [r for r, keep in zip(done, pareto.pareto_mask(vals, MODES)) if keep]
    chosen = choose(front, max_forgetting)
    default_row = next((r for r in done if _is_served(r, fixed)), None)
    check = None
    if check_splits > 1 and not _is_served(chosen, fixed):
        # the best of many trials on one split flatters itself: it must also beat the served carve
        # on the mean over further split seeds, or the served carve stays the choice
        check = confirm(bench, encoder, payload, chosen, default_row, fixed, val_fraction, seed, check_splits)
        if not check["holds"]:
            chosen = default_row
    chosen_cfg = CarveConfig.from_dict({**base, **chosen["config"]}).to_dict()
    summary: dict[str, Any] = {
        "sweep": "cmr", "policy": "carve", "dataset": bench.root.name, "trials": len(rows), "finished_all_experiences": sum(1 for r in rows if r["obj_d_acc"] is not None),
        "stopped_early": sum(1 for r in rows if r["obj_d_acc"] is None and r["error"] is None), "errors": sum(1 for r in rows if r["error"]),
        "objectives": dict(zip(OBJECTIVES, MODES)), "asha": {"metric": "val_d_acc", "mode": "max", "max_t": len(val.experiences), "grace_period": 1},
        "validation": {"fraction": val_fraction, "seed": seed, "per_model": per_model, "n_fit": [len(e.train) for e in val.experiences], "n_val": [len(e.test) for e in val.experiences]},
        "choice_rule": f"Pareto trials with D forgetting <= {max_forgetting}: highest (D-Acc + M-Acc)/2, then least train time"
                       + (f"; kept only if above the served carve's mean of it over {check_splits} validation splits" if check_splits > 1 else ""),
        "storage": storage, "name": name, "quick": quick, "search_space": {k: str(v) for k, v in search_space(quick, fixed).items()},
        "embedding": embedding_of(encoder),
        "front": front, "chosen": chosen, "check": check, "chosen_config": chosen_cfg, "default_trial": default_row, "all": rows,
        "sweep_wall_s": t_sweep,
    }
    out.mkdir(parents=True, exist_ok=True)
    common.write_json(out / "chosen_config.json", chosen_cfg)
    import yaml

    common.write_text(out / "chosen_serve.yaml", "# cmr serve --config FILE: the served router uses the tuned carve config\n"
                      + yaml.safe_dump({"policy": "carve", "embedding": embedding_of(encoder), "policy_config": chosen_cfg}, sort_keys=False))
    if test_eval:
        summary["test"] = evaluate_on_test(bench, encoder, {"chosen": chosen_cfg, "served": CarveConfig.from_dict(base).to_dict()})
    summary.update(common.run_info())
    summary["wall_s"] = time.perf_counter() - t_start
    common.write_json(out / "report.json", summary)
    common.write_text(out / "pareto.md", _markdown(summary))
    fig = pareto.scatter([r["obj_forgetting_d"] for r in done], [r["obj_d_acc"] for r in done], [r["obj_forgetting_d"] for r in front],
                         [r["obj_d_acc"] for r in front], (chosen["obj_forgetting_d"], chosen["obj_d_acc"]),
                         "D forgetting (validation, lower is better)", "D-Acc (validation, after the last experience)",
                         f"cmr tune cmr: carve on {bench.root.name} (colour: train s)", color=[r["obj_train_s"] for r in done], clabel="train s",
                         total=len(rows), not_completed={"stopped early": summary["stopped_early"], "errored": summary["errors"]})
    common.write_figure(out / "pareto.png", fig)
    return summary


def evaluate_on_test(bench, encoder, configs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Each config once through the real protocol (full train splits, test splits): reported,
    never used to choose."""
    from cmr.bench import cmr_protocol
    from cmr.policies.carve import CarveConfig, CarvePolicy

    res = {}
    for label, cfg in configs.items():
        r = cmr_protocol.evaluate(bench, CarvePolicy(encoder=encoder, config=CarveConfig.from_dict(cfg)))
        res[label] = {"final": r["final"], "forgetting": r["forgetting"], "train_s": r["timings"]["train_total_s"], "matrix_d": r["matrix"]["d"]}
    return res


def _markdown(s: dict[str, Any]) -> str:
    from tune.pareto import markdown_table

    def flat(r):
        return {**{k: r.get(k) for k in ("trial", *OBJECTIVES)}, **{k: r["config"].get(k) for k in KNOBS}}

    cols = [("trial", "trial"), ("obj_d_acc", "D-Acc"), ("obj_m_acc", "M-Acc"), ("obj_forgetting_d", "forgetting D"), ("obj_train_s", "train s")]
    cols += [(k, k) for k in KNOBS]
    front = sorted(s["front"], key=lambda r: -r["obj_d_acc"])
    lines = [
        f"# cmr tune cmr — carve on {s['dataset']}",
        "",
        f"{s['trials']} trials (Optuna TPE, multi-objective; ASHA on validation D-Acc per experience): {s['finished_all_experiences']} ran every "
        f"experience, {s['stopped_early']} stopped early by ASHA, {s['errors']} failed. Sweep wall time {s['sweep_wall_s']:.0f} s; "
        f"{s['date']}, {s['machine']['cpus']} CPU(s), commit {s['git_commit'] or '—'}. Tune storage: `{s['storage']}/{s['name']}`.",
        "",
        (f"Validation: one row of each model with two or more, up to {100 * s['validation']['fraction']:.0f}% of each train split"
         if s["validation"].get("per_model") else f"Validation: {100 * s['validation']['fraction']:.0f}% of each train split")
        + f" (seed {s['validation']['seed']}); the routers train on the rest. "
        "Objectives: D-Acc and M-Acc (max), D forgetting and train seconds (min), after the last experience.",
        "",
        f"## Pareto front (validation) — {len(front)} of {s['finished_all_experiences']} trials",
        "",
        *markdown_table([flat(r) for r in front], cols),
        "",
        f"Choice: {s['choice_rule']} → trial `{s['chosen']['trial']}`" + (" (the served carve)" if s["default_trial"] and s["chosen"]["trial"] == s["default_trial"]["trial"] else "") + ".",
    ]
    if s.get("check"):
        c = s["check"]
        lines += ["", f"Checked against the served carve on validation split seeds {', '.join(str(x['seed']) for x in c['splits'])}: "
                  "(D-Acc + M-Acc)/2 " + "; ".join(f"seed {x['seed']} {_objective(x['chosen']):.3f} vs {_objective(x['served']):.3f}" for x in c["splits"])
                  + f"; mean {c['mean_objective']['chosen']:.3f} vs {c['mean_objective']['served']:.3f}: "
                  + ("the front's best holds." if c["holds"] else "it does not hold, so the served carve is the choice.")]
    if s["default_trial"]:
        lines += ["", f"The served carve (trial `{s['default_trial']['trial']}`) on the same validation split: " + ", ".join(
            f"{h} {s['default_trial'][k]:.3f}" for k, h in cols[1:5])]
    if "test" in s:
        lines += ["", "## Test splits — evaluated once after the choice (not used to choose)", "",
                  "| config | M-Acc | F-Acc | D-Acc | forgetting M | forgetting D | train s |", "|---|---|---|---|---|---|---|"]
        for label, r in s["test"].items():
            f, g = r["final"], r["forgetting"]
            lines.append(f"| {label} | {f['m_acc']:.3f} | {f['f_acc']:.3f} | {f['d_acc']:.3f} | {g['m']:.3f} | {g['d']:.3f} | {r['train_s']:.1f} |")
    lines += ["", "Files: `chosen_config.json` (`cmr bench cmr --policy carve --config`, `cmr train --config`), "
              "`chosen_serve.yaml` (`cmr serve --config`), `pareto.png`, `report.json` (every trial)."]
    return "\n".join(lines) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from cmr.encoders.lexical import EMBEDDINGS
    from tune.cli import add_sweep_arguments

    add_sweep_arguments(p)
    p.add_argument("--data", default=None, help="CMRBench folder (default: $CMR_DATA/cmrbench)")
    p.add_argument("--max-forgetting", type=float, default=0.06, help="choice rule: D forgetting bound on the front (default 0.06)")
    p.add_argument("--no-test", action="store_true", help="skip the one test-split evaluation of the chosen config")
    p.add_argument("--check-splits", type=int, default=3,
                   help="validation splits (the sweep's and further seeds) on which the front's best must beat the served carve's "
                        "mean of D- and M-Acc to be chosen; 1 = the sweep's split only (default 3)")
    p.add_argument("--embedding", choices=EMBEDDINGS, default="auto",
                   help="what texts are embedded with (default auto: what the router serves; fitted on the train prompts and cards)")


def run(args: argparse.Namespace) -> int:
    from cmr.bench import common
    from cmr.data.cmrbench import load_cmrbench
    from tune.cli import out_dir, sets

    root = common.resolve_cmrbench_dir(args.data)
    bench = load_cmrbench(root)
    base = sets(args)
    trials = args.trials or (6 if args.quick else 40)
    encoder = common.fitted_encoder(args, [t for e in bench.experiences for t in e.train.texts], bench.cards)
    common.embed(encoder, [p for e in bench.experiences for p in (e.train, e.test)])
    storage = tc.storage_path(args.storage)
    name = args.name or f"cmr-carve-{common.utc_stamp()}"
    out = out_dir(args.out, storage, name)
    s = sweep(bench, encoder, trials=trials, quick=args.quick, storage=storage, name=name, out=out, seed=args.seed,
              val_fraction=args.val_fraction, concurrent=args.concurrent, max_forgetting=args.max_forgetting, base=base,
              test_eval=not args.no_test, address=args.address, num_cpus=args.num_cpus, check_splits=args.check_splits)
    c = s["chosen"]
    print(f"cmr tune cmr: {s['trials']} trials ({s['finished_all_experiences']} complete, {s['stopped_early']} stopped by ASHA), "
          f"front {len(s['front'])}; chosen {c['trial']}: val D-Acc {c['obj_d_acc']:.3f} M-Acc {c['obj_m_acc']:.3f} "
          f"forgetting D {c['obj_forgetting_d']:.3f} train {c['obj_train_s']:.1f}s; wall {s['wall_s']:.0f}s")
    if "test" in s:
        for label, r in s["test"].items():
            f = r["final"]
            print(f"  test ({label}, evaluated once after the choice): M-Acc {f['m_acc']:.3f} F-Acc {f['f_acc']:.3f} D-Acc {f['d_acc']:.3f} forgetting D {r['forgetting']['d']:.3f}")
    print(f"outputs: {out} (pareto.md, pareto.png, chosen_config.json, chosen_serve.yaml, report.json)")
    return 0
