"""Register → visible on every replica: how long until a model registered on one replica shows in
the hub version of the others (what a router compares per batch before reloading its cards).

    python -m bench.store_propagation [--n 200] [--replicas 3] [--dsn postgresql://…] [--out FILE.json]

Each replica is its own process with its own store (PostgreSQL: its own pool and LISTEN thread;
SQLite: its own connection to the file), polling ``version()`` every millisecond; the writer
registers one card at a time (``ModelHub.add``, a commit) and waits until every replica saw it.
Latency = first poll that sees the new version − the moment ``add`` was called (CLOCK_MONOTONIC is
shared by the processes of one machine). Without ``--dsn`` a throwaway PostgreSQL server
(tests/pg.py, fsync on) is started and stopped. Both backends are measured in one run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np


def _replica(dsn, path, ready, stop, out) -> None:
    from cmr.hub import PgHubStore, open_hub_store
    from cmr.state import PgDatabase

    store = PgHubStore(PgDatabase(dsn)) if dsn else open_hub_store(None, path)
    seen, last = {}, store.version()
    ready.set()
    while not stop.is_set():
        v = store.version()
        if v > last:
            now = time.monotonic()
            for k in range(last + 1, v + 1):
                seen[k] = now
            last = v
        time.sleep(0.001)
    store.close()
    out.put(seen)


def measure(dsn: str | None, path: Path, n: int, replicas: int) -> dict:
    from cmr.hub import ModelHub, open_hub_store
    from cmr.types import ModelCard

    ctx = mp.get_context("spawn")
    writer = open_hub_store(dsn, path)
    hub = ModelHub(writer)
    stop, out = ctx.Event(), ctx.Queue()
    readies = [ctx.Event() for _ in range(replicas)]
    procs = [ctx.Process(target=_replica, args=(dsn, str(path), r, stop, out)) for r in readies]
    for p in procs:
        p.start()
    for r in readies:
        r.wait(120)
    started, run = {}, time.strftime("%H%M%S")
    for i in range(n):
        t0 = time.monotonic()
        v = hub.add(ModelCard(id=f"prop-{run}-{i:04d}", description="propagation probe"))
        started[v] = t0
        time.sleep(0.02)  # registrations arrive one at a time, as an operator's would
    time.sleep(1.0)
    stop.set()
    seen = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
    writer.close()
    lat = np.array([s.get(v, np.inf) - t0 for s in seen for v, t0 in started.items()]) * 1e3
    missed = int(np.isinf(lat).sum())
    ok = lat[np.isfinite(lat)]
    return {"backend": "postgresql" if dsn else "sqlite", "registrations": n, "replicas": replicas, "missed": missed,
            "p50_ms": round(float(np.percentile(ok, 50)), 2), "p99_ms": round(float(np.percentile(ok, 99)), 2),
            "max_ms": round(float(ok.max()), 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--dsn", help="a PostgreSQL database to use (default: a throwaway server)")
    ap.add_argument("--out", help="write the results as JSON here")
    a = ap.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        results.append(measure(None, Path(tmp) / "hub.sqlite", a.n, a.replicas))
    if a.dsn:
        server = nullcontext(a.dsn)
    else:
        from tests.pg import throwaway_postgres

        server = throwaway_postgres(fsync=True)
    with server as dsn:
        results.append(measure(dsn, Path("-"), a.n, a.replicas))
    for r in results:
        print(json.dumps(r))
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
