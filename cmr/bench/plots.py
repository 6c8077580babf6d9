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
        ax.annotate(s["model"].split("/")[-1], (s["cost"], s["quality"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
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
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig
