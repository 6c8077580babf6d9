"""Ray Serve's front door (the process on the HTTP/gRPC ports): ``haproxy`` — Ray Serve starts
HAProxy (a C binary) on the ports and the ingress replica serves HTTP and gRPC itself ("direct
ingress") — or ``serve``, Serve's Python ProxyActor. Ray reads the choice from its environment
when its processes start, so it goes to ``cmr.raycluster.start(env=ray_proxy_env(...))`` before a
local cluster starts (a running cluster keeps the one its head and workers were started with)."""

from __future__ import annotations

import os
from pathlib import Path

from cmr.constants import RAY_HAPROXY_BINARY_ENV, RAY_HAPROXY_ENV, haproxy_binary_override

PROXIES = ("haproxy", "serve")
# the config Ray 2.60 writes uses tune.h2.be.* / tune.h2.fe.* (HAProxy 2.8+): Debian 12's 2.6
# refuses it (`haproxy -c`: unknown keyword); ray[serve] bundles 2.8 (the ray-haproxy wheel)
HAPROXY_MIN_VERSION = (2, 8)


def haproxy_binary() -> str | None:
    """The HAProxy executable Ray Serve would run, or None — Ray's own order:
    ``RAY_SERVE_HAPROXY_BINARY_PATH`` when set (None if it is not executable: Ray then refuses to
    start), the binary bundled in the ``ray-haproxy`` wheel (``ray[serve]`` on Linux), ``haproxy``
    on ``PATH``."""
    import importlib.util
    import shutil

    explicit = haproxy_binary_override()
    if explicit:
        explicit = _wrapped(explicit) or explicit
        return explicit if os.path.isfile(explicit) and os.access(explicit, os.X_OK) else None
    spec = importlib.util.find_spec("ray_haproxy")  # located, not imported
    if spec is not None and spec.origin:
        bundled = Path(spec.origin).parent / "bin" / "haproxy"
        if bundled.is_file() and os.access(bundled, os.X_OK):
            return str(bundled)
    return shutil.which("haproxy")


def haproxy_version(binary: str) -> tuple[int, int] | None:
    """``(major, minor)`` that ``binary -v`` reports, None if it does not run or say."""
    import re
    import subprocess

    try:
        out = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"version (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def haproxy_problem() -> str | None:
    """Why Ray Serve could not run HAProxy here (one line), or None when it can: no binary in
    Ray's search order, or one older than :data:`HAPROXY_MIN_VERSION`."""
    binary = haproxy_binary()
    if binary is None:
        override = haproxy_binary_override()
        return (f"{RAY_HAPROXY_BINARY_ENV}={override} is not an executable file" if override
                else "no HAProxy binary (none bundled by the ray-haproxy package, none on PATH)")
    version = haproxy_version(binary)
    if version is None or version < HAPROXY_MIN_VERSION:
        have = "an unknown version" if version is None else f"version {version[0]}.{version[1]}"
        return (f"{binary} is {have}; Ray Serve's HAProxy config needs {HAPROXY_MIN_VERSION[0]}.{HAPROXY_MIN_VERSION[1]}+ "
                f"(pip install 'ray[serve]' bundles one, or set {RAY_HAPROXY_BINARY_ENV})")
    return None


def resolve_proxy(choice: str) -> str:
    """``auto`` → ``haproxy`` when Ray Serve can run HAProxy here (:func:`haproxy_problem` is
    None), else ``serve``; ``haproxy`` and ``serve`` are returned as given (the caller checks)."""
    if choice not in ("auto", *PROXIES):
        raise ValueError(f"proxy must be one of auto, {', '.join(PROXIES)} (got {choice!r})")
    if choice == "auto":
        return "haproxy" if haproxy_problem() is None else "serve"
    return choice


#: Ray Serve's wait (seconds) for HAProxy to stop sending to a stopping direct-ingress replica
RAY_DRAIN_ENV = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"
LOCAL_DRAIN_S = 2
#: Ray Serve's wait (seconds) for a new proxy to report ready before it kills and restarts it
RAY_PROXY_READY_ENV = "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"
LOCAL_PROXY_READY_S = 30
#: where Ray Serve puts HAProxy's files (it adds a ``<node id>/`` folder before each file name);
#: its defaults are under /tmp/haproxy-serve, whose admin socket is mode 0666 at admin level
RAY_HAPROXY_FILES = {
    "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": "haproxy.cfg",
    "RAY_SERVE_HAPROXY_SOCKET_PATH": "admin.sock",
    "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": "",
    "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": "server-state",
    "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": "metrics.sock",
}
#: ``AppArgs.front_door`` field → the variable Ray reads when its processes start
RAY_FRONT_DOOR_ENV = {
    "stats_port": "RAY_SERVE_HAPROXY_STATS_PORT",
    "metrics_port": "RAY_SERVE_HAPROXY_METRICS_PORT",
    "client_timeout_s": "RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S",
    "max_connections": "RAY_SERVE_HAPROXY_MAXCONN",
    "grpc_max_message_bytes": "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE",
}
# <folder>/<56-hex node id>/metrics.sock must fit HAProxy's limit for a `log` socket path (97
# bytes; AF_UNIX itself allows 107): a longer state path gets a short folder in the temp dir
_MAX_FOLDER = 97 - 1 - 56 - 1 - len("metrics.sock")
PID_FILE = "cmr-serve.pid"


class FrontDoorBusy(RuntimeError):
    """Another live ``cmr serve`` owns this state folder's front door."""


def front_door_dir(state_dir: Path | str) -> Path:
    """The folder (mode 0700, this user's) for HAProxy's config, admin socket and server state:
    ``<state>/haproxy``, or, when that path is too long for a Unix socket, a per-user folder named
    by the state folder's hash under the system temp dir (refused if someone else made it)."""
    import hashlib
    import tempfile

    from cmr.state import private_dir

    d = Path(state_dir).resolve() / "haproxy"
    if len(str(d)) > _MAX_FOLDER:
        tag = hashlib.sha256(str(d).encode()).hexdigest()[:8]
        d = Path(tempfile.gettempdir()) / f"cmr-{os.getuid()}-{tag}"
        try:
            d.mkdir(mode=0o700)
        except FileExistsError:
            pass
        st = os.lstat(d)
        if not os.path.isdir(d) or os.path.islink(d) or st.st_uid != os.getuid():
            raise FrontDoorBusy(f"{d} exists and is not this user's folder: remove it or use a shorter --home")
    return private_dir(d)


def ray_proxy_env(proxy: str, state_dir: Path | str | None = None, front_door=None) -> dict[str, str]:
    """The ``RAY_*`` environment that makes Ray Serve use ``proxy`` (``haproxy`` or ``serve``).

    ``serve`` sets the flag to ``0`` explicitly, so an inherited ``RAY_SERVE_ENABLE_HA_PROXY=1``
    (e.g. from the container image) cannot turn HAProxy on behind the caller's back. With
    ``state_dir`` (a local start), HAProxy's files go to :func:`front_door_dir` instead of the
    shared temp dir. ``front_door`` (``AppArgs.front_door``) sets HAProxy's stats/metrics ports,
    client timeout and connection cap, and the gRPC message-size cap (either proxy)."""
    if proxy not in PROXIES:
        raise ValueError(f"proxy must be one of {', '.join(PROXIES)} (got {proxy!r})")
    limits = {name: str(getattr(front_door, f)) for f, name in RAY_FRONT_DOOR_ENV.items()
              if front_door and getattr(front_door, f) is not None}
    if proxy == "serve":
        return {RAY_HAPROXY_ENV: "0", **limits}
    # a Ray this process starts is one node: its HAProxy stops with it, so an ingress replica
    # need not wait Ray's default (sized for HAProxies on other nodes) before it exits
    # HAProxy's first start on a busy small machine can take longer than Ray's default readiness
    # wait, and a proxy that misses it is killed, failing the whole start
    env = {RAY_HAPROXY_ENV: "1", RAY_DRAIN_ENV: str(LOCAL_DRAIN_S), RAY_PROXY_READY_ENV: str(LOCAL_PROXY_READY_S)}
    if state_dir is not None:
        d = front_door_dir(state_dir)
        env.update({name: str(d / f) if f else str(d) for name, f in RAY_HAPROXY_FILES.items()})
        binary = haproxy_binary()
        if binary is not None:  # else Ray refuses to start HAProxy and says why
            env[RAY_HAPROXY_BINARY_ENV] = str(front_door_wrapper(d, binary, front_door))
    return {**env, **limits}


WRAPPER = "cmr-haproxy"
# Ray renders HAProxy's config from a fixed template with no setting for these: its stats page
# and Prometheus exporter bound on every interface (unauthenticated, fixed ports), its admin socket
# mode 666, no request-header timeout. The wrapper Ray runs as "haproxy" edits each config it is
# given (`-f`) into a copy and runs the real binary on that (exec: the pid Ray waits for).
_EDIT_AWK = r"""# services/proxy.py: the edits cmr makes to the HAProxy config Ray Serve renders
/^[^ \t#]/ { sec = $1 " " $2; skip = (sec == "frontend prometheus" && metrics == "") || (sec == "listen stats" && stats == "") }
skip { next }
$1 == "bind" && sec == "frontend prometheus" { print "    bind " metrics; next }
$1 == "bind" && sec == "listen stats" { print "    bind " stats; next }
$1 == "stats" && $2 == "socket" { sub(/ mode [0-7]+ /, " mode 600 ") }
{ print }
/^defaults/ && http_request != "" { print "    timeout http-request " http_request "s" }
"""
_WRAPPER_SH = """#!/bin/sh
# cmr (services/proxy.py): Ray Serve's HAProxy, run on a copy of each config it is given (-f)
# edited by {awk}: stats/metrics on 127.0.0.1 or off, admin socket 0600, request-header timeout
REAL={real}
umask 077
prev=
for a in "$@"; do
  shift
  if [ "$prev" = -f ]; then
    awk {vars} -f {awk} "$a" > "$a.cmr" || exit 1
    set -- "$@" "$a.cmr"
  else
    set -- "$@" "$a"
  fi
  prev=$a
done
exec "$REAL" "$@"
"""


def front_door_wrapper(d: Path | str, binary: str, front_door=None) -> Path:
    """Write ``<d>/cmr-haproxy`` (0700), the executable Ray Serve runs as HAProxy
    (``RAY_SERVE_HAPROXY_BINARY_PATH``): it edits the config Ray rendered (stats page and
    Prometheus exporter on 127.0.0.1 at ``front_door``'s ports, or removed when they are None;
    admin socket mode 0600; ``timeout http-request``) and execs ``binary`` on the edited copy."""
    import shlex

    from cmr.state import private_file

    d = Path(d)
    awk = private_file(d / "haproxy-edit.awk")
    awk.write_text(_EDIT_AWK)
    vals = {"stats": getattr(front_door, "stats_port", None), "metrics": getattr(front_door, "metrics_port", None)}
    vals = {k: f"127.0.0.1:{v}" if v else "" for k, v in vals.items()}
    vals["http_request"] = str(getattr(front_door, "http_request_timeout_s", "") or "")
    wrapper = private_file(d / WRAPPER)
    wrapper.write_text(_WRAPPER_SH.format(real=shlex.quote(binary), awk=shlex.quote(str(awk)),
                                          vars=" ".join(f"-v {k}={shlex.quote(v)}" for k, v in vals.items())))
    wrapper.chmod(0o700)
    return wrapper


def _wrapped(path: str) -> str | None:
    """The real HAProxy behind ``path`` when it is a :func:`front_door_wrapper`, else None."""
    import shlex

    if Path(path).name != WRAPPER:
        return None
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith("REAL="):
                return shlex.split(line[len("REAL="):])[0]
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _start_time(pid: int) -> str | None:
    """When the process started (clock ticks since boot), None when it is gone or a zombie: a pid
    with another start time is another process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def stale_front_doors(d: Path | str) -> list[int]:
    """This user's processes whose command line names a file in ``d`` (HAProxy started with a
    config there), other than this one: after a crash, the front door left holding the ports."""
    prefix = f"{Path(d)}/"
    found = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid():
            continue
        try:
            if p.stat().st_uid != os.getuid():
                continue
        except OSError:
            continue
        if any(a.startswith(prefix) for a in _cmdline(int(p.name))[1:]):
            found.append(int(p.name))
    return sorted(found)


def claim_front_door(d: Path | str, wait_s: float = 5.0) -> list[int]:
    """Before a local Ray starts HAProxy with its files in ``d``: refuse (:class:`FrontDoorBusy`)
    when a live ``cmr serve`` holds ``d`` (its pid file), else stop what a crashed one left
    (:func:`stale_front_doors`: SIGTERM, SIGKILL after ``wait_s``) and write this process's pid
    file. Returns the pids stopped."""
    import signal
    import time

    d = Path(d)
    pid_file = d / PID_FILE
    try:
        pid, started = pid_file.read_text().split()
        if int(pid) != os.getpid() and _start_time(int(pid)) == started:
            raise FrontDoorBusy(f"another cmr serve (pid {pid}) is serving from {d.parent}: stop it first, or use another --home")
    except (OSError, ValueError):
        pass
    stale = {pid: _start_time(pid) for pid in stale_front_doors(d)}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid, started in stale.items():
            if _start_time(pid) == started:  # not gone, not a new process with the old pid
                os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while any(_start_time(p) == t for p, t in stale.items()) and time.monotonic() < deadline:
            time.sleep(0.05)
    from cmr.state import private_file

    private_file(pid_file).write_text(f"{os.getpid()} {_start_time(os.getpid())}\n")
    return sorted(stale)


def release_front_door(d: Path | str) -> None:
    """Remove this process's pid file (a clean stop)."""
    pid_file = Path(d) / PID_FILE
    try:
        if pid_file.read_text().split()[0] == str(os.getpid()):
            pid_file.unlink()
    except (OSError, IndexError):
        pass
