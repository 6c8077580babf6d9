"""``cmr tune cmr|llm``: argument parsing and dispatch (cheap to import: the CLI builds its
parser from every command module)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

SWEEPS = {"cmr": "tune.cmr_sweep", "llm": "tune.llm_sweep"}


def add_sweep_arguments(p: argparse.ArgumentParser) -> None:
    """Options every sweep takes."""
    p.add_argument("--quick", action="store_true", help="a small sweep that finishes in minutes on a laptop CPU")
    p.add_argument("--trials", type=int, default=None, help="number of trials (default: 6 with --quick, else 40)")
    p.add_argument("--storage", default=None, help="Tune storage path: a folder or a URI for a cluster (default: $CMR_HOME/tune)")
    p.add_argument("--name", default=None, help="experiment name under the storage path (default: <sweep>-<UTC time>)")
    p.add_argument("--out", default=None, help="where pareto.md/png and the chosen file go (default: the experiment folder, or runs/ for a URI)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of each train split held out for validation (default 0.2)")
    p.add_argument("--concurrent", type=int, default=2, help="trials at once (default 2)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for the local Ray (default: all)")
    p.add_argument("--address", default=None, help="join this Ray cluster instead of starting one")
    p.add_argument("--set", dest="sets", action="extend", nargs="+", default=[], metavar="KEY=VALUE", help="fixed policy config (not swept)")


def sets(args: argparse.Namespace) -> dict[str, Any]:
    from cmr.bench.common import parse_sets

    return parse_sets(args.sets)


def out_dir(arg: str | None, storage: str, name: str) -> Path:
    from cmr.bench.common import utc_stamp
    from tune.common import local_dir

    if arg:
        return Path(arg)
    return local_dir(storage, name) or Path("runs") / f"tune-{name}-{utc_stamp()}"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from cmr.cli import add_module_commands

    add_module_commands(p.add_subparsers(dest="sweep", required=True), SWEEPS)


def run(args: argparse.Namespace) -> int:  # replaced by the sub-command's run via set_defaults
    raise SystemExit(2)
