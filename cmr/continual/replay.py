"""Replay storage: what a continual learner keeps of past data, as objects of their own.

Everything a learner trains on is reduced to *interactions* — ``(query embedding, model,
reward)`` triples with the query's domain — so labelled requests (one positive model),
outcome matrices (one triple per known score) and online feedback events share one store.

Two storage policies:

* :class:`ReservoirBuffer` — a uniform sample of everything seen, fixed capacity (online use).
* :class:`CoresetBuffer` — domain-stratified coreset with a budget that is a fraction of the
  data seen: each domain gets a quota proportional to its share of the data seen, each model
  a cap, and inside a domain rows are picked by farthest-point selection in embedding space,
  so the kept rows cover the domain rather than repeat its densest region.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

from cmr.data.examples import Examples
from cmr.types import FeedbackEvent

_NO_DOMAIN = ""


@dataclass
class Interactions:
    """A batch of ``(query, model, reward)`` triples.

    Attributes:
        emb: ``[n, d]`` float32 unit-norm query embeddings.
        model: the model id of each triple (the positive model, or the one that was chosen).
        reward: ``[n]`` float32 quality in [0, 1] (1 = right model / correct answer).
        domain: the query's domain (or task); ``""`` when unknown.
        text: the query text (kept for inspection; may be empty).
        weight: ``[n]`` float32 loss weight (card-text pseudo-examples weigh less).
    """

    emb: np.ndarray
    model: list[str]
    reward: np.ndarray
    domain: list[str] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    weight: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.model)
        self.emb = np.asarray(self.emb, dtype=np.float32).reshape(n, -1) if n else np.asarray(self.emb, dtype=np.float32)
        self.reward = np.asarray(self.reward, dtype=np.float32).reshape(n)
        if not self.domain:
            self.domain = [_NO_DOMAIN] * n
        if not self.text:
            self.text = [""] * n
        if self.weight is None:
            self.weight = np.ones(n, dtype=np.float32)
        self.weight = np.asarray(self.weight, dtype=np.float32).reshape(n)
        if not (len(self.domain) == len(self.text) == n and len(self.emb) == n):
            raise ValueError("Interactions: emb, model, reward, domain and text need the same length")

    def __len__(self) -> int:
        return len(self.model)

    @classmethod
    def empty(cls, dim: int) -> "Interactions":
        return cls(np.zeros((0, dim), np.float32), [], np.zeros(0, np.float32))

    @classmethod
    def from_examples(cls, data: Examples) -> "Interactions":
        """Labelled requests give one triple per row (reward 1 for the label); outcome matrices
        one triple per known ``(row, model)`` score."""
        if data.emb is None:
            raise ValueError("field 'emb': examples must be encoded before training")
        dom = data.meta.get("domain") or data.meta.get("task") or [None] * len(data)
        dom = [d or _NO_DOMAIN for d in dom]
        if data.labels is not None:
            keep = np.flatnonzero(data.labels >= 0)
            return cls(
                emb=data.emb[keep],
                model=[data.model_ids[data.labels[i]] for i in keep],
                reward=np.ones(len(keep), np.float32),
                domain=[dom[i] for i in keep],
                text=[data.texts[i] for i in keep],
            )
        rows, cols = np.nonzero(~np.isnan(data.scores))
        return cls(
            emb=data.emb[rows],
            model=[data.model_ids[j] for j in cols],
            reward=data.scores[rows, cols],
            domain=[dom[i] for i in rows],
            text=[data.texts[i] for i in rows],
        )

    @classmethod
    def from_events(cls, events: Sequence[FeedbackEvent]) -> "Interactions":
        """Feedback events that carry their query embedding (the rest cannot be learnt from)."""
        ev = [e for e in events if e.embedding is not None]
        if not ev:
            return cls(np.zeros((0, 0), np.float32), [], np.zeros(0, np.float32))
        return cls(
            emb=np.asarray([e.embedding for e in ev], dtype=np.float32),
            model=[e.model for e in ev],
            reward=np.array([e.reward for e in ev], np.float32),
            text=[e.query for e in ev],
        )

    def subset(self, idx) -> "Interactions":
        idx = np.asarray(idx)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        return Interactions(
            self.emb[idx], [self.model[i] for i in idx], self.reward[idx],
            [self.domain[i] for i in idx], [self.text[i] for i in idx], self.weight[idx],
        )

    @staticmethod
    def concat(parts: Sequence["Interactions"]) -> "Interactions":
        parts = [p for p in parts if len(p)]
        if not parts:
            return Interactions(np.zeros((0, 0), np.float32), [], np.zeros(0, np.float32))
        return Interactions(
            np.concatenate([p.emb for p in parts]),
            [m for p in parts for m in p.model],
            np.concatenate([p.reward for p in parts]),
            [d for p in parts for d in p.domain],
            [t for p in parts for t in p.text],
            np.concatenate([p.weight for p in parts]),
        )

    def state_dict(self) -> dict[str, Any]:
        return {"emb": self.emb, "model": list(self.model), "reward": self.reward, "domain": list(self.domain),
                "text": list(self.text), "weight": self.weight}

    @classmethod
    def from_state(cls, d: dict[str, Any]) -> "Interactions":
        return cls(np.asarray(d["emb"], np.float32), list(d["model"]), np.asarray(d["reward"], np.float32),
                   list(d["domain"]), list(d["text"]), np.asarray(d["weight"], np.float32))


def _reembedded(emb: np.ndarray, text: Sequence[str], weight: np.ndarray, encoder) -> tuple[np.ndarray, np.ndarray]:
    """``emb`` with each row that has a text encoded again by ``encoder``; a row without one can't
    be, so its loss weight becomes 0 (a vector of the old encoder would be wrong, not just old)."""
    has = np.array([bool(t) for t in text], dtype=bool)
    if not len(text):
        return emb, weight
    out = np.zeros((len(text), int(encoder.dim)), np.float32)
    if has.any():
        out[has] = encoder.encode([t for t, h in zip(text, has) if h])
    return out, np.where(has, weight, 0.0).astype(np.float32)


@runtime_checkable
class ReplayBuffer(Protocol):
    """A storage policy for past interactions."""

    def add(self, items: Interactions) -> None:
        """Offer new interactions; the buffer decides what it keeps."""

    def items(self) -> Interactions:
        """Everything kept."""

    def sample(self, n: int, rng: np.random.Generator) -> Interactions:
        """``n`` kept interactions drawn uniformly (fewer if fewer are kept)."""

    def __len__(self) -> int: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, d: dict[str, Any]) -> None: ...


class _Stored:
    """Shared storage and sampling for the buffers below."""

    def __init__(self) -> None:
        self._items: Interactions | None = None

    def items(self) -> Interactions:
        return self._items if self._items is not None else Interactions.empty(0)

    def __len__(self) -> int:
        return 0 if self._items is None else len(self._items)

    def sample(self, n: int, rng: np.random.Generator) -> Interactions:
        have = len(self)
        if have == 0 or n <= 0:
            return Interactions.empty(0 if self._items is None else self._items.emb.shape[1])
        return self._items.subset(rng.choice(have, size=min(n, have), replace=False))

    def reembed(self, encoder) -> None:
        """Encode the kept rows again (the encoder changed)."""
        if self._items is not None and len(self._items):
            it = self._items
            emb, weight = _reembedded(it.emb, it.text, it.weight, encoder)
            self._items = Interactions(emb, it.model, it.reward, it.domain, it.text, weight)


class ReservoirBuffer(_Stored):
    """Uniform reservoir sample (Vitter's algorithm R) of at most ``capacity`` interactions.

    Cost per ``add`` is proportional to the batch, not to the capacity: rows are written into
    preallocated slots in place, so the online learner's cost per event stays bounded.
    """

    kind = "reservoir"

    def __init__(self, capacity: int = 10_000, seed: int = 0):
        super().__init__()
        if capacity < 1:
            raise ValueError(f"field 'capacity': must be >= 1, got {capacity}")
        self.capacity = capacity
        self.seen = 0
        self._rng = np.random.default_rng(seed)
        self._emb: np.ndarray | None = None
        self._model: list[str] = []
        self._reward = np.zeros(0, np.float32)
        self._weight = np.zeros(0, np.float32)
        self._domain: list[str] = []
        self._text: list[str] = []

    def __len__(self) -> int:
        return min(self.seen, self.capacity)

    def items(self) -> Interactions:
        n = len(self)
        if self._emb is None:
            return Interactions.empty(0)
        return Interactions(self._emb[:n].copy(), list(self._model[:n]), self._reward[:n].copy(),
                            list(self._domain[:n]), list(self._text[:n]), self._weight[:n].copy())

    def sample(self, n: int, rng: np.random.Generator) -> Interactions:
        have = len(self)
        if have == 0 or n <= 0:
            return Interactions.empty(0 if self._emb is None else self._emb.shape[1])
        idx = rng.choice(have, size=min(n, have), replace=False)
        return Interactions(self._emb[idx], [self._model[i] for i in idx], self._reward[idx],
                            [self._domain[i] for i in idx], [self._text[i] for i in idx], self._weight[idx])

    def reembed(self, encoder) -> None:
        """Encode the kept rows again (the encoder changed)."""
        n = len(self)
        if self._emb is not None and n:
            emb, self._weight[:n] = _reembedded(self._emb[:n], self._text[:n], self._weight[:n], encoder)
            if emb.shape[1] != self._emb.shape[1]:
                self._emb = np.zeros((len(self._emb), emb.shape[1]), np.float32)
            self._emb[:n] = emb

    def add(self, items: Interactions) -> None:
        n = len(items)
        if n == 0:
            return
        need = min(self.capacity, self.seen + n)
        if self._emb is None or len(self._emb) < need:
            # grow geometrically up to the capacity (a huge capacity must not be allocated up front)
            size = min(self.capacity, max(need, 2 * (0 if self._emb is None else len(self._emb))))
            old = 0 if self._emb is None else len(self._emb)
            emb = np.zeros((size, items.emb.shape[1]), np.float32)
            reward, weight = np.zeros(size, np.float32), np.zeros(size, np.float32)
            if old:
                emb[:old], reward[:old], weight[:old] = self._emb, self._reward, self._weight
            self._emb, self._reward, self._weight = emb, reward, weight
        pos = self.seen + np.arange(n)
        slot = pos.copy()
        late = pos >= self.capacity
        if late.any():
            r = (self._rng.random(int(late.sum())) * (pos[late] + 1)).astype(np.int64)
            slot[late] = np.where(r < self.capacity, r, -1)
        self.seen += n
        for i, s in enumerate(slot):  # in stream order: a later item may overwrite an earlier one
            if s < 0:
                continue
            self._emb[s] = items.emb[i]
            self._reward[s] = items.reward[i]
            self._weight[s] = items.weight[i]
            if s < len(self._model):
                self._model[s], self._domain[s], self._text[s] = items.model[i], items.domain[i], items.text[i]
            else:
                self._model.append(items.model[i])
                self._domain.append(items.domain[i])
                self._text.append(items.text[i])

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "capacity": self.capacity, "seen": self.seen,
                "rng": self._rng.bit_generator.state, "items": self.items().state_dict() if len(self) else None}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.__init__(capacity=int(d["capacity"]))
        self._rng.bit_generator.state = d["rng"]
        if d.get("items") is not None:
            it = Interactions.from_state(d["items"])
            self.add(it)  # fills slots 0..n-1 in order (n <= capacity)
        self.seen = int(d["seen"])


def farthest_point_order(x: np.ndarray, k: int, first: int = 0) -> np.ndarray:
    """Greedy k-center selection: ``k`` row indices of ``x``, each the farthest (cosine) from
    those already chosen. Vectorised: one matrix-vector product per pick."""
    n = len(x)
    k = min(k, n)
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    chosen = np.empty(k, dtype=np.int64)
    chosen[0] = first
    dist = 1.0 - x @ x[first]
    dist[first] = -np.inf
    for i in range(1, k):
        j = int(np.argmax(dist))
        chosen[i] = j
        dist = np.minimum(dist, 1.0 - x @ x[j])
        dist[chosen[: i + 1]] = -np.inf
    return chosen


class CoresetBuffer(_Stored):
    """Domain-stratified coreset with a budget of ``fraction`` × (interactions seen).

    On every ``add`` the coreset is re-selected from (kept ∪ new): each domain's quota is its
    share of everything seen × the budget (at least one row for a domain that was seen); a
    model keeps at most ``per_model_cap`` rows; inside a domain rows are chosen by
    farthest-point selection, starting from the row nearest the domain centroid.
    """

    kind = "coreset"

    def __init__(self, fraction: float = 0.1, per_model_cap: int = 4, seed: int = 0):
        super().__init__()
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"field 'fraction': must be in [0, 1], got {fraction}")
        if per_model_cap < 1:
            raise ValueError(f"field 'per_model_cap': must be >= 1, got {per_model_cap}")
        self.fraction, self.per_model_cap = fraction, per_model_cap
        self.seen_per_domain: dict[str, int] = {}
        self.seed = seed

    @property
    def budget(self) -> int:
        return int(round(self.fraction * sum(self.seen_per_domain.values())))

    def add(self, items: Interactions) -> None:
        if len(items) == 0:
            return
        for d in items.domain:
            self.seen_per_domain[d] = self.seen_per_domain.get(d, 0) + 1
        pool = items if self._items is None else Interactions.concat([self._items, items])
        budget = self.budget
        if budget == 0:
            self._items = pool.subset(np.zeros(0, dtype=np.int64))
            return
        total = sum(self.seen_per_domain.values())
        doms = np.asarray(pool.domain, dtype=object)
        models = np.asarray(pool.model, dtype=object)
        keep: list[np.ndarray] = []
        for d, n_seen in self.seen_per_domain.items():
            rows = np.flatnonzero(doms == d)
            if rows.size == 0:
                continue
            quota = max(1, int(round(budget * n_seen / total)))
            keep.append(rows[self._select(pool.emb[rows], models[rows], quota)])
        self._items = pool.subset(np.concatenate(keep) if keep else np.zeros(0, dtype=np.int64))

    def _select(self, x: np.ndarray, models: np.ndarray, quota: int) -> np.ndarray:
        """Farthest-point order over the domain, then the model cap, then the quota."""
        centroid = x.mean(axis=0)
        first = int(np.argmax(x @ centroid))
        order = farthest_point_order(x, len(x), first) if len(x) <= 4 * quota else farthest_point_order(x, 4 * quota, first)
        count: dict[str, int] = {}
        out = []
        for i in order:
            m = models[i]
            if count.get(m, 0) >= self.per_model_cap:
                continue
            count[m] = count.get(m, 0) + 1
            out.append(i)
            if len(out) == quota:
                break
        return np.asarray(out, dtype=np.int64)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "fraction": self.fraction, "per_model_cap": self.per_model_cap,
                "seen_per_domain": dict(self.seen_per_domain),
                "items": None if self._items is None else self._items.state_dict()}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.fraction, self.per_model_cap = float(d["fraction"]), int(d["per_model_cap"])
        self.seen_per_domain = {str(k): int(v) for k, v in d["seen_per_domain"].items()}
        self._items = None if d.get("items") is None else Interactions.from_state(d["items"])


def buffer_from_state(d: dict[str, Any]) -> ReplayBuffer:
    """Rebuild a buffer saved with ``state_dict``."""
    kind = d.get("kind")
    if kind == ReservoirBuffer.kind:
        b: ReplayBuffer = ReservoirBuffer(capacity=int(d["capacity"]))
    elif kind == CoresetBuffer.kind:
        b = CoresetBuffer(fraction=float(d["fraction"]), per_model_cap=int(d["per_model_cap"]))
    else:
        raise ValueError(f"field 'kind': unknown replay buffer kind {kind!r}")
    b.load_state_dict(d)
    return b


class Replay:
    """The learner's replay: what it keeps of labelled experiences (``experiences``, e.g. a
    coreset) and of feedback events (``events``, e.g. a reservoir). An experience trains on its
    new data plus ``experiences``; an online step on its events plus ``online`` rows drawn half
    from each buffer; a consolidation on both buffers whole."""

    def __init__(self, experiences: ReplayBuffer, events: ReplayBuffer, online: int = 32):
        self.experiences, self.events, self.online = experiences, events, online

    def sample(self, rng: np.random.Generator) -> Interactions:
        n = self.online
        return Interactions.concat([self.events.sample(n // 2, rng), self.experiences.sample(n - n // 2, rng)])

    def items(self) -> Interactions:
        return Interactions.concat([self.experiences.items(), self.events.items()])

    def reembed(self, encoder) -> None:
        """Encode both buffers' rows again with ``encoder`` (after the policy tuned it)."""
        for b in (self.experiences, self.events):
            fn = getattr(b, "reembed", None)
            if fn is None:
                raise TypeError(f"replay buffer {type(b).__name__} cannot be encoded again (no reembed)")
            fn(encoder)

    def state_dict(self) -> dict[str, Any]:
        return {"experiences": self.experiences.state_dict(), "events": self.events.state_dict(), "online": self.online}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.experiences, self.events = buffer_from_state(d["experiences"]), buffer_from_state(d["events"])
        self.online = int(d["online"])
