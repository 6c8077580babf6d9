"""Benchmark drivers and experiment scripts (``python -m bench.NAME``): the serving benchmark
(``serve``, = ``cmr bench serve``), the load + fault test (``load``, = ``cmr bench load``), a
running server's accuracy and latency (``measure``), and the experiments behind docs/results.
Outside ``services/`` (the serving room holds only what is deployed); outside ``cmr/`` because
the drivers import Ray Serve."""

from __future__ import annotations

from typing import Callable


def cli(prog: str, doc: str, add_arguments: Callable, run: Callable, errors: type[Exception], label: str,
        argv: list[str] | None = None) -> int:
    """The one ``main`` of a driver: parse, record the command line, run; a refused input (``errors``)
    is one line on stderr and exit 2."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    add_arguments(p)
    a = p.parse_args(argv)
    a.command_line = prog + " " + " ".join(argv if argv is not None else sys.argv[1:])
    try:
        return run(a)
    except errors as e:
        print(f"{label}: error: {e}", file=sys.stderr)
        return 2
