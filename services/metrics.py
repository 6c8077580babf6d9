"""Prometheus metrics of the served app, through Ray's metrics API (``ray.util.metrics``).

Every Ray process (ingress, router, pools, learner) records into its own metric objects; Ray's
metrics agent aggregates them and exports them in Prometheus format on each node's metrics
export port (``ray.init(_metrics_export_port=...)`` / ``ray start --metrics-export-port``).
Ray prefixes the names with ``ray_``, so ``cmr_decisions_total`` is scraped as
``ray_cmr_decisions_total``.

Metric objects are created on first use in each process (nothing happens at import), and a
failure to record never fails a request: it is logged once and the request goes on.

| function | metric | kind | tags |
|---|---|---|---|
| ``routing_latency(s, path)`` | ``cmr_routing_latency_s`` | histogram (seconds) | ``path`` (route, chat, completion, grpc) |
| ``decision(model)`` | ``cmr_decisions_total`` | counter | ``model`` |
| ``fallback(reason)`` | ``cmr_fallbacks_total`` | counter | ``reason`` |
| ``feedback(status)`` | ``cmr_feedback_total`` | counter | ``status`` (accepted, unknown, expired, duplicate, invalid, forbidden) |
| ``learner_lag(events)`` | ``cmr_learner_lag_events`` | gauge | — |
| ``checkpoint_version(v, role)`` | ``cmr_checkpoint_version`` | gauge | ``role`` (learner, router) |
| ``pool_error(pool)`` | ``cmr_pool_errors_total`` | counter | ``pool`` |
| ``auth_rejection(reason)`` | ``cmr_auth_rejections_total`` | counter | ``reason`` (missing, invalid, revoked, scope, rate, size, tenant) |
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

log = logging.getLogger("cmr.serve.metrics")

#: latency buckets in seconds: 1 ms … 10 s (routing is ~10–500 ms on CPU, chat up to seconds)
LATENCY_BOUNDARIES = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]

# name -> (kind, description, tag keys)
_SPECS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "cmr_routing_latency_s": ("histogram", "Time to a routing decision (router call, seconds), by entry path", ("path",)),
    "cmr_decisions_total": ("counter", "Routing decisions, by chosen model", ("model",)),
    "cmr_fallbacks_total": ("counter", "Requests served by a fallback (retry or next-best model), by reason", ("reason",)),
    "cmr_feedback_total": ("counter", "Feedback events, by outcome (accepted or why rejected)", ("status",)),
    "cmr_learner_lag_events": ("gauge", "Feedback events stored but not yet learnt by the learner", ()),
    "cmr_checkpoint_version": ("gauge", "Policy checkpoint version, as written (learner) or loaded (router)", ("role",)),
    "cmr_pool_errors_total": ("counter", "Generation errors, by pool", ("pool",)),
    "cmr_auth_rejections_total": ("counter", "Requests refused by authentication, scope, rate or size, by reason", ("reason",)),
}

_lock = threading.Lock()
_metrics: dict[str, Any] = {}
_warned: set[str] = set()


def _metric(name: str) -> Any:
    m = _metrics.get(name)
    if m is not None:
        return m
    with _lock:
        m = _metrics.get(name)
        if m is None:
            from ray.util import metrics as rm  # deferred: importing ray is slow

            kind, desc, tags = _SPECS[name]
            if kind == "histogram":
                m = rm.Histogram(name, description=desc, boundaries=LATENCY_BOUNDARIES, tag_keys=tags)
            elif kind == "counter":
                m = rm.Counter(name, description=desc, tag_keys=tags)
            else:
                m = rm.Gauge(name, description=desc, tag_keys=tags)
            _metrics[name] = m
    return m


def _safe(name: str, fn: Callable[[Any], None]) -> None:
    # metrics are best effort: a recording error must not turn a good request into a 500
    try:
        fn(_metric(name))
    except Exception as e:
        if name not in _warned:
            _warned.add(name)
            log.warning("metric %s not recorded: %s: %s", name, type(e).__name__, e)


def routing_latency(seconds: float, path: str = "route") -> None:
    """Observe the time one routing decision took (seconds)."""
    _safe("cmr_routing_latency_s", lambda m: m.observe(float(seconds), tags={"path": str(path)}))


def decision(model: str, n: int = 1) -> None:
    """Count ``n`` decisions for ``model``."""
    _safe("cmr_decisions_total", lambda m: m.inc(n, tags={"model": str(model)}))


def fallback(reason: str) -> None:
    """Count a request served by a fallback (``reason``: e.g. ``replica_died``, ``pool_error``)."""
    _safe("cmr_fallbacks_total", lambda m: m.inc(1, tags={"reason": str(reason)}))


def feedback(status: str) -> None:
    """Count a feedback event by outcome: ``accepted`` or the rejection reason."""
    _safe("cmr_feedback_total", lambda m: m.inc(1, tags={"status": str(status)}))


def learner_lag(events: int) -> None:
    """Set how many stored feedback events the learner has not learnt yet."""
    _safe("cmr_learner_lag_events", lambda m: m.set(float(events)))


def checkpoint_version(version: int, role: str = "learner") -> None:
    """Set the checkpoint version written (``role='learner'``) or loaded (``role='router'``)."""
    _safe("cmr_checkpoint_version", lambda m: m.set(float(version or 0), tags={"role": str(role)}))


def pool_error(pool: str) -> None:
    """Count a generation error in ``pool``."""
    _safe("cmr_pool_errors_total", lambda m: m.inc(1, tags={"pool": str(pool)}))


def auth_rejection(reason: str) -> None:
    """Count a request refused by auth (``missing``, ``invalid``, ``revoked``, ``scope``, ``rate``, ``size``, ``tenant``)."""
    _safe("cmr_auth_rejections_total", lambda m: m.inc(1, tags={"reason": str(reason)}))


METRIC_NAMES = tuple(_SPECS)
