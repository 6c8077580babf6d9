"""cmr — a continual model router.

The core library: data loaders, the model hub, encoders, routing policies, continual learning
and benchmarks. It never imports Ray Serve or FastAPI; the serving layer lives in ``services/``.
"""

__version__ = "0.1.0"
