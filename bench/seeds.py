"""Quality figures as mean ± sd over training seeds (splits fixed), and uniroute's unseen-model margin.

python -m bench.seeds [--sets routerbench routerdc7 cmrbench] [--policies knn cluster ...]
                      [--cmr-policies knn carve ...] [--seeds 0 1 2 3 4] [--unseen 0.33]
                      [--embedding minilm] [--out docs/results/seeds]

Each (set, policy, seed) is one run of the benchmark command users run (``cmr bench llm`` on the
outcome sets, ``cmr bench cmr`` on CMRBench), as its own process, its ``report.json`` kept under
``--out/runs/``. The seed is the benchmark's ``--seed``: the protocol's splits do not move with it
(train/test are the data's; an ``--unseen`` split hides models drawn with the seed), the policy's
own randomness (samples, initialisation, tuning draws) does. The report gives each figure as
mean ± sd (sample sd over the seeds) and, with ``--unseen``, uniroute's margin over knn per seed
on the same hidden models (a paired difference), mean ± sd.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bench import cli
from cmr.encoders.lexical import EMBEDDINGS

LLM_SETS = ("routerbench", "routerdc7")
#: the figures of each protocol's report: (key in report.json, label)
LLM_FIGURES = (("aiq", "AIQ"), ("quality_at_lambda0", "quality at λ=0"), ("zero_router_aiq", "zero router AIQ"))
CMR_FIGURES = (("m_acc", "M-Acc"), ("f_acc", "F-Acc"), ("d_acc", "D-Acc"))


class SeedsError(ValueError):
    """A bad option of the driver (exit 2, one line)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sets", nargs="+", default=["routerbench", "routerdc7", "cmrbench"], help="routerbench, routerdc7, cmrbench")
    p.add_argument("--policies", nargs="+", default=["knn", "cluster", "uniroute", "uniroute-map", "linucb", "carve"],
                   help="policies for the outcome sets: NAME[:KEY=VALUE,...][@EMBEDDING] (config and embedding of that row)")
    p.add_argument("--cmr-policies", nargs="+", default=["knn", "cluster", "carve"], help="policies for CMRBench (same form)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--unseen", type=float, default=0.33, help="uniroute vs knn with this fraction of models unseen (0: skip)")
    p.add_argument("--embedding", default="minilm", choices=EMBEDDINGS)
    p.add_argument("--data-root", type=Path, default=None, help="folder holding routing/ and cmrbench/ (default: the shared data)")
    p.add_argument("--out", type=Path, default=Path("docs/results/seeds"))


def _run(cmd: list[str], out: Path) -> dict[str, Any]:
    """One benchmark run as its own process; its report (the command's own ``report.json``)."""
    if not (out / "report.json").is_file():  # a finished run is kept: an interrupted sweep resumes
        tmp = tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.")  # moved into place only once complete
        r = subprocess.run([sys.executable, "-m", "cmr.cli", *cmd, "--out", tmp], capture_output=True, text=True)
        if r.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            # exit 2: the command refused its input (e.g. a --set key the policy does not have)
            raise (SeedsError if r.returncode == 2 else RuntimeError)(f"{' '.join(cmd)}: exit {r.returncode}: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
        os.replace(tmp, out)
    return json.loads((out / "report.json").read_text())


def _spec(spec: str, embedding: str) -> tuple[str, list[str]]:
    """``NAME[:KEY=VALUE,...][@EMBEDDING]`` → (policy name, its benchmark options)."""
    spec, _, emb = spec.partition("@")
    name, _, sets = spec.partition(":")
    if not name or (sets and not all("=" in kv for kv in sets.split(","))):
        raise SeedsError(f"policy {spec!r}: expected NAME[:KEY=VALUE,...][@EMBEDDING]")
    from cmr.policies import policy_names

    if name not in policy_names():
        raise SeedsError(f"policy {spec!r}: unknown policy {name!r} (known: {', '.join(policy_names())})")
    if emb and emb not in EMBEDDINGS:
        raise SeedsError(f"policy {spec!r}: unknown embedding {emb!r} ({', '.join(EMBEDDINGS)})")
    return name, [*(x for kv in sets.split(",") if kv for x in ("--set", kv)), "--embedding", emb or embedding]


def _stat(xs: Sequence[float]) -> dict[str, float]:
    a = np.asarray([x for x in xs if x is not None], dtype=float)
    return {"mean": float(a.mean()) if a.size else float("nan"), "sd": float(a.std(ddof=1)) if a.size > 1 else 0.0, "n": int(a.size)}


def run(a: argparse.Namespace) -> int:
    from cmr import constants

    unknown = sorted(set(a.sets) - {*LLM_SETS, "cmrbench"})
    if unknown:
        raise SeedsError(f"--sets: unknown {', '.join(unknown)} (known: {', '.join((*LLM_SETS, 'cmrbench'))})")
    if len(a.seeds) < 2:
        raise SeedsError("--seeds: at least 2 seeds for a standard deviation")
    if not 0 <= a.unseen < 1:
        raise SeedsError("--unseen: a fraction in [0, 1)")
    specs = {p: _spec(p, a.embedding) for p in (*a.policies, *a.cmr_policies)}  # refused before anything is written
    root = a.data_root or constants.data_root()
    runs = a.out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    started = datetime.now(timezone.utc)
    table: dict[str, dict[str, Any]] = {}
    emb = ["--embedding", a.embedding]
    for s in a.sets:
        llm = s in LLM_SETS
        data = root / ("routing/" + s if llm else "cmrbench")
        for pol in (a.policies if llm else a.cmr_policies):
            name, opts = specs[pol]
            per = []
            for seed in a.seeds:
                out = runs / f"{s}-{pol.replace(':', '-').replace('@', '-').replace(',', '-').replace('=', '')}-s{seed}"
                rep = _run(["bench", "llm" if llm else "cmr", "--data", str(data), "--policy", name, "--seed", str(seed), *opts], out)
                per.append(rep if llm else rep["final"])
                print(f"{s} {pol} seed {seed}: " + "  ".join(f"{lab} {per[-1].get(k, float('nan')):.4f}"
                                                          for k, lab in (LLM_FIGURES if llm else CMR_FIGURES)), flush=True)
            table[f"{s}/{pol}"] = {k: _stat([r.get(k) for r in per]) for k, _ in (LLM_FIGURES if llm else CMR_FIGURES)}
        if llm and a.unseen:
            diffs, got = [], {}
            for pol in ("knn", "uniroute"):
                got[pol] = [_run(["bench", "llm", "--data", str(data), "--policy", pol, "--seed", str(seed), "--unseen", str(a.unseen), *emb],
                                 runs / f"{s}-unseen{a.unseen}-{pol}-s{seed}")["aiq"] for seed in a.seeds]
            diffs = [u - k for u, k in zip(got["uniroute"], got["knn"])]
            table[f"{s}/unseen{a.unseen}"] = {"knn": _stat(got["knn"]), "uniroute": _stat(got["uniroute"]), "margin": _stat(diffs)}
            print(f"{s} unseen {a.unseen}: uniroute − knn AIQ {np.mean(diffs):+.4f} ± {np.std(diffs, ddof=1):.4f}", flush=True)
        report = _write(a, started, table)  # after each set: a long sweep cut short keeps what it measured
    print(render_md(report))
    return 0


def _write(a: argparse.Namespace, started: datetime, table: dict[str, Any]) -> dict[str, Any]:
    report = {"started_utc": started.isoformat(timespec="seconds"), "command": getattr(a, "command_line", None) or "python -m bench.seeds",
              "seeds": a.seeds, "embedding": a.embedding, "machine": f"{os.cpu_count()} CPUs", "table": table}
    for name, text in (("report.json", json.dumps(report, indent=2) + "\n"), ("report.md", render_md(report))):
        tmp = a.out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, a.out / name)
    return report


def render_md(report: dict[str, Any]) -> str:
    """The mean ± sd tables of a report."""
    f = lambda s: f"{s['mean']:.3f} ± {s['sd']:.3f}"  # noqa: E731
    seeds = report["seeds"]
    lines = [f"# Quality over {len(seeds)} training seeds ({report['started_utc']})", "", f"`{report['command']}`", "",
             f"Seeds {', '.join(map(str, seeds))} (splits fixed; the policy's own randomness varies), embedding `{report['embedding']}` "
             "where a row does not name its own (`POLICY@EMBEDDING`), test splits; mean ± sample sd.", ""]
    llm = {k: v for k, v in report["table"].items() if k.split("/")[0] in LLM_SETS and not k.split("/")[1].startswith("unseen")}
    if llm:
        lines += ["| set | policy | AIQ | quality at λ=0 | zero router AIQ |", "|---|---|---|---|---|"]
        lines += [f"| {k.split('/')[0]} | {k.split('/')[1]} | {f(v['aiq'])} | {f(v['quality_at_lambda0'])} | {f(v['zero_router_aiq'])} |"
                  for k, v in llm.items()]
        lines.append("")
    unseen = {k: v for k, v in report["table"].items() if "/unseen" in k}
    if unseen:
        lines += ["| set, models unseen | knn AIQ | uniroute AIQ | margin uniroute − knn (paired) |", "|---|---|---|---|"]
        lines += [f"| {k.split('/')[0]}, {k.split('unseen')[1]} | {f(v['knn'])} | {f(v['uniroute'])} | {v['margin']['mean']:+.3f} ± {v['margin']['sd']:.3f} |"
                  for k, v in unseen.items()]
        lines.append("")
    cmr = {k: v for k, v in report["table"].items() if k.startswith("cmrbench/")}
    if cmr:
        lines += ["| CMRBench policy | M-Acc | F-Acc | D-Acc |", "|---|---|---|---|"]
        lines += [f"| {k.split('/')[1]} | {f(v['m_acc'])} | {f(v['f_acc'])} | {f(v['d_acc'])} |" for k, v in cmr.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    return cli("python -m bench.seeds", __doc__, add_arguments, run, SeedsError, "bench_seeds", argv)


if __name__ == "__main__":
    sys.exit(main())
