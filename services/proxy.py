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


def ray_proxy_env(proxy: str) -> dict[str, str]:
    """The ``RAY_*`` environment that makes Ray Serve use ``proxy`` (``haproxy`` or ``serve``).

    ``serve`` sets the flag to ``0`` explicitly, so an inherited ``RAY_SERVE_ENABLE_HA_PROXY=1``
    (e.g. from the container image) cannot turn HAProxy on behind the caller's back."""
    if proxy not in PROXIES:
        raise ValueError(f"proxy must be one of {', '.join(PROXIES)} (got {proxy!r})")
    if proxy == "serve":
        return {RAY_HAPROXY_ENV: "0"}
    # a Ray this process starts is one node: its HAProxy stops with it, so an ingress replica
    # need not wait Ray's default (sized for HAProxies on other nodes) before it exits
    return {RAY_HAPROXY_ENV: "1", RAY_DRAIN_ENV: str(LOCAL_DRAIN_S)}
