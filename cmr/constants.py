"""The one place where cmr reads environment variables (all prefixed ``CMR_``).

Functions, not module-level values: nothing is read at import time, and tests can set the
environment before calling.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

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


def store_dsn() -> str | None:
    """Where durable state lives when ``AppArgs.store`` is unset: ``CMR_STORE`` (a
    ``postgresql://…`` DSN, or ``sqlite``); default None: SQLite files under the state folder."""
    return os.environ.get("CMR_STORE") or None


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


def export_for_ray_workers(extra: Mapping[str, str] | None = None) -> None:
    """Before ``ray.init`` (``cmr.raycluster.start``): the environment local Ray workers inherit
    from this driver — the same embedding cache (``CMR_CACHE``, resolved now), offline model
    loading, no uv runtime env, no tokenizer thread pools fighting Ray's — plus ``extra``."""
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ["CMR_CACHE"] = str(cache_dir())
    os.environ.update(extra or {})


# -- Ray Serve's front door: the variables Ray reads (the choice itself: services/proxy.py) -----
RAY_HAPROXY_ENV = "RAY_SERVE_ENABLE_HA_PROXY"
RAY_HAPROXY_BINARY_ENV = "RAY_SERVE_HAPROXY_BINARY_PATH"


def haproxy_binary_override() -> str | None:
    """``RAY_SERVE_HAPROXY_BINARY_PATH``: the HAProxy executable the operator names for Ray Serve."""
    return os.environ.get(RAY_HAPROXY_BINARY_ENV) or None


def proxy_in_env() -> str:
    """The proxy this environment asks Ray Serve for (``RAY_SERVE_ENABLE_HA_PROXY``, Ray's default
    ``serve``) — what a cluster started from it uses."""
    return "haproxy" if os.environ.get(RAY_HAPROXY_ENV, "0") == "1" else "serve"
