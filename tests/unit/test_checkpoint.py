"""Checkpoints: versioned folders, exact round-trip, checksums, atomic writes, latest() skips bad ones."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cmr import checkpoint as ckpt
from cmr.continual.learner import Learner
from cmr.policies.registry import make_policy


def _trained_carve(cmr_small, encoder):
    exp = cmr_small.experiences[0]
    p = make_policy("carve", encoder=encoder, config={"epochs": 2, "replay": 0.2, "anchor": 1.0})
    live = cmr_small.cards_upto(exp.k)
    p.add_models(live)
    learner = Learner(p)
    learner.fit(exp.train, live)
    return learner, live, exp


def _assert_state_equal(a, b):
    if isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    elif isinstance(a, dict):
        assert set(a) == set(b)
        for k in a:
            _assert_state_equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_state_equal(x, y)
    else:
        assert a == b


def test_round_trip_is_exact(tmp_path, cmr_small, encoder):
    learner, live, exp = _trained_carve(cmr_small, encoder)
    p = learner.policy
    ck = ckpt.save(tmp_path, p, {"sha256": "abc"}, {"learner": learner.state_dict()})
    assert ck.version == 1 and ck.path == tmp_path / "v000001"
    for name in ("weights.npz", "state.json", "models.json", "config.json", "fingerprint.json", "manifest.json"):
        assert (ck.path / name).is_file()
    assert json.loads((ck.path / "models.json").read_text())[: len(live)] == [c.id for c in live]
    resumed = Learner.resume(ckpt.latest(tmp_path), encoder)
    loaded = resumed.policy
    _assert_state_equal(p.state_dict(), loaded.state_dict())
    _assert_state_equal(learner.state_dict(), resumed.state_dict())
    np.testing.assert_array_equal(p.score(exp.test.emb, live), loaded.score(exp.test.emb, live))
    # training continues identically from the checkpoint (rng, replay, anchor all restored)
    exp2 = cmr_small.experiences[1]
    live2 = cmr_small.cards_upto(exp2.k)
    for lr in (learner, resumed):
        lr.policy.add_models(cmr_small.cards_of(exp2.k))
        lr.fit(exp2.train, live2)
    np.testing.assert_allclose(p.score(exp2.test.emb, live2), loaded.score(exp2.test.emb, live2), rtol=1e-5, atol=1e-7)


def test_versions_and_latest_skip_corrupt_and_partial(tmp_path, cmr_small, encoder):
    p = make_policy("knn", encoder=encoder)
    exp = cmr_small.experiences[0]
    p.fit(exp.train, cmr_small.cards_upto(1))
    for _ in range(3):
        ckpt.save(tmp_path, p)
    assert ckpt.versions(tmp_path) == [1, 2, 3]
    assert ckpt.latest(tmp_path).version == 3
    # corrupt v3: one flipped byte in the weights
    w = tmp_path / "v000003" / "weights.npz"
    raw = bytearray(w.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    w.write_bytes(bytes(raw))
    with pytest.raises(ckpt.CheckpointError, match="checksum mismatch for weights.npz"):
        ckpt.verify(tmp_path / "v000003")
    # a partial v4 (no manifest), as a crash mid-write outside the atomic rename would leave
    (tmp_path / "v000004").mkdir()
    (tmp_path / "v000004" / "state.json").write_text("{}")
    assert ckpt.latest(tmp_path).version == 2
    loaded = ckpt.load_policy(tmp_path, encoder)
    np.testing.assert_array_equal(loaded.score(exp.test.emb, cmr_small.cards_upto(1)), p.score(exp.test.emb, cmr_small.cards_upto(1)))
    # the next save takes a fresh number; temp folders never linger
    assert ckpt.save(tmp_path, p).version == 5
    assert not [x for x in tmp_path.iterdir() if x.name.startswith(".tmp")]


def test_failed_write_leaves_nothing(tmp_path, encoder):
    class Broken:
        name = "knn"

        class config:  # noqa: N801 - mimics a config object
            @staticmethod
            def to_dict():
                return {}

        @staticmethod
        def state_dict():
            return {"bad": object()}

    with pytest.raises(TypeError):
        ckpt.save(tmp_path, Broken())
    assert list(tmp_path.iterdir()) == []
    assert ckpt.latest(tmp_path) is None
    with pytest.raises(ckpt.CheckpointError):
        ckpt.load_policy(tmp_path, encoder)


def test_cmr_train_in_process_writes_a_version_per_experience(tmp_path, data_root, encoder, capsys):
    from cmr.cli import main

    out = tmp_path / "ck"
    rc = main(["train", "--policy", "carve", "--data", str(data_root / "cmrbench"), "--out", str(out),
               "--experiences", "2", "--limit", "30", "--set", "epochs=1", "replay=0.1"])
    assert rc == 0
    assert ckpt.versions(out) == [1, 2]
    fp1 = ckpt.open_checkpoint(out / "v000001").fingerprint
    fp2 = ckpt.open_checkpoint(out / "v000002").fingerprint
    # the fingerprint covers the data seen so far: it changes when e2's split joins
    assert fp1["experience"] == 1 and fp2["experience"] == 2 and fp1["sha256"] != fp2["sha256"]
    learner = Learner.resume(ckpt.latest(out), encoder)
    assert learner.policy.config.replay == 0.1 and learner.experiences == 2
    # which MiniLM embedded it: torch by default (exact), fused with TF-IDF by the default embedding
    # `auto` (60 prompts and the hub's cards are texts enough to fit it)
    assert fp1["encoder"].startswith(encoder.name + "+tfidf-svd")
    # a checkpoint for the router: trained with the router's encoder, and it says so
    out8 = tmp_path / "ck8"
    assert main(["train", "--policy", "knn", "--data", str(data_root / "cmrbench"), "--out", str(out8), "--experiences", "1",
                 "--limit", "20", "--encoder", "onnx-int8"]) == 0
    assert "int8" in ckpt.open_checkpoint(out8 / "v000001").fingerprint["encoder"]
    # fused with TF-IDF: the fitted lexical part is in the checkpoint, and loading restores it
    outl = tmp_path / "ckl"
    assert main(["train", "--policy", "knn", "--data", str(data_root / "cmrbench"), "--out", str(outl), "--experiences", "1",
                 "--limit", "20", "--embedding", "minilm+tfidf"]) == 0
    assert ckpt.stored_config(outl / "v000001")["embedding"] == "minilm+tfidf"
    assert "+tfidf-svd" in ckpt.load_policy(outl, encoder=encoder).encoder.name
    capsys.readouterr()
    # a bad option is one clear line and exit 2, not a traceback
    assert main(["train", "--data", str(data_root / "cmrbench"), "--out", str(out), "--set", "nope=1"]) == 2
    assert "unknown option(s) nope" in capsys.readouterr().err


def _knn_versions(root, encoder, cmr_small, n):
    p = make_policy("knn", encoder=encoder)
    p.fit(cmr_small.experiences[0].train, cmr_small.cards_upto(1))
    for i in range(n):
        ckpt.save(root, p, {"offset": i})
    return p


def test_prune_keeps_newest_valid_and_the_chain_between(tmp_path, cmr_small, encoder):
    _knn_versions(tmp_path, encoder, cmr_small, 6)
    (tmp_path / "v000005" / "weights.npz").write_bytes(b"torn")  # v5 no longer verifies
    with pytest.raises(ValueError, match="keep must be >= 1"):
        ckpt.prune(tmp_path, 0)
    assert ckpt.prune(tmp_path, 10) == [] and ckpt.versions(tmp_path) == [1, 2, 3, 4, 5, 6]  # fewer valid than keep
    # the newest 2 valid are v6 and v4; the corrupt v5 between them stays (its fingerprint links the chain)
    assert ckpt.prune(tmp_path, 2) == [1, 2, 3]
    assert ckpt.versions(tmp_path) == [4, 5, 6] and ckpt.latest(tmp_path).version == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v000004", "v000005", "v000006"]  # no trash, no lease left
    assert ckpt.open_checkpoint(tmp_path / "v000004").fingerprint == {"offset": 3}
    # saving goes on numbering after the newest, never re-using a pruned number
    _knn_versions(tmp_path, encoder, cmr_small, 1)
    assert ckpt.prune(tmp_path, 1) == [4, 5, 6] and ckpt.versions(tmp_path) == [7]


def test_prune_skips_a_version_being_read_and_removes_by_rename(tmp_path, cmr_small, encoder, monkeypatch):
    import os
    import time

    _knn_versions(tmp_path, encoder, cmr_small, 4)
    with ckpt.reading(tmp_path / "v000001"):
        assert [p.name.startswith(".read-v000001-") for p in tmp_path.iterdir() if p.name.startswith(".")] == [True]
        assert ckpt.prune(tmp_path, 1) == [2, 3]  # v1 is held by a reader
        assert ckpt.read_state(tmp_path / "v000001")  # and still whole
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the lease went with the reader
    # a lease left by a killed reader is ignored once stale
    stale = tmp_path / ".read-v000001-999999-1"
    stale.touch()
    old = time.time() - ckpt.LEASE_STALE_S - 1
    os.utime(stale, (old, old))
    # removal is a rename into trash first: with the delete failing, the version is gone whole
    # from its name (no half folder), and the next prune clears the trash
    monkeypatch.setattr(ckpt.shutil, "rmtree", lambda *a, **k: None)
    assert ckpt.prune(tmp_path, 1) == [1]
    assert ckpt.versions(tmp_path) == [4]
    trash = [p for p in tmp_path.iterdir() if p.name.startswith(".trash-v000001-")]
    assert len(trash) == 1 and {f.name for f in trash[0].iterdir()} >= {"manifest.json", "weights.npz"}
    monkeypatch.undo()
    assert ckpt.prune(tmp_path, 1) == [] and not list(tmp_path.glob(".trash-*"))


def test_reading_a_pruned_version_is_a_checkpoint_error(tmp_path, cmr_small, encoder):
    _knn_versions(tmp_path, encoder, cmr_small, 2)
    path = tmp_path / "v000001"
    ckpt.prune(tmp_path, 1)
    with pytest.raises(ckpt.CheckpointError):
        ckpt.load_policy(path, encoder)
    with pytest.raises(ckpt.CheckpointError):
        ckpt.open_checkpoint(path)
