"""Decisions and feedback in SQLite (WAL): the durable log between the router and the learner.

The router records every decision (request id, query, query embedding, chosen model); a reward
posted later for that request id becomes a ``FeedbackEvent`` appended with an increasing offset.
The learner reads events after its saved offset, so no event is lost or learnt twice across
restarts. Plain sqlite3: usable without Ray (tests, tools).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np

from cmr.errors import CMRError
from cmr.types import Decision, FeedbackEvent

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
"""


class UnknownRequestError(CMRError):
    """Feedback for a request id that was never decided here."""


class DuplicateFeedbackError(CMRError):
    """A second reward for the same request id."""


class DecisionStore:
    """Append-only decisions and feedback; one connection shared by threads under a lock."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, timeout=30, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def record(self, decisions: list[Decision], queries: list[str], emb: np.ndarray, costs: list[float]) -> None:
        """Record a batch of decisions in one transaction (their ``request_id`` must be set)."""
        now = time.time()
        rows = [
            (d.request_id, now, q, np.ascontiguousarray(e, dtype=np.float32).tobytes(), d.model, float(c), json.dumps(d.to_dict()))
            for d, q, e, c in zip(decisions, queries, emb, costs)
        ]
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT INTO decisions VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
            self._db.execute("COMMIT")

    def decision(self, request_id: str) -> Decision | None:
        with self._lock:
            row = self._db.execute("SELECT decision FROM decisions WHERE request_id=?", (request_id,)).fetchone()
        return None if row is None else Decision.from_dict(json.loads(row[0]))

    def add_feedback(self, request_id: str, reward: float) -> int:
        """Append the reward for a past decision; returns the event's offset."""
        FeedbackEvent(request_id=request_id, model="-", reward=reward)  # validates the reward (names the field)
        with self._lock:
            if self._db.execute("SELECT 1 FROM decisions WHERE request_id=?", (request_id,)).fetchone() is None:
                raise UnknownRequestError(f"field 'request_id': no decision with id {request_id!r}")
            try:
                cur = self._db.execute("INSERT INTO feedback (request_id, reward, created) VALUES (?, ?, ?)", (request_id, float(reward), time.time()))
            except sqlite3.IntegrityError:
                raise DuplicateFeedbackError(f"field 'request_id': feedback for {request_id!r} was already recorded") from None
            return int(cur.lastrowid)

    def events(self, after: int = 0, limit: int = 10_000) -> list[FeedbackEvent]:
        """Feedback events with offset > ``after``, oldest first, joined with their decisions."""
        q = (
            "SELECT f.offset, f.request_id, f.reward, f.created, d.query, d.embedding, d.model, d.cost "
            "FROM feedback f JOIN decisions d ON d.request_id = f.request_id WHERE f.offset > ? ORDER BY f.offset LIMIT ?"
        )
        with self._lock:
            rows = self._db.execute(q, (after, limit)).fetchall()
        return [
            FeedbackEvent(
                request_id=rid, model=model, reward=reward, query=query, cost=cost, timestamp=created, offset=int(off),
                embedding=None if emb is None else np.frombuffer(emb, dtype=np.float32).tolist(),
            )
            for off, rid, reward, created, query, emb, model, cost in rows
        ]

    def last_offset(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT MAX(offset) FROM feedback").fetchone()
        return int(row[0] or 0)

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
