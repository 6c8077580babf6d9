"""Bytes a routing decision takes in the decision store, and the size a capped store settles at:

    python -m bench.store_retention [--n 20000] [--cap 5000] [--no-pg] [--out FILE.json]

Decisions as the router records them (``DecisionStore.record`` / ``PgDecisionStore.record``, batches
of 16): CMRBench test prompts as queries, a 384-dim float32 query embedding, the chosen model and
two runner-ups with hub model ids, an owner key and tenant. SQLite: the database file after a WAL
checkpoint; PostgreSQL (a throwaway server, tests/pg.py): ``pg_total_relation_size`` of the
decisions table (indexes and TOAST included). Then an empty store capped at ``--cap``
(``max_decisions``, purged on every record) gets cap, then 3 × cap more decisions: the size it
stays at (SQLite reuses freed pages; PostgreSQL's autovacuum makes deleted rows' space reusable)."""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import uuid
from pathlib import Path

import numpy as np

from cmr import constants
from cmr.types import Decision


def _inputs():
    root = constants.data_root() / "cmrbench"
    prompts = [json.loads(line)["prompt"] for e in sorted(root.glob("e*")) for line in (e / "test.jsonl").open()]
    models = [json.loads(line)["model"] for line in itertools.islice((root / "hub.jsonl").open(), 100)]
    return prompts, models


def _fill(st, n: int, prompts, models, rng, start: int = 0) -> None:
    for i in range(start, start + n, 16):
        k = min(16, start + n - i)
        ds = [Decision(model=models[(i + j) % len(models)], score=0.71, utility=0.69, checkpoint_version=3, cost_weight=0.1,
                       alternatives=[(models[(i + j + 1) % len(models)], 0.64), (models[(i + j + 2) % len(models)], 0.6)],
                       request_id=f"cmr-{uuid.uuid4().hex}") for j in range(k)]
        st.record(ds, [prompts[(i + j) % len(prompts)] for j in range(k)], rng.standard_normal((k, 384)).astype(np.float32),
                  [0.0004] * k, [("k-3f9a2c", "acme")] * k)


def _size(st) -> int:
    if hasattr(st, "_db"):  # SQLite
        st._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return st.path.stat().st_size
    with st.db.connection() as conn:
        return int(conn.execute("SELECT pg_total_relation_size('decisions')").fetchone()[0])


def measure(dsn: str | None, n: int, cap: int) -> dict:
    from services.store import open_decision_store

    prompts, models = _inputs()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        st = open_decision_store(dsn, Path(tmp) / "decisions.sqlite")
        _fill(st, n, prompts, models, rng)
        full = _size(st)
        if dsn:
            with st.db.connection() as conn:
                conn.execute("TRUNCATE decisions")
        else:
            st.close()
            for f in Path(tmp).glob("decisions.sqlite*"):
                f.unlink()
            st = open_decision_store(dsn, Path(tmp) / "decisions.sqlite")
        st.configure(None, 0.0, max_decisions=cap)
        _fill(st, cap, prompts, models, rng)
        at_cap = _size(st)
        _fill(st, 3 * cap, prompts, models, rng, start=cap)
        after = _size(st)
        vacuumed = None
        if dsn:  # what autovacuum (on by default, every minute) does for a table deleted from
            with st.db.connection() as conn:
                conn.commit()
                conn.autocommit = True
                conn.execute("VACUUM decisions")
                conn.autocommit = False
            _fill(st, 3 * cap, prompts, models, rng, start=4 * cap)
            vacuumed = _size(st)
        st.close()
    return {"backend": "postgresql" if dsn else "sqlite", "decisions": n, "bytes": full, "bytes_per_decision": round(full / n),
            "mean_query_chars": round(float(np.mean([len(p) for p in prompts]))), "cap": cap,
            "bytes_at_cap": at_cap, "bytes_after_3x_cap_more": after,
            **({"bytes_after_vacuum_and_3x_cap_more": vacuumed} if dsn else {})}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.store_retention", description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--cap", type=int, default=5_000)
    ap.add_argument("--no-pg", action="store_true", help="SQLite only")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    results = [measure(None, a.n, a.cap)]
    if not a.no_pg:
        from tests.pg import throwaway_postgres, unavailable

        if unavailable() is None:
            with throwaway_postgres() as dsn:
                results.append(measure(dsn, a.n, a.cap))
    for r in results:
        print(json.dumps(r))
    if a.out:
        a.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
