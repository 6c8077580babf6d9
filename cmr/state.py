"""Where durable state lives: SQLite files in the state folder (the embedded default), or one
PostgreSQL database shared by every replica on every node (``cmr serve --store postgresql://…``).

Each store (the hub, decisions and feedback, API keys) has a Protocol, a SQLite class and a
PostgreSQL class, and an ``open_*`` factory that picks one by the DSN (``is_postgres``). This
module holds what the PostgreSQL classes share: one connection pool per process and DSN, forward
schema migrations under an advisory lock, and the LISTEN/NOTIFY thread that keeps each replica's
view of changing state (hub version, key table, publications) fresh, with a periodic re-sync as a safety net.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import defaultdict
from pathlib import Path
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence
from urllib.parse import urlsplit, urlunsplit

from cmr.errors import CMRError

log = logging.getLogger("cmr.state")

SCHEMES = ("postgresql", "postgres")
#: the shared versions replicas watch; each is NOTIFYed on channel ``cmr_<name>`` by its writers
WATCHED = ("hub", "keys", "checkpoints", "settings")
CHANNELS = tuple(f"cmr_{n}" for n in WATCHED)
#: pg_advisory_xact_lock key serialising schema migrations of replicas that start together
_MIGRATE_LOCK = 0x636D72  # "cmr"


class StoreError(CMRError):
    """The state store cannot be used (bad DSN, a schema newer than this code)."""


def check_store(value: str | None) -> str | None:
    """The one validator of a store DSN: None, ``""`` or ``"sqlite"`` select the embedded SQLite
    files (returns None); ``postgresql://…`` (or ``postgres://…``) is returned as is."""
    if value is None or value in ("", "sqlite"):
        return None
    if not isinstance(value, str) or urlsplit(value).scheme not in SCHEMES:
        raise ValueError(f"expected 'sqlite' or a postgresql://… DSN, got {redact(str(value))!r}")
    return value


# -- files on this node: the one place that makes state private -------------------------------
def private_dir(path: Path | str, own: bool = True) -> Path:
    """``path`` as a folder only this user can enter (0700), whatever the umask: each folder
    created here is made 0700; an existing ``path`` is set to 0700 only when ``own`` (cmr's own
    state folder, not a folder the user named, e.g. the parent of a ``--db`` file) and this user
    owns it (a volume mounted with another owner is left as the operator set it)."""
    path = Path(path)
    missing = [p for p in (path, *path.parents) if not p.exists()]
    path.mkdir(parents=True, exist_ok=True)
    for p in (path, *missing) if own else missing:
        _chmod_own(p, 0o700)
    return path


def _chmod_own(path: Path, mode: int) -> None:
    if os.stat(path).st_uid == os.getuid():
        os.chmod(path, mode)


def private_file(path: Path | str) -> Path:
    """``path`` created if absent, mode 0600 (also when it existed: an older install's 0644).
    Call before SQLite opens a database: its -wal/-shm files take the main file's mode."""
    path = Path(path)
    private_dir(path.parent, own=False)
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    _chmod_own(path, 0o600)
    return path


def is_postgres(dsn: str | None) -> bool:
    return check_store(dsn) is not None


def redact(dsn: str) -> str:
    """The DSN without its password, for messages and logs."""
    try:
        u = urlsplit(dsn)
    except ValueError:
        return "<unparsable DSN>"
    if u.password is None:
        return dsn
    netloc = f"{u.username}:***@{u.hostname or ''}" + (f":{u.port}" if u.port else "")
    return urlunsplit(u._replace(netloc=netloc))


class PgDatabase:
    """A psycopg 3 connection pool plus one LISTEN connection (thread) for change notifications.

    ``PgDatabase.shared(dsn)`` gives the process's one instance per DSN (reference counted:
    ``release`` closes it with the last user); a directly constructed one (two "replicas" in one
    test) belongs to the store it is given to. Each ``connection()`` block is one transaction.
    """

    _shared: dict[str, "PgDatabase"] = {}
    _shared_lock = threading.Lock()

    def __init__(self, dsn: str, max_size: int = 4, resync_s: float = 5.0):
        import psycopg_pool  # deferred: only PostgreSQL deployments need the driver

        self.dsn = check_store(dsn)
        if self.dsn is None:
            raise StoreError(f"not a PostgreSQL DSN: {dsn!r}")
        self.resync_s = resync_s
        self.pool = psycopg_pool.ConnectionPool(self.dsn, min_size=1, max_size=max_size, open=False, name="cmr")
        try:
            self.pool.open(wait=True, timeout=30)
        except psycopg_pool.PoolTimeout:
            self.pool.close()
            raise StoreError(f"cannot connect to the state store {redact(self.dsn)}") from None
        self._refs = 1
        self._subs: dict[str, list[tuple[Callable[[str], None], Callable[[], None]]]] = defaultdict(list)
        self._subs_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._listening = threading.Event()

    @classmethod
    def shared(cls, dsn: str) -> "PgDatabase":
        with cls._shared_lock:
            db = cls._shared.get(dsn)
            if db is None:
                db = cls._shared[dsn] = cls(dsn)
            else:
                db._refs += 1
            return db

    def release(self) -> None:
        """Drop one reference; the last one stops the listener and closes the pool."""
        with self._shared_lock:
            self._refs -= 1
            if self._refs > 0:
                return
            if self._shared.get(self.dsn) is self:
                del self._shared[self.dsn]
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.pool.close()

    @contextmanager
    def connection(self) -> Iterator:
        """A pooled connection in a transaction: committed when the block ends, rolled back on error."""
        with self.pool.connection() as conn:
            yield conn

    def migrate(self, component: str, steps: Sequence[str]) -> int:
        """Apply the schema steps of ``component`` not applied yet (``schema_version`` records how
        many were), in one transaction under an advisory lock: replicas starting together apply
        each step once. Returns the schema version."""
        with self.connection() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATE_LOCK,))
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (component TEXT PRIMARY KEY, version INTEGER NOT NULL)")
            row = conn.execute("SELECT version FROM schema_version WHERE component = %s", (component,)).fetchone()
            have = int(row[0]) if row else 0
            if have > len(steps):
                raise StoreError(f"the {component} schema in {redact(self.dsn)} is version {have}, newer than this cmr knows "
                                 f"({len(steps)}): upgrade cmr")
            for step in steps[have:]:
                conn.execute(step)
            conn.execute("INSERT INTO schema_version (component, version) VALUES (%s, %s) "
                         "ON CONFLICT (component) DO UPDATE SET version = EXCLUDED.version", (component, len(steps)))
        return len(steps)

    # -- change notifications ------------------------------------------------------------------
    def subscribe(self, channel: str, on_notify: Callable[[str], None], resync: Callable[[], None]) -> Callable[[], None]:
        """Call ``on_notify(payload)`` for each NOTIFY on ``channel`` (one of ``CHANNELS``), and
        ``resync()`` every ``resync_s`` and after the listener (re)connects, when notifications
        may have been missed. Returns the unsubscribe function."""
        if channel not in CHANNELS:
            raise ValueError(f"unknown channel {channel!r}")
        entry = (on_notify, resync)
        with self._subs_lock:
            self._subs[channel].append(entry)
            if self._thread is None:
                self._thread = threading.Thread(target=self._listen, name="cmr-state-listener", daemon=True)
                self._thread.start()
        # a change committed before LISTEN took effect is caught by the re-sync that follows it
        self._listening.wait(timeout=10)

        def unsubscribe() -> None:
            with self._subs_lock:
                if entry in self._subs[channel]:
                    self._subs[channel].remove(entry)
        return unsubscribe

    def _resync_all(self) -> None:
        with self._subs_lock:
            fns = [r for subs in self._subs.values() for _, r in subs]
        for fn in fns:
            try:
                fn()
            except Exception:  # a failed re-sync is retried at the next one
                log.exception("state store re-sync failed")

    def _listen(self) -> None:
        import psycopg

        backoff = 0.1
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.dsn, autocommit=True) as conn:
                    for ch in CHANNELS:
                        conn.execute(f"LISTEN {ch}")
                    self._listening.set()
                    self._resync_all()
                    backoff, last = 0.1, time.monotonic()
                    while not self._stop.is_set():
                        for n in conn.notifies(timeout=0.25):
                            with self._subs_lock:
                                fns = [f for f, _ in self._subs.get(n.channel, ())]
                            for fn in fns:
                                fn(n.payload)
                        if time.monotonic() - last >= self.resync_s:
                            last = time.monotonic()
                            self._resync_all()
            except Exception:
                if self._stop.is_set():
                    return
                log.warning("state store listener lost its connection to %s; reconnecting", redact(self.dsn), exc_info=True)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)


class SharedVersion:
    """A version number in PostgreSQL (table ``versions``) that every replica keeps a local view
    of without querying: a writer bumps it with ``bump`` inside its own transaction (which also
    NOTIFYs ``cmr_<name>``), the listener thread raises each replica's view when the commit is
    delivered, and the periodic re-sync reads it in case a notification was missed."""

    def __init__(self, db: PgDatabase, name: str):
        if name not in WATCHED:
            raise ValueError(f"unknown shared version {name!r}")
        self.db, self.name = db, name
        db.migrate("versions", ("CREATE TABLE versions (name TEXT PRIMARY KEY, value BIGINT NOT NULL)",))
        with db.connection() as conn:
            conn.execute("INSERT INTO versions (name, value) VALUES (%s, 0) ON CONFLICT (name) DO NOTHING", (name,))
        self._lock = threading.Lock()
        self._value = 0
        self.resync()
        self._unsubscribe = db.subscribe(f"cmr_{name}", lambda payload: self.seen(int(payload)), self.resync)

    def get(self) -> int:
        return self._value

    def seen(self, v: int) -> None:
        with self._lock:
            self._value = max(self._value, v)  # versions only grow: a late message never lowers the view

    def resync(self) -> None:
        with self.db.connection() as conn:
            self.seen(int(conn.execute("SELECT value FROM versions WHERE name = %s", (self.name,)).fetchone()[0]))

    def bump(self, conn) -> int:
        """Increment the version in ``conn``'s transaction and notify at its commit; the row lock
        orders concurrent writers. Call ``seen`` with the result once committed."""
        v = int(conn.execute("UPDATE versions SET value = value + 1 WHERE name = %s RETURNING value", (self.name,)).fetchone()[0])
        conn.execute("SELECT pg_notify(%s, %s)", (f"cmr_{self.name}", str(v)))
        return v

    def close(self) -> None:
        self._unsubscribe()
