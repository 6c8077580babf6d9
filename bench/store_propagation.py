"""Register → visible, and calibration applied → in force, on every replica: how long until a
change made on one replica reaches the others.

    python -m bench.store_propagation [--what hub|calibration] [--n 200] [--replicas 3] [--dsn postgresql://…] [--out FILE.json]

Each replica is its own process with its own store (PostgreSQL: its own pool and LISTEN thread;
SQLite: its own connection to the file). ``hub``: replicas poll the hub ``version()`` every
millisecond (what a router compares per batch before reloading its cards); the writer registers
one card at a time (``ModelHub.add``, a commit). ``calibration``: replicas check the applied
calibration the way ``RouterCore``'s watcher does (``cmr.calibrate.applied``, woken by the
store's NOTIFY, else every ``AppArgs.reload_check_s``); the writer applies λ = 1, 2, … one at a
time (``cmr.calibrate.apply``, a random pause under one watcher period before each) and waits until
every replica has it. Latency = first check that sees the change − the moment the write was called
(CLOCK_MONOTONIC is shared by the processes of one machine). Without ``--dsn`` a throwaway
PostgreSQL server (tests/pg.py, fsync on) is started and stopped. Both backends are measured in one run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import tempfile
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np


def _open(what: str, dsn, path):
    """A replica's own store and (read the current value, wait until the next check)."""
    from cmr.state import PgDatabase

    if what == "hub":
        from cmr.hub import PgHubStore, open_hub_store

        store = PgHubStore(PgDatabase(dsn)) if dsn else open_hub_store(None, path)
        return store, store.version, lambda: time.sleep(0.001)
    from cmr.calibrate import applied
    from cmr.published import PgPublishedStore, open_published_store
    from services.config import AppArgs

    store = PgPublishedStore(PgDatabase(dsn)) if dsn else open_published_store(None, path)
    wake, period = threading.Event(), AppArgs.model_fields["reload_check_s"].default
    store.on_change(wake.set)  # as RouterCore's watcher

    def read() -> int:
        c = applied(store)
        return 0 if c is None else int(c.cost_weight)

    def wait() -> None:
        wake.wait(period)
        wake.clear()
    return store, read, wait


def _replica(what, dsn, path, ready, stop, out, ack) -> None:
    store, read, wait = _open(what, dsn, path)
    seen, last = {}, read()
    ready.set()
    while not stop.is_set():
        v = read()
        if v > last:
            now = time.monotonic()
            for k in range(last + 1, v + 1):
                seen[k] = now
            last = ack.value = v
        wait()
    store.close()
    out.put(seen)


def measure(dsn: str | None, path: Path, n: int, replicas: int, what: str = "hub") -> dict:
    from cmr.calibrate import Calibration, apply
    from cmr.hub import ModelHub, open_hub_store
    from cmr.published import open_published_store
    from cmr.types import ModelCard
    from services.config import AppArgs

    ctx = mp.get_context("spawn")
    writer = open_hub_store(dsn, path) if what == "hub" else open_published_store(dsn, path)
    stop, out = ctx.Event(), ctx.Queue()
    readies = [ctx.Event() for _ in range(replicas)]
    acks = [ctx.Value("q", 0) for _ in range(replicas)]
    procs = [ctx.Process(target=_replica, args=(what, dsn, str(path), r, stop, out, a)) for r, a in zip(readies, acks)]
    for p in procs:
        p.start()
    for r in readies:
        r.wait(120)
    started, run = {}, time.strftime("%H%M%S")
    if what == "hub":
        hub = ModelHub(writer)
        for i in range(n):
            t0 = time.monotonic()
            v = hub.add(ModelCard(id=f"prop-{run}-{i:04d}", description="propagation probe"))
            started[v] = t0
            time.sleep(0.02)  # registrations arrive one at a time, as an operator's would
    else:
        period = AppArgs.model_fields["reload_check_s"].default
        for v in range(1, n + 1):
            time.sleep(random.uniform(0, period))  # no phase lock with the replicas' checks
            started[v] = time.monotonic()
            apply(writer, Calibration(cost_weight=float(v), source="propagation probe"))
            deadline = time.monotonic() + 5
            while min(a.value for a in acks) < v and time.monotonic() < deadline:
                time.sleep(0.001)
    time.sleep(1.0)
    stop.set()
    seen = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
    writer.close()
    lat = np.array([s.get(v, np.inf) - t0 for s in seen for v, t0 in started.items()]) * 1e3
    missed = int(np.isinf(lat).sum())
    ok = lat[np.isfinite(lat)]
    return {"what": what, "backend": "postgresql" if dsn else "sqlite", "changes": n, "replicas": replicas, "missed": missed,
            "p50_ms": round(float(np.percentile(ok, 50)), 2), "p99_ms": round(float(np.percentile(ok, 99)), 2),
            "max_ms": round(float(ok.max()), 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--what", choices=("hub", "calibration"), default="hub", help="the change measured")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--dsn", help="a PostgreSQL database to use (default: a throwaway server)")
    ap.add_argument("--out", help="write the results as JSON here")
    a = ap.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        results.append(measure(None, Path(tmp) / f"{a.what}.sqlite", a.n, a.replicas, a.what))
    if a.dsn:
        server = nullcontext(a.dsn)
    else:
        from tests.pg import throwaway_postgres

        server = throwaway_postgres(fsync=True)
    with server as dsn:
        results.append(measure(dsn, Path("-"), a.n, a.replicas, a.what))
    for r in results:
        print(json.dumps(r))
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
