"""Markdown tables from benchmark reports: ``python -m cmr.bench.tables RUN_DIR ...``.

Reads every ``report.json`` under the given folders and prints one table per (protocol,
dataset, setting), one row per policy, ready to paste into a README.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from cmr.bench.common import fmt


def load_reports(paths: list[str]) -> list[dict[str, Any]]:
    """Every ``report.json`` under ``paths`` (folders searched recursively, or files)."""
    reps = []
    for p in map(Path, paths):
        files = [p] if p.is_file() else sorted(p.rglob("report.json"))
        for f in files:
            rep = json.loads(f.read_text(encoding="utf-8"))
            rep["_path"] = str(f.parent)
            reps.append(rep)
    return reps


def _group(rep: dict[str, Any]) -> tuple:
    if rep.get("protocol") == "cmr":
        return ("cmr", rep["dataset"], rep.get("feedback", "full"))
    return ("llm", rep["dataset"], float(rep.get("unseen", 0.0)))


def cmr_table(reps: list[dict[str, Any]]) -> str:
    rows = [
        "| policy | M-Acc | F-Acc | D-Acc | forgetting M | forgetting F | forgetting D | train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in reps:
        f, g = r["final"], r["forgetting"]
        rows.append(
            f"| {r['policy']} | {fmt(f['m_acc'])} | {fmt(f['f_acc'])} | {fmt(f['d_acc'])} | "
            f"{fmt(g['m'])} | {fmt(g['f'])} | {fmt(g['d'])} | {r['timings']['train_total_s']:.1f} |"
        )
    return "\n".join(rows)


def llm_table(reps: list[dict[str, Any]]) -> str:
    if all(r.get("equal_cost") for r in reps):
        rows = ["| policy | routed quality (= AIQ) | best single | oracle quality | train s |", "|---|---|---|---|---|"]
        for r in reps:
            rows.append(
                f"| {r['policy']} | {fmt(r['aiq'])} | {fmt(r['best_single']['quality'])} | {fmt(r['oracle']['quality'])} | "
                f"{r['timings']['train_s']:.1f} |"
            )
        return "\n".join(rows)
    rows = [
        "| policy | AIQ | max quality | quality at λ=0 | QNC | zero router AIQ | oracle AIQ | train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in reps:
        rows.append(
            f"| {r['policy']} | {fmt(r['aiq'])} | {fmt(r['max_quality'])} | {fmt(r['quality_at_lambda0'])} | "
            f"{fmt(r['qnc'])} | {fmt(r['zero_router_aiq'])} | {fmt(r['oracle_aiq'])} | {r['timings']['train_s']:.1f} |"
        )
    return "\n".join(rows)


# baselines first (weakest to strongest), other policies alphabetically, the oracle ceiling last
_ORDER = {"random": 0, "zeroshot": 1, "knn": 2, "cluster": 3, "oracle": 99}


def _row_key(rep: dict[str, Any]) -> tuple:
    return (_ORDER.get(rep["policy"], 50), rep["policy"])


def render(reps: list[dict[str, Any]]) -> str:
    """All tables, grouped by protocol, dataset and setting; baselines first, oracle last."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in reps:
        groups.setdefault(_group(r), []).append(r)
    out = []
    for key in sorted(groups, key=str):
        rs = sorted(groups[key], key=_row_key)
        if key[0] == "cmr":
            out += [f"### cmr bench cmr — {key[1]}, {key[2]} feedback", "", cmr_table(rs), ""]
        else:
            setting = f"unseen {key[2]:g}" if key[2] else "all models seen"
            out += [f"### cmr bench llm — {key[1]}, {setting}", "", llm_table(rs), ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cmr.bench.tables", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="run folders or report.json files")
    args = parser.parse_args(argv)
    reps = load_reports(args.paths)
    if not reps:
        print("no report.json found", file=sys.stderr)
        return 2
    print(render(reps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
