"""When does the fused embedding pay? MiniLM alone against MiniLM + TF-IDF, by how many prompts the
first training has.

python -m bench.embedding_threshold [--data-root DIR] [--sets cmrbench routerbench routerdc7] [--sizes 64 128 ...] [--seeds 0 1] [--out DIR]

``embedding: auto`` (the router's and ``cmr train``'s default) fuses labelled rows when the texts
it fits the lexical part on (the first training's prompts plus the hub's cards) number at least
``AUTO_MIN_TEXTS``, and never outcome rows. This measures that rule instead of assuming it: each
set's train split is cut to ``n`` prompts (a random subset per seed; CMRBench: the same fraction
of each experience), the lexical part is fitted on those prompts and the cards, as ``fit_encoder``
does for a first start, and the policy ``auto`` picks at full size on that set runs with each
embedding on the *full test split*: carve with its domain vote on CMRBench (continual protocol, final D and M),
``knn`` on outcome sets (AIQ where costs are known, else quality at λ = 0). Only the lexical part
differs between the two columns of a row: the dense vectors come from the same cached MiniLM.
A set is ``cmrbench`` (the folder ``DATA_ROOT/cmrbench``) or the name of an outcome set under
``DATA_ROOT/routing/``; where the texts hold too few terms to fit the lexical part, the fused column
says so (``fit_encoder`` refuses it there, and ``auto`` stays dense).

Writes ``DIR/report.json`` and ``DIR/report.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cmr.errors import CMRError

SIZES = (64, 128, 256, 512, 1024, 2048, 0)  # 0: the whole train split
SETS = ("cmrbench", "routerbench", "routerdc7")
EMBEDDINGS = ("minilm", "minilm+tfidf")


class BenchThresholdError(CMRError):
    """A bad option of ``bench.embedding_threshold`` (names it)."""


def _cut_cmrbench(bench, n: int, seed: int):
    """``bench`` with about ``n`` train prompts in all, the same fraction of each experience (0: all)."""
    from bench.cmrbench_limits import subsample

    total = sum(len(e.train) for e in bench.experiences)
    return bench if not n or n >= total else subsample(bench, n / total, seed)


def _cmrbench(root: Path, n: int, seed: int, embedding: str) -> dict[str, Any]:
    from cmr.bench import cmr_protocol, common
    from cmr.data import load_cmrbench
    from cmr.encoders.lexical import embedding_of
    from cmr.policies import make_policy

    bench = _cut_cmrbench(load_cmrbench(root / "cmrbench"), n, seed)
    texts = [t for e in bench.experiences for t in e.train.texts]
    enc = common.fitted_encoder(argparse.Namespace(embedding=embedding), texts, bench.cards)
    common.embed(enc, [p for e in bench.experiences for p in (e.train, e.test)])
    out = cmr_protocol.evaluate(bench, make_policy("carve", encoder=enc, config={"seed": seed, "domain_vote": 0.3}))
    f = out["final"]
    return {"n_prompts": len(texts), "n_texts": len(texts) + len(bench.cards), "embedding_used": embedding_of(enc),
            "policy": "carve domain_vote=0.3", "figure": "D", "value": float(f["d_acc"]), "m_acc": float(f["m_acc"])}


def _outcomes(root: Path, name: str, n: int, seed: int, embedding: str) -> dict[str, Any]:
    from cmr.bench import common, llm_protocol
    from cmr.data import load_outcomes
    from cmr.encoders.lexical import embedding_of
    from cmr.policies import make_policy

    data = load_outcomes(root / "routing" / name)
    if n and n < len(data.train):
        idx = np.sort(np.random.default_rng(seed).permutation(len(data.train))[:n])
        data = dataclasses.replace(data, train=data.train.subset(idx))
    enc = common.fitted_encoder(argparse.Namespace(embedding=embedding), data.train.texts, data.cards, labelled=False)
    common.embed(enc, [data.train, data.test])
    policy = make_policy("knn", encoder=enc, config={"seed": seed})
    llm_protocol.train_policy(policy, data, 0.0, None, seed)
    r = llm_protocol.evaluate(policy, data)
    key, label = ("quality_at_lambda0", "quality at λ=0") if r["equal_cost"] else ("aiq", "AIQ")
    return {"n_prompts": len(data.train), "n_texts": len(data.train) + len(data.cards), "embedding_used": embedding_of(enc),
            "policy": "knn", "figure": label, "value": float(r[key])}


def check_sets(root: Path, sets: Sequence[str]) -> None:
    """Refuse a set that is not a data folder of its format under ``root``, naming it."""
    from cmr.data.cmrbench import is_cmrbench_dir
    from cmr.data.outcomes import is_outcome_dir

    for s in sets:
        if not (is_cmrbench_dir(root / "cmrbench") if s == "cmrbench" else is_outcome_dir(root / "routing" / s)):
            where = root / "cmrbench" if s == "cmrbench" else root / "routing" / s
            raise BenchThresholdError(f"--sets {s!r}: no data set of its format at {where}")


def measure(root: Path, sets: Sequence[str], sizes: Sequence[int], seeds: Sequence[int]) -> list[dict[str, Any]]:
    """One row per (set, size, seed): each embedding's figure on the full test split."""
    from cmr.errors import ConfigError

    rows = []
    for s in sets:
        for n in sizes:
            for seed in (seeds if n else seeds[:1]):  # the whole split: no subset to vary
                row: dict[str, Any] = {"set": s, "size": n, "seed": seed}
                for emb in EMBEDDINGS:
                    t0 = time.perf_counter()
                    try:
                        r = _cmrbench(root, n, seed, emb) if s == "cmrbench" else _outcomes(root, s, n, seed, emb)
                    except ConfigError as e:  # too few terms to fit the lexical part: auto would stay dense
                        row[emb] = {"value": None, "error": str(e)}
                        continue
                    row.update(n_prompts=r["n_prompts"], n_texts=r["n_texts"], policy=r["policy"], figure=r["figure"])
                    row[emb] = {k: r[k] for k in ("value", "m_acc", "embedding_used") if k in r} | {"wall_s": time.perf_counter() - t0}
                print(f"{s} n={row.get('n_prompts')} seed {seed}: " + ", ".join(f"{e} {_fmt(row[e]['value'])}" for e in EMBEDDINGS), flush=True)
                rows.append(row)
    return rows


def _fmt(v, spec: str = ".4f") -> str:
    return "not fittable" if v is None else format(v, spec)


def _rule(row: dict[str, Any], min_texts: int) -> str:
    """Whether ``embedding: auto`` fuses for this row's training (``fit_encoder``)."""
    if row["set"] != "cmrbench":
        return "no (outcome rows)"
    return "yes" if row["n_texts"] >= min_texts else "no"


def render(rep: dict[str, Any]) -> str:
    from cmr.encoders.lexical import AUTO_MIN_TEXTS

    lines = ["# When the fused embedding pays: MiniLM alone vs MiniLM + TF-IDF, by training prompts", "",
             f"`{rep['command']}` — {rep['started_utc']}, commit {(rep.get('git_commit') or '?')[:10]}, {rep['wall_s']:.0f} s.", "",
             f"Train split cut to n prompts (random per seed); lexical part fitted on them and the cards; full test split. "
             f"The rule of `embedding: auto`: fuse labelled rows (CMRBench's format) from {AUTO_MIN_TEXTS} texts (prompts + cards), "
             "never outcome rows. Δ = fused − minilm, points (×100); "
             "mean ± sd over seeds where a cut varies.", "",
             "| set | policy, figure | train prompts | texts fitted on | minilm | minilm+tfidf | Δ (points) | rule fuses |", "|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list] = {}
    for r in rep["rows"]:
        groups.setdefault((r["set"], r["size"]), []).append(r)
    sd = lambda x: f" ± {x.std(ddof=1):.3f}" if len(x) > 1 else ""  # noqa: E731
    for (s, _), rs in groups.items():
        r0 = rs[0]
        a = np.array([r["minilm"]["value"] for r in rs])
        if any(r["minilm+tfidf"]["value"] is None for r in rs):
            fused, delta = "not fittable", "—"
        else:
            b = np.array([r["minilm+tfidf"]["value"] for r in rs])
            d = (b - a) * 100
            fused, delta = f"{b.mean():.3f}{sd(b)}", f"{d.mean():+.2f}" + (f" ± {d.std(ddof=1):.2f}" if len(d) > 1 else "")
        lines.append(f"| {s} | {r0['policy']}, {r0['figure']} | {r0['n_prompts']} | {r0['n_texts']} | {a.mean():.3f}{sd(a)} | "
                     f"{fused} | {delta} | {_rule(r0, AUTO_MIN_TEXTS)} |")
    return "\n".join(lines) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``python -m bench.embedding_threshold``."""
    p.add_argument("--data-root", type=Path, default=None, help="folder holding cmrbench/ and routing/ (default: the shared data)")
    p.add_argument("--sets", nargs="+", default=list(SETS), help="cmrbench and/or outcome sets under routing/")
    p.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="train prompts per run (0: the whole split)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="subset (and training) seeds")
    p.add_argument("--out", default=None)


def run(a: argparse.Namespace) -> int:
    """Check the options, measure, write ``report.json`` / ``report.md`` and print the table."""
    from cmr import constants
    from cmr.bench import common

    if any(n < 0 for n in a.sizes):
        raise BenchThresholdError(f"--sizes: each must be ≥ 0 (got {min(a.sizes)})")
    root = a.data_root or constants.data_root()
    check_sets(root, a.sets)
    started = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    rep = {"command": a.command_line, "started_utc": started.isoformat(timespec="seconds"),
           "rows": measure(root, a.sets, a.sizes, a.seeds), **common.run_info()}
    rep["wall_s"] = time.perf_counter() - t0
    out = Path(a.out or f"runs/embedding-threshold-{started:%Y%m%dT%H%M%SZ}")
    md = render(rep)
    common.write_json(out / "report.json", rep)
    common.write_text(out / "report.md", md)
    print(md)
    return 0


def main(argv: list[str] | None = None) -> int:
    from bench import cli

    return cli("python -m bench.embedding_threshold", __doc__, add_arguments, run, BenchThresholdError, "bench_embedding_threshold", argv)


if __name__ == "__main__":
    raise SystemExit(main())
