"""Real Ray Serve in-process on CPU: one Ray per session, one Serve app per test module.

A module sets ``APP_ARGS`` (extra ``AppArgs`` fields), ``GRPC = True`` to open the gRPC port, and
``ENGINE_FACTORY = "fake-vllm"`` to give the pools ``fake_vllm_factory``.
State lives in a fresh ``CMR_HOME`` per module; the embedding cache stays the shared one, so the
CMRBench card and prompt texts are not re-encoded.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import pytest

from cmr import constants

pytestmark = pytest.mark.ray


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServedApp:
    url: str
    grpc_port: int | None
    args: object  # services.config.AppArgs


@pytest.fixture(scope="session")
def ray_session():
    # set before ray.init: workers inherit the driver's environment
    os.environ["CMR_CACHE"] = str(constants.cache_dir())
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def served(ray_session, tmp_path_factory, request):
    from ray import serve

    from services.app import build_app
    from services.config import AppArgs
    port = _free_port()
    grpc_port = grpc_options = None
    if getattr(request.module, "GRPC", False):
        from services.grpc import servicer_functions

        grpc_port = _free_port()
        grpc_options = {"port": grpc_port, "grpc_servicer_functions": servicer_functions()}
    serve.start(http_options={"host": "127.0.0.1", "port": port}, grpc_options=grpc_options)
    home = tmp_path_factory.mktemp("cmr_home")
    # API keys are on by default in the server; these tests run in explicit open mode unless the
    # module's APP_ARGS says otherwise (tests/ray/test_security.py)
    fields = {"home": str(home), "train_limit": 40, "learner": {"poll_s": 0.5}, "auth": {"open": True}, **getattr(request.module, "APP_ARGS", {})}
    args = AppArgs(**fields)
    factory = None
    if getattr(request.module, "ENGINE_FACTORY", None) == "fake-vllm":
        from services.pools.vllm import fake_vllm_factory as factory
    serve.run(build_app(args, engine_factory=factory), name="cmr", route_prefix="/")
    try:
        yield ServedApp(url=f"http://127.0.0.1:{port}", grpc_port=grpc_port, args=args)
    finally:
        serve.shutdown()
        from services.learner import learner_handle

        h = learner_handle(args)
        if h is not None:
            ray_session.kill(h)
