"""The model hub: a versioned registry of model cards with change events.

Every change (add, update, retire) bumps the version and is told to listeners, so a router can
index a new model the moment it is registered.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from cmr.errors import HubError
from cmr.hub.store import HubStore, HubStoreProtocol
from cmr.types import ModelCard


@dataclass(frozen=True)
class HubChange:
    """What changed: ``kind`` is ``added``, ``updated`` or ``retired``."""

    kind: str
    cards: tuple[ModelCard, ...]
    version: int


Listener = Callable[[HubChange], None]


class ModelHub:
    """Live cards kept in memory, persisted in a hub store (SQLite ``HubStore`` by default)."""

    def __init__(self, store: HubStoreProtocol | None = None, path: Path | str | None = None):
        self.store = store or HubStore(path or ":memory:")
        self._lock = threading.RLock()
        self._live: dict[str, ModelCard] = {c.id: c for c, _, _ in self.store.load()}
        self._listeners: list[Listener] = []

    # -- reads -------------------------------------------------------------------------------
    @property
    def version(self) -> int:
        return self.store.version()

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, model_id: str) -> bool:
        return model_id in self._live

    def get(self, model_id: str) -> ModelCard:
        try:
            return self._live[model_id]
        except KeyError:
            raise HubError(f"unknown model {model_id!r}") from None

    def list(self, include_retired: bool = False) -> list[ModelCard]:
        """Live cards in id order (retired ones too when asked)."""
        if include_retired:
            return [c for c, _, _ in self.store.load(include_retired=True)]
        with self._lock:
            return [self._live[k] for k in sorted(self._live)]

    # -- writes ------------------------------------------------------------------------------
    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def add(self, cards: ModelCard | Sequence[ModelCard]) -> int:
        """Register new cards; an id already live is refused (use ``update``). A retired id may return."""
        cards = [cards] if isinstance(cards, ModelCard) else list(cards)
        with self._lock:
            ids = [c.id for c in cards]
            dup = next((i for i in ids if i in self._live), None) or (len(set(ids)) < len(ids) and "duplicate in batch")
            if dup:
                raise HubError(f"model {dup!r} is already registered")
            v = self.store.add(cards)  # checks again against the store: another process may have added it
            for c in cards:
                self._live[c.id] = c
        self._emit(HubChange("added", tuple(cards), v))
        return v

    def update(self, card: ModelCard) -> int:
        with self._lock:
            if card.id not in self._live:
                raise HubError(f"unknown model {card.id!r}")
            v = self.store.write([card])
            self._live[card.id] = card
        self._emit(HubChange("updated", (card,), v))
        return v

    def retire(self, model_ids: str | Iterable[str]) -> int:
        ids = [model_ids] if isinstance(model_ids, str) else list(model_ids)
        with self._lock:
            unknown = [i for i in ids if i not in self._live]
            if unknown:
                raise HubError(f"unknown model {unknown[0]!r}")
            v = self.store.set_retired(ids, True)
            gone = tuple(self._live.pop(i) for i in ids)
        self._emit(HubChange("retired", gone, v))
        return v

    def _emit(self, change: HubChange) -> None:
        for fn in list(self._listeners):
            fn(change)
