"""Persistence for the hub: one row per card, a monotonically increasing version.

``HubStore`` (SQLite, the embedded default) and ``PgHubStore`` (PostgreSQL, shared by replicas
on several nodes) both satisfy ``HubStoreProtocol``; ``open_hub_store`` picks one by the DSN.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Iterable, Protocol

from cmr.errors import HubError
from cmr.state import PgDatabase, SharedVersion, is_postgres, private_file
from cmr.types import ModelCard


class HubStoreProtocol(Protocol):
    """What the hub needs from its store. ``version`` is cheap (a router checks it per batch)."""

    def version(self) -> int: ...
    def write(self, cards: Iterable[ModelCard], retired: bool = False) -> int: ...
    def add(self, cards: Iterable[ModelCard]) -> int: ...
    def set_retired(self, ids: Iterable[str], retired: bool) -> int: ...
    def get(self, model_id: str) -> tuple[ModelCard, bool] | None: ...
    def load(self, include_retired: bool = False, since_version: int = 0) -> list[tuple[ModelCard, bool, int]]: ...
    def close(self) -> None: ...


def _already(model_id: str) -> HubError:
    return HubError(f"model {model_id!r} is already registered")


def open_hub_store(dsn: str | None, path: Path | str) -> HubStoreProtocol:
    """The hub store of a deployment: PostgreSQL when ``dsn`` is a postgresql:// DSN, else the
    SQLite file ``path``."""
    return PgHubStore(dsn) if is_postgres(dsn) else HubStore(path)

_UPSERT = "INSERT OR REPLACE INTO cards (id, card, retired, version) VALUES (?, ?, ?, ?)"
_PG_UPSERT = ("INSERT INTO hub_cards (id, card, retired, version) VALUES (%s, %s, %s, %s) ON CONFLICT (id) DO UPDATE "
              "SET card = EXCLUDED.card, retired = EXCLUDED.retired, version = EXCLUDED.version")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS cards (
  id TEXT PRIMARY KEY,
  card TEXT NOT NULL,
  retired INTEGER NOT NULL DEFAULT 0,
  version INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta (key, value) VALUES ('version', 0);
"""


class HubStore:
    """Cards in SQLite (WAL); each ``version()`` reads the file, so other processes' writes show at once. ``path=':memory:'`` keeps everything in memory (tests, benchmarks)."""

    def __init__(self, path: Path | str = ":memory:"):
        self.path = str(path)
        if self.path != ":memory:":
            private_file(self.path)  # 0600 before SQLite creates it (and its -wal/-shm)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30, isolation_level=None)
        if self.path != ":memory:":
            self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def version(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT value FROM meta WHERE key='version'").fetchone()[0])

    def write(self, cards: Iterable[ModelCard], retired: bool = False) -> int:
        """Insert or replace cards in one transaction; returns the new hub version."""
        rows = [(c.id, json.dumps(c.to_dict()), int(retired)) for c in cards]
        return self._bump(lambda cur, v: cur.executemany(_UPSERT, [(*r, v) for r in rows]))

    def add(self, cards: Iterable[ModelCard]) -> int:
        """Insert new cards in one transaction, refused whole (``HubError``) when one's id is live
        in the store, whatever the caller's view of it (another process may have added it since);
        a retired id may return. Returns the new hub version."""
        rows = [(c.id, json.dumps(c.to_dict()), 0) for c in cards]

        def change(cur, v):
            ids = [r[0] for r in rows]
            for i in range(0, len(ids), 900):  # SQLite's bound-parameter limit
                chunk = ids[i : i + 900]
                live = cur.execute(f"SELECT id FROM cards WHERE retired = 0 AND id IN ({','.join('?' * len(chunk))})", chunk).fetchone()
                if live:
                    raise _already(live[0])
            cur.executemany(_UPSERT, [(*r, v) for r in rows])

        return self._bump(change)

    def set_retired(self, ids: Iterable[str], retired: bool) -> int:
        """Mark cards retired (or live again) in one transaction; returns the new hub version."""
        ids = list(ids)
        return self._bump(lambda cur, v: cur.executemany(
            "UPDATE cards SET retired=?, version=? WHERE id=?", [(int(retired), v, i) for i in ids]))

    def _bump(self, change) -> int:
        """Run ``change(cursor, new_version)`` and bump the version, all or nothing."""
        with self._lock:
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                v = int(cur.execute("SELECT value FROM meta WHERE key='version'").fetchone()[0]) + 1
                change(cur, v)
                cur.execute("UPDATE meta SET value=? WHERE key='version'", (v,))
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            return v

    def get(self, model_id: str) -> tuple[ModelCard, bool] | None:
        with self._lock:
            row = self._db.execute("SELECT card, retired FROM cards WHERE id=?", (model_id,)).fetchone()
        return None if row is None else (ModelCard.from_dict(json.loads(row[0])), bool(row[1]))

    def load(self, include_retired: bool = False, since_version: int = 0) -> list[tuple[ModelCard, bool, int]]:
        """All cards (optionally only those changed after ``since_version``), in id order."""
        q = "SELECT card, retired, version FROM cards WHERE version > ?"
        if not include_retired:
            q += " AND retired = 0"
        with self._lock:
            rows = self._db.execute(q + " ORDER BY id", (since_version,)).fetchall()
        return [(ModelCard.from_dict(json.loads(c)), bool(r), int(v)) for c, r, v in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()


_PG_SCHEMA = ("CREATE TABLE hub_cards (id TEXT PRIMARY KEY, card TEXT NOT NULL, retired BOOLEAN NOT NULL DEFAULT FALSE, version BIGINT NOT NULL)",)


class PgHubStore:
    """Cards in PostgreSQL. ``version()`` is this replica's view of the hub version, kept fresh
    without a query (``cmr.state.SharedVersion``: NOTIFY at each write's commit, periodic re-sync)."""

    def __init__(self, db: PgDatabase | str):
        self.db = PgDatabase.shared(db) if isinstance(db, str) else db
        self.db.migrate("hub", _PG_SCHEMA)
        self._version = SharedVersion(self.db, "hub")

    def version(self) -> int:
        return self._version.get()

    def write(self, cards: Iterable[ModelCard], retired: bool = False) -> int:
        """Insert or replace cards in one transaction; returns the new hub version."""
        rows = [(c.id, json.dumps(c.to_dict()), bool(retired)) for c in cards]
        return self._bump(lambda cur, v: cur.executemany(_PG_UPSERT, [(*r, v) for r in rows]))

    def add(self, cards: Iterable[ModelCard]) -> int:
        """As :meth:`HubStore.add`: refused whole when an id is live; writers are serialised by
        the version bump's row lock, so two replicas adding one id cannot both succeed."""
        rows = [(c.id, json.dumps(c.to_dict()), False) for c in cards]

        def change(cur, v):
            live = cur.execute("SELECT id FROM hub_cards WHERE NOT retired AND id = ANY(%s) LIMIT 1", ([r[0] for r in rows],)).fetchone()
            if live:
                raise _already(live[0])
            cur.executemany(_PG_UPSERT, [(*r, v) for r in rows])

        return self._bump(change)

    def set_retired(self, ids: Iterable[str], retired: bool) -> int:
        """Mark cards retired (or live again) in one transaction; returns the new hub version."""
        ids = list(ids)
        return self._bump(lambda cur, v: cur.executemany(
            "UPDATE hub_cards SET retired = %s, version = %s WHERE id = %s", [(bool(retired), v, i) for i in ids]))

    def _bump(self, change) -> int:
        """Run ``change(cursor, new_version)`` and bump the version, all or nothing."""
        with self.db.connection() as conn:
            v = self._version.bump(conn)
            with conn.cursor() as cur:
                change(cur, v)
        self._version.seen(v)
        return v

    def get(self, model_id: str) -> tuple[ModelCard, bool] | None:
        with self.db.connection() as conn:
            row = conn.execute("SELECT card, retired FROM hub_cards WHERE id = %s", (model_id,)).fetchone()
        return None if row is None else (ModelCard.from_dict(json.loads(row[0])), bool(row[1]))

    def load(self, include_retired: bool = False, since_version: int = 0) -> list[tuple[ModelCard, bool, int]]:
        """All cards (optionally only those changed after ``since_version``), in id order."""
        q = "SELECT card, retired, version FROM hub_cards WHERE version > %s"
        if not include_retired:
            q += " AND NOT retired"
        with self.db.connection() as conn:
            rows = conn.execute(q + ' ORDER BY id COLLATE "C"', (since_version,)).fetchall()  # byte order, as SQLite
        return [(ModelCard.from_dict(json.loads(c)), bool(r), int(v)) for c, r, v in rows]

    def close(self) -> None:
        self._version.close()
        self.db.release()
