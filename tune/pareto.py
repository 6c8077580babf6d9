"""Pareto fronts over several objectives, their table (markdown) and plot (PNG)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def pareto_mask(values: np.ndarray, modes: Sequence[str]) -> np.ndarray:
    """Rows of ``values`` (``[n, k]``) that no other row dominates (``modes``: ``max``/``min`` per
    column). A row dominates another when it is at least as good everywhere and better somewhere."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 2 or v.shape[1] != len(modes):
        raise ValueError(f"values must be [n, {len(modes)}], got {v.shape}")
    sign = np.array([1.0 if m == "max" else -1.0 for m in modes])
    g = v * sign  # larger is better in every column
    ge = (g[:, None, :] >= g[None, :, :]).all(axis=2)  # ge[i, j]: i at least as good as j everywhere
    gt = (g[:, None, :] > g[None, :, :]).any(axis=2)
    dominated = (ge & gt).any(axis=0)
    return ~dominated


def markdown_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]], nd: int = 3) -> list[str]:
    """``| header | ... |`` lines for ``rows`` with ``columns`` = [(key, header)]."""

    def f(x):
        if x is None:
            return "—"
        if isinstance(x, float):
            return f"{x:.{nd}g}" if abs(x) < 1e-3 and x != 0 else f"{x:.{nd}f}"
        return str(x)

    out = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(f(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return out


def scatter(all_x, all_y, front_x, front_y, chosen_xy, xlabel: str, ylabel: str, title: str, color=None, clabel: str | None = None,
            total: int | None = None, not_completed: dict[str, int] | None = None):
    """Every completed trial (grey or coloured by ``color``), the Pareto front (line) and the
    chosen point (a ring around its front point, labelled). The title's second line counts the
    plotted trials out of ``total``, and the rest by ``not_completed`` reason (e.g. stopped early)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    if color is not None:
        sc = ax.scatter(all_x, all_y, c=color, cmap="viridis", s=28, alpha=0.8, label="trials")
        fig.colorbar(sc, ax=ax, label=clabel or "")
    else:
        ax.scatter(all_x, all_y, c="0.6", s=28, label="trials")
    o = np.argsort(front_x)
    ax.plot(np.asarray(front_x)[o], np.asarray(front_y)[o], "o-", color="tab:red", mfc="none", ms=9, label="Pareto front")
    if chosen_xy is not None:
        # a larger hollow ring: a one-point front stays visible under it
        ax.plot([chosen_xy[0]], [chosen_xy[1]], "o", mfc="none", mec="k", mew=1.8, ms=17, label="chosen")
        ax.annotate("chosen", chosen_xy, xytext=(11, -11), textcoords="offset points", fontsize=8)
    ax.margins(0.1)  # the rings at the extremes stay inside the axes
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if total is not None:
        rest = ", ".join(f"{n} {why}" for why, n in (not_completed or {}).items() if n)
        title += f"\n{len(all_x)} of {total} trials completed" + (f" ({rest})" if rest else "")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return fig
