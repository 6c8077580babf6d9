"""Loader for routing outcome matrices: ``models.jsonl``, ``prompts.jsonl``, ``outcomes.csv``.

Missing (prompt, model) pairs stay NaN. A pair's cost is the recorded cost, else the model's
``cost`` from models.jsonl, else the model's mean recorded cost, else 0. A card's cost (what
the router trades against quality) is the model's ``cost`` when given, else its mean recorded
cost on the training prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cmr.data.examples import Examples
from cmr.data.io import need_str, parse_float, read_csv, read_jsonl
from cmr.errors import DataError
from cmr.types import ModelCard


@dataclass
class OutcomeData:
    """An outcome matrix split into train and test ``Examples`` over the same model columns."""

    root: Path
    name: str
    cards: list[ModelCard]
    train: Examples
    test: Examples
    has_cost: bool

    @property
    def model_ids(self) -> list[str]:
        return [c.id for c in self.cards]


def load_outcomes(root: Path | str) -> OutcomeData:
    """Load an outcome-matrix directory; malformed input raises ``DataError``."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, None, None, "not a directory")
    mpath, ppath, opath = root / "models.jsonl", root / "prompts.jsonl", root / "outcomes.csv"

    models: list[str] = []
    model_cost: dict[str, float] = {}
    for n, obj in read_jsonl(mpath):
        mid = need_str(obj, "model", mpath, n)
        if mid in model_cost or mid in models:
            raise DataError(mpath, n, "model", f"duplicate model id {mid!r}")
        models.append(mid)
        if obj.get("cost") is not None:
            c = obj["cost"]
            if not isinstance(c, (int, float)) or isinstance(c, bool):
                raise DataError(mpath, n, "cost", f"must be a number, got {c!r}")
            model_cost[mid] = parse_float(str(c), mpath, n, "cost", lo=0.0)
    if not models:
        raise DataError(mpath, None, None, "no models")
    mcol = {m: i for i, m in enumerate(models)}

    ids, texts, tasks, splits = [], [], [], []
    prow: dict[str, int] = {}
    for n, obj in read_jsonl(ppath):
        pid = need_str(obj, "id", ppath, n)
        if pid in prow:
            raise DataError(ppath, n, "id", f"duplicate prompt id {pid!r}")
        text = need_str(obj, "prompt", ppath, n)
        split = need_str(obj, "split", ppath, n)
        if split not in ("train", "test"):
            raise DataError(ppath, n, "split", f"must be 'train' or 'test', got {split!r}")
        prow[pid] = len(ids)
        ids.append(pid)
        texts.append(text)
        tasks.append(need_str(obj, "task", ppath, n, optional=True) or "")
        splits.append(split)
    if not ids:
        raise DataError(ppath, None, None, "no prompts")

    scores = np.full((len(ids), len(models)), np.nan, dtype=np.float32)
    costs = np.full((len(ids), len(models)), np.nan, dtype=np.float32)
    for n, row in read_csv(opath, ["prompt_id", "model", "score", "cost"]):
        pid, mid = row["prompt_id"], row["model"]
        if pid not in prow:
            raise DataError(opath, n, "prompt_id", f"unknown prompt id {pid!r}")
        if mid not in mcol:
            raise DataError(opath, n, "model", f"unknown model {mid!r}")
        i, j = prow[pid], mcol[mid]
        scores[i, j] = parse_float(row["score"], opath, n, "score", lo=0.0, hi=1.0)
        if row["cost"] not in (None, ""):
            costs[i, j] = parse_float(row["cost"], opath, n, "cost", lo=0.0)

    has_cost = bool(model_cost) or bool(np.isfinite(costs).any())
    is_train = np.array([s == "train" for s in splits])
    # fill costs where not recorded: model's cost, else its mean recorded cost (train rows), else 0
    for j, m in enumerate(models):
        recorded = costs[is_train, j]
        recorded = recorded[np.isfinite(recorded)]
        fallback = model_cost.get(m, float(recorded.mean()) if recorded.size else 0.0)
        costs[np.isnan(costs[:, j]), j] = fallback
    card_cost = {}
    for j, m in enumerate(models):
        if m in model_cost:
            card_cost[m] = model_cost[m]
        else:
            tr = costs[is_train, j]
            card_cost[m] = float(tr.mean()) if tr.size else 0.0

    cards = [ModelCard(id=m, cost=card_cost[m]) for m in models]
    full = Examples(texts=texts, model_ids=models, scores=scores, costs=costs, meta={"id": ids, "task": tasks})
    return OutcomeData(
        root=root,
        name=root.name,
        cards=cards,
        train=full.subset(is_train),
        test=full.subset(~is_train),
        has_cost=has_cost,
    )


def is_outcome_dir(root: Path) -> bool:
    return (Path(root) / "outcomes.csv").is_file()
