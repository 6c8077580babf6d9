"""The decision/feedback store's contract, on both backends (``store_dsn``: SQLite files, a
throwaway PostgreSQL): owners (tenant checks), expiry (410) and purge, bad rewards refused with
nothing stored, and a feedback event surviving a killed writer process; the schema upgrade of an
existing SQLite file."""

from __future__ import annotations

import multiprocessing as mp
import sqlite3
import time

import numpy as np
import pytest

from cmr.types import Decision
from services.store import (DecisionStore, DuplicateFeedbackError, ExpiredRequestError, ForbiddenFeedbackError,
                            UnknownRequestError, open_decision_store)


def _open(dsn, tmp_path, ttl_s=None, purge_every_s=None):
    st = open_decision_store(dsn, tmp_path / "d.sqlite")
    st.configure(ttl_s, purge_every_s)
    return st


def _record(st: DecisionStore, *rids: str) -> None:
    ds = [Decision(model="m1", score=0.5, utility=0.5, alternatives=[], checkpoint_version=1, request_id=r) for r in rids]
    st.record(ds, [f"query {r}" for r in rids], np.zeros((len(rids), 4), np.float32), [0.1] * len(rids))


def test_owner_checks_and_rejections_store_nothing(tmp_path, store_dsn):
    st = _open(store_dsn, tmp_path)
    _record(st, "r1", "r2", "r3")
    st.set_owners([("r1", "k1", "acme"), ("r2", "k2", "other")])
    assert st.owner("r1") == ("k1", "acme") and st.owner("r3") == (None, None) and st.owner("nope") is None
    with pytest.raises(ForbiddenFeedbackError, match="request_id"):
        st.add_feedback("r2", 1.0, tenant="acme", check_owner=True)
    with pytest.raises(ForbiddenFeedbackError):  # made without a key: no tenant may claim it
        st.add_feedback("r3", 1.0, tenant="acme", check_owner=True)
    for bad in (float("nan"), float("inf"), -0.1, 1.5, "0.5", True, None):
        with pytest.raises(ValueError, match="reward"):
            st.add_feedback("r1", bad, tenant="acme", check_owner=True)
    with pytest.raises(UnknownRequestError, match="request_id"):
        st.add_feedback("nope", 1.0, tenant="acme", check_owner=True)
    assert st.last_offset() == 0 and st.events() == []  # nothing stored by any refusal
    # the same tenant may post with another of its keys (e.g. a feedback-only key)
    assert st.add_feedback("r1", 0.75, tenant="acme", check_owner=True) == 1
    with pytest.raises(DuplicateFeedbackError, match="already recorded"):
        st.add_feedback("r1", 0.75, tenant="acme", check_owner=True)
    assert st.add_feedback("r3", 0.0) == 2  # open mode: no owner check
    assert [(e.request_id, e.reward) for e in st.events()] == [("r1", 0.75), ("r3", 0.0)]


def test_owners_recorded_with_their_decisions(tmp_path, store_dsn):
    # the router's path: who asked goes into the decision's own insert (one transaction per batch)
    st = _open(store_dsn, tmp_path)
    ds = [Decision(model="m1", score=0.5, utility=0.5, alternatives=[], checkpoint_version=1, request_id=r) for r in ("a", "b")]
    st.record(ds, ["qa", "qb"], np.zeros((2, 4), np.float32), [0.1, 0.2], [("k1", "acme"), (None, None)])
    assert st.owner("a") == ("k1", "acme") and st.owner("b") == (None, None)
    with pytest.raises(ForbiddenFeedbackError):
        st.add_feedback("a", 1.0, tenant="other", check_owner=True)
    assert st.add_feedback("a", 1.0, tenant="acme", check_owner=True) == 1


def test_expired_ids_are_refused_and_purged(tmp_path, store_dsn):
    st = _open(store_dsn, tmp_path, ttl_s=0.3, purge_every_s=3600)
    _record(st, "old-with-feedback", "old", "young")
    st.add_feedback("old-with-feedback", 1.0)
    time.sleep(0.4)
    _record(st, "new")
    with pytest.raises(ExpiredRequestError, match="expired"):
        st.add_feedback("old", 1.0)
    assert st.last_offset() == 1
    assert st.purge_expired() == 2  # "old" and "young": past the ttl, no feedback
    with pytest.raises(UnknownRequestError, match="expired and purged"):
        st.add_feedback("old", 1.0)
    # a decision with feedback stays: the learner's events join with it
    assert [e.request_id for e in st.events()] == ["old-with-feedback"] and st.decision("old-with-feedback") is not None
    assert st.add_feedback("new", 0.5) == 2


def test_record_purges_on_its_own(tmp_path, store_dsn):
    st = _open(store_dsn, tmp_path, ttl_s=0.2, purge_every_s=0.0)
    _record(st, "a")
    time.sleep(0.3)
    _record(st, "b")  # purges "a" on the way
    assert st.decision("a") is None and st.decision("b") is not None


def test_decisions_beyond_the_cap_are_purged_oldest_first(tmp_path, store_dsn):
    """Issue 14 (7): retention by size as well as age: the newest ``max_decisions`` decisions are
    kept, older ones only when they have feedback (the learner's events join with them)."""
    st = _open(store_dsn, tmp_path, purge_every_s=3600)
    st.configure(None, 3600, max_decisions=3)
    for r in "abcdef":
        _record(st, r)
        time.sleep(0.01)  # distinct creation times
    st.add_feedback("a", 1.0)
    assert st.purge_expired() == 2  # "b", "c"
    assert [r for r in "abcdef" if st.decision(r) is not None] == ["a", "d", "e", "f"]
    st.configure(None, 0.0, max_decisions=1)
    _record(st, "g")  # record purges on its own (no ttl needed)
    assert [r for r in "abcdefg" if st.decision(r) is not None] == ["a", "g"]
    assert [e.request_id for e in st.events()] == ["a"]


def test_a_capped_sqlite_file_stops_growing(tmp_path):
    """Bytes, not only rows: under the cap the file reuses the pages purged decisions freed."""
    st = DecisionStore(tmp_path / "d.sqlite")
    st.configure(None, 0.0, max_decisions=500)
    rng = np.random.default_rng(0)

    def fill(n):
        for i in range(0, n, 100):
            rids = [f"r{fill.k + j}" for j in range(100)]
            fill.k += 100
            ds = [Decision(model="m1", score=0.5, utility=0.5, alternatives=[], checkpoint_version=1, request_id=r) for r in rids]
            st.record(ds, ["q" * 300] * 100, rng.standard_normal((100, 384)).astype(np.float32), [0.1] * 100)
        st._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return (tmp_path / "d.sqlite").stat().st_size

    fill.k = 0
    first = fill(2000)
    assert fill(6000) <= first * 1.1
    assert st._db.execute("SELECT COUNT(*) FROM decisions").fetchone()[0] == 500


def test_old_file_gains_owner_columns(tmp_path):
    path = tmp_path / "d.sqlite"
    db = sqlite3.connect(path)  # the first release's schema, with one decision in it
    db.executescript("""
        CREATE TABLE decisions (request_id TEXT PRIMARY KEY, created REAL NOT NULL, query TEXT NOT NULL, embedding BLOB,
                                model TEXT NOT NULL, cost REAL NOT NULL, decision TEXT NOT NULL);
        CREATE TABLE feedback (offset INTEGER PRIMARY KEY AUTOINCREMENT, request_id TEXT NOT NULL UNIQUE, reward REAL NOT NULL, created REAL NOT NULL);
        CREATE TABLE cursors (name TEXT PRIMARY KEY, offset INTEGER NOT NULL);
    """)
    d = Decision(model="m1", score=0.5, utility=0.5, alternatives=[], checkpoint_version=1, request_id="old")
    import json

    db.execute("INSERT INTO decisions VALUES (?, ?, ?, ?, ?, ?, ?)", ("old", time.time(), "q", None, "m1", 0.0, json.dumps(d.to_dict())))
    db.commit()
    db.close()
    st = DecisionStore(path)
    assert st.owner("old") == (None, None)
    _record(st, "new")
    st.set_owners([("new", "k", "t")])
    assert st.owner("new") == ("k", "t") and st.add_feedback("old", 1.0) == 1


def _post_then_die(dsn, path: str, conn) -> None:
    st = open_decision_store(dsn, path)
    off = st.add_feedback("r1", 0.5)
    conn.send(off)  # the "2xx": sent only after add_feedback returned
    import os

    os._exit(1)  # no close, no checkpoint of the WAL: the process dies


def test_acknowledged_feedback_survives_a_killed_writer(tmp_path, store_dsn):
    path = tmp_path / "d.sqlite"
    st = open_decision_store(store_dsn, path)
    _record(st, "r1")
    st.close()
    parent, child = mp.get_context("spawn").Pipe()
    p = mp.get_context("spawn").Process(target=_post_then_die, args=(store_dsn, str(path), child))
    p.start()
    off = parent.recv()
    p.join(30)
    assert p.exitcode == 1
    st = open_decision_store(store_dsn, path)
    assert [(e.offset, e.request_id, e.reward) for e in st.events()] == [(off, "r1", 0.5)]
