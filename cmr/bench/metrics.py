"""Benchmark metrics: continual accuracy matrices and forgetting; quality–cost curves, AIQ and QNC.

Pure numpy, no I/O: every function here is checked on hand-computed cases in
``tests/unit/test_metrics.py``.

AIQ, as used throughout cmr (pinned down so that it reproduces the data README's reference
figures on RouterBench test: zero router 0.823, oracle 0.974)::

    AIQ = 1 / (c_max − c_min) · ∫_{c_min}^{c_max} H(c) dc

* ``[c_min, c_max]`` is the range of the *single models'* mean realised costs on the evaluated
  prompts (the same range for every router of a data set, so AIQs are comparable).
* ``H`` is the non-decreasing upper convex hull of the router's (cost, quality) points: points
  dominated by a cheaper, at-least-as-good point are dropped, then the upper concave hull of the
  rest is taken (any point on a segment is reachable by randomising between its two ends).
* Right of the hull's most expensive point, ``H`` stays flat at the hull's best quality (a
  router may always spend less than it is allowed to).
* Left of the hull's cheapest point, ``H`` is also flat, at that point's quality. This is the
  convention that reproduces the reference oracle figure (0.974 is exactly the oracle's quality,
  i.e. its single point extended flat across the whole range); clipping at the cheapest point or
  dropping to zero there gives 0.947 / 0.971 instead. It is optimistic for routers whose curve
  starts right of ``c_min``; it does not matter for the zero router, whose cheapest point is
  ``c_min`` by construction.
* Hull parts outside ``[c_min, c_max]`` are clipped (linear interpolation at the bounds).
* Equal costs (``c_max == c_min``): the curve degenerates to a point and AIQ is the best quality.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

# --------------------------------------------------------------------------------------------
# continual protocol
# --------------------------------------------------------------------------------------------


def forgetting(matrix: np.ndarray) -> float:
    """Mean over earlier experiences ``j < K`` of ``max_{k in j..K-1} acc[k, j] − acc[K, j]``.

    ``matrix[k, j]`` is the accuracy on test set ``j`` after training on experience ``k``
    (lower triangle filled, NaN above the diagonal). With one experience there is nothing to
    forget and the result is 0.0.
    """
    a = np.asarray(matrix, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"accuracy matrix must be square, got shape {a.shape}")
    last = a.shape[0] - 1
    if last < 1:
        return 0.0
    drops = [np.nanmax(a[j:last, j]) - a[last, j] for j in range(last)]
    return float(np.mean(drops))


def final_average(matrix: np.ndarray) -> float:
    """Average accuracy over all test sets after the last experience (the matrix's last row)."""
    a = np.asarray(matrix, dtype=np.float64)
    return float(np.nanmean(a[-1]))


def routing_hits(chosen, cards, data) -> dict[str, np.ndarray]:
    """Per request of labelled ``data``: did the chosen card (``chosen`` indexes ``cards``) hit
    the target model (``m``), its family (``f``), its domain (``d``)?

    The one definition every CMRBench figure uses: the target model itself is always a family
    and domain hit; otherwise the chosen card's label must equal the request's label, and a
    missing label (on either side) is never a hit — two models without a family are not one family.
    """
    ch = np.asarray(chosen, dtype=np.int64)
    pred = np.array([c.id for c in cards], dtype=object)[ch]
    hit_m = pred == np.array(data.model_ids, dtype=object)[data.labels]
    out = {"m": hit_m}
    for m, field in (("f", "family"), ("d", "domain")):
        mine = np.array([getattr(c, field) for c in cards], dtype=object)[ch]
        truth = np.array(data.meta.get(field, [None] * len(data)), dtype=object)
        out[m] = hit_m | ((mine != None) & (mine == truth))  # noqa: E711 (elementwise on object arrays)
    return out


def accuracies(chosen, cards, data) -> dict[str, float]:
    """M/F/D accuracy (``m``, ``f``, ``d``) of :func:`routing_hits`."""
    return {m: float(h.mean()) if h.size else float("nan") for m, h in routing_hits(chosen, cards, data).items()}


def continual_summary(mats: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """``final`` (``m_acc``...) and ``forgetting`` (``m``...) of accuracy matrices keyed by metric."""
    return {"final": {f"{m}_acc": final_average(a) for m, a in mats.items()}, "forgetting": {m: forgetting(a) for m, a in mats.items()}}


def matrix_to_json(matrix: np.ndarray) -> list[list[float | None]]:
    """Nested lists with NaN (not yet evaluated) as ``None`` so the report is strict JSON."""
    return [[None if not np.isfinite(x) else float(x) for x in row] for row in np.asarray(matrix, dtype=np.float64)]


# --------------------------------------------------------------------------------------------
# quality–cost curves
# --------------------------------------------------------------------------------------------


def pareto_hull(costs: Sequence[float], qualities: Sequence[float]) -> np.ndarray:
    """The non-decreasing upper convex hull of (cost, quality) points, as ``[h, 2]`` sorted by cost.

    Dominated points (another point is no more expensive and at least as good) are dropped,
    then the upper concave hull of the remaining staircase is kept. Quality strictly increases
    along the result.
    """
    c = np.asarray(costs, dtype=np.float64).ravel()
    q = np.asarray(qualities, dtype=np.float64).ravel()
    if c.shape != q.shape:
        raise ValueError("costs and qualities must have the same length")
    ok = np.isfinite(c) & np.isfinite(q)
    c, q = c[ok], q[ok]
    if c.size == 0:
        raise ValueError("no finite (cost, quality) point")
    # sort by cost ascending, quality descending: the first point of each cost is its best
    order = np.lexsort((-q, c))
    c, q = c[order], q[order]
    # staircase: keep a point only if it beats every cheaper point (this is a scan over the
    # curve's ~100 points, not over requests)
    keep = np.zeros(c.size, dtype=bool)
    best = -np.inf
    for i in range(c.size):
        if q[i] > best:
            keep[i] = True
            best = q[i]
    pts = np.stack([c[keep], q[keep]], axis=1)
    hull: list[np.ndarray] = []
    for p in pts:
        # pop the last point while it lies on or below the chord from the one before it to p
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (x2 - x1) * (p[1] - y1) - (y2 - y1) * (p[0] - x1) >= 0:
                hull.pop()
            else:
                break
        hull.append(p)
    return np.asarray(hull)


def hull_value(hull: np.ndarray, c: float | np.ndarray) -> np.ndarray:
    """``H(c)``: the hull interpolated linearly, flat outside its cost range (see module doc)."""
    return np.interp(c, hull[:, 0], hull[:, 1], left=hull[0, 1], right=hull[-1, 1])


def aiq(costs: Sequence[float], qualities: Sequence[float], c_min: float, c_max: float) -> float:
    """Area under the non-decreasing convex hull over ``[c_min, c_max]``, divided by its width.

    The exact convention is in the module docstring. ``c_max == c_min`` (every model costs the
    same) returns the hull's best quality.
    """
    if not (np.isfinite(c_min) and np.isfinite(c_max)) or c_max < c_min:
        raise ValueError(f"bad cost range [{c_min}, {c_max}]")
    h = pareto_hull(costs, qualities)
    if c_max - c_min <= 0:
        return float(h[-1, 1])
    inner = h[(h[:, 0] > c_min) & (h[:, 0] < c_max), 0]
    xs = np.concatenate([[c_min], inner, [c_max]])
    ys = hull_value(h, xs)
    area = float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2.0))
    return area / (c_max - c_min)


def qnc(costs: Sequence[float], qualities: Sequence[float], target_quality: float, target_cost: float) -> float | None:
    """Cheapest cost at which the router's hull reaches ``target_quality``, over ``target_cost``.

    Only costs the router can actually reach count: the hull between its points (randomising
    between two routers) but not the flat extension left of its cheapest point. ``None`` when
    the router never reaches the target quality; ``target_cost`` must be > 0.
    """
    if target_cost <= 0:
        raise ValueError("QNC needs a positive target cost")
    h = pareto_hull(costs, qualities)
    tol = 1e-12
    if h[-1, 1] < target_quality - tol:
        return None
    i = int(np.argmax(h[:, 1] >= target_quality - tol))
    if i == 0:
        return float(h[0, 0] / target_cost)
    (x1, y1), (x2, y2) = h[i - 1], h[i]
    x = x1 + (target_quality - y1) * (x2 - x1) / (y2 - y1)
    return float(x / target_cost)


def lambda_grid(card_costs: np.ndarray, score_range: float, n: int = 80) -> np.ndarray:
    """λ values that trace a whole quality–cost curve: 0, then ``n − 1`` log-spaced values.

    Scaled to the cards' costs and to the spread of the policy's predicted scores, so the grid
    fits any score scale: the smallest λ moves a score by at most ~0.1 % of its spread even on the
    most expensive model; the largest makes the cheapest model win against any score gap
    (``10 · spread / smallest positive cost gap``). All costs equal → ``[0.0]``.
    """
    c = np.unique(np.asarray(card_costs, dtype=np.float64))
    if c.size < 2 or n < 2:
        return np.array([0.0])
    spread = float(score_range) if np.isfinite(score_range) and score_range > 0 else 1.0
    gap = float(np.diff(c).min())
    lo = 1e-3 * spread / float(c.max())
    hi = 10.0 * spread / gap
    return np.concatenate([[0.0], np.geomspace(lo, max(hi, lo * 10), n - 1)])


def sweep(
    pred: np.ndarray,
    true_scores: np.ndarray,
    true_costs: np.ndarray,
    card_costs: np.ndarray,
    lambdas: Sequence[float],
) -> np.ndarray:
    """The quality–cost curve of a router: ``[len(lambdas), 3]`` rows ``(λ, mean cost, mean quality)``.

    Per λ and prompt, the chosen model is ``cmr.decide.choose(pred, card_costs, λ)`` restricted to
    the pairs whose outcome is known (NaN in ``true_scores`` is masked out); its realised quality
    and cost are the recorded ones. Rows with no known pair are dropped.
    """
    from cmr.decide import choose

    known = ~np.isnan(true_scores)
    rows = known.any(axis=1)
    pred, true_scores, true_costs, known = pred[rows], true_scores[rows], true_costs[rows], known[rows]
    finite = np.isfinite(pred)
    if not finite.all():  # a policy may return -inf/NaN for models it cannot score: rank them last
        floor = float(pred[finite].min()) - 1.0 if finite.any() else 0.0
        pred = np.where(finite, pred, floor)
    r = np.arange(len(pred))
    out = np.empty((len(lambdas), 3), dtype=np.float64)
    for i, lam in enumerate(lambdas):  # one vectorised decision over all prompts per λ
        ch = choose(pred, card_costs, float(lam), mask=known)
        out[i] = (lam, float(np.mean(true_costs[r, ch])), float(np.mean(true_scores[r, ch])))
    return out


def single_models(true_scores: np.ndarray, true_costs: np.ndarray, model_ids: Sequence[str]) -> list[dict]:
    """Each model's mean quality and mean realised cost over the prompts it has an outcome for."""
    known = ~np.isnan(true_scores)
    n = known.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        q = np.where(known, true_scores, 0.0).sum(axis=0) / n
        c = np.where(known, true_costs, 0.0).sum(axis=0) / n
    return [
        {"model": m, "quality": float(q[j]), "cost": float(c[j]), "n": int(n[j])}
        for j, m in enumerate(model_ids)
        if n[j] > 0
    ]


def best_single(singles: list[dict]) -> dict:
    """The single model with the best mean quality (ties: the cheaper)."""
    if not singles:
        raise ValueError("no model has a known outcome")
    b = min(singles, key=lambda s: (-s["quality"], s["cost"]))
    return {"model": b["model"], "quality": b["quality"], "cost": b["cost"]}


def oracle_point(true_scores: np.ndarray, true_costs: np.ndarray) -> tuple[float, float]:
    """(mean cost, mean quality) of the oracle: best known model per prompt, cheapest among ties."""
    s = np.where(np.isnan(true_scores), -np.inf, true_scores)
    rows = np.isfinite(s).any(axis=1)
    s, c = s[rows], np.where(np.isnan(true_costs[rows]), np.inf, true_costs[rows])
    top = s.max(axis=1, keepdims=True)
    ch = np.where(s == top, c, np.inf).argmin(axis=1)
    r = np.arange(len(s))
    return float(c[r, ch].mean()), float(s[r, ch].mean())
