"""Checkpoint anchoring: an L2 pull of parameters towards their values after the last experience.

When a router trains on experience k, the embeddings of models it already knew (and its query
projection) drift to fit the new data, and old queries stop finding their models. The anchor
holds a frozen copy of the parameters from the checkpoint after k−1 and adds

    strength_rows · mean_i ||E_i − E_i⁰||²   over the anchored rows i of each row-wise table E
  + strength_dense · ||θ − θ⁰||²              over every other anchored tensor θ (squared
                                               Frobenius norm: a mean over the 147k entries
                                               of a 384×384 projection made the pull vanish)

to the loss. Row-wise tables (one row per model id) grow between experiences: rows appended
after the snapshot are free, which is what lets new models move while old ones stay put.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np


@dataclass
class AnchorConfig:
    """Strengths of the pull (0 turns a part off)."""

    strength_rows: float = 1.0
    strength_dense: float = 1.0


class Anchor:
    """A frozen snapshot of named tensors and the penalty for moving away from it.

    ``rows`` names the row-wise tensors (per-model tables): only their first ``n`` rows (the
    rows that existed at capture time) are anchored.
    """

    def __init__(self, config: AnchorConfig | None = None):
        self.config = config or AnchorConfig()
        self._ref: dict[str, Any] = {}
        self._rows: set[str] = set()

    def __bool__(self) -> bool:
        return bool(self._ref)

    def capture(self, params: Mapping[str, Any], rows: set[str] | frozenset[str] = frozenset()) -> None:
        """Snapshot ``params`` (torch tensors); ``rows`` names the per-model tables."""
        self._ref = {k: v.detach().clone() for k, v in params.items()}
        self._rows = set(rows) & set(params)

    def clear(self) -> None:
        self._ref, self._rows = {}, set()

    def penalty(self, params: Mapping[str, Any]):
        """The anchoring loss for the current ``params`` (a torch scalar; 0 when nothing is anchored)."""
        import torch

        total = None
        for name, ref in self._ref.items():
            cur = params[name]
            if name in self._rows:
                if self.config.strength_rows <= 0 or ref.shape[0] == 0:
                    continue
                term = self.config.strength_rows * ((cur[: ref.shape[0]] - ref) ** 2).sum(dim=-1).mean()
            else:
                if self.config.strength_dense <= 0:
                    continue
                term = self.config.strength_dense * ((cur - ref) ** 2).sum()
            total = term if total is None else total + term
        if total is None:
            return torch.zeros(())
        return total

    def drift(self, params: Mapping[str, Any]) -> dict[str, float]:
        """Squared distance of each anchored tensor from the snapshot (rows: mean per anchored row)."""
        out = {}
        for name, ref in self._ref.items():
            cur = params[name].detach()
            if name in self._rows:
                out[name] = float(((cur[: ref.shape[0]] - ref) ** 2).sum(dim=-1).mean()) if ref.shape[0] else 0.0
            else:
                out[name] = float(((cur - ref) ** 2).sum())
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "config": {"strength_rows": self.config.strength_rows, "strength_dense": self.config.strength_dense},
            "rows": sorted(self._rows),
            "ref": {k: v.detach().cpu().numpy() for k, v in self._ref.items()},
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        import torch

        self.config = AnchorConfig(**d["config"])
        self._rows = set(d["rows"])
        self._ref = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in d["ref"].items()}
