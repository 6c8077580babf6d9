"""Which checkpoint version is served: a row per publication in the state store.

A version is written whole first (``cmr.checkpoint.save``: a local folder renamed into place, or
files uploaded to a URI with the manifest last), then *published* here: one row with the policy,
version, where it lives (a path or URI) and the SHA-256 of its manifest. Routers on every node
load the published version, never "the newest folder", so a half-written or unpublished version is
never loaded; a version whose files do not match the published checksum is refused.

``PublishedStore`` (SQLite, in the state folder) and ``PgPublishedStore`` (PostgreSQL: each
publication NOTIFYs ``cmr_checkpoints``, so watchers on any node wake at once; the periodic re-sync
of ``cmr.state.SharedVersion`` is the safety net) both satisfy ``PublishedStoreProtocol``;
``open_published_store`` picks one by the DSN. The current version is the latest publication
(re-publishing an older version rolls back).

The same stores publish *settings*: a named JSON object every router applies (the calibrated λ,
``cmr.calibrate.apply``), one row per name, replaced whole; on PostgreSQL a change NOTIFYs
``cmr_settings`` and wakes the same watchers.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

from cmr import checkpoint
from cmr.state import PgDatabase, SharedVersion, is_postgres, private_file

log = logging.getLogger("cmr.published")


@dataclass(frozen=True)
class Published:
    """One publication: ``uri`` is the version's folder (a path or a URI), ``checksum`` the
    SHA-256 of its ``manifest.json``."""

    policy: str
    version: int
    uri: str
    checksum: str
    created: float


class PublishedStoreProtocol(Protocol):
    def publish(self, policy: str, version: int, uri: str, checksum: str) -> Published: ...
    def current(self, policy: str) -> Published | None: ...
    def history(self, policy: str, limit: int = 20) -> list[Published]: ...
    def put_setting(self, name: str, value: dict) -> None: ...
    def setting(self, name: str) -> dict | None: ...
    def on_change(self, fn: Callable[[], None]) -> None: ...
    def close(self) -> None: ...


def open_published_store(dsn: str | None, path: Path | str) -> PublishedStoreProtocol:
    """PostgreSQL when ``dsn`` is a postgresql:// DSN, else the SQLite file ``path``."""
    return PgPublishedStore(dsn) if is_postgres(dsn) else PublishedStore(path)


def publish(store: PublishedStoreProtocol, root: Path | str, ck: checkpoint.Checkpoint) -> Published:
    """Publish checkpoint ``ck`` (already written whole under ``root``): routers switch to it."""
    if ck.path is None:
        raise checkpoint.CheckpointError("an in-memory checkpoint cannot be published")
    return store.publish(ck.policy, ck.version, checkpoint.version_uri(root, ck.version), checkpoint.manifest_digest(ck.path))


def publish_latest(root: Path | str, store: str) -> Published:
    """Publish the newest whole version under ``root`` (what ``cmr train --publish`` does after a
    retraining job): ``store`` is a served app's postgresql://… DSN, or its ``published.sqlite``."""
    from cmr.state import SCHEMES

    ck = checkpoint.latest(root)
    if ck is None:
        raise checkpoint.CheckpointError(f"{root}: no valid checkpoint to publish")
    dsn = store if store.split("://", 1)[0] in SCHEMES else None
    st = open_published_store(dsn, store)
    try:
        return publish(st, root, ck)
    finally:
        st.close()


def open_publication(p: Published) -> checkpoint.Checkpoint:
    """The checkpoint of publication ``p``, fetched to this node and verified against its checksum."""
    ck = checkpoint.open_checkpoint(p.uri)
    if checkpoint.manifest_digest(ck.path) != p.checksum:
        raise checkpoint.CheckpointError(f"{p.uri}: manifest does not match the published checksum")
    return ck


def load_served(store: PublishedStoreProtocol, policy: str, adopt: Path | str | None = None) -> checkpoint.Checkpoint | None:
    """The newest published version of ``policy`` that opens and verifies (a corrupt one is
    skipped, with a log line), or None when nothing is published. With ``adopt`` (a checkpoint
    root) and nothing published yet, the newest whole version there is published and returned: one
    written before publications existed, or by ``cmr train --out``."""
    history = store.history(policy)
    if not history and adopt is not None:
        ck = checkpoint.latest(adopt)
        if ck is not None:
            publish(store, adopt, ck)
        return ck
    for p in history:
        try:
            return open_publication(p)
        except checkpoint.CheckpointError:
            log.exception("published checkpoint v%d does not verify; trying the one before", p.version)
    return None


_COLUMNS = "policy, version, uri, checksum, created"


def _setting_json(name: str, value: dict) -> str:
    """The stored form of a setting (checked before anything is written): a JSON object, no NaN."""
    if not isinstance(value, dict):
        raise ValueError(f"setting {name!r}: must be a JSON object")
    return json.dumps(value, allow_nan=False, sort_keys=True)


class PublishedStore:
    """Publications in a SQLite file (WAL; every read sees other processes' commits)."""

    def __init__(self, path: Path | str):
        self.path = str(path)
        private_file(self.path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS published (seq INTEGER PRIMARY KEY AUTOINCREMENT, policy TEXT NOT NULL, "
                         "version INTEGER NOT NULL, uri TEXT NOT NULL, checksum TEXT NOT NULL, created REAL NOT NULL)")
        self._db.execute("CREATE TABLE IF NOT EXISTS settings (name TEXT PRIMARY KEY, value TEXT NOT NULL, created REAL NOT NULL)")

    def publish(self, policy: str, version: int, uri: str, checksum: str) -> Published:
        p = Published(policy, int(version), str(uri), checksum, time.time())
        with self._lock:
            self._db.execute(f"INSERT INTO published ({_COLUMNS}) VALUES (?, ?, ?, ?, ?)",
                             (p.policy, p.version, p.uri, p.checksum, p.created))
        return p

    def history(self, policy: str, limit: int = 20) -> list[Published]:
        """Publications of ``policy``, newest first, one per version."""
        with self._lock:
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM published WHERE seq IN (SELECT MAX(seq) FROM published "
                                    "WHERE policy = ? GROUP BY version) ORDER BY seq DESC LIMIT ?", (policy, limit)).fetchall()
        return [Published(a, int(b), c, d, float(e)) for a, b, c, d, e in rows]

    def current(self, policy: str) -> Published | None:
        h = self.history(policy, 1)
        return h[0] if h else None

    def put_setting(self, name: str, value: dict) -> None:
        """Publish setting ``name`` (replacing the previous value) in one commit."""
        text = _setting_json(name, value)
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO settings (name, value, created) VALUES (?, ?, ?)", (name, text, time.time()))

    def setting(self, name: str) -> dict | None:
        """The published value of setting ``name`` (None: never set)."""
        with self._lock:
            row = self._db.execute("SELECT value FROM settings WHERE name = ?", (name,)).fetchone()
        return None if row is None else json.loads(row[0])

    def on_change(self, fn: Callable[[], None]) -> None:
        """Nothing to hear from a file: watchers poll ``current`` and ``setting``."""

    def close(self) -> None:
        with self._lock:
            self._db.close()


_PG_SCHEMA = ("CREATE TABLE published (seq BIGSERIAL PRIMARY KEY, policy TEXT NOT NULL, version BIGINT NOT NULL, "
              "uri TEXT NOT NULL, checksum TEXT NOT NULL, created DOUBLE PRECISION NOT NULL)",
              "CREATE TABLE settings (name TEXT PRIMARY KEY, value TEXT NOT NULL, created DOUBLE PRECISION NOT NULL)")


class PgPublishedStore:
    """Publications in PostgreSQL. ``current`` and ``setting`` query only when this replica's view
    of the publication (or settings) counter moved (``SharedVersion``: NOTIFY at the commit,
    periodic re-sync)."""

    def __init__(self, db: PgDatabase | str):
        self.db = PgDatabase.shared(db) if isinstance(db, str) else db
        self.db.migrate("published", _PG_SCHEMA)
        self._count = SharedVersion(self.db, "checkpoints")
        self._settings = SharedVersion(self.db, "settings")
        self._cache: dict[str, tuple[int, Published | None]] = {}
        self._setting_cache: dict[str, tuple[int, str | None]] = {}
        self._unsubs: list[Callable[[], None]] = []

    def publish(self, policy: str, version: int, uri: str, checksum: str) -> Published:
        p = Published(policy, int(version), str(uri), checksum, time.time())
        with self.db.connection() as conn:
            n = self._count.bump(conn)
            conn.execute(f"INSERT INTO published ({_COLUMNS}) VALUES (%s, %s, %s, %s, %s)", (p.policy, p.version, p.uri, p.checksum, p.created))
        self._count.seen(n)
        return p

    def history(self, policy: str, limit: int = 20) -> list[Published]:
        with self.db.connection() as conn:
            rows = conn.execute(f"SELECT {_COLUMNS} FROM published WHERE seq IN (SELECT MAX(seq) FROM published "
                                "WHERE policy = %s GROUP BY version) ORDER BY seq DESC LIMIT %s", (policy, limit)).fetchall()
        return [Published(a, int(b), c, d, float(e)) for a, b, c, d, e in rows]

    def current(self, policy: str) -> Published | None:
        n = self._count.get()
        hit = self._cache.get(policy)
        if hit is None or hit[0] != n:
            h = self.history(policy, 1)
            hit = self._cache[policy] = (n, h[0] if h else None)
        return hit[1]

    def put_setting(self, name: str, value: dict) -> None:
        """Publish setting ``name`` (replacing the previous value); NOTIFYs every replica at the commit."""
        text = _setting_json(name, value)
        with self.db.connection() as conn:
            n = self._settings.bump(conn)
            conn.execute("INSERT INTO settings (name, value, created) VALUES (%s, %s, %s) ON CONFLICT (name) "
                         "DO UPDATE SET value = EXCLUDED.value, created = EXCLUDED.created", (name, text, time.time()))
        self._settings.seen(n)

    def setting(self, name: str) -> dict | None:
        n = self._settings.get()
        hit = self._setting_cache.get(name)
        if hit is None or hit[0] != n:
            with self.db.connection() as conn:
                row = conn.execute("SELECT value FROM settings WHERE name = %s", (name,)).fetchone()
            hit = self._setting_cache[name] = (n, None if row is None else row[0])
        return None if hit[1] is None else json.loads(hit[1])

    def on_change(self, fn: Callable[[], None]) -> None:
        """Call ``fn()`` at each publication's or setting's NOTIFY (and each re-sync): a watcher
        wakes at once."""
        for ch in ("cmr_checkpoints", "cmr_settings"):
            self._unsubs.append(self.db.subscribe(ch, lambda _payload: fn(), fn))

    def close(self) -> None:
        for u in self._unsubs:
            u()
        self._count.close()
        self._settings.close()
        self.db.release()
