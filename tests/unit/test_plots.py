"""The benchmark and tune charts (matplotlib Agg): what they say and that they are written."""

from __future__ import annotations

import itertools

import numpy as np

from cmr.bench import common, plots
from tune import pareto


def _text_boxes(fig, ax):
    from matplotlib.text import Text

    r = fig.canvas.get_renderer()
    return {t.get_text(): Text.get_window_extent(t, r) for t in ax.texts}


def test_pareto_title_counts_every_trial_and_a_one_point_front_shows_under_chosen(tmp_path):
    xs, ys = [0.03, 0.04, 0.02], [0.55, 0.57, 0.62]
    fig = pareto.scatter(xs, ys, [0.02], [0.62], (0.02, 0.62), "forgetting", "D-Acc", "cmr tune cmr: carve",
                         color=[1.0, 2.0, 3.0], clabel="train s", total=7, not_completed={"stopped early": 3, "errored": 1, "other": 0})
    ax = fig.axes[0]
    assert ax.get_title().splitlines() == ["cmr tune cmr: carve", "3 of 7 trials completed (3 stopped early, 1 errored)"]
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    front, chosen = lines["Pareto front"], lines["chosen"]
    # the chosen marker is a hollow ring larger than the front's: the front point stays visible inside it
    assert chosen.get_markerfacecolor() == "none" and chosen.get_markersize() > front.get_markersize()
    assert "chosen" in _text_boxes(fig, ax)
    common.write_figure(tmp_path / "pareto.png", fig)
    assert (tmp_path / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_curve_labels_overlap_neither_each_other_nor_the_legend(tmp_path):
    # equal-cost models a few hundredths of quality apart: their labels would stack on each other
    singles = [{"model": f"org/model-{i}-chat", "quality": q, "cost": 0.001} for i, q in enumerate([0.41, 0.415, 0.42, 0.43, 0.5])]
    singles.append({"model": "org/big", "quality": 0.7, "cost": 0.01})
    curve = np.array([[0.0, 0.01, 0.7], [1.0, 0.001, 0.43]])
    hull = curve[:, 1:]
    fig = plots.quality_cost(curve, hull, singles, None, (0.002, 0.8), title="t", label="knn", unseen=["org/big"])
    ax = fig.axes[0]
    boxes = _text_boxes(fig, ax)
    assert set(boxes) == {s["model"].split("/")[-1] for s in singles}
    assert not any(a.overlaps(b) for a, b in itertools.combinations(boxes.values(), 2))
    legend = ax.get_legend().get_window_extent(fig.canvas.get_renderer())
    assert not legend.overlaps(ax.get_window_extent()) and not any(b.overlaps(legend) for b in boxes.values())
    common.write_figure(tmp_path / "curve.png", fig)
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
