"""``cmr bench store`` without Ray: its options (bad ones exit 2 naming the option), how the
deployments' raw cells become the report (pooled latencies, CPU per request, the store's share,
the p99 floor) and the files it writes. The run itself (Ray + PostgreSQL, ~1 min at its smallest)
is measured, not tested: docs/results/store."""

from __future__ import annotations

import argparse
import json

import pytest

from bench import store
from cmr.cli import build_parser, main


def _part(lat: list[float], cpu: dict[str, float], ids=None) -> dict:
    return {"lat": lat, "wall_s": len(lat) / 100, "errors": 0, "error_samples": [], "models": ids or [None] * len(lat),
            "steal_s": 0.0, "cpu_s": cpu}


def _deployment(base_ms: float, offsets: list[int]) -> dict:
    return {"startup_s": 12.0,
            "route": _part([base_ms + i for i in range(100)], {"Router": 0.5, "Ingress": 0.3, "client": 0.1, "postgres": 0.1}),
            "route_norecord": _part([base_ms - 1 + i for i in range(100)], {"Router": 0.45, "Ingress": 0.3, "client": 0.1}),
            "feedback": {**_part([5.0] * len(offsets), {"Ingress": 0.2, "Router": 0.1}, ids=offsets), "duplicate_offsets": 0}}


def _args(**kw) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    store.add_arguments(p)
    return p.parse_args([f"--{k.replace('_', '-')}={v}" for k, v in kw.items()])


def test_cli_registers_the_command_with_its_defaults():
    a = build_parser().parse_args(["bench", "store"])
    assert a.func is store.run and a.rounds == 2 and a.dsn is None and a.requests >= 100


@pytest.mark.parametrize("argv, field", [(["--requests", "0"], "--requests"), (["--rounds", "-1"], "--rounds"),
                                         (["--direct-events", "0"], "--direct-events"), (["--dsn", "sqlite"], "--dsn"), (["--dsn", "mysql://x/y"], "--dsn")])
def test_a_bad_option_exits_2_naming_it(argv, field, capsys):
    assert main(["bench", "store", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"cmr: error: {field}:"), err


def test_report_pools_deployments_and_applies_the_floor(tmp_path):
    a = _args(requests=100, rounds=2)
    raw = {"sqlite": [_deployment(10, list(range(1, 101))), _deployment(12, list(range(101, 201)))],
           "postgresql": [_deployment(11, list(range(1, 101))), _deployment(60, list(range(101, 201)))]}
    r = store.build_report(a, raw, started_utc="t", command="cmr bench store", machine="m", loadavg_start=[1, 1, 1],
                           loadavg_end=[2, 2, 2], order=["S", "P", "P", "S"], postgres="throwaway")
    s, p = r["backends"]["sqlite"]["route"], r["backends"]["postgresql"]["route"]
    assert s["n"] == p["n"] == 200  # both deployments pooled
    # CPU per answered request: 2 × (0.5 + 0.3 + 0.1 + 0.1) s over 200 requests; the server's excludes the client
    assert s["cpu_ms_per_request"]["Router"] == pytest.approx(5.0) and s["server_cpu_ms_per_request"] == pytest.approx(9.0)
    assert r["store_share"]["sqlite"]["cpu_ms"] == pytest.approx(9.0 - 7.5)  # route_norecord: 2 × 0.75 s / 200
    assert r["backends"]["postgresql"]["feedback"]["duplicate_offsets"] == 0
    f = r["floors"]["route_p99_pg_over_sqlite"]
    assert f["measured"] == pytest.approx(p["p99_ms"] / s["p99_ms"]) and f["met"] is (f["measured"] <= 1.2)
    assert f["met"] is False  # a PostgreSQL tail ~45 ms above SQLite's ~110 fails it

    feedback = {"n": 10, "p50_ms": 1.0, "p99_ms": 2.0, "events_per_s": 900.0, "threads": 8, "duplicate_offsets": 0,
                "cpu_ms_per_event": {"client": 0.3}}
    r["store_only"] = {b: {"record_batch16": {"p50_ms": 0.4, "p99_ms": 0.6}, "feedback": feedback} for b in ("sqlite", "postgresql")}
    store.write_report(r, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "report.json").read_text())["floors"] == r["floors"]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| postgresql | 900 (8 threads) |" in md
    assert "| postgresql | feedback |" in md and "| route_p99_pg_over_sqlite |" in md and "| NO |" in md


def test_cpu_of_a_server_outside_the_process_tree_is_counted_under_its_role():
    """A daemonised server (as pg_ctl leaves PostgreSQL: not a descendant of the benchmark) is
    found by a string of its command line, and its CPU is counted under that role, not another."""
    import subprocess
    import sys
    import time
    import uuid

    from bench.serve import _cpu_by_role

    marker = f"cmr-test-server-{uuid.uuid4().hex}"
    burn = "import sys, time\nt = time.process_time()\nwhile time.process_time() - t < 0.5: pass\ntime.sleep(5)"
    # sh starts the server in the background and exits: the server is re-parented, as a daemon is
    subprocess.run(["sh", "-c", f'"{sys.executable}" -c "$0" {marker} >/dev/null 2>&1 &', burn], check=True)
    deadline = time.monotonic() + 20
    cpu = {}
    while time.monotonic() < deadline and cpu.get("server", 0.0) < 0.4:
        time.sleep(0.2)
        cpu = _cpu_by_role({"server": marker})
    assert cpu.get("server", 0.0) >= 0.4, cpu
    assert "server" not in _cpu_by_role()  # without the hint it is someone else's process: not counted
