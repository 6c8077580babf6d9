"""The operator's console: static pages (``static/``, plain ES modules, no build step) served by
the ingress at ``/console/``, and the shaping of the data its JSON endpoints return.

The data comes from where it already lives: decisions and rewards from the decision store
(``DecisionStore.recent``), the learner and checkpoint from the router's status, the hub from
the router, the what-if curve from ``cmr.calibrate.curve``. Nothing here runs on the request
path: every function is called only when a console asks.

Scopes: the pages themselves hold no data and are public; every ``/v1/console/*`` endpoint needs
a valid key; keys without the ``admin`` scope see only their own tenant's decisions and never a
prompt; admin actions go to ``/v1/admin/*`` (admin scope, as for any client).

The charting library is uPlot (``static/vendor/uplot``: MIT, version in ``VENDORED``), copied
unchanged from its npm package.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

#: the page, its modules and the vendored chart library
STATIC_DIR = Path(__file__).parent / "static"

#: what was vendored, from which registry package, and its licence (``make console-vendor`` re-fetches it)
VENDORED = {"uplot": {"version": "1.6.32", "license": "MIT", "npm": "uplot@1.6.32",
                      "integrity": "sha512-KIMVnG68zvu5XXUbC4LQEPnhwOxBuLyW1AHtpm6IKTXImkbLgkMy+jabjLgSLMasNuGGzQm/ep3tOkyTxpiQIw==",
                      "files": ["dist/uPlot.esm.js", "dist/uPlot.min.css", "LICENSE"]}}

#: headers of every console file: scripts and styles from this origin only, never framed
HEADERS = {"content-security-policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
           "x-frame-options": "DENY", "x-content-type-options": "nosniff", "cache-control": "no-cache", "referrer-policy": "no-referrer"}

_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
          ".txt": "text/plain; charset=utf-8", "": "text/plain; charset=utf-8"}


def static_file(path: str) -> tuple[Path, str] | None:
    """The file under ``STATIC_DIR`` that ``path`` names (``""``: the page) and its media type;
    None for anything outside the folder or not a file."""
    root = STATIC_DIR.resolve()
    f = (root / (path or "index.html")).resolve()
    if not f.is_relative_to(root) or not f.is_file():
        return None
    return f, _TYPES.get(f.suffix, "application/octet-stream")


def visible(row: dict[str, Any], admin: bool) -> dict[str, Any]:
    """A decision as a console viewer may see it: the prompt only with the admin scope."""
    return row if admin else {k: v for k, v in row.items() if k != "query"}


def usage(rows: Iterable[dict[str, Any]], since: float, until: float, buckets: int) -> dict[str, Any]:
    """Per-model share, cost and reward over time from decision rows (``DecisionStore.recent``):
    ``buckets`` equal slices of ``[since, until)``; per slice and model the decisions, their card
    cost and the mean reward of those that got feedback, and the totals per model."""
    width = max((until - since) / buckets, 1e-9)
    per: dict[str, dict[str, list]] = {}
    totals: dict[str, dict[str, float]] = {}
    for r in rows:
        b = int((r["created"] - since) // width)
        if not 0 <= b < buckets:
            continue
        m = per.setdefault(r["model"], {"decisions": [0] * buckets, "cost": [0.0] * buckets, "reward_sum": [0.0] * buckets,
                                        "rewarded": [0] * buckets})
        t = totals.setdefault(r["model"], {"decisions": 0, "cost": 0.0, "reward_sum": 0.0, "rewarded": 0})
        m["decisions"][b] += 1
        m["cost"][b] += r["cost"]
        t["decisions"] += 1
        t["cost"] += r["cost"]
        if r.get("reward") is not None:
            m["reward_sum"][b] += r["reward"]
            m["rewarded"][b] += 1
            t["reward_sum"] += r["reward"]
            t["rewarded"] += 1
    n = sum(t["decisions"] for t in totals.values())
    models = {}
    for name, m in sorted(per.items()):
        t = totals[name]
        models[name] = {
            "decisions": m["decisions"], "cost": m["cost"],
            "reward": [s / k if k else None for s, k in zip(m["reward_sum"], m["rewarded"])],
            "total": {"decisions": t["decisions"], "share": t["decisions"] / n if n else 0.0, "cost": t["cost"],
                      "feedback": t["rewarded"], "reward": t["reward_sum"] / t["rewarded"] if t["rewarded"] else None},
        }
    return {"since": since, "until": until, "times": [since + (i + 0.5) * width for i in range(buckets)], "decisions": n, "models": models}
