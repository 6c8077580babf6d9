"""State store benchmark (issue 13): durable feedback events/s and /v1/route latency with the
SQLite store and with PostgreSQL, in one run, with the server's CPU per request.

``cmr bench store [--requests 300] [--concurrency 8] [--rounds 2] [--dsn postgresql://…] [--out DIR]``
(or ``python -m bench.store``)

One Ray instance on 127.0.0.1; in it the served app (``services.app.deploy``, the one deployment
of ``cmr serve``: CMRBench hub, ``knn`` trained on ``--train-limit`` requests per experience, no
pools, no learner, open mode) is deployed once per backend and round, in the order S P, P S, ...
(so a drift of the shared machine's speed hits both alike), each backend on its own ``home``.
Per deployment, at ``--concurrency``:

- ``route``: ``/v1/route`` with every decision recorded (the store write is on the response path:
  the router inserts a batch's decisions before it answers, so that feedback can follow at once);
  every request a different real CMRBench test prompt (no embedding cache answers);
- ``route_norecord``: the same with ``record`` false, nothing written: the store's share of ``route``;
- ``feedback``: one ``/v1/feedback`` per decision of ``route``; a 200 means committed (SQLite
  ``synchronous=FULL``; PostgreSQL ``synchronous_commit`` on, fsync on), so answered events/s is
  the durable feedback rate.

Before that, each store alone (``store_only``: the same store classes, in this process, no HTTP):
``--direct-events`` feedback commits from ``--concurrency`` threads, its own ceiling.

CPU ms per answered request by process (``bench.serve._cpu_by_role``), the PostgreSQL server's
processes included when this run started the server (a throwaway one, ``tests/pg.py``; with
``--dsn`` the database server's CPU is not visible here). Writes ``report.json`` and ``report.md``
into ``--out`` (default ``runs/store-<UTC>``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import tempfile
import time
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cmr.errors import CMRError

#: the issue's floor: route p99 with PostgreSQL at most this much above SQLite's, on one node
P99_RATIO_FLOOR = 1.20
CELLS = ("route", "route_norecord", "feedback")


class BenchStoreError(CMRError):
    """A bad option: one line, exit 2."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``cmr bench store`` and ``python -m bench.store``."""
    p.add_argument("--requests", type=int, default=300, help="routed requests per cell and deployment (each then gets a feedback post)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    p.add_argument("--rounds", type=int, default=2, help="deployments per backend, alternating the order (S P, P S, ...)")
    p.add_argument("--direct-events", type=int, default=2000, help="feedback events posted to each store alone (in-process, no HTTP)")
    p.add_argument("--train-limit", type=int, default=40, help="first start: knn trained on this many requests per experience")
    p.add_argument("--dsn", default=None, help="a PostgreSQL database to use (default: a throwaway server, fsync on)")
    p.add_argument("--proxy", choices=("haproxy", "serve"), default=None, help="the front door (default haproxy when its binary exists)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default runs/store-<UTC>)")


def check_args(a: argparse.Namespace) -> None:
    """One line naming the option for a value the run cannot use."""
    for name in ("requests", "concurrency", "rounds", "train_limit", "direct_events"):
        if getattr(a, name) < 1:
            raise BenchStoreError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(a, name)}")
    if a.dsn is not None:
        from cmr.state import check_store

        try:
            if check_store(a.dsn) is None:
                raise ValueError("expected a postgresql://… DSN (SQLite is always measured)")
        except ValueError as e:
            raise BenchStoreError(f"--dsn: {e}") from None


def _pg_server_marker(dsn: str) -> str | None:
    """What identifies the throwaway server's processes: its socket folder (``host=`` of the DSN,
    which tests/pg.py passes to the server's command line); None for a server elsewhere."""
    host = parse_qs(urlsplit(dsn).query).get("host", [""])[0]
    return host if host.startswith("/") else None


def store_only(dsn: str | None, path: Path, n: int, threads: int, marker: str | None) -> dict[str, Any]:
    """The decision store alone, in this process (no HTTP, no Ray): ``n`` decisions recorded in
    batches of 16 (as a router batch does), then one ``add_feedback`` per decision from ``threads``
    threads. Committed feedback events/s and each commit's latency: the store's own ceiling, which
    the served path (above it: proxy, ingress, router) does not reach on 2 cores."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from bench.serve import _cpu_by_role, _pcts
    from cmr.types import Decision
    from services.store import open_decision_store

    store = open_decision_store(dsn, path)
    servers = {"postgres": marker} if marker else None
    try:
        ids = [f"bench-{os.urandom(8).hex()}" for _ in range(n)]
        emb = np.zeros((16, 384), dtype=np.float32)
        rec: list[float] = []
        for i in range(0, n, 16):
            batch = [Decision(model="m", score=0.5, utility=0.5, request_id=r) for r in ids[i: i + 16]]
            t = time.perf_counter()
            store.record(batch, ["q"] * len(batch), emb[: len(batch)], [0.001] * len(batch))
            rec.append((time.perf_counter() - t) * 1e3)

        def post(r: str) -> tuple[float, int]:
            t = time.perf_counter()
            off = store.add_feedback(r, 0.5)
            return (time.perf_counter() - t) * 1e3, off

        cpu0, t0 = _cpu_by_role(servers), time.perf_counter()
        with ThreadPoolExecutor(threads) as ex:
            got = list(ex.map(post, ids))
        wall, cpu1 = time.perf_counter() - t0, _cpu_by_role(servers)
    finally:
        store.close()
    offs = [o for _, o in got]
    # this process (the store's client side) and the PostgreSQL server: nothing else serves here
    cpu = {k: round((cpu1[k] - cpu0.get(k, 0.0)) * 1e3 / n, 3) for k in ("client", "postgres") if k in cpu1}
    return {"record_batch16": _pcts(rec), "feedback": {**_pcts([ms for ms, _ in got]), "events_per_s": n / wall, "threads": threads,
            "duplicate_offsets": len(offs) - len(set(offs)), "cpu_ms_per_event": cpu}}


def _deployment(backend: str, dsn: str | None, home: Path, a: argparse.Namespace, marker: str | None,
                prompts: list[str], offset: int) -> dict[str, Any]:
    """Deploy the app on ``backend``, run the three cells, undeploy; the cells' raw results."""
    from bench.serve import _cpu_by_role, _free_port, _load, _steal_s
    from services.app import deploy, undeploy
    from services.config import AppArgs

    args = AppArgs(home=str(home), store=dsn, policy="knn", train_limit=a.train_limit, learner={"enabled": False},
                   auth={"open": True}, tiny_models=False, pools=[])
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    servers = {"postgres": marker} if marker else None
    t0 = time.perf_counter()
    deploy(args, port=port)
    try:
        startup = time.perf_counter() - t0
        asyncio.run(_load(url, "/v1/route", [{"query": q} for q in prompts[:16]], a.concurrency))  # warm-up
        n = a.requests
        qs = prompts[offset: offset + 2 * n]
        bodies = {"route": [{"query": q} for q in qs[:n]], "route_norecord": [{"query": q, "record": False} for q in qs[n:]]}
        out: dict[str, Any] = {"startup_s": round(startup, 1)}
        ids: list[str | None] = []
        for cell in CELLS:
            if cell == "feedback":
                body = [{"request_id": r, "reward": round((i % 10) / 9, 3)} for i, r in enumerate(ids) if r]
                path, field = "/v1/feedback", "offset"
            else:
                body, path, field = bodies[cell], "/v1/route", "request_id"
            cpu0, st0 = _cpu_by_role(servers), _steal_s()
            part = asyncio.run(_load(url, path, body, a.concurrency, field=field))
            cpu1, part["steal_s"] = _cpu_by_role(servers), _steal_s() - st0
            part["cpu_s"] = {k: cpu1[k] - cpu0.get(k, 0.0) for k in cpu1}
            if cell == "route":
                ids = list(part["models"])
            elif cell == "feedback":  # each acknowledged event has its own offset: none given twice
                offs = [o for o in part["models"] if o is not None]
                part["duplicate_offsets"] = len(offs) - len(set(offs))
            out[cell] = part
        return out
    finally:
        undeploy(args)


def summarise(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One backend's cell from its deployments: latencies pooled (``bench.serve._merge``), CPU ms
    per answered request by process role and in all."""
    from bench.serve import _merge

    cell = _merge(parts)
    cell.pop("models", None)
    cpu: dict[str, float] = {}
    for p in parts:
        for k, v in p["cpu_s"].items():
            cpu[k] = cpu.get(k, 0.0) + v
    if cell.get("n"):
        per = {k: round(v * 1e3 / cell["n"], 2) for k, v in cpu.items() if v > 0}
        cell["cpu_ms_per_request"] = dict(sorted(per.items(), key=lambda kv: -kv[1]))
        # the server's CPU: everything but the HTTP client (this process)
        cell["server_cpu_ms_per_request"] = round(sum(v for k, v in per.items() if k != "client"), 2)
    if any("duplicate_offsets" in p for p in parts):
        cell["duplicate_offsets"] = sum(p.get("duplicate_offsets", 0) for p in parts)
    return cell


def verdicts(backends: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The issue's floor: route p99, PostgreSQL over SQLite, at most ``P99_RATIO_FLOOR``."""
    s, p = backends.get("sqlite", {}).get("route", {}), backends.get("postgresql", {}).get("route", {})
    if not (s.get("n") and p.get("n")):
        return {}
    ratio = p["p99_ms"] / s["p99_ms"]
    return {"route_p99_pg_over_sqlite": {"measured": ratio, "floor": P99_RATIO_FLOOR, "met": ratio <= P99_RATIO_FLOOR}}


def render_md(r: dict[str, Any]) -> str:
    """The report as Markdown: one table per cell kind, both backends side by side."""
    lines = [f"# State store benchmark ({r['started_utc']})", "", f"`{r['command']}`", "",
             f"Machine: {r['machine']}; load average (1/5/15 min) at start {r['loadavg_start']}, at end {r['loadavg_end']}. "
             f"{r['rounds']} deployment(s) per backend, order {' '.join(r['order'])}; concurrency {r['concurrency']}, "
             f"{r['requests']} requests per cell and deployment. PostgreSQL: {r['postgres']}.", "",
             "| backend | cell | answered/s | p50 ms | p99 ms | errors | server CPU ms / request | by process | steal |",
             "|---|---|---|---|---|---|---|---|---|"]
    for cell in CELLS:
        for b, cells in r["backends"].items():
            c = cells[cell]
            by = ", ".join(f"{k} {v:.1f}" for k, v in list((c.get("cpu_ms_per_request") or {}).items())[:5])
            lines.append(f"| {b} | {cell} | {c.get('rps', 0):.1f} | {c.get('p50_ms', float('nan')):.1f} | {c.get('p99_ms', float('nan')):.1f} | "
                         f"{c['errors']} | {c.get('server_cpu_ms_per_request', float('nan')):.1f} | {by} | {c.get('steal_pct', float('nan')):.1f}% |")
    lines += ["", "Feedback: answered = committed (durable) events; duplicate offsets: "
              + ", ".join(f"{b} {cells['feedback'].get('duplicate_offsets', 0)}" for b, cells in r["backends"].items()), ""]
    if r.get("store_share"):
        lines += ["Store's share of a routed request (route − route_norecord, p50 ms / server CPU ms): "
                  + "; ".join(f"{b} {v['p50_ms']:.1f} / {v['cpu_ms']:.1f}" for b, v in r["store_share"].items()), ""]
    if r.get("store_only"):
        lines += ["## The store alone (in-process, no HTTP: its own ceiling)", "",
                  "| backend | feedback events/s (committed) | commit p50 ms | commit p99 ms | record 16 decisions p50 / p99 ms | CPU ms / event | duplicate offsets |",
                  "|---|---|---|---|---|---|---|"]
        for b, v in r["store_only"].items():
            f, rb = v["feedback"], v["record_batch16"]
            by = ", ".join(f"{k} {x:.2f}" for k, x in f["cpu_ms_per_event"].items())
            lines.append(f"| {b} | {f['events_per_s']:.0f} ({f['threads']} threads) | {f['p50_ms']:.2f} | {f['p99_ms']:.2f} | "
                         f"{rb['p50_ms']:.2f} / {rb['p99_ms']:.2f} | {by} | {f['duplicate_offsets']} |")
        lines.append("")
    lines += ["## Floor", "", "| floor | measured | limit | met |", "|---|---|---|---|"]
    for k, v in r["floors"].items():
        lines.append(f"| {k} | {v['measured']:.3g} | {v['floor']:g} | {'yes' if v['met'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def write_report(r: dict[str, Any], out: Path) -> None:
    """``report.json`` and ``report.md`` into ``out``, each written atomically."""
    import json

    from bench.serve import _write_atomic

    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / "report.json", json.dumps(r, indent=2) + "\n")
    _write_atomic(out / "report.md", render_md(r))


def build_report(a: argparse.Namespace, raw: dict[str, list[dict[str, Any]]], **info: Any) -> dict[str, Any]:
    """The report from each backend's deployments (``_deployment`` results, in run order)."""
    backends = {b: {cell: summarise([d[cell] for d in ds]) for cell in CELLS} for b, ds in raw.items()}
    share = {}
    for b, cells in backends.items():
        r, n = cells["route"], cells["route_norecord"]
        if r.get("n") and n.get("n"):
            share[b] = {"p50_ms": r["p50_ms"] - n["p50_ms"],
                        "cpu_ms": r.get("server_cpu_ms_per_request", 0.0) - n.get("server_cpu_ms_per_request", 0.0)}
    return {**info, "rounds": a.rounds, "concurrency": a.concurrency, "requests": a.requests, "train_limit": a.train_limit,
            "backends": backends, "store_share": share, "startup_s": {b: [d["startup_s"] for d in ds] for b, ds in raw.items()},
            "floors": verdicts(backends)}


def run(a: argparse.Namespace) -> int:
    """Run the benchmark ``a`` asks for; print and write the report."""
    from bench.serve import test_prompts
    from cmr import raycluster
    from services import proxy as px

    check_args(a)
    proxy = a.proxy or px.resolve_proxy("auto")
    if proxy == "haproxy" and px.haproxy_problem():
        raise BenchStoreError(f"--proxy haproxy: {px.haproxy_problem()} (or --proxy serve)")
    if a.dsn is None:
        from tests.pg import throwaway_postgres, unavailable

        if unavailable():
            raise BenchStoreError(f"no PostgreSQL to measure: {unavailable()} (or give --dsn)")
        server = throwaway_postgres(fsync=True)
    else:
        server = nullcontext(a.dsn)
    started = datetime.now(timezone.utc)
    out = a.out or Path("runs") / f"store-{started.strftime('%Y%m%dT%H%M%SZ')}"
    info = {"started_utc": started.isoformat(timespec="seconds"),
            "command": getattr(a, "command_line", None) or "cmr " + " ".join(sys.argv[1:]),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
            "loadavg_start": [round(x, 2) for x in os.getloadavg()], "proxy": proxy}
    # every request of the run a different prompt: deployments take consecutive slices
    prompts = test_prompts(10**9, seed=2)
    need = 16 + 2 * a.requests * a.rounds * 2
    if len(prompts) < need:
        raise BenchStoreError(f"--requests: {a.requests} × {a.rounds} rounds needs {need} distinct test prompts, the data has {len(prompts)}")
    raw: dict[str, list[dict[str, Any]]] = {"sqlite": [], "postgresql": []}
    order: list[str] = []
    with server as dsn, tempfile.TemporaryDirectory(prefix="cmr-bench-store-") as tmp:
        marker = _pg_server_marker(dsn) if a.dsn is None else None
        direct = {}
        for b in ("sqlite", "postgresql"):  # before Ray starts: no other process of this run is busy
            direct[b] = store_only(dsn if b == "postgresql" else None, Path(tmp) / "direct.sqlite", a.direct_events, a.concurrency, marker)
            f = direct[b]["feedback"]
            print(f"{b:<10} store alone: {f['events_per_s']:.0f} feedback events/s, p50 {f['p50_ms']:.2f} p99 {f['p99_ms']:.2f} ms", flush=True)
        with raycluster.running(env=px.ray_proxy_env(proxy)):
            offset = 16
            for rnd in range(a.rounds):
                for b in (("sqlite", "postgresql") if rnd % 2 == 0 else ("postgresql", "sqlite")):
                    d = _deployment(b, dsn if b == "postgresql" else None, Path(tmp) / b, a, marker, prompts, offset)
                    offset += 2 * a.requests
                    raw[b].append(d)
                    order.append(b[0].upper())
                    print(f"{b:<10} round {rnd + 1}: " + "  ".join(
                        f"{c} {d[c].get('rps', 0):.1f}/s p50 {d[c].get('p50_ms', float('nan')):.1f} p99 {d[c].get('p99_ms', float('nan')):.1f} ms"
                        f" err {d[c]['errors']}" for c in CELLS), flush=True)
    info.update({"order": order, "loadavg_end": [round(x, 2) for x in os.getloadavg()],
                 "postgres": ("throwaway server on this machine (tests/pg.py, fsync on, unix socket), its CPU counted"
                              if a.dsn is None else "--dsn (server CPU not counted)")})
    report = build_report(a, raw, **info)
    report["store_only"] = direct
    report["wall_s"] = round((datetime.now(timezone.utc) - started).total_seconds(), 1)
    write_report(report, out)
    print(render_md(report))
    print(f"wrote {out}/report.json, report.md")
    return 0


def main(argv: list[str] | None = None) -> int:
    from bench import cli

    return cli("python -m bench.store", __doc__, add_arguments, run, BenchStoreError, "bench_store", argv)


if __name__ == "__main__":
    raise SystemExit(main())
