"""Real Ray Serve in-process on CPU: one Ray per session, one Serve app per test module.

A module sets ``APP_ARGS`` (extra ``AppArgs`` fields), ``GRPC = True`` to open the gRPC port, and
``ENGINE_FACTORY = "fake-vllm"`` to give the pools ``fake_vllm_factory``.
State lives in a fresh ``CMR_HOME`` per module; the embedding cache stays the shared one, so the
CMRBench card and prompt texts are not re-encoded.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from tests.ray.serve_process import free_port

pytestmark = pytest.mark.ray


@dataclass
class ServedApp:
    url: str
    grpc_port: int | None
    args: object  # services.config.AppArgs


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from cmr import raycluster

    with raycluster.running():
        yield ray


@pytest.fixture(scope="module")
def served(ray_session, tmp_path_factory, request):
    from services.app import deploy, undeploy
    from services.config import AppArgs

    port = free_port()
    grpc_port = free_port() if getattr(request.module, "GRPC", False) else None
    home = tmp_path_factory.mktemp("cmr_home")
    # API keys are on by default in the server; these tests run in explicit open mode unless the
    # module's APP_ARGS says otherwise (tests/ray/test_security.py)
    fields = {"home": str(home), "train_limit": 40, "learner": {"poll_s": 0.5, "checkpoint_every_s": 0.5}, "auth": {"open": True}, **getattr(request.module, "APP_ARGS", {})}
    args = AppArgs(**fields)
    factory = None
    if getattr(request.module, "ENGINE_FACTORY", None) == "fake-vllm":
        from services.pools.vllm import fake_vllm_factory as factory
    deploy(args, port=port, grpc_port=grpc_port, engine_factory=factory)
    try:
        yield ServedApp(url=f"http://127.0.0.1:{port}", grpc_port=grpc_port, args=args)
    finally:
        undeploy(args)
