"""Online learning from partial feedback: the training prompts replayed as a bandit stream.

The train split (an outcome matrix, or a CMRBench folder with labels as 0/1 rewards, its
experiences in order and the hub growing at each) is shuffled once (seeded) and replayed in
batches: each policy scores the batch, ``cmr.decide.choose`` picks a model per prompt at the cost
weight ``--lam``, and the policy is told only the chosen model's reward (``policy.update``).
Regret per prompt = oracle utility − chosen utility, utility = quality − λ·recorded cost, the
oracle picking the best known model of that prompt.

In the same run, each ``--baseline`` policy is trained offline (full information) on the first
``--warm`` fraction of the stream and then routes the rest without learning: the fixed router a
bandit has to beat. Every policy's regret is compared on that same remainder of the stream, and
every policy is scored afterwards on the test split with the llm protocol's metrics (AIQ over a
λ sweep; routed quality where costs are all equal — on CMRBench that is M-Acc).

Writes report.json, report.md and regret.png (cumulative regret over the stream).
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

from cmr.bench import common

_CURVE_POINTS = 200  # points of each regret curve kept in report.json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``cmr bench online``."""
    parser.add_argument("--policy", action="append", required=True, help="policy learning online; repeat for several on one plot")
    parser.add_argument("--baseline", action="append", default=None, help="fixed offline router(s) fit on the first --warm of the stream (default: knn)")
    parser.add_argument("--data", default=None, help="outcome-matrix folder or set name (routerbench), or a CMRBench folder")
    parser.add_argument("--out", default=None, help="output folder (default: runs/online-<dataset>-<policies>-<UTC time>)")
    parser.add_argument("--seed", type=int, default=0, help="stream order and policy seed")
    parser.add_argument("--set", dest="sets", action="extend", nargs="+", default=[], metavar="KEY=VALUE", help="config override for every --policy (JSON values); POLICY:KEY=VALUE for one policy only")
    parser.add_argument("--config", default=None, metavar="FILE.json", help="config for every --policy as a JSON object (--set wins)")
    parser.add_argument("--batch-size", type=int, default=32, help="prompts routed between two updates")
    parser.add_argument(
        "--lam",
        default="0",
        help="cost weight λ of the routing decision and of the regret; 'sweep' draws one λ per request from the "
        "llm protocol's λ grid (users with different cost preferences: every model gets explored)",
    )
    parser.add_argument("--warm", type=float, default=0.1, help="fraction of the stream the fixed baselines are trained on")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N prompts of the shuffled stream (quick runs)")


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


def load_stream(arg: str | None, seed: int, limit: int | None = None) -> dict[str, Any]:
    """The stream and the test data: ``{"name", "root", "stream", "segments", "eval"}``.

    ``stream`` is an ``Examples`` in replay order (rows with every outcome known among the
    models live at that point); ``segments`` lists ``(start_row, cards entering there)``;
    ``eval`` is an ``OutcomeData`` whose test split and cards the final evaluation uses.
    """
    from pathlib import Path

    import numpy as np

    from cmr.data.cmrbench import is_cmrbench_dir, load_cmrbench
    from cmr.data.examples import Examples
    from cmr.data.outcomes import OutcomeData, load_outcomes

    rng = np.random.default_rng(seed)
    p = Path(arg) if arg else None
    if p is not None and (is_cmrbench_dir(p) or is_cmrbench_dir(p / "cmrbench")):
        root = common.resolve_cmrbench_dir(arg)
        bench = load_cmrbench(root)
        parts, segments, at = [], [], 0
        for exp in bench.experiences:  # experiences stay in order; prompts shuffle within each
            part = exp.train.subset(rng.permutation(len(exp.train)))
            part.meta["id"] = [f"e{exp.k}-train-{i}" for i in range(len(part))]
            segments.append((at, bench.cards_of(exp.k)))
            parts.append(part)
            at += len(part)
        stream = Examples.concat(parts)
        # a CMRBench prompt only knows its label: every other live model scores 0 on it
        stream.costs = np.zeros_like(stream.scores)
        test = Examples.concat([e.test for e in bench.experiences])
        test.costs = np.zeros_like(test.scores)
        data = OutcomeData(root=root, name=root.name, cards=bench.cards, train=stream, test=test, has_cost=False)
        # the card's experience says when it becomes routable
        exp_of = np.array([c.experience or 1 for c in bench.cards])
        row_exp = np.concatenate([np.full(len(pt), e.k) for pt, e in zip(parts, bench.experiences)])
        live = exp_of[None, :] <= row_exp[:, None]
        stream.scores = np.where(live, stream.scores, np.nan).astype(np.float32)
    else:
        root = common.resolve_outcome_dir(arg)
        data = load_outcomes(root)
        full = ~np.isnan(data.train.scores).any(axis=1)  # bandit rewards need every outcome known
        idx = np.flatnonzero(full)
        stream = data.train.subset(idx[rng.permutation(len(idx))])
        segments = [(0, list(data.cards))]
    if limit is not None:
        if limit < 2:
            raise common.BenchConfigError("--limit: must be >= 2")
        stream = stream.subset(np.arange(min(limit, len(stream))))
        segments = [(s, c) for s, c in segments if s < len(stream)]
    return {"name": root.name, "root": root, "stream": stream, "segments": segments, "eval": data}


# --------------------------------------------------------------------------------------------
# the replay
# --------------------------------------------------------------------------------------------


def _utilities(stream, lam):
    import numpy as np

    lam = np.asarray(lam, dtype=np.float64)
    lam = lam[:, None] if lam.ndim == 1 else lam
    util = stream.scores.astype(np.float64) - lam * np.nan_to_num(stream.costs.astype(np.float64))
    return np.where(np.isnan(stream.scores), -np.inf, util)


def replay(policy, stream, segments, lam, batch_size: int, start: int = 0, learn: bool = True) -> dict[str, Any]:
    """Route rows ``start..`` of ``stream`` batch by batch; with ``learn``, feed back the chosen
    model's reward after each batch. ``lam`` is one cost weight or one per stream row.
    Returns per-row regret and reward arrays."""
    import numpy as np

    from cmr.continual.learner import Learner
    from cmr.decide import choose
    from cmr.types import FeedbackEvent

    learner = Learner(policy)  # the served learner's code: bounded steps, replay, consolidation
    util = _utilities(stream, lam)
    best = util.max(axis=1)
    lam_rows = np.broadcast_to(np.asarray(lam, dtype=np.float64), (len(stream),))
    ids = list(stream.model_ids)
    col = stream.column
    n = len(stream)
    regret = np.zeros(n - start)
    reward = np.zeros(n - start)
    segs = sorted(segments, key=lambda x: x[0])
    # batch boundaries: every batch_size rows, and wherever the hub grows
    cuts = sorted({*range(start, n, batch_size), *(at for at, _ in segs if start < at < n), n})
    cards: list = []
    added = 0
    t_route = t_update = 0.0
    for b0, b1 in common.progress(list(zip(cuts[:-1], cuts[1:])), desc=f"{policy.name} stream", unit="batch"):
        while added < len(segs) and segs[added][0] <= b0:  # the hub grows mid-stream
            cards.extend(segs[added][1])
            policy.add_models(segs[added][1])
            added += 1
        cand = np.array([col[c.id] for c in cards])
        costs = np.array([c.cost for c in cards], dtype=np.float64)
        q = stream.emb[b0:b1]
        t0 = time.perf_counter()
        s = common.check_scores(policy.score(q, cards), b1 - b0, len(cards), policy.name)
        ch = cand[choose(s, costs, lam_rows[b0:b1], mask=np.isfinite(util[b0:b1][:, cand]))]
        t_route += time.perf_counter() - t0
        r = np.arange(b0, b1)
        regret[b0 - start : b1 - start] = best[r] - util[r, ch]
        reward[b0 - start : b1 - start] = stream.scores[r, ch]
        if learn:
            t0 = time.perf_counter()
            events = [  # one event per routed prompt of this batch
                FeedbackEvent(
                    request_id=str(stream.meta["id"][i]) if "id" in stream.meta else str(i),
                    model=ids[j],
                    reward=float(stream.scores[i, j]),
                    query=stream.texts[i],
                    embedding=stream.emb[i].tolist(),
                    cost=float(stream.costs[i, j]),
                )
                for i, j in zip(r, ch)
            ]
            learner.consume(events)
            t_update += time.perf_counter() - t0
    return {"regret": regret, "reward": reward, "route_s": t_route, "update_s": t_update}


def _curve(cum) -> list[list[float]]:
    """Down-sampled ``[[step, cumulative regret], ...]`` for report.json."""
    import numpy as np

    n = len(cum)
    if n == 0:
        return []
    at = np.unique(np.linspace(0, n - 1, min(n, _CURVE_POINTS)).astype(int))
    return [[int(i + 1), float(cum[i])] for i in at]


def _evaluate(policy, data, cards) -> dict[str, Any]:
    """The llm protocol's test metrics (AIQ etc.) of ``policy`` routing among ``cards``."""
    from cmr.bench.llm_protocol import evaluate

    view = type(data)(root=data.root, name=data.name, cards=list(cards), train=data.train, test=data.test, has_cost=data.has_cost)
    res = evaluate(policy, view)
    res.pop("_plot", None)
    keep = ("aiq", "zero_router_aiq", "oracle_aiq", "quality_at_lambda0", "cost_at_lambda0", "max_quality", "best_single", "oracle", "equal_cost", "qnc")
    return {k: res[k] for k in keep}


def _summary(reg, rew, warm_rows: int, last_rows: int) -> dict[str, Any]:
    """Regret figures of one router; ``reg`` starts at stream row ``warm_rows`` for the fixed
    baselines (pass 0) and at row 0 for the online policies."""
    import numpy as np

    tail = reg[warm_rows:] if len(reg) > warm_rows else reg[:0]
    n = len(reg)
    half = n // 2
    return {
        # the end of the stream: where "the bandit ends ahead" is judged
        "mean_regret_last_quarter": float(reg[-last_rows:].mean()) if last_rows and n >= last_rows else None,
        "cum_regret": float(reg.sum()),
        "mean_regret": float(reg.mean()) if n else None,
        "cum_regret_after_warm": float(tail.sum()),
        "mean_regret_after_warm": float(tail.mean()) if len(tail) else None,
        "mean_reward": float(rew.mean()) if n else None,
        # sublinear regret: the second half costs less than the first
        "mean_regret_first_half": float(reg[:half].mean()) if half else None,
        "mean_regret_second_half": float(reg[half:].mean()) if n - half else None,
        "curve": _curve(np.cumsum(reg)),
    }


def _markdown(rep: dict[str, Any]) -> str:
    s = rep["stream"]
    lines = [
        f"# cmr bench online — {rep['dataset']}",
        "",
        f"{s['n']} training prompts replayed in batches of {s['batch_size']} (seed {rep['seed']}), λ = {rep['lam']}; "
        f"baselines trained offline on the first {s['warm_rows']} prompts ({rep['warm']:.0%}). "
        f"{rep['date']}, {rep['machine']['cpus']} CPU(s), commit {rep['git_commit'] or '—'}",
        "",
        f"Regret is compared on prompts {s['warm_rows'] + 1}..{s['n']} (where every router is routing without having seen them).",
        "",
        "| router | kind | mean regret, last quarter | mean regret after warm | cum. regret after warm | mean reward (stream) | regret 1st half → 2nd half | test AIQ / quality |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for kind, group in (("online", rep["policies"]), ("fixed offline", rep["baselines"])):
        for name, r in group.items():
            halves = f"{common.fmt(r['mean_regret_first_half'])} → {common.fmt(r['mean_regret_second_half'])}" if kind == "online" else "—"
            lines.append(
                f"| {name} | {kind} | {common.fmt(r['mean_regret_last_quarter'], 4)} | {common.fmt(r['mean_regret_after_warm'], 4)} | {common.fmt(r['cum_regret_after_warm'], 1)} | "
                f"{common.fmt(r['mean_reward'])} | {halves} | {common.fmt(r['test']['aiq'])} |"
            )
    t = next(iter(rep["policies"].values()))["test"]
    lines += [
        "",
        f"Test reference: zero router {common.fmt(t['zero_router_aiq'])}, oracle {common.fmt(t['oracle_aiq'])}, "
        f"best single {common.fmt(t['best_single']['quality'])} ({t['best_single']['model']})"
        + (" — equal costs: AIQ is the routed quality." if t["equal_cost"] else "."),
        "",
    ]
    for name, v in rep["verdict"].items():
        lines.append(
            f"- {name}: ends {'ahead of' if v['ahead'] else 'NOT ahead of'} the fixed {v['baseline']} (regret rate, last quarter); "
            f"cumulative after warm-up: {'ahead' if v['ahead_cumulative_after_warm'] else 'behind'}; test: {'ahead' if v['ahead_on_test'] else 'behind'}"
        )
    return "\n".join(lines) + "\n"


def _plot(rep: dict[str, Any], title: str):
    from cmr.bench.plots import _pyplot

    plt = _pyplot()
    warm = rep["stream"]["warm_rows"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, r in rep["policies"].items():
        xs, ys = zip(*r["curve"]) if r["curve"] else ((), ())
        a1.plot(xs, ys, label=name)
        xs2, ys2 = zip(*r["curve_after_warm"]) if r["curve_after_warm"] else ((), ())
        a2.plot([x + warm for x in xs2], ys2, label=f"{name} (online)")
    for name, r in rep["baselines"].items():
        xs2, ys2 = zip(*r["curve_after_warm"]) if r["curve_after_warm"] else ((), ())
        a2.plot([x + warm for x in xs2], ys2, "--", label=f"{name} (fixed, fit on first {warm})")
    a1.axvline(warm, color="grey", lw=0.8, ls=":")
    a1.set(xlabel="prompts routed", ylabel="cumulative regret vs oracle", title="whole stream")
    a2.set(xlabel="prompts routed", ylabel="cumulative regret vs oracle", title=f"after the first {warm} prompts")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _sets_for(name: str, items: list[str]) -> list[str]:
    """The ``--set`` items that apply to policy ``name``: unscoped ones and ``name:KEY=VALUE``."""
    out = []
    for item in items:
        key = item.partition("=")[0]
        scope, colon, _ = key.partition(":")
        if not colon:
            out.append(item)
        elif scope == name:
            out.append(item[len(scope) + 1 :])
    return out


def run(args: argparse.Namespace) -> int:
    """``cmr bench online``: replay, compare with fixed baselines, evaluate, write the report."""
    import numpy as np

    from cmr.continual.learner import Learner
    from cmr.encoders import default_encoder
    from cmr.policies import policy_class

    if args.batch_size < 1:
        raise common.BenchConfigError("--batch-size: must be >= 1")
    if not 0.0 < args.warm < 1.0:
        raise common.BenchConfigError(f"--warm {args.warm}: must be in (0, 1)")
    lam_arg = str(args.lam).strip().lower()
    if lam_arg != "sweep":
        try:
            lam_value = float(lam_arg)
        except ValueError:
            raise common.BenchConfigError(f"--lam {args.lam}: must be a number >= 0 or 'sweep'") from None
        if not math.isfinite(lam_value) or lam_value < 0:
            raise common.BenchConfigError(f"--lam {args.lam}: must be a finite number >= 0 or 'sweep'")
    baselines = args.baseline or ["knn"]
    for name in [*args.policy, *baselines]:
        policy_class(name)  # unknown names fail before any work
    d = load_stream(args.data, args.seed, args.limit)
    stream, data = d["stream"], d["eval"]
    encoder = default_encoder()
    common.embed(encoder, [stream, data.test])
    n = len(stream)
    if lam_arg == "sweep":
        from cmr.bench import metrics

        grid = metrics.lambda_grid(np.array([c.cost for c in data.cards], dtype=np.float64), 1.0)
        lam = np.random.default_rng(args.seed + 1).choice(grid, size=n)  # seeded: every router sees the same λs
    else:
        lam = lam_value
    warm_rows = max(1, int(math.ceil(args.warm * n)))
    last_rows = max(1, (n - warm_rows) // 4)
    out = common.out_dir(args.out, "online", d["name"], "+".join(args.policy))
    all_cards = [c for _, cs in d["segments"] for c in cs]

    rep: dict[str, Any] = {
        "protocol": "online",
        "dataset": d["name"],
        "data": str(d["root"]),
        "seed": args.seed,
        "lam": lam_arg if lam_arg == "sweep" else lam_value,
        "warm": args.warm,
        "stream": {"n": n, "batch_size": args.batch_size, "warm_rows": warm_rows, "last_quarter_rows": last_rows, "n_models": len(stream.model_ids)},
        "policies": {},
        "baselines": {},
    }
    t_all = time.perf_counter()
    for name in args.policy:
        policy = common.build_policy(argparse.Namespace(**{**vars(args), "policy": name, "sets": _sets_for(name, args.sets)}), encoder)
        t0 = time.perf_counter()
        r = replay(policy, stream, d["segments"], lam, args.batch_size)
        s = _summary(r["regret"], r["reward"], warm_rows, last_rows)
        s["curve_after_warm"] = _curve(np.cumsum(r["regret"][warm_rows:]))
        s["test"] = _evaluate(policy, data, all_cards)
        s["config"] = policy.config.to_dict()
        s["timings"] = {"route_s": r["route_s"], "update_s": r["update_s"], "total_s": time.perf_counter() - t0}
        rep["policies"][name] = s
        print(f"{name} (online): mean regret last quarter {s['mean_regret_last_quarter']:.4f}, after warm {s['mean_regret_after_warm']:.4f}  test AIQ/quality {s['test']['aiq']:.3f}")
    warm_cards = [c for at, cs in d["segments"] if at < warm_rows for c in cs]
    for name in baselines:
        policy = common.build_policy(argparse.Namespace(**{**vars(args), "policy": name, "sets": [], "config": None}), encoder)
        t0 = time.perf_counter()
        first = stream.subset(np.arange(warm_rows))
        Learner(policy).fit(first, warm_cards)
        r = replay(policy, stream, d["segments"], lam, args.batch_size, start=warm_rows, learn=False)
        s = _summary(r["regret"], r["reward"], 0, last_rows)
        s["cum_regret"] = s["mean_regret"] = s["mean_regret_first_half"] = s["mean_regret_second_half"] = None
        s["curve_after_warm"] = s.pop("curve")
        s["curve"] = []
        s["test"] = _evaluate(policy, data, all_cards)
        s["timings"] = {"total_s": time.perf_counter() - t0}
        rep["baselines"][name] = s
        print(f"{name} (fixed, fit on first {warm_rows}): mean regret last quarter {s['mean_regret_last_quarter']:.4f}, after warm {s['mean_regret_after_warm']:.4f}  test AIQ/quality {s['test']['aiq']:.3f}")
    # the bandit must *end* ahead: compare the regret rate on the last quarter of the stream,
    # the cumulative regret after warm-up, and the test score, each against the best baseline
    best_base = min(rep["baselines"], key=lambda b: rep["baselines"][b]["mean_regret_last_quarter"])
    base = rep["baselines"][best_base]
    rep["verdict"] = {
        name: {
            "baseline": best_base,
            "ahead": r["mean_regret_last_quarter"] < base["mean_regret_last_quarter"],
            "ahead_cumulative_after_warm": r["mean_regret_after_warm"] < min(b["mean_regret_after_warm"] for b in rep["baselines"].values()),
            "ahead_on_test": r["test"]["aiq"] > max(b["test"]["aiq"] for b in rep["baselines"].values()),
        }
        for name, r in rep["policies"].items()
    }
    rep["wall_s"] = time.perf_counter() - t_all
    rep.update(common.run_info())
    common.write_json(out / "report.json", rep)
    common.write_text(out / "report.md", _markdown(rep))
    common.write_figure(out / "regret.png", _plot(rep, f"online routing on {d['name']} (λ = {lam_arg}, batch {args.batch_size})"))
    for name, v in rep["verdict"].items():
        print(
            f"{name}: ends {'ahead of' if v['ahead'] else 'NOT ahead of'} fixed {v['baseline']} (last-quarter regret); "
            f"cumulative after warm: {'ahead' if v['ahead_cumulative_after_warm'] else 'behind'}; test: {'ahead' if v['ahead_on_test'] else 'behind'}"
        )
    print(f"report: {out / 'report.json'}")
    return 0
