"""Shared fixtures: the real MiniLM encoder and small slices of the shared data."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("CMR_NO_PROGRESS", "1")

from cmr import constants  # noqa: E402


def pytest_addoption(parser) -> None:
    parser.addoption("--console-shots", default=None,
                     help="folder for the console browser test's screenshots (docs/console to refresh the README's)")


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = constants.data_root()
    if not root.is_dir():
        pytest.skip(f"shared data not found at {root}")
    return root


@pytest.fixture(scope="session")
def encoder():
    """Real all-MiniLM-L6-v2 with the persistent embedding cache (one load per session)."""
    from cmr.encoders import default_encoder

    return default_encoder()


@pytest.fixture(scope="session")
def cmr_small(data_root, encoder):
    """CMRBench restricted to 2 experiences, 60 train / 40 test requests each, embedded.

    The hub is cut down to the models these requests name plus 40 others, so a test never
    embeds the full 2,315-card hub (CI starts with an empty embedding cache)."""
    from cmr.data import load_cmrbench

    bench = load_cmrbench(data_root / "cmrbench")
    rng = np.random.default_rng(0)
    exps = []
    for exp in bench.experiences[:2]:
        tr = exp.train.subset(rng.choice(len(exp.train), 60, replace=False))
        te = exp.test.subset(rng.choice(len(exp.test), 40, replace=False))
        tr.emb, te.emb = encoder.encode(tr.texts), encoder.encode(te.texts)
        exps.append(type(exp)(exp.k, tr, te))
    named = {exp.train.model_ids[i] for e in exps for part in (e.train, e.test) for i in part.labels}
    others = [c.id for c in bench.cards if c.id not in named and (c.experience or 1) <= 2]
    keep = named | set(rng.choice(others, 40, replace=False))
    bench.cards = [c for c in bench.cards if c.id in keep]
    ids = [c.id for c in bench.cards]
    bench.experiences = [type(e)(e.k, e.train.select_models(ids), e.test.select_models(ids)) for e in exps]
    return bench


@pytest.fixture(scope="session")
def outcomes_small(data_root, encoder):
    """RouterBench outcome matrix, 120 train / 60 test prompts, embedded."""
    from cmr.data import load_outcomes

    data = load_outcomes(data_root / "routing" / "routerbench")
    rng = np.random.default_rng(0)
    data.train = data.train.subset(rng.choice(len(data.train), 120, replace=False))
    data.test = data.test.subset(rng.choice(len(data.test), 60, replace=False))
    data.train.emb, data.test.emb = encoder.encode(data.train.texts), encoder.encode(data.test.texts)
    return data


def pytest_collection_modifyitems(session, config, items):
    """Run the Ray tests last: their session-wide Ray instance then never runs beside the unit
    tests (2 cores), and a unit-test failure shows before the slower Serve tests."""
    items.sort(key=lambda item: "/tests/ray/" in str(item.path))


@pytest.fixture(scope="session")
def pg_server():
    """A throwaway PostgreSQL server for the session (tests/pg.py); skips when none can start."""
    from tests import pg

    why = pg.unavailable()
    if why:
        pytest.skip(f"PostgreSQL backend not tested: {why}")
    with pg.throwaway_postgres() as dsn:
        yield dsn


_pg_databases = iter(range(1, 1 << 30))


@pytest.fixture
def pg_dsn(pg_server):
    """A fresh, empty database on the session's PostgreSQL server."""
    from cmr.state import PgDatabase
    from tests import pg

    dsn = pg.new_database(pg_server, f"t{next(_pg_databases)}")
    yield dsn
    db = PgDatabase._shared.get(dsn)  # stores a test left open: stop their listener and pool
    if db is not None:
        db._refs = 1
        db.release()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_dsn(request):
    """Contract tests run once per backend: None (SQLite files) or a fresh PostgreSQL database."""
    return None if request.param == "sqlite" else request.getfixturevalue("pg_dsn")
