"""``cmr serve --proxy``: which front door a local Ray gets, the RAY_* environment that asks for it,
and the refusals (no binary → exit 2 with one line; ``--address`` → the cluster decides)."""

from __future__ import annotations

import argparse
import os
import stat
from pathlib import Path

import pytest

from cmr import constants
from services import proxy as px
from services import serve_cli


def _ns(**kw) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    serve_cli.add_arguments(p)
    return p.parse_args([f"--{k.replace('_', '-')}={v}" for k, v in kw.items()])


@pytest.fixture
def clean_env(monkeypatch):
    """Both variables absent, and restored afterwards even though a test writes os.environ
    (setenv records the original; delenv of an absent variable alone would not): the Ray tests
    later in the same session must not inherit a front door from here."""
    for name in (constants.RAY_HAPROXY_ENV, constants.RAY_HAPROXY_BINARY_ENV):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    return monkeypatch


def test_env_for_each_proxy():
    assert px.ray_proxy_env("haproxy") == {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
                                           "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "30"}
    assert px.ray_proxy_env("serve") == {"RAY_SERVE_ENABLE_HA_PROXY": "0"}  # explicit: beats an inherited 1
    with pytest.raises(ValueError, match="proxy"):
        px.ray_proxy_env("nginx")
    with pytest.raises(ValueError, match="proxy"):
        px.resolve_proxy("nginx")


def _fake_haproxy(tmp_path, version: str):
    fake = tmp_path / f"haproxy-{version}"
    fake.write_text(f"#!/bin/sh\necho 'HAProxy version {version}-1 2026/01/01 - https://haproxy.org/'\n")
    return fake


def test_binary_override_decides(clean_env, tmp_path):
    fake = _fake_haproxy(tmp_path, "2.8.25")
    clean_env.setenv(constants.RAY_HAPROXY_BINARY_ENV, str(fake))
    assert px.haproxy_binary() is None and px.resolve_proxy("auto") == "serve"  # not executable
    assert "is not an executable file" in px.haproxy_problem()
    fake.chmod(0o755)
    assert px.haproxy_binary() == str(fake) and px.haproxy_version(str(fake)) == (2, 8)
    assert px.haproxy_problem() is None and px.resolve_proxy("auto") == "haproxy"
    assert px.resolve_proxy("serve") == "serve"


def test_too_old_haproxy_is_not_used(clean_env, tmp_path):
    """Debian 12's HAProxy 2.6 rejects the config Ray 2.60 writes: auto must not pick it."""
    old = _fake_haproxy(tmp_path, "2.6.12")
    old.chmod(0o755)
    clean_env.setenv(constants.RAY_HAPROXY_BINARY_ENV, str(old))
    assert px.haproxy_version(str(old)) == (2, 6) and "version 2.6; " in px.haproxy_problem()
    assert px.resolve_proxy("auto") == "serve"


def test_auto_exports_haproxy_when_usable(clean_env, tmp_path, capsys):
    fake = _fake_haproxy(tmp_path, "3.0.11")
    fake.chmod(0o755)
    clean_env.setenv(constants.RAY_HAPROXY_BINARY_ENV, str(fake))
    assert serve_cli.choose_proxy(_ns()) == "haproxy"
    assert f"front door: haproxy (HAProxy {fake}" in capsys.readouterr().out
    assert serve_cli.choose_proxy(_ns(proxy="serve")) == "serve"
    # what cmr.raycluster.start puts into the environment Ray's processes inherit
    constants.export_for_ray_workers(px.ray_proxy_env("haproxy"))
    assert os.environ[constants.RAY_HAPROXY_ENV] == "1" and constants.proxy_in_env() == "haproxy"


def test_auto_falls_back_and_explicit_haproxy_exits_2(clean_env, capsys):
    clean_env.setenv(constants.RAY_HAPROXY_BINARY_ENV, "/nonexistent/haproxy")
    assert serve_cli.choose_proxy(_ns()) == "serve"
    assert "front door: serve (RAY_SERVE_HAPROXY_BINARY_PATH=/nonexistent/haproxy is not an executable file)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        serve_cli.choose_proxy(_ns(proxy="haproxy"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "/nonexistent/haproxy is not an executable file" in err


def test_address_leaves_the_cluster_env_alone(clean_env, capsys):
    assert serve_cli.choose_proxy(_ns(address="ray://head:10001", proxy="haproxy")) is None
    assert constants.RAY_HAPROXY_ENV not in os.environ
    assert "cluster's own environment decides" in capsys.readouterr().out


def test_k8s_ray_pods_get_haproxy():
    """KubeRay's `ray start` gets no `cmr serve` flag: the head and every worker take the flag from
    the cmr-env config map (Ray reads it when its processes start)."""
    import yaml

    base = constants.REPO_ROOT / "k8s" / "base"
    env = yaml.safe_load((base / "configmap.yaml").read_text())["data"]
    assert env[constants.RAY_HAPROXY_ENV] == px.ray_proxy_env("haproxy")[constants.RAY_HAPROXY_ENV]
    svc = yaml.safe_load((base / "rayservice.yaml").read_text())
    rc = svc["spec"]["rayClusterConfig"]
    pods = [rc["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in rc["workerGroupSpecs"]]
    for spec in pods:
        ray = spec["containers"][0]
        assert {"configMapRef": {"name": "cmr-env"}} in ray.get("envFrom", []), ray["name"]
        assert all(e["name"] != constants.RAY_HAPROXY_ENV for e in ray.get("env", [])), "overridden in a container"


# -- issue 14: the front door's files and a crash's leftover -----------------------------------
def _short_state():
    """A state folder short enough for HAProxy's sockets to live under it."""
    import tempfile

    return tempfile.mkdtemp(prefix="cmr-t-")


def test_haproxy_files_live_in_a_private_folder_of_the_state_dir():
    """Ray's default puts HAProxy's admin socket (mode 0666, admin level) under /tmp/haproxy-serve:
    any local user could repoint a backend and capture bearer keys. A local start moves every file
    into a 0700 folder of this user's, and sets the stats/metrics ports from the app's args."""
    import shutil

    from services.config import FrontDoorArgs

    state = _short_state()
    try:
        env = px.ray_proxy_env("haproxy", state, FrontDoorArgs(stats_port=18404, metrics_port=19101))
        d = px.front_door_dir(state)
        assert d.parent == Path(state).resolve()
        st = os.stat(d)
        assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.getuid()
        for name in px.RAY_HAPROXY_FILES:
            assert env[name] == str(d) or env[name].startswith(f"{d}/"), name
            # Ray adds "<56-hex node id>/" before the file name: the socket path must still fit
            assert len(os.path.join(os.path.dirname(env[name]), "0" * 56, "metrics.sock")) <= 97  # HAProxy's `log` path limit
        assert env["RAY_SERVE_HAPROXY_STATS_PORT"] == "18404" and env["RAY_SERVE_HAPROXY_METRICS_PORT"] == "19101"
        if px.haproxy_binary():  # Ray runs the wrapper that edits its config, which runs the real one
            assert env[constants.RAY_HAPROXY_BINARY_ENV] == str(d / px.WRAPPER)
            assert px._wrapped(env[constants.RAY_HAPROXY_BINARY_ENV]) == px.haproxy_binary()
        # issue 14 (2): limits that apply before any parsing, not Ray's hour-long client timeout / 2 GiB gRPC
        assert env["RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S"] == "60" and env["RAY_SERVE_HAPROXY_MAXCONN"] == "4096"
        assert env["RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"] == str(4 << 20)
        assert px.ray_proxy_env("serve", front_door=FrontDoorArgs())["RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"] == str(4 << 20)
        assert env[constants.RAY_HAPROXY_ENV] == "1"
    finally:
        shutil.rmtree(state)


def test_long_state_dir_gets_a_private_temp_folder_and_refuses_a_planted_one(tmp_path):
    state = tmp_path / ("x" * 80)  # too long for <state>/haproxy/<node id>/metrics.sock
    d = px.front_door_dir(state)
    try:
        assert len(str(d)) <= px._MAX_FOLDER and stat.S_IMODE(os.stat(d).st_mode) == 0o700
        assert px.front_door_dir(state) == d  # the same folder on every start: a leftover is found
    finally:
        d.rmdir()
    d.symlink_to(tmp_path)  # another user (or a stale link) got there first
    try:
        with pytest.raises(px.FrontDoorBusy, match="not this user's folder"):
            px.front_door_dir(state)
    finally:
        d.unlink()


def _sleeper(config_path):
    """A stand-in for HAProxy: a process whose command line names its config file."""
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "-f", str(config_path)])


def test_a_crashed_serves_front_door_is_stopped_and_a_foreign_process_left_alone(tmp_path):
    """kill -9 of cmr serve and Ray leaves HAProxy holding the ports: the next start stops it (only
    a process whose command line names a file in our folder), then refuses while a live cmr serve
    owns the folder (its pid file), and starts again once that one is gone."""
    import shutil

    state = _short_state()
    d = px.front_door_dir(state)
    ours, foreign = _sleeper(d / ("f" * 56) / "haproxy.cfg"), _sleeper(tmp_path / "haproxy.cfg")
    try:
        import time

        time.sleep(0.3)  # let both exec
        assert px.stale_front_doors(d) == [ours.pid]
        assert px.claim_front_door(d) == [ours.pid]
        assert ours.wait(timeout=10) != 0 and foreign.poll() is None
        assert (d / px.PID_FILE).read_text().split()[0] == str(os.getpid())
        assert stat.S_IMODE(os.stat(d / px.PID_FILE).st_mode) == 0o600
        # a second instance on the same state folder while the first lives: refused, nothing stopped
        (d / px.PID_FILE).write_text(f"{foreign.pid} {px._start_time(foreign.pid)}\n")
        with pytest.raises(px.FrontDoorBusy, match=f"another cmr serve \\(pid {foreign.pid}\\)"):
            px.claim_front_door(d)
        assert foreign.poll() is None
        foreign.kill()
        foreign.wait()
        assert px.claim_front_door(d) == []  # its pid file is stale now
        px.release_front_door(d)
        assert not (d / px.PID_FILE).exists()
    finally:
        for p in (ours, foreign):
            p.kill()
            p.wait()
        shutil.rmtree(state)


# the sections of Ray Serve's HAProxy template that cmr edits (Ray renders ports, paths, servers)
_RAY_CONFIG = """global
    log 127.0.0.1:514 local0 info
    stats socket {sock} mode 666 level admin expose-fd listeners
    stats timeout 30s
    maxconn 4096
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    log global
frontend prometheus
    bind :{metrics}
    mode http
    http-request use-service prometheus-exporter if {{ path /metrics }}
    no log
frontend http_frontend
    bind 127.0.0.1:{http}
    http-request return status 200 if {{ path /-/healthz }}
listen stats
  bind *:{stats}
  stats enable
  stats uri /stats
  stats refresh 1s
"""


@pytest.mark.skipif(px.haproxy_binary() is None, reason="no HAProxy binary here")
@pytest.mark.parametrize("ports", [(None, None), (18404, 19101)])
def test_the_wrapper_binds_stats_and_metrics_to_loopback_or_removes_them(tmp_path, ports):
    """Issue 14 (3): Ray's template binds HAProxy's unauthenticated stats page and Prometheus
    exporter on every interface at fixed ports (two instances clash) and leaves the admin socket
    0666 and no request-header timeout. The real HAProxy accepts the edited config (``-c``)."""
    import subprocess

    from services.config import FrontDoorArgs

    args = FrontDoorArgs(stats_port=ports[0], metrics_port=ports[1], http_request_timeout_s=7)
    wrapper = px.front_door_wrapper(tmp_path, px.haproxy_binary(), args)
    assert stat.S_IMODE(wrapper.stat().st_mode) == 0o700
    cfg = tmp_path / "node" / "haproxy.cfg"
    cfg.parent.mkdir()
    cfg.write_text(_RAY_CONFIG.format(sock=tmp_path / "a.sock", metrics=9101, stats=8404, http=18080))
    r = subprocess.run([str(wrapper), "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    edited = (cfg.parent / "haproxy.cfg.cmr").read_text()
    assert stat.S_IMODE((cfg.parent / "haproxy.cfg.cmr").stat().st_mode) == 0o600
    binds = [line.split()[1] for line in edited.splitlines() if line.split()[:1] == ["bind"]]
    if ports == (None, None):
        assert binds == ["127.0.0.1:18080"] and "prometheus" not in edited and "listen stats" not in edited
    else:
        assert binds == ["127.0.0.1:19101", "127.0.0.1:18080", "127.0.0.1:18404"]
    assert " mode 600 level admin" in edited and "mode 666" not in edited
    assert "\n    timeout http-request 7s\n" in edited.split("frontend")[0]
