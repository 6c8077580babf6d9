"""Benchmark protocols (``cmr bench cmr``, ``cmr bench llm``), their metrics, plots and reports.

Each protocol module exposes ``add_arguments(parser)`` and ``run(args) -> int`` for the CLI and
stays cheap to import; heavy imports happen inside ``run``.
"""
