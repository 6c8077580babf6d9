"""``cmr serve``: start Ray locally and serve the router (HTTP 8000, gRPC 9000 by default).

With no configuration it serves the embedded default: the CMRBench hub for ``/v1/route`` with a
router trained at first start, two tiny local chat models and the learner, all state under
``CMR_HOME``. ``--config`` reads a YAML of ``AppArgs`` fields (or a Serve config such as
``cluster/serve.yaml``); flags override it.

API keys are required unless ``--open``. At the first start without keys a bootstrap key (tenant
``default``, every scope) is created, printed once and saved to ``$CMR_HOME/serve/bootstrap.key``
(mode 0600); ``cmr keys`` makes and revokes others.

``--proxy`` chooses the front door on the HTTP and gRPC ports of the local Ray it starts:
``haproxy`` (Ray Serve runs HAProxy there and the ingress replica serves HTTP and gRPC itself, no
Python proxy hop), ``serve`` (Serve's Python ProxyActor), or ``auto`` (default: haproxy when a
binary is found, see ``services.proxy.haproxy_binary``). It goes into Ray's environment before
a local Ray starts; with ``--address`` the running cluster's environment decides.
"""

from __future__ import annotations

import argparse
import sys

# Ray, Serve and the app are imported inside run(): `cmr --help` must stay fast


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML with AppArgs fields, or a Serve config file (applications[0].args)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default 127.0.0.1; 0.0.0.0 to expose)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=9000, help="gRPC port; 0 disables gRPC")
    p.add_argument("--policy", help="routing policy (see `cmr policies`)")
    p.add_argument("--home", help="state folder (default CMR_HOME)")
    p.add_argument("--store", help="durable state: 'sqlite' (files under --home, the default) or a postgresql://… DSN shared by "
                                   "replicas on several nodes (AppArgs.store; default CMR_STORE)")
    p.add_argument("--train-limit", type=int, help="train the first-start router on at most this many requests per experience")
    p.add_argument("--checkpoints", help="where checkpoint versions are written: a path every node can read or a URI "
                                         "(s3://…, gs://…; AppArgs.checkpoints; default <home>/serve/checkpoints)")
    p.add_argument("--no-learner", action="store_true", help="do not start the online learner actor")
    p.add_argument("--no-tiny-models", action="store_true", help="do not create/serve the two tiny local chat models")
    p.add_argument("--num-cpus", type=int, help="CPUs for the local Ray instance (default: all)")
    p.add_argument("--address", help="connect to this Ray cluster instead of starting one")
    p.add_argument("--open", action="store_true", help="serve WITHOUT API keys (local use only; AuthArgs.open)")
    p.add_argument("--proxy", choices=("auto", "haproxy", "serve"), default="auto",
                   help="front door on the HTTP/gRPC ports: haproxy (Ray Serve's HAProxy + direct ingress), serve (Serve's "
                        "Python proxy), auto (default: haproxy when its binary is found). Ignored with --address")
    p.add_argument("--log-format", choices=("json", "text"), default="json",
                   help="Serve log encoding of the app's replicas (json: structured, with request ids)")


def build_args(ns: argparse.Namespace):
    """AppArgs from ``--config`` plus flag overrides (flags win), checked against the served
    checkpoint (``check_checkpoint_config``)."""
    from services.config import load_args, read_config
    from services.routing import check_checkpoint_config

    data = read_config(ns.config) if ns.config else {}
    if ns.policy:
        data["policy"] = ns.policy
    if ns.home:
        data["home"] = ns.home
    if getattr(ns, "store", None):
        data["store"] = ns.store
    if getattr(ns, "checkpoints", None):
        data["checkpoints"] = ns.checkpoints
    if ns.train_limit:
        data["train_limit"] = ns.train_limit
    if ns.no_learner:
        data["learner"] = {**(data.get("learner") or {}), "enabled": False}
    if ns.no_tiny_models:
        data["tiny_models"] = False
    if getattr(ns, "open", False):
        data["auth"] = {**(data.get("auth") or {}), "open": True}
    args = load_args(data, source=ns.config or "arguments")
    check_checkpoint_config(args)
    return args


def choose_proxy(ns: argparse.Namespace) -> str | None:
    """The front door for a local cluster (``haproxy`` or ``serve``); None with ``--address`` (the
    cluster's environment decides). Raises SystemExit(2) when ``--proxy haproxy`` is asked for and
    Ray Serve cannot run HAProxy here."""
    from cmr import constants
    from services import proxy as px

    choice = getattr(ns, "proxy", "auto")
    if ns.address:
        if choice != "auto":
            print(f"cmr: --proxy {choice} has no effect with --address: the cluster's own environment decides "
                  f"({constants.RAY_HAPROXY_ENV} in its head and worker containers)", flush=True)
        return None
    proxy = px.resolve_proxy(choice)
    problem = px.haproxy_problem()
    if proxy == "haproxy" and problem is not None:
        print(f"cmr: --proxy haproxy: {problem}; install haproxy 2.8+ or use --proxy serve", file=sys.stderr, flush=True)
        raise SystemExit(2)
    why = f"HAProxy {px.haproxy_binary()}" if proxy == "haproxy" else (problem if choice == "auto" else "asked for")
    print(f"cmr: front door: {proxy} ({why}" + ("; --proxy serve for Serve's Python proxy)" if proxy == "haproxy" else ")"), flush=True)
    return proxy


def run(ns: argparse.Namespace) -> int:
    args = build_args(ns)  # validate before starting anything
    proxy = choose_proxy(ns)
    _announce_keys(args, ns.host)
    from services import proxy as px

    door = None
    try:
        if proxy == "haproxy":  # its files in a 0700 folder of the state dir, a crash's leftover stopped
            door = px.front_door_dir(args.state_dir())
            stale = px.claim_front_door(door)
            if stale:
                print(f"cmr: stopped the front door a crashed cmr serve left running (pids {', '.join(map(str, stale))})", flush=True)
        env = px.ray_proxy_env(proxy, args.state_dir(), args.front_door) if proxy else None
    except px.FrontDoorBusy as e:
        print(f"cmr: {e}", file=sys.stderr, flush=True)
        return 2
    try:
        return _serve(ns, args, env)
    finally:
        if door is not None:
            px.release_front_door(door)


def _serve(ns: argparse.Namespace, args, env: dict[str, str] | None) -> int:
    from cmr import raycluster
    from services.app import deploy, undeploy

    with raycluster.running(ns.address, ns.num_cpus, env=env, log_to_driver=True):
        first = not _has_checkpoint(args)
        print(f"cmr: starting (state under {args.home_path()})" + ("; first start: training the router" + (" and creating the tiny models" if args.tiny_models and not args.pools else "") + " (minutes)" if first else ""), flush=True)
        deploy(args, host=ns.host, port=ns.http_port, grpc_port=ns.grpc_port, logging_config={"encoding": ns.log_format.upper()})
        print(f"cmr: serving http://{ns.host}:{ns.http_port}/v1 (OpenAI-compatible)" + (f", gRPC on :{ns.grpc_port}" if ns.grpc_port else "") + "; Ctrl-C stops", flush=True)
        port = _metrics_port()
        if port:
            print(f"cmr: metrics (Prometheus): http://127.0.0.1:{port}/metrics on this node, series prefixed ray_cmr_ (Ray's metrics export port)", flush=True)
        import signal
        import threading

        stop = threading.Event()
        # SIGTERM (docker stop, kill) shuts down as cleanly as Ctrl-C
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            stop.wait()
            return 0
        except KeyboardInterrupt:
            return 0
        finally:
            print("cmr: stopping…", flush=True)
            undeploy(args)


def _has_checkpoint(args) -> bool:
    """Whether the served policy already has a checkpoint (else this start trains one)."""
    from cmr import checkpoint
    from services.routing import checkpoint_root

    return bool(checkpoint.versions(checkpoint_root(args)))


def _metrics_port() -> int | None:
    """This node's Prometheus export port (Ray's metrics agent serves every process's series there)."""
    import ray

    here = ray.util.get_node_ip_address()
    ports = [n.get("MetricsExportPort") for n in ray.nodes() if n.get("Alive") and n.get("NodeManagerAddress") == here]
    return next((int(p) for p in ports if p), None)


def _announce_keys(args, host: str) -> None:
    """Open mode: say so loudly. Else make sure a key exists (bootstrap key at first start)."""
    if args.auth.open:
        print("cmr: OPEN MODE: no API key is checked" + (f"; {host} is reachable from other machines" if host not in ("127.0.0.1", "localhost", "::1") else ""), flush=True)
        return
    from services.auth import ensure_bootstrap_key

    path, token = ensure_bootstrap_key(args.state_dir(), args.auth.keys_path, args.store_dsn())
    if token is not None:
        print(f"cmr: created the bootstrap API key (tenant 'default', scopes infer,feedback,admin): {token}", flush=True)
        print(f"cmr: saved to {path} (mode 0600); it is not shown again. `cmr keys create` makes scoped keys, `cmr keys revoke` removes one", flush=True)
    else:
        print("cmr: API keys required (Authorization: Bearer <key>); `cmr keys list` shows them" + (f", bootstrap key in {path}" if path.is_file() else ""), flush=True)
