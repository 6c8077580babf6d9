"""Loader for CMRBench-format directories: ``hub.jsonl`` plus ``e1..eN/{train,test}.jsonl``.

Any number of experiences; the experience of a model card says when it enters the hub.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cmr.data.examples import Examples
from cmr.data.io import need_int, need_str, read_jsonl
from cmr.errors import DataError
from cmr.types import ModelCard

_EXP_DIR = re.compile(r"^e(\d+)$")


@dataclass
class Experience:
    """One step of the continual protocol: its number and its labelled train/test requests."""

    k: int
    train: Examples
    test: Examples


@dataclass
class CMRBench:
    """A hub that grows over experiences, and the labelled requests of each experience."""

    root: Path
    cards: list[ModelCard]
    experiences: list[Experience]

    def cards_upto(self, k: int) -> list[ModelCard]:
        """Cards routable after experience ``k`` (``experience <= k``)."""
        return [c for c in self.cards if (c.experience or 1) <= k]

    def cards_of(self, k: int) -> list[ModelCard]:
        """Cards that enter the hub at experience ``k``."""
        return [c for c in self.cards if (c.experience or 1) == k]


def load_hub(path: Path) -> list[ModelCard]:
    """Read ``hub.jsonl`` (one card a line, ``model`` is the id)."""
    cards, seen = [], set()
    for n, obj in read_jsonl(path):
        mid = need_str(obj, "model", path, n)
        if mid in seen:
            raise DataError(path, n, "model", f"duplicate model id {mid!r}")
        seen.add(mid)
        exp = need_int(obj, "experience", path, n, minimum=1) if "experience" in obj else 1
        for key in ("family", "domain", "description"):
            need_str(obj, key, path, n, optional=True)
        meta = {k: obj[k] for k in ("framework", "api_call", "performance", "created_at") if obj.get(k) is not None}
        cards.append(
            ModelCard(
                id=mid,
                family=obj.get("family"),
                domain=obj.get("domain"),
                description=obj.get("description") or "",
                experience=exp,
                added_at=float(obj["created_at"]) / 1000.0 if isinstance(obj.get("created_at"), (int, float)) else 0.0,
                metadata=meta,
            )
        )
    if not cards:
        raise DataError(path, None, None, "no model cards")
    return cards


def load_split(path: Path, model_ids: list[str], col: dict[str, int]) -> Examples:
    """Read one labelled split into one-hot ``Examples`` over ``model_ids``."""
    texts, labels, fams, doms = [], [], [], []
    for n, obj in read_jsonl(path):
        texts.append(need_str(obj, "prompt", path, n))
        mid = need_str(obj, "model", path, n)
        if mid not in col:
            raise DataError(path, n, "model", f"unknown model {mid!r} (not in hub.jsonl)")
        labels.append(col[mid])
        fams.append(need_str(obj, "family", path, n, optional=True))
        doms.append(need_str(obj, "domain", path, n, optional=True))
    lab = np.asarray(labels, dtype=np.int64)
    scores = np.zeros((len(texts), len(model_ids)), dtype=np.float32)
    scores[np.arange(len(texts)), lab] = 1.0
    return Examples(texts=texts, model_ids=model_ids, scores=scores, labels=lab, meta={"family": fams, "domain": doms})


def load_cmrbench(root: Path | str) -> CMRBench:
    """Load a CMRBench-format directory; malformed input raises ``DataError``."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, None, None, "not a directory")
    cards = load_hub(root / "hub.jsonl")
    ids = [c.id for c in cards]
    col = {m: i for i, m in enumerate(ids)}
    ks = sorted(int(m.group(1)) for p in root.iterdir() if p.is_dir() and (m := _EXP_DIR.match(p.name)))
    if not ks:
        raise DataError(root, None, None, "no experience folders e1..eN")
    exps = [Experience(k, load_split(root / f"e{k}" / "train.jsonl", ids, col), load_split(root / f"e{k}" / "test.jsonl", ids, col)) for k in ks]
    return CMRBench(root=root, cards=cards, experiences=exps)


def is_cmrbench_dir(root: Path) -> bool:
    return (Path(root) / "hub.jsonl").is_file()
