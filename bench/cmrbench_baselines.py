"""Sanity check of the kNN and cluster baselines on CMRBench with *joint* training.

Joint = all four train splits at once, routing among all 2,315 cards (the setting of the data
README's reference table). Hyper-parameters are chosen on a seeded 80/20 validation split of the
joint train set; the chosen configuration is then refitted on the whole train set and reported
on the four test sets (average of the per-experience accuracies). The test sets are never used
for a choice. Not the official benchmark (that is ``cmr bench cmr``); a quick cross-check.

    python -m bench.cmrbench_baselines [--data DIR] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from cmr import constants
from cmr.bench import metrics
from cmr.data import Examples, load_cmrbench
from cmr.decide import choose
from cmr.encoders import default_encoder
from cmr.policies import make_policy


def accuracies(scores: np.ndarray, data: Examples, cards) -> dict[str, float]:
    """M-Acc / F-Acc / D-Acc of routing each row to the argmax (the one decision rule, λ = 0)."""
    pick = choose(scores, np.array([c.cost for c in cards]), 0.0)
    return {f"{m}_acc": v for m, v in metrics.accuracies(pick, cards, data).items()}


PRIOR_WEIGHTS = [0.0, 0.3, 1.0, 2.0, 4.0]


def card_similarity(policy, q, cards) -> np.ndarray:
    return q @ policy.card_embeddings(cards).T


def tune_knn(encoder, fit: Examples, val: Examples, cards):
    """Grid over k × weighting × prior weight on the validation rows; the neighbour part is
    computed once per (k, weighting) and the card term added for each prior weight."""
    results = []
    base = make_policy("knn", encoder=encoder, config={"prior_weight": 0.0})
    base.fit(fit, cards)
    cs = card_similarity(base, val.emb, cards)
    for k, (weighting, temp) in itertools.product([10, 30, 100], [("similarity", 0.05), ("softmax", 0.02), ("softmax", 0.05)]):
        base.config = dataclasses.replace(base.config, k=k, weighting=weighting, temperature=temp)
        est = base.neighbour_estimate(val.emb, cards)
        for pw in PRIOR_WEIGHTS:
            acc = accuracies(est + pw * cs, val, cards)
            results.append(({"k": k, "weighting": weighting, "temperature": temp, "prior_weight": pw}, acc))
    return results


def tune_cluster(encoder, fit: Examples, val: Examples, cards):
    """Grid over n_clusters × soft/temperature × smoothing × prior weight on the validation rows."""
    results = []
    for n in [256, 1024, 2048]:
        pol = make_policy("cluster", encoder=encoder, config={"n_clusters": n, "prior_weight": 0.0})
        pol.fit(fit, cards)
        cs = card_similarity(pol, val.emb, cards)
        for (soft, temp), sm in itertools.product([(False, 0.05), (True, 0.02)], [1.0, 5.0]):
            pol.config = dataclasses.replace(pol.config, soft=soft, temperature=temp, smoothing=sm)
            est = pol.score(val.emb, cards)
            for pw in PRIOR_WEIGHTS:
                acc = accuracies(est + pw * cs, val, cards)
                results.append(({"n_clusters": n, "soft": soft, "temperature": temp, "smoothing": sm, "prior_weight": pw}, acc))
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(constants.data_root() / "cmrbench"))
    ap.add_argument("--out", default="runs/cmrbench_baselines.json")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    t0 = time.time()
    bench = load_cmrbench(args.data)
    enc = default_encoder()
    for e in bench.experiences:
        e.train.emb, e.test.emb = enc.encode(e.train.texts), enc.encode(e.test.texts)
    cards = bench.cards
    train = Examples.concat([e.train for e in bench.experiences])
    rng = np.random.default_rng(args.seed)
    perm = rng.permutation(len(train))
    n_val = len(train) // 5
    val, fit = train.subset(perm[:n_val]), train.subset(perm[n_val:])
    print(f"joint train {len(train)} rows (fit {len(fit)}, validation {len(val)}), {len(cards)} cards; loaded in {time.time() - t0:.1f}s")

    report = {"protocol": "CMRBench joint training (e1..e4 train), all cards, test = mean over e1..e4 test sets", "seed": args.seed, "policies": {}}
    def evaluate(name, config):
        pol = make_policy(name, encoder=enc, config=config)
        pol.fit(train, cards)
        per_exp = {e.k: accuracies(pol.score(e.test.emb, cards), e.test, cards) for e in bench.experiences}
        mean = {m: float(np.mean([a[m] for a in per_exp.values()])) for m in ("m_acc", "f_acc", "d_acc")}
        return pol, mean, per_exp

    for name, tune in (("knn", tune_knn), ("cluster", tune_cluster)):
        t = time.time()
        pol, mean, per_exp = evaluate(name, None)
        print(f"{name}: default config {pol.config.to_dict()} (self-tuned card weight {pol.prior_weight}) test mean {mean} ({time.time() - t:.1f}s)")
        report["policies"][name + "_default"] = {"config": pol.config.to_dict(), "tuned_prior_weight": pol.prior_weight, "test_mean": mean, "test_per_experience": per_exp}
        t = time.time()
        res = tune(enc, fit, val, cards)
        best_cfg, best_val = max(res, key=lambda r: (r[1]["m_acc"], r[1]["d_acc"]))
        print(f"{name}: {len(res)} configs on validation in {time.time() - t:.1f}s; best {best_cfg} -> {best_val}")
        t = time.time()
        pol, mean, per_exp = evaluate(name, best_cfg)
        print(f"{name}: test (fit+score {time.time() - t:.1f}s) mean {mean}; per experience {per_exp}")
        report["policies"][name] = {"config": best_cfg, "validation": best_val, "test_mean": mean, "test_per_experience": per_exp,
                                     "validation_grid": [{"config": c, **a} for c, a in res]}

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=out.parent, delete=False, suffix=".tmp") as f:
        json.dump(report, f, indent=1)
    os.replace(f.name, out)
    print(f"wrote {out} ({time.time() - t0:.0f}s total)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
