"""``cmr serve`` as a user runs it: a subprocess that starts its own Ray, serves, and stops cleanly
on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from cmr import constants

pytestmark = pytest.mark.ray


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cmr_serve_starts_serves_and_stops(tmp_path):
    port = _free_port()
    # HAProxy mode (the default where it can run): an ingress replica drains 30 s before it exits
    # so that load balancers notice; a test has none
    env = {**os.environ, "CMR_CACHE": str(constants.cache_dir()), "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0", "HF_HUB_OFFLINE": "1",
           "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"}
    cmd = [sys.executable, "-m", "cmr.cli", "serve", "--http-port", str(port), "--grpc-port", "0", "--home", str(tmp_path),
           "--train-limit", "20", "--no-learner", "--num-cpus", "2"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        lines = []
        end = time.monotonic() + 300
        for line in proc.stdout:  # "cmr: serving ..." once the app is up
            lines.append(line)
            if line.startswith("cmr: serving") or time.monotonic() > end:
                break
        assert lines and lines[-1].startswith(f"cmr: serving http://127.0.0.1:{port}/v1"), lines
        # API keys are on: the first start created the bootstrap key, printed once and saved 0600
        key = (tmp_path / "serve" / "bootstrap.key").read_text().strip()
        assert any(key in line for line in lines) and (tmp_path / "serve" / "bootstrap.key").stat().st_mode & 0o077 == 0
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as c:
            assert c.get("/healthz").json()["checkpoint_version"] == 1
            msg = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 3}
            assert c.post("/v1/chat/completions", json=msg).status_code == 401
            r = c.post("/v1/chat/completions", json=msg, headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200 and r.json()["model"] in ("tiny-gpt2-a", "tiny-gpt2-b")
        assert (tmp_path / "serve" / "hub.sqlite").is_file() and (tmp_path / "models" / "tiny-gpt2-a" / "config.json").is_file()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert rc == 0
