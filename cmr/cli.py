"""The ``cmr`` command.

Sub-commands are thin: each ``bench`` protocol lives in its own module exposing
``add_arguments(parser)`` and ``run(args) -> int``, listed once in ``BENCH``. User errors
(bad data, unknown policy) print one line and exit 2; never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from cmr.errors import CMRError

# protocol name -> module (imported only when that protocol runs)
BENCH: dict[str, str] = {
    "cmr": "cmr.bench.cmr_protocol",
    "llm": "cmr.bench.llm_protocol",
    "online": "cmr.bench.online",
    "load": "bench.load",  # the served app under load while a replica and the learner are killed
    "serve": "bench.serve",  # issue 4: decision latency, end-to-end req/s and router overhead
    "exactness": "bench.exactness",  # issue 17: the exact and the faster query encoders, quality and decision latency
    "store": "bench.store",  # issue 13: SQLite vs PostgreSQL: durable feedback/s, route p50/p99, CPU per request
}

# other sub-commands -> module with add_arguments/run
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("services.serve_cli", "start Ray locally and serve the router"),
    "keys": ("services.keys_cli", "create, list and revoke the served app's API keys"),
    "train": ("cmr.train", "train a policy over the CMRBench experiences, a checkpoint after each"),
    "tune": ("tune.cli", "Ray Tune sweeps (Optuna + ASHA): continual-router knobs, or the cost weight λ; Pareto front + chosen config"),
    "calibrate": ("cmr.calibrate", "compute the cost weight λ for a traffic target and apply it to the router"),
}


def _policies(args: argparse.Namespace) -> int:
    from cmr.policies import policy_class, policy_names

    for name in policy_names():
        doc = (policy_class(name).__doc__ or "").strip().splitlines()
        print(f"{name:14s} {doc[0] if doc else ''}")
    return 0


def add_module_commands(sub, modules: dict[str, str]) -> None:
    """One sub-parser per ``name -> module``; the module supplies ``add_arguments(parser)``,
    ``run(args) -> int`` and, as its docstring's first line, the help text."""
    for name, module in modules.items():
        mod = importlib.import_module(module)
        sp = sub.add_parser(name, help=(mod.__doc__ or "").strip().splitlines()[0])
        mod.add_arguments(sp)
        sp.set_defaults(func=mod.run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cmr", description="cmr — a continual model router on Ray")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("policies", help="list the registered routing policies")
    p.set_defaults(func=_policies)

    bench = sub.add_parser("bench", help="run a benchmark protocol and write a report")
    bsub = bench.add_subparsers(dest="protocol", required=True)
    add_module_commands(bsub, BENCH)

    for name, (module, help_) in COMMANDS.items():
        mod = importlib.import_module(module)
        cp = sub.add_parser(name, help=help_)
        mod.add_arguments(cp)
        cp.set_defaults(func=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CMRError as e:
        print(f"cmr: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cmr: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
