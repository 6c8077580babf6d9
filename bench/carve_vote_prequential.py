"""Does carve's domain vote help on a workload? Read from its train splits alone, prequentially.

python -m bench.carve_vote_prequential [--embedding minilm|minilm+tfidf] [--seed 0] [--votes ...] [--out DIR]

Carve runs the CMRBench continual protocol (``Learner.fit`` per experience, as ``cmr bench cmr``).
Before it learns experience k (k ≥ 2), the model trained on experiences 1..k−1 scores experience k's
*train* rows (their models and cards are live, not yet learnt from) under each vote weight v; these
rows are held out for that model, so the figure is a validation that needs no split. The vote is a
scoring-time option (it never changes training), so one trained model scores every v. After each
fit, the same v grid is scored on the test sets seen so far (reported beside it, not used to choose).

Writes ``DIR/report.json`` and ``DIR/report.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

VOTES = (0.0, 0.1, 0.2, 0.3, 0.45, 0.6, 0.8)


def _hits(policy, data, cards, votes) -> dict[str, dict[str, float]]:
    """M / F / D accuracy of ``policy`` on labelled ``data`` under each vote weight (keyed ``str(v)``)."""
    from dataclasses import replace

    from cmr.bench import metrics
    from cmr.decide import choose

    costs = np.array([c.cost for c in cards], dtype=np.float64)
    keep, out = policy.config, {}
    try:
        for v in votes:
            policy.config = replace(keep, domain_vote=v)
            pred = np.asarray(policy.score(data.emb, cards), np.float64)
            out[str(v)] = {f"{k}_acc": float(h.mean()) for k, h in metrics.routing_hits(choose(pred, costs), cards, data).items()}
    finally:
        policy.config = keep
    return out


def run(a: argparse.Namespace) -> dict[str, Any]:
    from cmr import constants
    from cmr.bench import common
    from cmr.continual.learner import Learner
    from cmr.data import load_cmrbench
    from cmr.policies import make_policy

    bench = load_cmrbench(constants.data_root() / "cmrbench")
    enc = common.fitted_encoder(a, [t for e in bench.experiences for t in e.train.texts], bench.cards)
    common.embed(enc, [p for e in bench.experiences for p in (e.train, e.test)])
    policy = make_policy("carve", encoder=enc, config={"seed": a.seed})
    common.embed_cards(policy, bench.cards)
    learner = Learner(policy)
    rows: list[dict[str, Any]] = []
    for exp in bench.experiences:
        live = tuple(bench.cards_upto(exp.k))
        policy.add_models(bench.cards_of(exp.k))
        pre = _hits(policy, exp.train, live, a.votes) if exp.k > 1 else None
        learner.fit(exp.train, list(live))
        per = [_hits(policy, bench.experiences[j].test, live, a.votes) for j in range(exp.k)]
        test = {v: {m: float(np.mean([p[v][m] for p in per])) for m in per[0][v]} for v in per[0]}
        rows.append({"experience": exp.k, "prequential_train": pre, "test_seen": test})
        print(f"e{exp.k}: prequential {json.dumps(pre)}\n    test {json.dumps(test)}", flush=True)
    return {"rows": rows}


def render(rep: dict[str, Any]) -> str:
    votes = rep["votes"]
    mean = lambda r: np.mean([r["m_acc"], r["f_acc"], r["d_acc"]])  # noqa: E731
    lines = [f"# carve's domain vote, prequential on the train splits ({rep['embedding']}, seed {rep['seed']})", "",
             f"`{rep['command']}` — {rep['started_utc']}, commit {(rep.get('git_commit') or '?')[:10]}, {rep['wall_s']:.0f} s.", "",
             "Before learning experience k, the model of experiences 1..k−1 routes experience k's train rows (held out for it) "
             "under each vote weight v: mean of M/F/D accuracy, then D. Test columns: after learning k, mean over the test "
             "sets seen (not used to choose).", "",
             "| experience | figure | " + " | ".join(f"v={v:g}" for v in votes) + " |", "|" + "---|" * (len(votes) + 2)]
    for r in rep["rows"]:
        if r["prequential_train"]:
            p = r["prequential_train"]
            lines.append(f"| e{r['experience']} | train, before learning it: M/F/D mean | " + " | ".join(f"{mean(p[str(v)]):.4f}" for v in votes) + " |")
            lines.append(f"| e{r['experience']} | train, before learning it: D | " + " | ".join(f"{p[str(v)]['d_acc']:.4f}" for v in votes) + " |")
        t = r["test_seen"]
        lines.append(f"| e{r['experience']} | test seen, after: M / D | " + " | ".join(f"{t[str(v)]['m_acc']:.3f} / {t[str(v)]['d_acc']:.3f}" for v in votes) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import sys

    from cmr.bench import common

    p = argparse.ArgumentParser(prog="python -m bench.carve_vote_prequential", description=__doc__.split("\n")[0])
    common.add_embedding_argument(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--votes", type=float, nargs="+", default=list(VOTES))
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if any(not 0 <= v <= 1 for v in a.votes):
        p.error("--votes: each in [0, 1]")
    started = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    rep = {"command": "python -m bench.carve_vote_prequential " + " ".join(sys.argv[1:] if argv is None else argv),
           "started_utc": started.isoformat(timespec="seconds"), "embedding": a.embedding, "seed": a.seed, "votes": a.votes,
           **run(a), **common.run_info()}
    rep["wall_s"] = time.perf_counter() - t0
    out = Path(a.out or f"runs/carve-vote-prequential-{a.embedding.replace('+', '-')}-s{a.seed}")
    common.write_json(out / "report.json", rep)
    common.write_text(out / "report.md", render(rep))
    print(render(rep))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
