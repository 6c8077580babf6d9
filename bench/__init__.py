"""Benchmark drivers and experiment scripts (``python -m bench.NAME``): the serving benchmark
(``serve``, = ``cmr bench serve``), the load + fault test (``load``, = ``cmr bench load``), a
running server's accuracy and latency (``measure``), and the experiments behind docs/results.
Outside ``services/`` (the serving room holds only what is deployed); outside ``cmr/`` because
the drivers import Ray Serve."""
