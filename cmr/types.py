"""Core value types: model cards, routing decisions and feedback events.

Plain dataclasses with an exact dict round-trip (``to_dict`` / ``from_dict``), so they travel
unchanged through SQLite, JSON, HTTP and checkpoints.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Annotated, Any

from pydantic import AfterValidator, ConfigDict, Field, ValidationError
from pydantic.dataclasses import dataclass as _pydantic_dataclass

from cmr.errors import HubError, validation_line

_ID_SPLIT = re.compile(r"[/_\-.:]+")

#: limits of a model card (the one card validator, used by HTTP, gRPC and the hub alike)
MAX_ID_CHARS = 256
MAX_TEXT_CHARS = 65_536
MAX_COST = 1e6
MAX_JSON_BYTES = 65_536
MAX_JSON_DEPTH = 8


def _printable(v: str) -> str:
    if not v.strip() or not v.isprintable():
        raise ValueError("must be non-empty printable text (no control or other non-printable characters)")
    return v


def _bounded(v: dict[str, Any]) -> dict[str, Any]:
    """Free-form card objects (``backend``, ``metadata``) stay small, shallow JSON."""

    def depth(x: Any) -> int:
        children = x.values() if isinstance(x, dict) else x if isinstance(x, list) else ()
        return 1 + max(map(depth, children), default=0)

    if depth(v) > MAX_JSON_DEPTH:
        raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        size = len(json.dumps(v, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ValueError(f"must be plain JSON ({e})") from None
    if size > MAX_JSON_BYTES:
        raise ValueError(f"larger than {MAX_JSON_BYTES} bytes as JSON")
    return v


Id = Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS), AfterValidator(_printable)]
Text = Annotated[str, Field(max_length=MAX_TEXT_CHARS)]
Json = Annotated[dict[str, Any], AfterValidator(_bounded)]


@_pydantic_dataclass(config=ConfigDict(strict=True, allow_inf_nan=False, extra="forbid"))
class ModelCard:
    """Everything the router knows about one model of the hub.

    ``profile`` maps a profile-prompt id to the model's score on it (UniRoute: a new model joins
    by answering a small set of representative prompts). ``backend`` holds serving settings
    (engine name, path or URL, resources); the router never reads it. Every field is checked
    when a card is built (a pydantic dataclass): this is the one card validator, so HTTP, gRPC
    and the hub refuse the same cards with the same message.
    """

    id: Id
    family: Id | None = None
    domain: Text | None = None
    description: Text = ""
    cost: Annotated[float, Field(ge=0, le=MAX_COST)] = 0.0
    backend: Json = field(default_factory=dict)
    profile: dict[Id, Annotated[float, Field(ge=0, le=1)]] = field(default_factory=dict)
    experience: int | None = None
    added_at: float = field(default_factory=time.time)
    metadata: Json = field(default_factory=dict)

    def text(self) -> str:
        """Card text for the encoder: id words + domain + description."""
        words = " ".join(w for w in _ID_SPLIT.split(self.id) if w)
        parts = [words, self.domain or "", self.description or ""]
        return ". ".join(p.strip() for p in parts if p and p.strip())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "") -> "ModelCard":
        """Build a card from a dict; unknown keys go to ``metadata`` rather than being lost.
        A bad field is one ``HubError`` line naming it (prefixed by ``where``, e.g. ``cards.3``)."""
        if not isinstance(d, dict):
            raise HubError(f"field '{where or 'card'}': a model card must be a JSON object")
        names = {f.name for f in fields(cls)}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names}
        if "id" not in known and "model" in extra:  # the shared data's hub.jsonl says "model"
            known["id"] = extra.pop("model")
        if extra:
            known["metadata"] = {**extra, **(known.get("metadata") or {})}
        try:
            return cls(**known)
        except ValidationError as e:
            raise HubError(validation_line(e, prefix=f"{where}." if where else "")) from None


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
    #: seconds the router took for the batch this decision was made in (encode, score, decide)
    latency_s: float | None = None
    #: the task the request named (``RoutingOptions.task``), learnt with its feedback
    task: str | None = None

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
    #: the task the request named, if any (policies with per-task priors learn it)
    task: str | None = None

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
