"""Where carve's forgetting on CMRBench comes from: memory, or the hub growing around old requests?

    python -m bench.forgetting [--split-seed 0] [--test] [--set KEY=VALUE ...] [--out docs/results/forgetting]

CMRBench scores every experience's requests, after each later experience, among every model routable
then: a request of experience j is routed among the models of experiences 1..k (k ≥ j). Its M-Acc can
fall because the router forgot what it learnt about j, or because models that joined after j now
take its requests. This runs carve as ``auto`` serves it (``auto``'s carve options, ``embedding: auto``) through the benchmark's protocol (``cmr_protocol.evaluate``) twice: continual (replay and
anchoring, as served) and ``joint`` (every row kept, nothing anchored: a router that forgets nothing
it was shown). After each experience k, for each experience j ≤ k it records M/D-Acc routed among
all models routable at k (what the benchmark scores) and among the models of experiences ≤ j only
(the hub the router had when it learnt j), and the share of j's requests routed to a model that
joined after j (none of j's requests names one). A probe (logistic regression on the embedding,
fitted on the train rows) then asks whether a request's text tells which experience its model
joined in: if not, no router can keep the later models off the earlier requests.

Validation split by default (``cmr bench cmr --validation 0.15 --per-model``, ``--split-seed``), the
test splits with ``--test``. Writes ``report.json`` and ``report.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import cli


class ForgettingError(ValueError):
    """A bad option (exit 2, one line)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-root", type=Path, default=None, help="folder holding cmrbench/ (default: the shared data)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the validation split carved from the train splits")
    p.add_argument("--test", action="store_true", help="score the test splits instead of the validation split")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a carve option on top of auto's carve")
    p.add_argument("--out", default="docs/results/forgetting")


def _options(items: list[str]) -> dict[str, Any]:
    """``auto``'s carve options with ``--set`` items on top (parsed as ``cmr bench --set`` parses them),
    validated before anything is loaded or embedded."""
    from cmr.bench.common import BenchConfigError, parse_sets
    from cmr.errors import ConfigError
    from cmr.policies.auto import CANDIDATES
    from cmr.policies.carve import CarveConfig

    try:
        cfg = {**CANDIDATES["carve"][1], **parse_sets(items)}
        CarveConfig.from_dict(cfg)
    except BenchConfigError as e:
        raise ForgettingError(str(e)) from None
    except ConfigError as e:
        raise ForgettingError(f"--set: {e}") from None
    return cfg


def _probe(bench) -> dict[str, Any]:
    """Accuracy of predicting the experience a request's model joined in from its embedding
    (logistic regression fitted on the train rows, scored on the evaluated rows) against always
    guessing the commonest one, overall and for each pair of experiences."""
    from sklearn.linear_model import LogisticRegression

    exp_of = {c.id: c.experience or 1 for c in bench.cards}

    def rows(parts):
        x = np.vstack([p.emb for p in parts])
        y = np.concatenate([[exp_of[p.model_ids[i]] for i in p.labels] for p in parts])
        return x, y

    x, y = rows([e.train for e in bench.experiences])
    xe, ye = rows([e.test for e in bench.experiences])

    def fit_score(keep: set[int]) -> dict[str, float | None]:
        m, me = np.isin(y, list(keep)), np.isin(ye, list(keep))
        if not me.any() or len(set(y[m])) < 2:  # nothing to score, or one experience only: no probe
            return {"accuracy": None, "majority": None, "n": int(me.sum())}
        clf = LogisticRegression(max_iter=2000).fit(x[m], y[m])
        majority = float(np.max(np.bincount(ye[me])) / me.sum())
        return {"accuracy": float(clf.score(xe[me], ye[me])), "majority": majority, "n": int(me.sum())}

    # the experiences some train row's model joined in (each pair needs both to fit)
    ks = sorted({exp_of[e.train.model_ids[i]] for e in bench.experiences for i in e.train.labels})
    return {"all": fit_score(set(ks)), "pairs": {f"{a}-{b}": fit_score({a, b}) for i, a in enumerate(ks) for b in ks[i + 1 :]}}


def _run(bench, enc, cfg: dict[str, Any]) -> dict[str, Any]:
    """The protocol for carve with ``cfg``; per (k, j): M/D among all routable models and among
    those of experiences ≤ j, and the share of j's requests routed to a later model."""
    from cmr.bench import common, metrics
    from cmr.bench.cmr_protocol import evaluate
    from cmr.decide import choose
    from cmr.policies.registry import make_policy

    policy = make_policy("carve", encoder=enc, config=cfg)
    exps = bench.experiences
    cells: list[dict[str, Any]] = []

    def after(summary: dict[str, Any]) -> None:
        k = summary["experience"]
        live = bench.cards_upto(k)
        cohort = np.array([c.experience or 1 for c in live])
        for e in exps:
            if e.k > k:
                break
            if not len(e.test):  # a validation split can hold out no row of a tiny experience
                continue
            s = common.check_scores(policy.score(e.test.emb, live), len(e.test), len(live), policy.name)
            zero = np.zeros(len(live))
            routed = choose(s, zero, 0.0)
            own = choose(np.where(cohort <= e.k, s, -np.inf), zero, 0.0)
            a, b = metrics.accuracies(routed, live, e.test), metrics.accuracies(own, live, e.test)
            cells.append({"k": k, "j": e.k, "m": a["m"], "d": a["d"], "m_own_hub": b["m"], "d_own_hub": b["d"],
                          "to_later": float(np.mean(cohort[routed] > e.k))})

    t0 = time.perf_counter()
    r = evaluate(bench, policy, on_experience=after)
    return {"config": cfg, "final": r["final"], "forgetting": r["forgetting"], "cells": cells, "s": time.perf_counter() - t0}


def _matrix(cells: list[dict[str, Any]], key: str) -> np.ndarray:
    """``key`` of the cells as the benchmark's accuracy matrix (``[k, j]``, NaN above the diagonal)."""
    ks = sorted({c["k"] for c in cells})
    at = {k: i for i, k in enumerate(ks)}
    m = np.full((len(ks), len(ks)), np.nan)
    for c in cells:
        m[at[c["k"]], at[c["j"]]] = c[key]
    return m


def _final_own_hub(cells: list[dict[str, Any]]) -> dict[str, float]:
    """Final average M/D as the benchmark computes it, but each experience's requests routed among
    the models of its own hub (the experiences up to it)."""
    from cmr.bench import metrics

    return {m: metrics.final_average(_matrix(cells, f"{m}_own_hub")) for m in "md"}


def _forgetting_own_hub(cells: list[dict[str, Any]], key: str) -> float:
    """The benchmark's forgetting (``metrics.forgetting``) of ``key``."""
    from cmr.bench import metrics

    return metrics.forgetting(_matrix(cells, key))


def _write(args: argparse.Namespace) -> int:
    from cmr.bench import common

    rep = run(args)
    rep["command_line"] = args.command_line
    name = "report-test" if args.test else f"report-validation{args.split_seed}"
    out = Path(args.out)
    common.write_json(out / f"{name}.json", rep)
    md = render(rep)
    common.write_text(out / f"{name}.md", md)
    print(md)
    return 0


def run(args: argparse.Namespace) -> dict[str, Any]:
    from cmr import constants
    from cmr.bench import common
    from cmr.bench.cmr_protocol import validation_split
    from cmr.data import load_cmrbench
    from cmr.encoders import default_encoder
    from cmr.encoders.lexical import embedding_of, fit_encoder

    cfg = _options(args.set)
    root = (args.data_root or constants.data_root()) / "cmrbench"
    if not (root / "hub.jsonl").is_file():
        raise ForgettingError(f"--data-root: no CMRBench at {root} (hub.jsonl)")
    bench = load_cmrbench(root)
    if not args.test:
        bench = validation_split(bench, 0.15, seed=args.split_seed, per_model=True)
        if not any(len(e.test) for e in bench.experiences):
            raise ForgettingError(f"--split-seed: the validation split of {root} holds out no row (too few rows per model); try --test")
    fit_texts = [t for e in bench.experiences for t in e.train.texts] + [c.text() for c in bench.cards]
    enc = fit_encoder("auto", default_encoder(), fit_texts)  # as the served default embeds
    common.embed(enc, [p for e in bench.experiences for p in (e.train, e.test)])
    runs = {name: _run(bench, enc, {**cfg, "joint": joint}) for name, joint in (("continual", False), ("joint", True))}
    for r in runs.values():
        r["final_own_hub"] = _final_own_hub(r["cells"])
        r["forgetting_own_hub"] = {"m": _forgetting_own_hub(r["cells"], "m_own_hub"), "d": _forgetting_own_hub(r["cells"], "d_own_hub")}
    split = "test" if args.test else f"validation (split seed {args.split_seed})"
    return {"split": split, "embedding": embedding_of(enc), "runs": runs, "probe": _probe(bench), "run": common.run_info()}


def render(rep: dict[str, Any]) -> str:
    f = lambda x: "—" if x is None else f"{x:.3f}"  # noqa: E731
    md = ["# Where carve's forgetting comes from (CMRBench)", "",
          f"`{rep.get('command_line', 'python -m bench.forgetting')}`, {rep['split']}, carve as `auto` serves it (`{rep['runs']['continual']['config']}`), embedding `{rep['embedding']}`;"
          f" commit {(rep['run'].get('git_commit') or '')[:7]}.", "",
          "| run | M-Acc | D-Acc | forgetting M / D (points) | M-Acc / D-Acc, each experience routed among its own hub | forgetting M / D there |",
          "|---|---|---|---|---|---|"]
    for name, r in rep["runs"].items():
        md.append(f"| {name} | {f(r['final']['m_acc'])} | {f(r['final']['d_acc'])} | {r['forgetting']['m'] * 100:.1f} / {r['forgetting']['d'] * 100:.1f} | "
                  f"{f(r['final_own_hub']['m'])} / {f(r['final_own_hub']['d'])} | "
                  f"{r['forgetting_own_hub']['m'] * 100:.1f} / {r['forgetting_own_hub']['d'] * 100:.1f} |")
    md += ["", "Each cell: after experience k, experience j's requests (continual run): M-Acc among all routable models / among the",
           "models of experiences ≤ j, and the share routed to a model that joined after j.", "",
           "| k \\ j | " + " | ".join(str(j) for j in sorted({c['j'] for c in rep['runs']['continual']['cells']})) + " |",
           "|---|" + "---|" * len({c["j"] for c in rep["runs"]["continual"]["cells"]})]
    cells = rep["runs"]["continual"]["cells"]
    for k in sorted({c["k"] for c in cells}):
        row = {c["j"]: c for c in cells if c["k"] == k}
        md.append(f"| {k} | " + " | ".join(
            (f"{f(row[j]['m'])} / {f(row[j]['m_own_hub'])}, {row[j]['to_later'] * 100:.0f} % later" if j in row else "")
            for j in sorted({c['j'] for c in cells})) + " |")
    p = rep["probe"]
    md += ["", "Probe: the experience a request's model joined in, predicted from the request's embedding (logistic regression on",
           "the train rows), against always guessing the commonest:", "",
           "| experiences | accuracy | commonest | rows |", "|---|---|---|---|",
           f"| all | {f(p['all']['accuracy'])} | {f(p['all']['majority'])} | {p['all']['n']} |"]
    md += [f"| {pair} | {f(v['accuracy'])} | {f(v['majority'])} | {v['n']} |" for pair, v in p["pairs"].items()]
    return "\n".join(md) + "\n"


def main(argv: list[str] | None = None) -> int:
    return cli("python -m bench.forgetting", __doc__, add_arguments, _write, ForgettingError, "bench_forgetting", argv)


if __name__ == "__main__":
    raise SystemExit(main())
