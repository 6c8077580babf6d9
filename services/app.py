"""``build_app(args)``: the one way to build the served application.

``serve run services.app:build_app``, ``cluster/serve.yaml``, KubeRay's ``serveConfigV2`` and
``cmr serve`` all come here; ``args`` is validated as ``AppArgs`` (pydantic), so a typo in a
config file fails with the field's name before anything is deployed.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from services.config import AppArgs, load_args
from services.ingress import Ingress
from services.pools.base import EngineFactory
from services.pools.deployment import PoolDeployment
from services.router import RouterDeployment
from services.routing import check_checkpoint_config, effective_pools


def build_app(args: dict[str, Any] | AppArgs | None = None, engine_factory: EngineFactory | None = None) -> Application:
    """Ingress → Router (+ learner actor) and one deployment per pool.

    ``engine_factory`` (Python callers only; YAML cannot name one) replaces ``make_engine`` in
    every pool, e.g. ``services.pools.vllm.fake_vllm_factory`` where vLLM cannot run.
    """
    # one ConfigError line naming the field (serve deploy, KubeRay, cmr serve) before anything is deployed
    args = args if isinstance(args, AppArgs) else load_args(args, source="build_app args")
    check_checkpoint_config(args)
    a = args.to_dict()
    router = serve.deployment(RouterDeployment, name="Router").options(
        num_replicas=args.router_replicas, ray_actor_options=args.router_actor_options, max_ongoing_requests=256,
    ).bind(a)
    pools = {}
    for p in effective_pools(args):
        opts: dict[str, Any] = {"ray_actor_options": p.ray_actor_options, "max_ongoing_requests": p.max_ongoing_requests}
        if p.autoscaling_config is not None:
            opts["autoscaling_config"] = p.autoscaling_config
        else:
            opts["num_replicas"] = p.num_replicas
        pools[p.name] = serve.deployment(PoolDeployment, name=f"Pool-{p.name}").options(**opts).bind(a, p.name, engine_factory)
    ingress = serve.deployment(Ingress, name="Ingress").options(ray_actor_options=args.ingress_actor_options, max_ongoing_requests=512)
    return ingress.bind(a, router, pools)


def deploy(args: AppArgs, *, host: str = "127.0.0.1", port: int = 8000, grpc_port: int | None = None,
           engine_factory: EngineFactory | None = None, logging_config: dict[str, Any] | None = None,
           proxy_location: str | None = None) -> None:
    """Start Serve on ``host:port`` (and gRPC on ``grpc_port``) and run the app as ``cmr`` at ``/``:
    the one deployment of ``cmr serve``, the serving benchmark, the load test and the Ray tests.
    Ray must be up (``cmr.raycluster.start``). ``proxy_location`` (Serve's: ``EveryNode``,
    ``HeadOnly``): None keeps Serve's default; several nodes on one host need ``HeadOnly`` (one port)."""
    from services.grpc import servicer_functions

    grpc = {"port": grpc_port, "grpc_servicer_functions": servicer_functions()} if grpc_port else None
    http = {"host": host, "port": port, "keep_alive_timeout_s": args.front_door.keep_alive_timeout_s}
    serve.start(http_options=http, grpc_options=grpc, **({"proxy_location": proxy_location} if proxy_location else {}))
    serve.run(build_app(args, engine_factory), name="cmr", route_prefix="/", logging_config=logging_config)


def undeploy(args: AppArgs) -> None:
    """Shut Serve down and kill the app's detached learner actor (it outlives Serve otherwise)."""
    import ray

    from services.learner import learner_handle

    serve.shutdown()
    h = learner_handle(args)
    if h is not None:
        ray.kill(h)
