"""Measure a running server: routing accuracy on CMRBench test splits through ``POST /v1/route``,
and routing latency/throughput under concurrency.

    python -m bench.measure --url http://127.0.0.1:8000 --per-experience 200 --concurrency 1 32

Accuracy is over the test splits only (the served router was trained on the train splits), with
the decision restricted (``routing.allow``) to the models routable after that experience, as
the CMRBench protocol says. Decisions are not recorded (``record: false``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import numpy as np


async def _route_all(url: str, bodies: list[dict], concurrency: int, api_key: str | None = None) -> tuple[list[dict], list[float], float]:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    sem = asyncio.Semaphore(concurrency)
    lat: list[float] = [0.0] * len(bodies)
    out: list[dict] = [{}] * len(bodies)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=httpx.Limits(max_connections=concurrency), headers=headers) as client:
        async def one(i: int, body: dict) -> None:
            async with sem:
                t = time.perf_counter()
                r = await client.post("/v1/route", json=body)
                lat[i] = time.perf_counter() - t
                r.raise_for_status()
                out[i] = r.json()

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i, b) for i, b in enumerate(bodies)))
        wall = time.perf_counter() - t0
    return out, lat, wall


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--data", help="CMRBench folder (default: the shared data)")
    p.add_argument("--per-experience", type=int, default=200, help="test prompts sampled per experience (seed 0)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    p.add_argument("--api-key-file", help="file holding an API key with scope 'infer' (e.g. $CMR_HOME/serve/bootstrap.key); "
                   "not needed against a server started with --open")
    ns = p.parse_args(argv)
    api_key = None
    if ns.api_key_file:
        from pathlib import Path

        try:
            api_key = Path(ns.api_key_file).read_text().strip()
        except OSError as e:
            p.error(f"--api-key-file: {e.strerror}: {ns.api_key_file}")

    from cmr import constants
    from cmr.bench import metrics
    from cmr.data import load_cmrbench

    bench = load_cmrbench(ns.data or constants.data_root() / "cmrbench")
    index = {c.id: i for i, c in enumerate(bench.cards)}
    rng = np.random.default_rng(0)
    report: dict = {"url": ns.url, "per_experience": ns.per_experience, "accuracy": {}, "latency": {}}
    all_bodies = []
    for exp in bench.experiences:
        te = exp.test
        idx = rng.choice(len(te), min(ns.per_experience, len(te)), replace=False)
        allow = [c.id for c in bench.cards_upto(exp.k)]
        bodies = [{"query": te.texts[i], "record": False, "routing": {"allow": allow, "k": 1}} for i in idx]
        res, _, _ = asyncio.run(_route_all(ns.url, bodies, 16, api_key))
        m, f, d = metrics.accuracies([index[r["model"]] for r in res], bench.cards, te.subset(idx)).values()
        report["accuracy"][f"e{exp.k}"] = {"n": len(idx), "M-Acc": round(float(m), 4), "F-Acc": round(float(f), 4), "D-Acc": round(float(d), 4)}
        all_bodies += [{"query": b["query"], "record": False} for b in bodies]
    acc = report["accuracy"].values()
    report["accuracy"]["mean"] = {k: round(float(np.mean([a[k] for a in acc])), 4) for k in ("M-Acc", "F-Acc", "D-Acc")}
    for c in ns.concurrency:
        _, lat, wall = asyncio.run(_route_all(ns.url, all_bodies, c, api_key))
        ms = np.asarray(lat) * 1000
        report["latency"][f"c{c}"] = {"n": len(lat), "p50_ms": round(float(np.percentile(ms, 50)), 1), "p95_ms": round(float(np.percentile(ms, 95)), 1),
                                      "throughput_rps": round(len(lat) / wall, 1)}
    json.dump(report, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
