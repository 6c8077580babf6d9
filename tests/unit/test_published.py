"""Checkpoints every node can read (``store_dsn``: SQLite files, a throwaway PostgreSQL): a
version is served only once published in the state store, a publication reaches another replica
(PostgreSQL: its NOTIFY wakes the watcher), and a half-written, unpublished or tampered version is
never loaded — in a local folder and at a URI (fsspec's in-memory filesystem stands in for an
object store)."""

from __future__ import annotations

import threading
import time

import pytest

from cmr import checkpoint
from cmr.policies.registry import make_policy
from cmr.published import PgPublishedStore, load_served, open_publication, open_published_store, publish
from cmr.state import PgDatabase


def _replica(dsn, path):
    # a replica of its own: its own pool and listener, not the process's shared one
    return PgPublishedStore(PgDatabase(dsn)) if dsn else open_published_store(None, path)


@pytest.fixture(params=["local", "uri"])
def root(request, tmp_path, monkeypatch):
    monkeypatch.setenv("CMR_HOME", str(tmp_path / "home"))  # where fetched copies of a URI's versions go
    if request.param == "local":
        return tmp_path / "checkpoints" / "random"
    import fsspec

    fsspec.filesystem("memory").store.clear()
    return f"memory://ckpt-{time.monotonic_ns()}/random"


def _half_write(root, version: int) -> None:
    """What a writer killed mid-way leaves: some files of a version, no manifest."""
    if checkpoint.is_remote(root):
        fs, path = checkpoint._filesystem(checkpoint.version_uri(root, version))
        fs.create_dir(path)
        with fs.open_output_stream(f"{path}/weights.npz") as f:
            f.write(b"partial")
    else:
        d = checkpoint.version_dir(root, version)
        d.mkdir(parents=True)
        (d / "weights.npz").write_bytes(b"partial")


def test_only_a_published_whole_version_is_loaded(tmp_path, store_dsn, root):
    a, b = _replica(store_dsn, tmp_path / "published.sqlite"), _replica(store_dsn, tmp_path / "published.sqlite")
    woke = threading.Event()
    b.on_change(woke.set)
    try:
        policy = make_policy("random")
        assert load_served(b, "random") is None  # nothing published: nothing served
        v1 = checkpoint.save(root, policy, {"offset": 0})
        publish(a, root, v1)
        _half_write(root, 2)  # a writer died mid-way
        v3 = checkpoint.save(root, policy, {"offset": 3})  # whole, not published yet
        assert checkpoint.versions(root) == [1, 2, 3]
        assert load_served(b, "random").version == 1  # not the newest folder: the published one
        with pytest.raises(checkpoint.CheckpointError, match="manifest|missing"):
            checkpoint.open_checkpoint(checkpoint.version_uri(root, 2))
        woke.clear()
        t0 = time.perf_counter()
        publish(a, root, v3)
        while (cur := b.current("random")) is None or cur.version != 3:  # the other replica sees it within 1 s
            assert time.perf_counter() - t0 < 1.0, "publication not seen within 1 s"
            time.sleep(0.002)
        if store_dsn:
            assert woke.wait(1.0)  # the NOTIFY wakes a watcher on any node, no polling needed
        ck = load_served(b, "random")
        assert ck.version == 3 and ck.fingerprint == {"offset": 3}
        # a publication whose files do not match its checksum is refused; the one before is served
        bad = a.publish("random", 4, checkpoint.version_uri(root, 3), "0" * 64)
        with pytest.raises(checkpoint.CheckpointError, match="checksum"):
            open_publication(bad)
        assert load_served(b, "random").version == 3
        # re-publishing an older version rolls back
        publish(a, root, checkpoint.open_checkpoint(checkpoint.version_uri(root, 1)))
        assert b.history("random")[0].version == 1 and load_served(b, "random").version == 1
    finally:
        a.close()
        b.close()


def test_calibration_applied_on_one_replica_is_seen_by_another(tmp_path, store_dsn):
    """``cmr.calibrate.apply`` on one replica's store reaches another within 1 s (PostgreSQL: the
    NOTIFY wakes its watcher); a bad value is refused with nothing stored."""
    from cmr import calibrate as cal

    a, b = _replica(store_dsn, tmp_path / "published.sqlite"), _replica(store_dsn, tmp_path / "published.sqlite")
    woke = threading.Event()
    b.on_change(woke.set)
    try:
        assert cal.applied(b) is None
        for lam in (0.5, 2.0):
            woke.clear()
            t0 = time.perf_counter()
            cal.apply(a, cal.Calibration(cost_weight=lam, source=f"replica a {lam}"))
            while (got := cal.applied(b)) is None or got.cost_weight != lam:
                assert time.perf_counter() - t0 < 1.0, "calibration not seen within 1 s"
                time.sleep(0.002)
            assert got.source == f"replica a {lam}"
            if store_dsn:
                assert woke.wait(1.0)
        for bad in (cal.Calibration(cost_weight=-1.0), cal.Calibration(cost_weight=1.0, held_out={"n": float("nan")})):
            with pytest.raises(cal.CalibrationError):
                cal.apply(a, bad)
        with pytest.raises(ValueError, match="JSON object"):
            a.put_setting(cal.SETTING, [1, 2])  # type: ignore[arg-type]
        time.sleep(0.05)
        assert cal.applied(b).cost_weight == 2.0 and cal.applied(a).cost_weight == 2.0
    finally:
        a.close()
        b.close()


def test_remote_versions_are_fetched_and_verified(tmp_path, monkeypatch):
    monkeypatch.setenv("CMR_HOME", str(tmp_path / "home"))
    root = f"memory://ckpt-{time.monotonic_ns()}/random"
    v1 = checkpoint.save(root, make_policy("random"), {"offset": 1})
    local = checkpoint.fetch(checkpoint.version_uri(root, 1))
    assert local.is_dir() and checkpoint.manifest_digest(local) == checkpoint.manifest_digest(v1.path)
    assert checkpoint.read_fingerprint(root, 1) == {"offset": 1}
    # a tampered remote file fails verification on a node that has no copy yet
    import fsspec
    import shutil

    shutil.rmtree(local)
    fs = fsspec.filesystem("memory")
    fs.pipe(f"{root.split('://', 1)[1]}/v000001/state.json", b"{}")
    with pytest.raises(checkpoint.CheckpointError, match="checksum"):
        checkpoint.fetch(checkpoint.version_uri(root, 1))
    checkpoint.save(root, make_policy("random"))
    checkpoint.save(root, make_policy("random"))
    assert checkpoint.prune(root, 2) == [1] and checkpoint.versions(root) == [2, 3]


def test_checkpoint_location_is_checked():
    from services.config import AppArgs, load_args
    from cmr.errors import ConfigError

    assert AppArgs(checkpoints="/mnt/shared/ckpt").checkpoints == "/mnt/shared/ckpt"
    assert AppArgs(checkpoints="s3://bucket/cmr").checkpoints == "s3://bucket/cmr"
    with pytest.raises(ConfigError, match="checkpoints"):
        load_args({"checkpoints": "nosuchfs://x"})


def test_cmr_serve_takes_the_checkpoint_location(tmp_path, capsys):
    import argparse

    from cmr.cli import main
    from services.serve_cli import add_arguments, build_args

    p = argparse.ArgumentParser()
    add_arguments(p)
    ns = p.parse_args(["--home", str(tmp_path), "--checkpoints", "gs://bucket/cmr", "--no-tiny-models"])
    assert build_args(ns).checkpoints == "gs://bucket/cmr"
    assert main(["serve", "--home", str(tmp_path), "--checkpoints", "nosuchfs://x"]) == 2
    assert "checkpoints" in capsys.readouterr().err


def test_a_retrained_version_is_published_for_the_routers(tmp_path, store_dsn):
    from cmr.published import publish_latest

    root = tmp_path / "checkpoints" / "random"
    store = store_dsn or str(tmp_path / "published.sqlite")
    reader = _replica(store_dsn, tmp_path / "published.sqlite")
    try:
        checkpoint.save(root, make_policy("random"))
        checkpoint.save(root, make_policy("random"))  # what `cmr train --out ROOT` leaves
        assert reader.current("random") is None
        assert publish_latest(root, store).version == 2  # `cmr train --publish STORE`
        assert load_served(reader, "random").version == 2
    finally:
        reader.close()
