"""The state store across replicas (``store_dsn``: SQLite files, a throwaway PostgreSQL): a change
made on one replica is seen by another within 1 s, concurrent feedback is stored exactly once
with offsets in order, replicas starting together migrate the schema once, and the PostgreSQL
listener's safety nets (periodic re-sync, reconnect) work. Two store instances with their own
connections stand for two replicas."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from cmr.hub import ModelHub, PgHubStore, open_hub_store
from cmr.state import PgDatabase, StoreError
from cmr.types import Decision, ModelCard
from services.store import DuplicateFeedbackError, PgDecisionStore, open_decision_store


def _replica_hub(dsn, path, resync_s=5.0):
    # a replica of its own: its own pool and listener, not the process's shared one
    return PgHubStore(PgDatabase(dsn, resync_s=resync_s)) if dsn else open_hub_store(None, path)


def _wait(cond, timeout=1.0) -> float:
    t0 = time.perf_counter()
    while not cond():
        if time.perf_counter() - t0 > timeout:
            raise AssertionError(f"not seen within {timeout} s")
        time.sleep(0.002)
    return time.perf_counter() - t0


def test_a_registration_reaches_the_other_replica_within_a_second(tmp_path, store_dsn):
    a, b = _replica_hub(store_dsn, tmp_path / "hub.sqlite"), _replica_hub(store_dsn, tmp_path / "hub.sqlite")
    try:
        for i in range(5):
            v = ModelHub(a).add(ModelCard(id=f"m{i}"))
            _wait(lambda: b.version() >= v)
            assert f"m{i}" in ModelHub(b)
        v = a.set_retired(["m0"], True)
        _wait(lambda: b.version() >= v)
        assert "m0" not in ModelHub(b)
    finally:
        a.close()
        b.close()


def _decide(st, rids):
    ds = [Decision(model="m1", score=0.5, utility=0.5, alternatives=[], checkpoint_version=1, request_id=r) for r in rids]
    st.record(ds, ["q"] * len(rids), np.zeros((len(rids), 4), np.float32), [0.1] * len(rids))


def test_concurrent_feedback_is_stored_once_with_offsets_in_order(tmp_path, store_dsn):
    stores = [open_decision_store(store_dsn, tmp_path / "d.sqlite") if not store_dsn else PgDecisionStore(PgDatabase(store_dsn))
              for _ in range(2)]
    rids = [f"r{i}" for i in range(40)]
    _decide(stores[0], rids)
    accepted, dups, errors = [], [], []

    def post(st, order):
        for r in order:
            try:
                accepted.append((st.add_feedback(r, 0.5), r))
            except DuplicateFeedbackError:
                dups.append(r)
            except Exception as e:  # noqa: BLE001 - any other error fails the test below
                errors.append(e)

    # both replicas post every id, two threads each: each id is accepted exactly once
    threads = [threading.Thread(target=post, args=(st, rids[::step])) for st in stores for step in (1, -1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert not errors
        assert sorted(r for _, r in accepted) == sorted(rids) and len(dups) == 3 * len(rids)
        offsets = sorted(o for o, _ in accepted)
        assert offsets == list(range(1, len(rids) + 1))  # gapless: no offset the learner could skip
        assert [e.offset for e in stores[1].events()] == offsets and stores[1].last_offset() == len(rids)
    finally:
        for st in stores:
            st.close()


def test_replicas_starting_together_migrate_once(pg_dsn):
    import psycopg

    dbs, errors = [], []

    def start():
        try:
            db = PgDatabase(pg_dsn)
            PgDecisionStore(db)
            dbs.append(db)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for db in dbs:
        db.release()
    assert not errors and len(dbs) == 4
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("SELECT version FROM schema_version WHERE component = 'decisions'").fetchone() == (1,)
        # a schema newer than this code is refused, not written over
        conn.execute("UPDATE schema_version SET version = 99 WHERE component = 'decisions'")
    with pytest.raises(StoreError, match="newer than this cmr knows"):
        PgDecisionStore(PgDatabase(pg_dsn))


def test_a_missed_notification_is_caught_by_the_resync(pg_dsn):
    import psycopg

    a = _replica_hub(pg_dsn, None, resync_s=0.3)
    try:
        with psycopg.connect(pg_dsn) as conn:  # a writer that does not NOTIFY
            conn.execute("UPDATE versions SET value = value + 1 WHERE name = 'hub'")
        _wait(lambda: a.version() == 1, timeout=2.0)
    finally:
        a.close()


def test_the_listener_reconnects(pg_dsn):
    import psycopg

    a, b = _replica_hub(pg_dsn, None), _replica_hub(pg_dsn, None)
    try:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:  # kill every LISTEN connection
            killed = conn.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                  "WHERE query LIKE 'LISTEN%%' AND pid <> pg_backend_pid()").fetchone()[0]
        assert killed == 2
        time.sleep(0.3)
        v = a.write([ModelCard(id="after")])
        _wait(lambda: b.version() >= v, timeout=3.0)
    finally:
        a.close()
        b.close()


def test_store_setting_is_validated(monkeypatch):
    from services.config import AppArgs, ConfigError, load_args

    with pytest.raises(ConfigError, match="field 'store'"):
        load_args({"store": "mysql://x"})
    assert load_args({"store": "sqlite"}).store_dsn() is None
    assert load_args({"store": "postgresql://u@h/db"}).store_dsn() == "postgresql://u@h/db"
    monkeypatch.setenv("CMR_STORE", "postgresql://u@h/other")
    assert AppArgs().store_dsn() == "postgresql://u@h/other" and AppArgs(store="sqlite").store_dsn() is None
    monkeypatch.setenv("CMR_STORE", "redis://x")
    with pytest.raises(ConfigError, match="CMR_STORE"):
        AppArgs().store_dsn()


def test_a_decisions_task_reaches_the_learner_with_its_feedback(tmp_path, store_dsn):
    """The task a request named is stored with its decision and comes back on its feedback event
    (what a policy with per-task priors learns from); a decision without one gives None."""
    st = open_decision_store(store_dsn, tmp_path / "d.sqlite") if not store_dsn else PgDecisionStore(PgDatabase(store_dsn))
    try:
        ds = [Decision(model="m", score=0.5, utility=0.5, request_id=f"task-{i}", task=t) for i, t in enumerate(("gsm8k", None))]
        st.record(ds, ["q0", "q1"], np.zeros((2, 4), np.float32), [0.1, 0.1])
        for d in ds:
            st.add_feedback(d.request_id, 1.0)
        got = {e.request_id: e.task for e in st.events() if e.request_id.startswith("task-")}
        assert got == {"task-0": "gsm8k", "task-1": None}
    finally:
        st.close()


def test_a_model_added_by_one_replica_is_refused_by_another_that_has_not_seen_it(tmp_path, store_dsn):
    """A replica's in-memory view of the hub may lag: the store itself refuses an id that is live
    there (the same HubError, so HTTP 409 / gRPC ALREADY_EXISTS), and nothing of the batch is written."""
    from cmr.errors import HubError

    a, b = _replica_hub(store_dsn, tmp_path / "hub.sqlite"), _replica_hub(store_dsn, tmp_path / "hub.sqlite")
    try:
        hub_a, hub_b = ModelHub(a), ModelHub(b)  # b's view is taken now: it has not seen "m1"
        v = hub_a.add(ModelCard(id="m1"))
        with pytest.raises(HubError, match="'m1' is already registered"):
            hub_b.add([ModelCard(id="m2"), ModelCard(id="m1", description="another")])
        assert a.version() == v and a.get("m2") is None and a.get("m1")[0].description == ""
        a.set_retired(["m1"], True)
        assert hub_b.add(ModelCard(id="m1", description="back")) > v  # a retired id may return
    finally:
        a.close()
        b.close()
