"""``cmr serve`` as a user runs it: a subprocess that starts its own Ray, serves, and stops cleanly
on SIGTERM."""

from __future__ import annotations

import shutil

import httpx
import pytest

from tests.ray.serve_process import cmr_serve, free_port

pytestmark = pytest.mark.ray


def test_cmr_serve_starts_serves_and_stops(tmp_path):
    port = free_port()
    args = ["--grpc-port", "0", "--home", str(tmp_path), "--train-limit", "20", "--no-learner", "--num-cpus", "2"]
    door = None
    with cmr_serve(args, port, stop_timeout_s=90) as lines:
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
        # issue 14: state private to the service user; HAProxy's config and admin socket in its 0700 folder
        assert all(p.stat().st_mode & 0o077 == 0 for p in [tmp_path / "serve", *(tmp_path / "serve").glob("*.sqlite*")])
        if any("front door: haproxy" in line for line in lines):
            from services.proxy import front_door_dir

            door = front_door_dir(tmp_path / "serve")
            assert list(door.glob("*/haproxy.cfg")) and list(door.glob("*/admin.sock")), sorted(door.rglob("*"))
    if door is not None and not door.is_relative_to(tmp_path):  # the temp-dir folder of a long state path
        shutil.rmtree(door, ignore_errors=True)


def test_a_local_start_never_joins_a_ray_found_on_the_machine():
    """Issue 14 (local users): with no ``--address``, Ray's default joins the machine's latest
    ``ray start`` (or ``RAY_ADDRESS``): another user's Ray would run the app, its keys and prompts
    (and ``--num-cpus`` failed with a traceback). A local start is always a new Ray."""
    import os
    import subprocess
    import sys

    code = ("from cmr import raycluster\nimport ray\nassert raycluster.start(num_cpus=1)\n"
            "print(ray.get_runtime_context().gcs_address)\nray.shutdown()")
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:1", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}  # nothing listens there
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and not r.stdout.strip().endswith(":1"), r.stdout + r.stderr[-2000:]
