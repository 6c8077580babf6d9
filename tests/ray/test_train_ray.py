"""`cmr train --ray`: the same learner loop inside a Ray Train TorchTrainer (one CPU worker)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytestmark = pytest.mark.ray


def test_train_ray_writes_loadable_checkpoints(ray_session, data_root, tmp_path, encoder, capsys):
    from cmr import checkpoint as ckpt
    from cmr.cli import main
    from cmr.data import load_cmrbench

    out = tmp_path / "ckpt"
    rc = main(["train", "--policy", "carve", "--data", str(data_root / "cmrbench"), "--out", str(out), "--ray",
               "--experiences", "2", "--limit", "40", "--set", "epochs=2"])
    assert rc == 0
    assert ckpt.versions(out) == [1, 2]
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # the last report reached Ray Train with its checkpoint
    assert summary["experience"] == 2 and summary["ray_checkpoint"]
    ck = ckpt.open_checkpoint(out / "v000002")
    assert ck.fingerprint["limit"] == 40 and len(ck.fingerprint["sha256"]) == 64
    policy = ckpt.load_policy(out, encoder)
    bench = load_cmrbench(data_root / "cmrbench")
    cards = bench.cards_upto(2)
    q = policy.encoder.encode(bench.experiences[1].test.texts[:3])  # the checkpoint's embedding (fused by default)
    s = policy.score(q, cards)
    assert s.shape == (3, len(cards)) and np.isfinite(s).all()
