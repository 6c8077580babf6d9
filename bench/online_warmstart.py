"""Issue 3's online comparison with warm-started bandits.

    python -m bench.online_warmstart [--data routerbench] [--policy linucb --policy thompson] [--lam 0|sweep] [--out DIR]

``cmr bench online`` starts every bandit cold, while the fixed offline router it must beat is fit
with full outcomes on the first 10% of the stream. Here each bandit is also given that 10% with
full outcomes (``policy.fit``, the warm start issue 3 names) and then learns online from the
chosen model's reward only on the remaining 90%, through the same ``replay`` as the harness;
the cold bandit and the fixed ``knn`` run alongside. Regret (vs the oracle, at ``--lam``) is compared on
the rows after the warm-up and on the last quarter. Writes ``DIR/report.{json,md}``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

from cmr.bench import common
from cmr.bench.online import load_stream, replay
from cmr.continual.learner import Learner
from cmr.encoders import default_encoder
from cmr.policies import make_policy


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="routerbench")
    ap.add_argument("--policy", action="append", default=None)
    ap.add_argument("--warm", type=float, default=0.1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lam", default="0", help="cost weight, or 'sweep' (one seeded λ per prompt, as cmr bench online)")
    ap.add_argument("--out", default="docs/results/online-warmstart")
    args = ap.parse_args()
    policies = args.policy or ["linucb", "thompson"]
    d = load_stream(args.data, args.seed)
    stream = d["stream"]
    enc = default_encoder()
    common.embed(enc, [stream])
    n = len(stream)
    warm = max(1, int(math.ceil(args.warm * n)))
    last = max(1, (n - warm) // 4)
    warm_cards = [c for at, cs in d["segments"] if at < warm for c in cs]
    first = stream.subset(np.arange(warm))
    if args.lam == "sweep":
        from cmr.bench import metrics

        grid = metrics.lambda_grid(np.array([c.cost for c in d["eval"].cards], dtype=np.float64), 1.0)
        lam = np.random.default_rng(args.seed + 1).choice(grid, size=n)  # the harness's λs, row for row
    else:
        lam = float(args.lam)
    rows = []

    def run(label, name, fit: bool, learn: bool, start: int):
        pol = make_policy(name, encoder=enc, config={"seed": args.seed})
        t0 = time.perf_counter()
        if fit:
            Learner(pol).fit(first, warm_cards)
        r = replay(pol, stream, d["segments"], lam, args.batch_size, start=start, learn=learn)
        reg = r["regret"][warm - start :]  # rows after the warm-up, for every router
        row = {"router": label, "mean_regret_after_warm": float(reg.mean()), "mean_regret_last_quarter": float(reg[-last:].mean()),
               "mean_reward_after_warm": float(r["reward"][warm - start :].mean()), "s": time.perf_counter() - t0}
        print(f"{label}: regret after warm {row['mean_regret_after_warm']:.4f}, last quarter {row['mean_regret_last_quarter']:.4f}", flush=True)
        rows.append(row)

    run("knn fixed on first 10%", "knn", True, False, warm)
    for p in policies:
        run(f"{p} cold (as cmr bench online)", p, False, True, 0)
        run(f"{p} warm-started on first 10%", p, True, True, warm)
    rep = {"command": "python " + " ".join(sys.argv), "data": d["name"], "n": n, "warm_rows": warm, "last_quarter_rows": last,
           "lam": args.lam, "rows": rows, "info": common.run_info(), "load": " ".join(Path("/proc/loadavg").read_text().split()[:3])}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common.write_json(out / "report.json", rep)
    md = [f"# Warm-started bandits vs the fixed offline router — {d['name']}", "",
          f"`{rep['command']}` — {rep['info']['date']}, commit {rep['info']['git_commit']}, load average {rep['load']}. "
          f"{n} stream prompts, λ = {args.lam}, batches of {args.batch_size}; regret vs the oracle on rows {warm + 1}..{n} and on the last {last}.", "",
          "| router | mean regret after warm-up | mean regret, last quarter | mean reward after warm-up |", "|---|---|---|---|"]
    md += [f"| {r['router']} | {r['mean_regret_after_warm']:.4f} | {r['mean_regret_last_quarter']:.4f} | {r['mean_reward_after_warm']:.3f} |" for r in rows]
    common.write_text(out / "report.md", "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
