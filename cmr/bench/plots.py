"""Benchmark figures (matplotlib, Agg backend): accuracy-matrix heatmaps and quality–cost curves.

Each function returns a closed-over ``Figure``; ``cmr.bench.common.write_figure`` saves it
atomically.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: benchmarks run on servers and in CI
    import matplotlib.pyplot as plt

    return plt


def accuracy_heatmaps(matrices: dict[str, np.ndarray], exp_labels: Sequence[str], title: str):
    """One heatmap per accuracy matrix (rows: after experience k; columns: test set j)."""
    plt = _pyplot()
    names = list(matrices)
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        a = np.asarray(matrices[name], dtype=np.float64)
        im = ax.imshow(np.ma.masked_invalid(a), vmin=0.0, vmax=1.0, cmap="viridis")
        ax.set_xticks(range(a.shape[1]), [f"test {e}" for e in exp_labels])
        ax.set_yticks(range(a.shape[0]), [f"after {e}" for e in exp_labels])
        ax.set_title(name)
        for (i, j), v in np.ndenumerate(a):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white" if v < 0.6 else "black", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def quality_cost(
    curve: np.ndarray,
    hull: np.ndarray,
    singles: Sequence[dict],
    oracle_curve: np.ndarray | None,
    oracle_pt: tuple[float, float],
    title: str,
    label: str,
    unseen: Sequence[str] = (),
):
    """The router's λ-sweep points and hull, the single models and the oracle on one plot.

    ``curve`` is ``[n, 3]`` (λ, cost, quality); ``hull`` ``[h, 2]`` (cost, quality). Models in
    ``unseen`` (hidden at training time) are drawn hollow.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5.0))
    ax.plot(curve[:, 1], curve[:, 2], ".", color="tab:blue", alpha=0.5, label=f"{label} (λ sweep)")
    ax.plot(hull[:, 0], hull[:, 1], "-", color="tab:blue", lw=1.5, label=f"{label} hull")
    if oracle_curve is not None and len(oracle_curve) > 1:
        ax.plot(oracle_curve[:, 1], oracle_curve[:, 2], ":", color="tab:green", lw=1, label="oracle (λ sweep)")
    ax.plot([oracle_pt[0]], [oracle_pt[1]], "*", color="tab:green", ms=12, label="oracle")
    hidden = set(unseen)
    for s in singles:
        ax.plot([s["cost"]], [s["quality"]], "o", color="tab:red", ms=5, mfc="none" if s["model"] in hidden else "tab:red")
    ax.plot([], [], "o", color="tab:red", ms=5, label="single models")
    if hidden:
        ax.plot([], [], "o", color="tab:red", mfc="none", ms=5, label="unseen at training")
    costs = np.array([s["cost"] for s in singles] + list(curve[:, 1]))
    if costs.min() > 0 and costs.max() / costs.min() > 20:
        ax.set_xscale("log")  # per-call prices span orders of magnitude
    ax.set_xlabel("mean cost per prompt (USD)")
    ax.set_ylabel("mean quality")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    # outside the axes: inside, it hides the points of whichever corner it takes
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    _label_points(fig, ax, [(s["cost"], s["quality"], s["model"].split("/")[-1]) for s in singles], curve[:, 1:])
    return fig


def _label_points(fig, ax, points: Sequence[tuple[float, float, str]], avoid: np.ndarray, fontsize: int = 7) -> None:
    """Label each point to its right; a label that would cover a point (of ``points`` or the
    ``[n, 2]`` data points ``avoid``) or a label placed before it (lowest points first) moves up
    in half-line steps until it is clear, with a leader line."""
    from matplotlib.text import Text
    from matplotlib.transforms import Bbox

    renderer = fig.canvas.get_renderer()
    step = 0.5 * fontsize * 1.2  # points
    r = 3 * fig.dpi / 72  # a marker's half-width in pixels
    xy = np.concatenate([np.array([p[:2] for p in points], dtype=np.float64).reshape(-1, 2), avoid])
    marks = [Bbox.from_extents(px - r, py - r, px + r, py + r) for px, py in ax.transData.transform(xy)]
    labels: list = []
    for n in sorted(range(len(points)), key=lambda n: (points[n][1], points[n][0])):
        x, y, text = points[n]
        others = marks[:n] + marks[n + 1 :] + labels
        for i in range(4 * len(points) + 1):
            a = ax.annotate(text, (x, y), xytext=(5, i * step), textcoords="offset points", fontsize=fontsize, va="center",
                            bbox={"boxstyle": "square,pad=0.05", "fc": "white", "ec": "none", "alpha": 0.7},  # lines pass behind
                            arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.6, "shrinkA": 0, "shrinkB": 3} if i else None)
            a.update_positions(renderer)
            box = Text.get_window_extent(a, renderer)  # the text alone, not its leader line
            if i == 4 * len(points) or not any(box.overlaps(b) for b in others):
                break
            a.remove()
        labels.append(box)
