"""Decisions and feedback: the durable log between the router and the learner.

``DecisionStore`` (SQLite WAL files, the embedded default) and ``PgDecisionStore`` (PostgreSQL,
shared by replicas on several nodes) both satisfy ``DecisionStoreProtocol``;
``open_decision_store`` picks one by the DSN, ``open_hub`` / ``open_decisions`` by ``AppArgs``.

The router records every decision (request id, query, query embedding, chosen model); a reward
posted later for that request id becomes a ``FeedbackEvent`` appended with an increasing offset.
The learner reads events after its saved offset, so no event is lost or learnt twice across
restarts. Plain sqlite3: usable without Ray (tests, tools).

Durability (SQLite): the feedback insert commits with ``synchronous=FULL`` (the WAL is fsynced before the
call returns, so a 2xx means the event survives a power loss); decisions use ``NORMAL`` (safe
against a process crash; a decision lost to a power cut only means its feedback is refused).
Each decision records the API key and tenant that asked for it (in the same insert); feedback is
accepted from the same tenant only, and for ``ttl_s`` seconds (then 410). Decisions that never
got feedback are purged past their time and when older than the newest ``max_decisions`` (retention by
size: the bytes a decision takes are measured by ``bench/store_retention.py``); decisions with
feedback stay, since the learner's events are joined with them. With PostgreSQL every commit is durable (``synchronous_commit``, the
server's default), and feedback offsets are assigned under a lock so that they become visible in
order: the learner reads "offset > cursor" and must never pass an offset committed later.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from cmr.errors import CMRError
from cmr.hub import HubStoreProtocol, open_hub_store
from cmr.state import PgDatabase, is_postgres, private_file
from cmr.types import Decision, FeedbackEvent

if TYPE_CHECKING:
    from cmr.published import PublishedStoreProtocol
    from services.config import AppArgs

_SCHEMA = """
CREATE TABLE IF NOT EXISTS decisions (
  request_id TEXT PRIMARY KEY,
  created REAL NOT NULL,
  query TEXT NOT NULL,
  embedding BLOB,
  model TEXT NOT NULL,
  cost REAL NOT NULL,
  decision TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS feedback (
  offset INTEGER PRIMARY KEY AUTOINCREMENT,
  request_id TEXT NOT NULL UNIQUE,
  reward REAL NOT NULL,
  created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS cursors (name TEXT PRIMARY KEY, offset INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS superseded (request_id TEXT PRIMARY KEY, by TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS decisions_created ON decisions (created);
"""

#: columns added after the first release: added to an existing file on open
_ADDED = {"key_id": "TEXT", "tenant": "TEXT"}


class UnknownRequestError(CMRError):
    """Feedback for a request id that was never decided here."""


class DuplicateFeedbackError(CMRError):
    """A second reward for the same request id."""


class SupersededRequestError(CMRError):
    """Feedback for a decision whose model failed; another decision answered the request."""


class ExpiredRequestError(CMRError):
    """Feedback for a decision older than the store's ``ttl_s``."""


class ForbiddenFeedbackError(CMRError):
    """Feedback from a tenant other than the one whose key made the request."""


def _duplicate(request_id: str) -> DuplicateFeedbackError:
    return DuplicateFeedbackError(f"field 'request_id': feedback for {request_id!r} was already recorded")


def _refuse_feedback(request_id: str, row, superseded_by: str | None, duplicate: bool, tenant: str | None, check_owner: bool,
                     ttl_s: float | None, now: float) -> None:
    """Raise the error a reward for ``request_id`` gets, if any (``row``: its decision's
    ``(created, tenant)`` or None): the one refusal order of both backends."""
    if row is None:
        hint = f" (unknown, or expired and purged: ids accept feedback for {ttl_s:g} s)" if ttl_s is not None else ""
        raise UnknownRequestError(f"field 'request_id': no decision with id {request_id!r}{hint}")
    if check_owner and row[1] != tenant:
        raise ForbiddenFeedbackError(f"field 'request_id': {request_id!r} was not made with a key of this tenant")
    if superseded_by is not None:  # its model failed and another answered: a reward here would credit the wrong model
        raise SupersededRequestError(f"field 'request_id': the model of {request_id!r} failed and the request was answered "
                                     f"under id {superseded_by!r}: send the feedback for that id")
    if duplicate:
        raise _duplicate(request_id)
    if ttl_s is not None and now - row[0] > ttl_s:
        raise ExpiredRequestError(f"field 'request_id': {request_id!r} expired (feedback is accepted for {ttl_s:g} s after the request)")


class DecisionStoreProtocol(Protocol):
    """The decision and feedback log as the router, the ingress and the learner use it."""

    ttl_s: float | None

    def configure(self, ttl_s: float | None = None, purge_every_s: float | None = None, max_decisions: int | None = None) -> None: ...
    def record(self, decisions: list[Decision], queries: list[str], emb: np.ndarray, costs: list[float],
               owners: list[tuple[str | None, str | None]] | None = None) -> None: ...
    def set_owners(self, owners: list[tuple[str, str | None, str | None]]) -> None: ...
    def owner(self, request_id: str) -> tuple[str | None, str | None] | None: ...
    def purge_expired(self, now: float | None = None) -> int: ...
    def decision(self, request_id: str) -> Decision | None: ...
    def add_feedback(self, request_id: str, reward: float, tenant: str | None = None, check_owner: bool = False) -> int: ...
    def supersede(self, request_id: str, by: str) -> None: ...
    def events(self, after: int = 0, limit: int = 10_000) -> list[FeedbackEvent]: ...
    def last_offset(self) -> int: ...
    def recent(self, after: float = 0.0, limit: int = 100, tenant: str | None = None, model: str | None = None) -> list[dict]: ...
    def recent_embeddings(self, limit: int, tenant: str | None = None) -> np.ndarray: ...
    def cursor(self, name: str) -> int: ...
    def set_cursor(self, name: str, offset: int) -> None: ...
    def close(self) -> None: ...


def open_decision_store(dsn: str | None, path: Path | str, ttl_s: float | None = None) -> DecisionStoreProtocol:
    """PostgreSQL when ``dsn`` is a postgresql:// DSN, else the SQLite file ``path``."""
    return PgDecisionStore(dsn, ttl_s=ttl_s) if is_postgres(dsn) else DecisionStore(path, ttl_s=ttl_s)


def open_decisions(args: "AppArgs") -> DecisionStoreProtocol:
    """The decision and feedback store of a served app (``AppArgs.store``)."""
    return open_decision_store(args.store_dsn(), args.state_dir() / "decisions.sqlite")


def open_hub(args: "AppArgs") -> HubStoreProtocol:
    """The hub store of a served app (``AppArgs.store``)."""
    return open_hub_store(args.store_dsn(), args.state_dir() / "hub.sqlite")


def open_published(args: "AppArgs") -> "PublishedStoreProtocol":
    """Which checkpoint versions are published (served) in a served app (``AppArgs.store``)."""
    from cmr.published import open_published_store

    return open_published_store(args.store_dsn(), args.state_dir() / "published.sqlite")


def _rows_to_events(rows) -> list[FeedbackEvent]:
    # the task travels in the decision's JSON (no column of its own: nothing to migrate)
    return [
        FeedbackEvent(
            request_id=rid, model=model, reward=reward, query=query, cost=cost, timestamp=created, offset=int(off),
            embedding=None if emb is None else np.frombuffer(emb, dtype=np.float32).tolist(),
            task=json.loads(dec).get("task") if dec else None,
        )
        for off, rid, reward, created, query, emb, model, cost, dec in rows
    ]


def _decision_rows(decisions, queries, emb, costs, owners, now):
    owners = owners or [(None, None)] * len(decisions)
    return [
        (d.request_id, now, q, np.ascontiguousarray(e, dtype=np.float32).tobytes(), d.model, float(c), json.dumps(d.to_dict()), k, t)
        for d, q, e, c, (k, t) in zip(decisions, queries, emb, costs, owners)
    ]


#: the console's view of a decision (``recent``): the decision joined with its reward and fallback
_RECENT = ("SELECT d.request_id, d.created, d.model, d.cost, d.decision, d.key_id, d.tenant, d.query, f.reward, s.{by} "
           "FROM decisions d LEFT JOIN feedback f ON f.request_id = d.request_id LEFT JOIN superseded s ON s.request_id = d.request_id "
           "WHERE d.created > {p}{where} ORDER BY d.created DESC LIMIT {p}")


def _recent_sql(p: str, by: str, tenant: str | None, model: str | None) -> str:
    where = (f" AND d.tenant = {p}" if tenant is not None else "") + (f" AND d.model = {p}" if model is not None else "")
    return _RECENT.format(p=p, by=by, where=where)


def _recent_rows(rows) -> list[dict]:
    out = []
    for rid, created, model, cost, dec, key_id, tenant, query, reward, by in rows:
        d = json.loads(dec)
        out.append({"request_id": rid, "created": created, "model": model, "cost": cost, "score": d.get("score"),
                    "cost_weight": d.get("cost_weight"), "latency_s": d.get("latency_s"), "checkpoint_version": d.get("checkpoint_version"),
                    "alternatives": [a[0] for a in d.get("alternatives", [])], "key_id": key_id, "tenant": tenant, "query": query,
                    "reward": reward, "superseded_by": by})
    return out


def _embeddings(rows) -> np.ndarray:
    return np.stack([np.frombuffer(r[0], dtype=np.float32) for r in rows]) if rows else np.zeros((0, 0), np.float32)


class _FeedbackWindow:
    """How long request ids accept feedback, how many decisions without feedback are kept, and how
    often the rest are purged (both backends)."""

    ttl_s: float | None = None
    purge_every_s: float = 60.0
    max_decisions: int | None = None

    def configure(self, ttl_s: float | None = None, purge_every_s: float | None = None, max_decisions: int | None = None) -> None:
        """Set how long request ids accept feedback (None: forever), how often to purge, and how
        many decisions are kept (None: no cap): older ones go unless they have feedback."""
        self.ttl_s = ttl_s
        self.max_decisions = max_decisions
        if purge_every_s is not None:
            self.purge_every_s = purge_every_s

    def _purge_due(self, now: float) -> bool:
        return (self.ttl_s is not None or self.max_decisions is not None) and now - self._last_purge >= self.purge_every_s

    def purge_expired(self, now: float | None = None) -> int:
        """Delete decisions without feedback that are older than ``ttl_s`` or than the newest
        ``max_decisions`` decisions; returns how many. Decisions with feedback stay: the learner's
        events join with them."""
        now = time.time() if now is None else now
        self._last_purge = now
        n = 0 if self.ttl_s is None else self._delete_expired(now - self.ttl_s)
        return n + (0 if self.max_decisions is None else self._delete_beyond(self.max_decisions))


class DecisionStore(_FeedbackWindow):
    """Append-only decisions and feedback in SQLite; one connection shared by threads under a lock."""

    def __init__(self, path: Path | str, ttl_s: float | None = None, purge_every_s: float = 60.0):
        self.path = Path(path)
        private_file(self.path)  # 0600 before SQLite creates it (and its -wal/-shm)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, timeout=30, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        have = {r[1] for r in self._db.execute("PRAGMA table_info(decisions)")}
        for col, kind in _ADDED.items():
            if col not in have:
                try:
                    self._db.execute(f"ALTER TABLE decisions ADD COLUMN {col} {kind}")
                except sqlite3.OperationalError:  # another process added it first
                    pass
        self.ttl_s = ttl_s
        self.purge_every_s = purge_every_s
        self._last_purge = 0.0

    def record(self, decisions: list[Decision], queries: list[str], emb: np.ndarray, costs: list[float],
               owners: list[tuple[str | None, str | None]] | None = None) -> None:
        """Record a batch of decisions in one transaction (their ``request_id`` must be set), with
        the ``(key_id, tenant)`` that asked for each when given (see ``set_owners``)."""
        now = time.time()
        rows = _decision_rows(decisions, queries, emb, costs, owners, now)
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT INTO decisions (request_id, created, query, embedding, model, cost, decision, key_id, tenant) "
                                 "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            self._db.execute("COMMIT")
        if self._purge_due(now):
            self.purge_expired(now)

    def set_owners(self, owners: list[tuple[str, str | None, str | None]]) -> None:
        """Record ``(request_id, key_id, tenant)`` of decisions already recorded without them, in one
        transaction (before their ids reach the client, so no feedback can arrive in between)."""
        rows = [(k, t, rid) for rid, k, t in owners if k is not None or t is not None]
        if not rows:
            return
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany("UPDATE decisions SET key_id=?, tenant=? WHERE request_id=?", rows)
            self._db.execute("COMMIT")

    def owner(self, request_id: str) -> tuple[str | None, str | None] | None:
        """``(key_id, tenant)`` of a decision, or None if there is no such decision."""
        with self._lock:
            row = self._db.execute("SELECT key_id, tenant FROM decisions WHERE request_id=?", (request_id,)).fetchone()
        return None if row is None else (row[0], row[1])

    def _delete_expired(self, cutoff: float) -> int:
        with self._lock:
            cur = self._db.execute("DELETE FROM decisions WHERE created < ? AND request_id NOT IN (SELECT request_id FROM feedback)", (cutoff,))
        return int(cur.rowcount)

    def _delete_beyond(self, keep: int) -> int:
        # the cutoff from the `created` index alone (no table rows read); freed pages are reused
        # by later inserts: the file stops growing, it does not shrink
        with self._lock:
            row = self._db.execute("SELECT created FROM decisions ORDER BY created DESC LIMIT 1 OFFSET ?", (keep - 1,)).fetchone()
            if row is None:
                return 0
            cur = self._db.execute("DELETE FROM decisions WHERE created < ? AND request_id NOT IN (SELECT request_id FROM feedback)", (row[0],))
        return int(cur.rowcount)

    def decision(self, request_id: str) -> Decision | None:
        with self._lock:
            row = self._db.execute("SELECT decision FROM decisions WHERE request_id=?", (request_id,)).fetchone()
        return None if row is None else Decision.from_dict(json.loads(row[0]))

    def add_feedback(self, request_id: str, reward: float, tenant: str | None = None, check_owner: bool = False) -> int:
        """Append the reward for a past decision; returns the event's offset once it is on disk.

        ``check_owner``: only the decision's tenant may post it (``ForbiddenFeedbackError``; a
        decision made without a key has no tenant and accepts no keyed feedback). Raises
        ``UnknownRequestError``, ``ExpiredRequestError`` (older than ``ttl_s``),
        ``DuplicateFeedbackError`` or ``ValueError`` (reward not a finite number in [0, 1]).
        """
        FeedbackEvent(request_id=request_id, model="-", reward=reward)  # validates the reward (names the field)
        now = time.time()
        with self._lock:
            row = self._db.execute("SELECT created, tenant FROM decisions WHERE request_id=?", (request_id,)).fetchone()
            sup = self._db.execute("SELECT by FROM superseded WHERE request_id=?", (request_id,)).fetchone()
            dup = self._db.execute("SELECT 1 FROM feedback WHERE request_id=?", (request_id,)).fetchone() is not None
            _refuse_feedback(request_id, row, sup and sup[0], dup, tenant, check_owner, self.ttl_s, now)
            # the one commit a 2xx promises: fsync the WAL before returning
            self._db.execute("PRAGMA synchronous=FULL")
            try:
                cur = self._db.execute("INSERT INTO feedback (request_id, reward, created) VALUES (?, ?, ?)", (request_id, float(reward), now))
            except sqlite3.IntegrityError:  # posted by another process between the check and the insert
                raise _duplicate(request_id) from None
            finally:
                self._db.execute("PRAGMA synchronous=NORMAL")
            return int(cur.lastrowid)

    def supersede(self, request_id: str, by: str) -> None:
        """Mark a decision whose model failed to answer as replaced by decision ``by`` (a fallback):
        feedback for it is then refused with a pointer to ``by``."""
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO superseded (request_id, by) VALUES (?, ?)", (request_id, by))

    def events(self, after: int = 0, limit: int = 10_000) -> list[FeedbackEvent]:
        """Feedback events with offset > ``after``, oldest first, joined with their decisions."""
        q = (
            "SELECT f.offset, f.request_id, f.reward, f.created, d.query, d.embedding, d.model, d.cost, d.decision "
            "FROM feedback f JOIN decisions d ON d.request_id = f.request_id WHERE f.offset > ? ORDER BY f.offset LIMIT ?"
        )
        with self._lock:
            rows = self._db.execute(q, (after, limit)).fetchall()
        return _rows_to_events(rows)

    def last_offset(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT MAX(offset) FROM feedback").fetchone()
        return int(row[0] or 0)

    def recent(self, after: float = 0.0, limit: int = 100, tenant: str | None = None, model: str | None = None) -> list[dict]:
        """The newest ``limit`` decisions made after time ``after`` (newest first), of ``tenant`` /
        ``model`` when given, each with its reward and the decision that superseded it (if any)."""
        params = (after, *(x for x in (tenant, model) if x is not None), limit)
        with self._lock:
            rows = self._db.execute(_recent_sql("?", "by", tenant, model), params).fetchall()
        return _recent_rows(rows)

    def recent_embeddings(self, limit: int, tenant: str | None = None) -> np.ndarray:
        """Query embeddings of the newest ``limit`` decisions (of ``tenant`` when given): ``[n, dim]``."""
        q = "SELECT embedding FROM decisions WHERE embedding IS NOT NULL" + (" AND tenant = ?" if tenant is not None else "")
        with self._lock:
            rows = self._db.execute(q + " ORDER BY created DESC LIMIT ?", (*((tenant,) if tenant is not None else ()), limit)).fetchall()
        return _embeddings(rows)

    def cursor(self, name: str) -> int:
        with self._lock:
            row = self._db.execute("SELECT offset FROM cursors WHERE name=?", (name,)).fetchone()
        return int(row[0]) if row else 0

    def set_cursor(self, name: str, offset: int) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO cursors (name, offset) VALUES (?, ?)", (name, int(offset)))

    def close(self) -> None:
        with self._lock:
            self._db.close()


_PG_SCHEMA = (
    """
    CREATE TABLE decisions (request_id TEXT PRIMARY KEY, created DOUBLE PRECISION NOT NULL, query TEXT NOT NULL, embedding BYTEA,
                            model TEXT NOT NULL, cost DOUBLE PRECISION NOT NULL, decision TEXT NOT NULL, key_id TEXT, tenant TEXT);
    CREATE INDEX decisions_created ON decisions (created);
    CREATE TABLE feedback ("offset" BIGINT PRIMARY KEY, request_id TEXT NOT NULL UNIQUE, reward DOUBLE PRECISION NOT NULL,
                           created DOUBLE PRECISION NOT NULL);
    CREATE TABLE cursors (name TEXT PRIMARY KEY, "offset" BIGINT NOT NULL);
    CREATE TABLE superseded (request_id TEXT PRIMARY KEY, "by" TEXT NOT NULL);
    """,
)
#: pg_advisory_xact_lock key: feedback inserts take offsets one at a time, in commit order
_FEEDBACK_LOCK = 0x636D7266  # "cmrf"


class PgDecisionStore(_FeedbackWindow):
    """Decisions and feedback in PostgreSQL, shared by every router, ingress and learner replica."""

    def __init__(self, db: PgDatabase | str, ttl_s: float | None = None, purge_every_s: float = 60.0):
        self.db = PgDatabase.shared(db) if isinstance(db, str) else db
        self.db.migrate("decisions", _PG_SCHEMA)
        self.ttl_s = ttl_s
        self.purge_every_s = purge_every_s
        self._last_purge = 0.0

    def record(self, decisions: list[Decision], queries: list[str], emb: np.ndarray, costs: list[float],
               owners: list[tuple[str | None, str | None]] | None = None) -> None:
        """Record a batch of decisions in one transaction (see ``DecisionStore.record``)."""
        now = time.time()
        rows = _decision_rows(decisions, queries, emb, costs, owners, now)
        with self.db.connection() as conn, conn.cursor() as cur:
            cur.executemany("INSERT INTO decisions (request_id, created, query, embedding, model, cost, decision, key_id, tenant) "
                            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)", rows)
        if self._purge_due(now):
            self.purge_expired(now)

    def set_owners(self, owners: list[tuple[str, str | None, str | None]]) -> None:
        """Record ``(request_id, key_id, tenant)`` of decisions recorded without them, in one transaction."""
        rows = [(k, t, rid) for rid, k, t in owners if k is not None or t is not None]
        if rows:
            with self.db.connection() as conn, conn.cursor() as cur:
                cur.executemany("UPDATE decisions SET key_id = %s, tenant = %s WHERE request_id = %s", rows)

    def _one(self, q: str, params: tuple):
        with self.db.connection() as conn:
            return conn.execute(q, params).fetchone()

    def owner(self, request_id: str) -> tuple[str | None, str | None] | None:
        row = self._one("SELECT key_id, tenant FROM decisions WHERE request_id = %s", (request_id,))
        return None if row is None else (row[0], row[1])

    def _delete_expired(self, cutoff: float) -> int:
        with self.db.connection() as conn:
            cur = conn.execute("DELETE FROM decisions d WHERE created < %s AND NOT EXISTS "
                               "(SELECT 1 FROM feedback f WHERE f.request_id = d.request_id)", (cutoff,))
            return int(cur.rowcount)

    def _delete_beyond(self, keep: int) -> int:
        with self.db.connection() as conn:
            row = conn.execute("SELECT created FROM decisions ORDER BY created DESC LIMIT 1 OFFSET %s", (keep - 1,)).fetchone()
            if row is None:
                return 0
            cur = conn.execute("DELETE FROM decisions d WHERE created < %s AND NOT EXISTS "
                               "(SELECT 1 FROM feedback f WHERE f.request_id = d.request_id)", (row[0],))
            return int(cur.rowcount)

    def decision(self, request_id: str) -> Decision | None:
        row = self._one("SELECT decision FROM decisions WHERE request_id = %s", (request_id,))
        return None if row is None else Decision.from_dict(json.loads(row[0]))

    def add_feedback(self, request_id: str, reward: float, tenant: str | None = None, check_owner: bool = False) -> int:
        """Append the reward for a past decision; returns the event's offset once it is committed
        (the same contract and errors as ``DecisionStore.add_feedback``)."""
        FeedbackEvent(request_id=request_id, model="-", reward=reward)  # validates the reward (names the field)
        now = time.time()
        with self.db.connection() as conn:
            row = conn.execute("SELECT created, tenant FROM decisions WHERE request_id = %s", (request_id,)).fetchone()
            sup = conn.execute('SELECT "by" FROM superseded WHERE request_id = %s', (request_id,)).fetchone()
            dup = conn.execute("SELECT 1 FROM feedback WHERE request_id = %s", (request_id,)).fetchone() is not None
            _refuse_feedback(request_id, row, sup and sup[0], dup, tenant, check_owner, self.ttl_s, now)
            # held to the commit: the next insert sees this one's offset, so offsets commit in order
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_FEEDBACK_LOCK,))
            got = conn.execute('INSERT INTO feedback ("offset", request_id, reward, created) '
                               'SELECT COALESCE(MAX("offset"), 0) + 1, %s, %s, %s FROM feedback '
                               'ON CONFLICT (request_id) DO NOTHING RETURNING "offset"', (request_id, float(reward), now)).fetchone()
            if got is None:  # posted by another replica between the check and the insert
                raise _duplicate(request_id)
        return int(got[0])  # after the block: committed

    def supersede(self, request_id: str, by: str) -> None:
        """Mark a decision whose model failed to answer as replaced by decision ``by``."""
        with self.db.connection() as conn:
            conn.execute('INSERT INTO superseded (request_id, "by") VALUES (%s, %s) ON CONFLICT (request_id) DO UPDATE SET "by" = EXCLUDED."by"',
                         (request_id, by))

    def events(self, after: int = 0, limit: int = 10_000) -> list[FeedbackEvent]:
        """Feedback events with offset > ``after``, oldest first, joined with their decisions."""
        with self.db.connection() as conn:
            rows = conn.execute('SELECT f."offset", f.request_id, f.reward, f.created, d.query, d.embedding, d.model, d.cost, d.decision '
                                'FROM feedback f JOIN decisions d ON d.request_id = f.request_id WHERE f."offset" > %s '
                                'ORDER BY f."offset" LIMIT %s', (after, limit)).fetchall()
        return _rows_to_events(rows)

    def last_offset(self) -> int:
        return int(self._one('SELECT COALESCE(MAX("offset"), 0) FROM feedback', ())[0])

    def recent(self, after: float = 0.0, limit: int = 100, tenant: str | None = None, model: str | None = None) -> list[dict]:
        """The newest decisions after ``after`` (see ``DecisionStore.recent``)."""
        params = (after, *(x for x in (tenant, model) if x is not None), limit)
        with self.db.connection() as conn:
            rows = conn.execute(_recent_sql("%s", '"by"', tenant, model), params).fetchall()
        return _recent_rows(rows)

    def recent_embeddings(self, limit: int, tenant: str | None = None) -> np.ndarray:
        """Query embeddings of the newest ``limit`` decisions (see ``DecisionStore.recent_embeddings``)."""
        q = "SELECT embedding FROM decisions WHERE embedding IS NOT NULL" + (" AND tenant = %s" if tenant is not None else "")
        with self.db.connection() as conn:
            rows = conn.execute(q + " ORDER BY created DESC LIMIT %s", (*((tenant,) if tenant is not None else ()), limit)).fetchall()
        return _embeddings(rows)

    def cursor(self, name: str) -> int:
        row = self._one('SELECT "offset" FROM cursors WHERE name = %s', (name,))
        return int(row[0]) if row else 0

    def set_cursor(self, name: str, offset: int) -> None:
        with self.db.connection() as conn:
            conn.execute('INSERT INTO cursors (name, "offset") VALUES (%s, %s) ON CONFLICT (name) DO UPDATE SET "offset" = EXCLUDED."offset"',
                         (name, int(offset)))

    def close(self) -> None:
        self.db.release()
