"""LLM routing on an outcome matrix: quality–cost curve over a λ sweep, AIQ, QNC, oracle.

Fit on the train prompts, report on the test prompts. Per λ, each test prompt goes to
``cmr.decide.choose(scores, card_costs, λ)`` among the models whose outcome on it is known;
the realised quality and cost are the recorded ones. With ``--unseen FRACTION`` (UniRoute's
protocol) that fraction of the models is hidden during training and joins afterwards through
its answers to a small labelled set of profile prompts held out of the training split.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Any

from cmr.bench import common


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``cmr bench llm``."""
    common.add_common_arguments(parser)
    common.add_embedding_argument(parser)
    parser.add_argument("--unseen", type=float, default=0.0, metavar="FRACTION", help="fraction of models hidden at training time (0 = none)")
    parser.add_argument("--profile-size", type=int, default=None, metavar="N", help="profile prompts held out of train for --unseen (default: 10%% of train)")
    parser.add_argument("--lambdas", type=int, default=80, metavar="N", help="points of the λ sweep (0 plus N-1 log-spaced values)")


def _profiles(data, cols) -> list[dict[str, float]]:
    """Per model column: {profile prompt id: score} over the known pairs of ``data``."""
    import numpy as np

    ids = data.meta["id"]
    out = []
    for j in cols:
        known = np.flatnonzero(~np.isnan(data.scores[:, j]))
        out.append({ids[i]: float(data.scores[i, j]) for i in known})
    return out


def train_policy(policy, data, unseen: float, profile_size: int | None, seed: int) -> dict[str, Any]:
    """Train ``policy`` on ``data.train`` (all models, or the seen ones plus profiles); returns
    what the report records about the split. ``data.cards`` are replaced by the cards the
    policy was given (with profiles under ``--unseen``)."""
    import numpy as np

    from cmr.continual.learner import Learner

    cards = data.cards
    if unseen <= 0:
        policy.add_models(cards)
        Learner(policy).fit(data.train, cards)
        return {}
    m = len(cards)
    n_hide = int(round(unseen * m))
    if not 1 <= n_hide <= m - 1:
        raise common.BenchConfigError(f"--unseen {unseen}: hides {n_hide} of {m} models; must leave at least one seen and hide at least one")
    rng = np.random.default_rng(seed)
    hidden = np.sort(rng.choice(m, n_hide, replace=False))
    seen = np.setdiff1d(np.arange(m), hidden)
    n_train = len(data.train)
    n_prof = profile_size if profile_size is not None else max(1, int(round(0.1 * n_train)))
    if not 1 <= n_prof < n_train:
        raise common.BenchConfigError(f"--profile-size {n_prof}: must be in [1, {n_train - 1}] (train prompts)")
    perm = rng.permutation(n_train)
    prof, rest = data.train.subset(perm[:n_prof]), data.train.subset(perm[n_prof:])
    # every card carries its profile answers (seen ones too, so a policy that learns from
    # profiles has training examples); the policy learns the profile prompts before the models
    prof_of = _profiles(prof, range(m))
    cards = [dataclasses.replace(c, profile=prof_of[j]) for j, c in enumerate(cards)]
    seen_cards = [cards[j] for j in seen]
    policy.set_profile_prompts(prof.meta["id"], prof.emb, prof.meta.get("task"))
    policy.add_models(seen_cards)
    Learner(policy).fit(rest.select_models([c.id for c in seen_cards]), seen_cards)
    policy.add_models([cards[j] for j in hidden])
    data.cards = cards
    return {
        "unseen_models": [cards[j].id for j in hidden],
        "seen_models": [cards[j].id for j in seen],
        "n_profile_prompts": n_prof,
        "n_train_fit": len(rest),
    }


def evaluate(policy, data, n_lambdas: int = 80) -> dict[str, Any]:
    """Score the test prompts, sweep λ and compute every curve metric (see ``cmr.bench.metrics``)."""
    import numpy as np

    from cmr.bench import metrics

    test, cards = data.test, data.cards
    common.reveal_if_needed(policy, test)
    pred = common.check_scores(policy.score(test.emb, cards, tasks=test.meta.get("task")), len(test), len(cards), policy.name).astype(np.float64)
    card_costs = np.array([c.cost for c in cards], dtype=np.float64)
    finite = pred[np.isfinite(pred)]
    spread = float(finite.max() - finite.min()) if finite.size else 1.0
    lams = metrics.lambda_grid(card_costs, spread, n_lambdas)
    curve = metrics.sweep(pred, test.scores, test.costs, card_costs, lams)
    singles = metrics.single_models(test.scores, test.costs, test.model_ids)
    sc = np.array([s["cost"] for s in singles])
    sq = np.array([s["quality"] for s in singles])
    c_min, c_max = float(sc.min()), float(sc.max())
    equal_cost = not data.has_cost or np.ptp(card_costs) == 0
    if equal_cost:
        c_max = c_min  # the curve is one point: AIQ is its quality
    best = metrics.best_single(singles)
    o_cost, o_q = metrics.oracle_point(test.scores, test.costs)
    truth = np.nan_to_num(test.scores.astype(np.float64), nan=0.0)
    o_curve = metrics.sweep(truth, test.scores, test.costs, card_costs, metrics.lambda_grid(card_costs, 1.0, n_lambdas))
    hull = metrics.pareto_hull(curve[:, 1], curve[:, 2])
    res: dict[str, Any] = {
        "aiq": metrics.aiq(curve[:, 1], curve[:, 2], c_min, c_max),
        "zero_router_aiq": metrics.aiq(sc, sq, c_min, c_max),
        "oracle_aiq": metrics.aiq([o_cost], [o_q], c_min, c_max),
        "oracle_sweep_aiq": metrics.aiq(o_curve[:, 1], o_curve[:, 2], c_min, c_max),
        "oracle": {"quality": o_q, "cost": o_cost},
        "best_single": best,
        "max_quality": float(curve[:, 2].max()),
        "quality_at_lambda0": float(curve[0, 2]),
        "cost_at_lambda0": float(curve[0, 1]),
        "qnc": None if equal_cost or best["cost"] <= 0 else metrics.qnc(curve[:, 1], curve[:, 2], best["quality"], best["cost"]),
        "equal_cost": bool(equal_cost),
        "cost_range": [c_min, c_max],
        "curve": [{"lambda": float(l), "cost": float(c), "quality": float(q)} for l, c, q in curve],
        "hull": [{"cost": float(c), "quality": float(q)} for c, q in hull],
        "single_models": singles,
        "n_test": len(test),
        "n_models": len(cards),
    }
    res["_plot"] = (curve, hull, singles, o_curve, (o_cost, o_q))
    return res


def _markdown(rep: dict[str, Any]) -> str:
    b = rep["best_single"]
    lines = [
        f"# cmr bench llm — {rep['policy']} on {rep['dataset']}" + (f" (unseen {rep['unseen']})" if rep["unseen"] else ""),
        "",
        f"seed {rep['seed']}, {rep['n_test']} test prompts, {rep['n_models']} models, {rep['date']}, "
        f"{rep['machine']['cpus']} CPU(s), commit {rep['git_commit'] or '—'}; train {rep['timings']['train_s']:.1f} s, "
        f"card encoding {rep['timings']['encode_s']:.1f} s",
        "",
    ]
    if rep["equal_cost"]:
        lines += [
            "Every model costs the same here (no cost recorded): the curve is one point and AIQ is the routed quality.",
            "",
            "| policy | routed quality | best single (model) | oracle quality |",
            "|---|---|---|---|",
            f"| {rep['policy']} | {common.fmt(rep['aiq'])} | {common.fmt(b['quality'])} ({b['model']}) | {common.fmt(rep['oracle']['quality'])} |",
        ]
    else:
        lines += [
            "| policy | AIQ | zero router AIQ | oracle AIQ | max quality | best single (model, cost) | QNC |",
            "|---|---|---|---|---|---|---|",
            f"| {rep['policy']} | {common.fmt(rep['aiq'])} | {common.fmt(rep['zero_router_aiq'])} | {common.fmt(rep['oracle_aiq'])} | "
            f"{common.fmt(rep['max_quality'])} | {common.fmt(b['quality'])} ({b['model']}, {b['cost']:.3g}) | {common.fmt(rep['qnc'])} |",
        ]
    lines += ["", "## single models (test)", "", "| model | quality | mean cost |", "|---|---|---|"]
    lines += [f"| {s['model']} | {s['quality']:.3f} | {s['cost']:.3g} |" for s in rep["single_models"]]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    """``cmr bench llm``: load, embed, train, sweep, write report.json / report.md / curve.png."""
    from cmr.bench import plots
    from cmr.data.outcomes import load_outcomes

    if not 0.0 <= args.unseen < 1.0:
        raise common.BenchConfigError(f"--unseen {args.unseen}: must be in [0, 1)")
    if args.lambdas < 1:
        raise common.BenchConfigError("--lambdas: must be >= 1")
    root = common.resolve_outcome_dir(args.data)
    data = load_outcomes(root)
    cls, config = common.policy_spec(args)  # fail fast on a bad policy name or option
    from cmr.encoders.lexical import embedding_of

    encoder = common.fitted_encoder(args, data.train.texts, data.cards, labelled=False)
    common.embed(encoder, [data.train, data.test])
    policy = cls(encoder=encoder, config=config)
    tag = "-".join(t for t in (f"unseen{args.unseen:g}" if args.unseen else "", "" if args.embedding == "minilm" else args.embedding.replace("+", "-")) if t)
    out = common.out_dir(args.out, "llm", root.name, args.policy, tag)

    encode_s = common.embed_cards(policy, data.cards)  # up front: the training clock is training only
    t0 = time.perf_counter()
    split = train_policy(policy, data, args.unseen, args.profile_size, args.seed)
    t_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = evaluate(policy, data, args.lambdas)
    t_eval = time.perf_counter() - t0
    plot_args = res.pop("_plot")
    rep: dict[str, Any] = {
        "protocol": "llm",
        "policy": args.policy,
        "data": str(root),
        "dataset": root.name,
        "unseen": args.unseen,
        "seed": args.seed,
        "config": policy.config.to_dict(),
        "embedding": args.embedding,
        "embedding_used": embedding_of(encoder),  # what `auto` resolved to
        "encoder": encoder.name,
        "choice": policy.describe(),
        **res,
        **split,
        "timings": {"encode_s": encode_s, "train_s": t_train, "eval_s": t_eval},
        **common.run_info(),
    }
    common.write_json(out / "report.json", rep)
    common.write_text(out / "report.md", _markdown(rep))
    title = f"{args.policy} on {root.name}" + (f" (unseen {args.unseen:g})" if args.unseen else "")
    common.write_figure(out / "curve.png", plots.quality_cost(*plot_args, title=title, label=args.policy, unseen=rep.get("unseen_models", ())))
    b = rep["best_single"]
    took = f"  train {t_train:.1f}s  card encoding {encode_s:.1f}s"
    if rep["equal_cost"]:
        print(f"{title}: quality {rep['aiq']:.3f} (equal costs: AIQ = quality)  best single {b['quality']:.3f} ({b['model']})  oracle {rep['oracle']['quality']:.3f}{took}")
    else:
        qnc = "never" if rep["qnc"] is None else f"{rep['qnc']:.3f}"
        print(
            f"{title}: AIQ {rep['aiq']:.3f}  zero router {rep['zero_router_aiq']:.3f}  oracle {rep['oracle_aiq']:.3f}  "
            f"max quality {rep['max_quality']:.3f}  best single {b['quality']:.3f} ({b['model']})  QNC {qnc}{took}"
        )
    if rep["choice"]:
        print(common.choice_line(rep["choice"]))
    print(f"report: {out / 'report.json'}")
    return 0
