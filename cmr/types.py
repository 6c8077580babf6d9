"""Core value types: model cards, routing decisions and feedback events.

Plain dataclasses with an exact dict round-trip (``to_dict`` / ``from_dict``), so they travel
unchanged through SQLite, JSON, HTTP and checkpoints.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from cmr.errors import HubError

_ID_SPLIT = re.compile(r"[/_\-.:]+")


@dataclass
class ModelCard:
    """Everything the router knows about one model of the hub.

    ``profile`` maps a profile-prompt id to the model's score on it (UniRoute: a new model joins
    by answering a small set of representative prompts). ``backend`` holds serving settings
    (engine name, path or URL, resources); the router never reads it.
    """

    id: str
    family: str | None = None
    domain: str | None = None
    description: str = ""
    cost: float = 0.0
    backend: dict[str, Any] = field(default_factory=dict)
    profile: dict[str, float] = field(default_factory=dict)
    experience: int | None = None
    added_at: float = field(default_factory=time.time)
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id.strip():
            raise HubError("field 'id': a model card needs a non-empty string id")
        if not isinstance(self.cost, (int, float)) or isinstance(self.cost, bool) or not math.isfinite(self.cost) or self.cost < 0:
            raise HubError(f"field 'cost': must be a finite number >= 0, got {self.cost!r}")
        self.cost = float(self.cost)
        for name in ("backend", "profile", "metadata"):
            if not isinstance(getattr(self, name), dict):
                raise HubError(f"field '{name}': must be an object")
        for k, v in self.profile.items():
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise HubError(f"field 'profile.{k}': must be a finite number")

    def text(self) -> str:
        """Card text for the encoder: id words + domain + description."""
        words = " ".join(w for w in _ID_SPLIT.split(self.id) if w)
        parts = [words, self.domain or "", self.description or ""]
        return ". ".join(p.strip() for p in parts if p and p.strip())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelCard":
        """Build a card from a dict; unknown keys go to ``metadata`` rather than being lost."""
        if not isinstance(d, dict):
            raise HubError("a model card must be a JSON object")
        names = {f.name for f in fields(cls)}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names}
        if "id" not in known and "model" in extra:  # the shared data's hub.jsonl says "model"
            known["id"] = extra.pop("model")
        if extra:
            known["metadata"] = {**extra, **(known.get("metadata") or {})}
        try:
            return cls(**known)
        except TypeError as e:  # wrong types for dataclass fields
            raise HubError(str(e)) from None


@dataclass
class Decision:
    """One routing decision: the chosen model and the runner-ups, best first."""

    model: str
    score: float
    utility: float
    alternatives: list[tuple[str, float]] = field(default_factory=list)
    checkpoint_version: int | None = None
    request_id: str | None = None
    #: the cost weight λ the utility was computed with (the request's, or the router's calibrated default)
    cost_weight: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["alternatives"] = [list(a) for a in self.alternatives]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Decision":
        d = dict(d)
        d["alternatives"] = [tuple(a) for a in d.get("alternatives", [])]
        return cls(**d)


@dataclass
class FeedbackEvent:
    """Partial feedback: the reward of the model that was chosen for one query, nothing else.

    ``embedding`` is the query embedding recorded at decision time (so the learner need not
    re-encode); ``reward`` is the quality in [0, 1]; ``cost`` is what the call cost.
    """

    request_id: str
    model: str
    reward: float
    query: str = ""
    embedding: list[float] | None = None
    cost: float = 0.0
    timestamp: float = field(default_factory=time.time)
    offset: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.reward, (int, float)) or isinstance(self.reward, bool) or not math.isfinite(self.reward):
            raise ValueError(f"field 'reward': must be a finite number, got {self.reward!r}")
        if not 0.0 <= float(self.reward) <= 1.0:
            raise ValueError(f"field 'reward': must be in [0, 1], got {self.reward!r}")
        self.reward = float(self.reward)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FeedbackEvent":
        return cls(**d)
