"""The front door under keyless abuse (issue 14, item 2), against a running ``cmr serve``:

    python -m bench.front_door --http-port 8000 --grpc-port 9000 [--idle 4000] [--grpc-mb 300] [--out FILE.json]

1. ``--idle`` connections are opened and held: half send nothing, half a request whose headers
   never end. While they are open, ``GET /healthz`` on a new connection is timed (floor: < 1 s).
   Then it waits past the request-header timeout and counts the held connections the server closed.
2. One gRPC ``Route`` message of ``--grpc-mb`` MB, no key: the status it gets and how much the
   ingress replica's peak resident memory (``VmHWM``) grew (floor: < 100 MB).

The file-descriptor soft limit is raised to the hard limit first (each held connection is one)."""

from __future__ import annotations

import argparse
import json
import resource
import socket
import time
from pathlib import Path

INGRESS_TITLE = "ServeReplica:cmr:Ingress"


def raise_fd_limit(need: int) -> int:
    """Soft ``RLIMIT_NOFILE`` raised towards ``need`` (at most the hard limit); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = need if hard == resource.RLIM_INFINITY else min(need, hard)
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def hold_connections(port: int, n: int) -> list[socket.socket]:
    """``n`` open connections to ``127.0.0.1:port``: even ones silent, odd ones with half-sent headers."""
    socks = []
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        if i % 2:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        socks.append(s)
    return socks


def closed_by_server(socks: list[socket.socket]) -> int:
    """How many of ``socks`` the server has closed (EOF or a reply, e.g. HAProxy's 408)."""
    import select

    poll = select.poll()  # select() stops at fd 1024
    for s in socks:
        poll.register(s, select.POLLIN | select.POLLHUP | select.POLLERR)
    return len(poll.poll(0))


def healthz_s(port: int, tries: int = 5) -> list[float]:
    """Seconds each of ``tries`` ``GET /healthz`` on a fresh connection took (inf: no 200)."""
    import httpx

    out = []
    for _ in range(tries):
        t = time.perf_counter()
        try:
            ok = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=30).status_code == 200
        except httpx.HTTPError:
            ok = False
        out.append(time.perf_counter() - t if ok else float("inf"))
    return out


def idle_connections(port: int, n: int, header_timeout_s: float | None = None) -> dict:
    """Item 1 of the module docstring; with ``header_timeout_s``, also waits that long (plus 2 s)
    and reports how many held connections the server closed."""
    raise_fd_limit(n + 256)
    t = time.perf_counter()
    socks = hold_connections(port, n)
    out = {"idle": n, "open_s": round(time.perf_counter() - t, 2), "healthz_s": [round(x, 3) for x in healthz_s(port)]}
    try:
        if header_timeout_s is not None:
            time.sleep(header_timeout_s + 2)
            out["closed_after_timeout"] = closed_by_server(socks)
            out["healthz_after_s"] = [round(x, 3) for x in healthz_s(port, 2)]
    finally:
        for s in socks:
            s.close()
    return out


def _title_pids(title: str) -> list[int]:
    pids = []
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit() and title in (p / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(p.name))
        except OSError:
            continue
    return pids


def _kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def oversize_grpc(grpc_port: int, mb: int) -> dict:
    """Item 2 of the module docstring (one message of ``mb`` MB, no key)."""
    import grpc

    from services.grpc import cmr_pb2 as pb
    from services.grpc import cmr_pb2_grpc

    pids = _title_pids(INGRESS_TITLE)
    before = {p: _kb(p, "VmHWM") for p in pids}
    rss = {p: _kb(p, "VmRSS") for p in pids}
    opts = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}", options=opts) as ch:
        grpc.channel_ready_future(ch).result(timeout=60)
        stub = cmr_pb2_grpc.CMRStub(ch)
        t = time.perf_counter()
        try:
            stub.Route(pb.RouteRequest(query="x" * (mb << 20)), timeout=120)
            code, details = "OK", ""
        except grpc.RpcError as e:
            code, details = e.code().name, e.details() or ""
        took = time.perf_counter() - t
    growth = max(((_kb(p, "VmHWM") - before[p]) for p in pids), default=None)
    return {"grpc_mb": mb, "code": code, "details": details[:200], "s": round(took, 2), "ingress_pids": pids,
            "ingress_rss_mb": [round(v / 1024) for v in rss.values()],
            "ingress_peak_growth_mb": None if growth is None else round(growth / 1024, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.front_door", description=__doc__.split("\n\n")[0])
    p.add_argument("--http-port", type=int, required=True)
    p.add_argument("--grpc-port", type=int, required=True)
    p.add_argument("--idle", type=int, default=4000)
    p.add_argument("--grpc-mb", type=int, default=300)
    p.add_argument("--header-timeout-s", type=float, default=10, help="the server's request-header timeout (front_door.http_request_timeout_s)")
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    res = {"idle": idle_connections(a.http_port, a.idle, a.header_timeout_s), "grpc": oversize_grpc(a.grpc_port, a.grpc_mb)}
    res["floors"] = {"healthz_under_1s": max(res["idle"]["healthz_s"]) < 1.0,
                     "grpc_refused_under_100mb": res["grpc"]["code"] != "OK" and (res["grpc"]["ingress_peak_growth_mb"] or 0) < 100}
    text = json.dumps(res, indent=1)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")
    return 0 if all(res["floors"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
