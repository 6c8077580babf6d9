"""``cmr serve`` in a subprocess (its own Ray instance): start it, wait for "cmr: serving", stop it
with SIGTERM and check it exits 0. Shared by the tests that need a process-level server."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from typing import Iterator

from cmr import constants


_handed_out: set[int] = set()


def free_port() -> int:
    """A port free now, for a server a test starts later. Not from the kernel's ephemeral range:
    a port from there (bind to 0, close) can be taken by any outgoing connection or port-0 bind
    (Ray opens many as it starts) before the server binds it. Not from Ray's worker ports either
    (10002-19999 by default). Never the same port twice in one test process."""
    try:
        low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    for _ in range(200):
        port = rng.randrange(20000, max(low, 20001))
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError("no free port between 20000 and the ephemeral range")


class Lines(list):
    """The lines ``cmr serve`` printed up to "cmr: serving"; ``proc``: its process."""

    proc: subprocess.Popen


def kill_9_all_but_haproxy(proc: subprocess.Popen) -> list[int]:
    """A crash: SIGKILL to ``proc`` and every process of its session (its Ray: GCS, raylet,
    workers) except HAProxy, which outlives them as it did in issue 14. Returns the pids killed."""
    pids = []
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
            exe = open(f"/proc/{p}/cmdline", "rb").read().split(b"\0")[0]
        except OSError:
            continue
        if int(fields[3]) == proc.pid and not exe.endswith(b"haproxy"):  # field 6 of stat: the session id
            pids.append(int(p))
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    return pids


@contextmanager
def cmr_serve(args: list[str], port: int, stop_timeout_s: float = 120) -> Iterator[Lines]:
    """Run ``cmr serve --http-port PORT ARGS...`` in its own session; yields the lines it printed
    up to "cmr: serving". On exit it is stopped with SIGTERM and must exit 0, unless the test
    killed it (:func:`kill_9_all_but_haproxy`)."""
    # HAProxy mode (the default where it can run): a direct-ingress replica waits this long for
    # HAProxy to stop sending before it exits (Ray's default 30 s, for HAProxies on other nodes);
    # one node here: keep the stop short
    env = {**os.environ, "CMR_CACHE": str(constants.cache_dir()), "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0", "HF_HUB_OFFLINE": "1",
           "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"}
    env.pop(constants.RAY_HAPROXY_ENV, None)  # `--proxy` decides, not an inherited value
    cmd = [sys.executable, "-m", "cmr.cli", "serve", "--http-port", str(port), *args]
    # stderr goes to a file (a pipe nobody reads could fill and block the server): its tail is
    # shown when the server fails to start or to stop, so a failing start in CI names its cause
    err = tempfile.TemporaryFile(mode="w+", prefix="cmr-serve-stderr")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True)

    def why() -> str:
        err.flush()
        err.seek(0)
        return "".join(lines) + "\n--- stderr (tail) ---\n" + err.read()[-4000:]

    lines = Lines()
    lines.proc = proc
    try:
        end = time.monotonic() + 300
        for line in proc.stdout:  # "cmr: serving ..." once the app is up
            lines.append(line)
            if line.startswith("cmr: serving") or time.monotonic() > end:
                break
        assert lines and lines[-1].startswith(f"cmr: serving http://127.0.0.1:{port}/v1"), why()
        yield lines
    finally:
        killed = proc.returncode == -signal.SIGKILL  # by the test: nothing left to stop
        if not killed:
            proc.send_signal(signal.SIGTERM)
            try:
                rc = proc.wait(timeout=stop_timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise
    assert killed or rc == 0, why()
    err.close()
