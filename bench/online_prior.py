"""The linear bandits' prior precision, empirical Bayes (the default) against the unit prior they
had before (``reg=1``), over seeds: what locality (issue 18) costs or gains in online learning.

    python -m bench.online_prior [--seeds 0 1 2 3 4] [--out docs/results/online-prior]

Each cell is one ``cmr bench online --policy linucb --policy thompson`` run (its report kept under
``--out/runs/``): RouterBench at λ = 0, RouterBench with a λ per request (``--lam sweep``) and
RouterDC7 (``--limit 6000``), once with the default prior and once with ``--set reg=1.0``. The
report gives each figure as mean ± sd over the seeds (the seed orders the stream).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

RUNS = {"routerbench": ["--data", "routerbench"], "routerbench-sweep": ["--data", "routerbench", "--lam", "sweep"],
        "routerdc7": ["--data", "routerdc7", "--limit", "6000"]}
VARIANTS = {"empirical Bayes (default)": [], "unit prior (reg=1, before)": ["--set", "reg=1.0"]}
FIGURES = (("regret_last_quarter", "regret, last quarter"), ("regret_after_warm", "regret after warm-up"), ("test_aiq", "test AIQ / quality"))


def _figures(report: dict, policy: str) -> dict[str, float]:
    r = report["policies"][policy]
    return {"regret_last_quarter": r["mean_regret_last_quarter"], "regret_after_warm": r["mean_regret_after_warm"], "test_aiq": r["test"]["aiq"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.online_prior", description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--out", type=Path, default=Path("docs/results/online-prior"))
    a = p.parse_args(argv)
    rows: dict[tuple[str, str, str], list[dict[str, float]]] = {}
    for run, args in RUNS.items():
        for variant, extra in VARIANTS.items():
            tag = "eb" if not extra else "unit"
            for seed in a.seeds:
                out = a.out / "runs" / f"{run}-{tag}-s{seed}"
                if not (out / "report.json").is_file():
                    subprocess.run([sys.executable, "-m", "cmr.cli", "bench", "online", "--policy", "linucb", "--policy", "thompson", *args, *extra,
                                    "--seed", str(seed), "--out", str(out)], check=True, stdout=subprocess.DEVNULL)
                rep = json.loads((out / "report.json").read_text())
                for pol in ("linucb", "thompson"):
                    rows.setdefault((run, pol, variant), []).append(_figures(rep, pol))
    lines = [f"# Linear bandits' prior precision: empirical Bayes vs the unit prior, seeds {' '.join(map(str, a.seeds))}", "",
             f"`python -m bench.online_prior --seeds {' '.join(map(str, a.seeds))} --out {a.out}`; each cell mean ± sample sd over the seeds.", "",
             "| run | policy | prior | " + " | ".join(label for _, label in FIGURES) + " |", "|---|---|---|" + "---|" * len(FIGURES)]
    summary = []
    for (run, pol, variant), vals in rows.items():
        cells = []
        for key, _ in FIGURES:
            x = np.array([v[key] for v in vals], dtype=float)
            cells.append(f"{x.mean():.3f} ± {x.std(ddof=1) if len(x) > 1 else 0.0:.3f}")
            summary.append({"run": run, "policy": pol, "prior": variant, "figure": key, "mean": float(x.mean()), "values": x.tolist()})
        lines.append(f"| {run} | {pol} | {variant} | " + " | ".join(cells) + " |")
    first = json.loads((a.out / "runs" / f"routerbench-eb-s{a.seeds[0]}" / "report.json").read_text())
    prov = {k: first.get(k) for k in ("date", "machine", "git_commit")}  # of the runs (kept under runs/)
    m = prov["machine"] or {}
    where = f"{m.get('platform')}, {m.get('cpus')} CPUs" if isinstance(m, dict) else str(m)
    lines[2:2] = [f"Runs from {prov['date']}, {where}, commit {prov['git_commit']}.", ""]
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "report.md").write_text("\n".join(lines) + "\n")
    (a.out / "report.json").write_text(json.dumps({"seeds": a.seeds, **prov, "rows": summary}, indent=2) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
