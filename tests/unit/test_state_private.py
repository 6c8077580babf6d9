"""Issue 14 (6): every state file a local user could read (prompts in decisions.sqlite, keys, hub,
weights) is created 0600 in folders only the service user can enter (0700), even under umask 022."""

from __future__ import annotations

import os
import stat

import pytest

from cmr import checkpoint
from cmr.calibrate import Calibration, write_calibration
from cmr.policies.registry import make_policy
from services import auth
from services.config import load_args
from services.routing import _file_lock
from services.store import open_decisions, open_hub


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _modes(root):
    for d, dirs, files in os.walk(root):
        yield d, stat.S_IMODE(os.stat(d).st_mode), True
        for f in files:
            yield os.path.join(d, f), stat.S_IMODE(os.stat(os.path.join(d, f)).st_mode), False


def test_state_is_private_under_umask_022(tmp_path, umask_022):
    home = tmp_path / "home"  # cmr creates CMR_HOME itself here
    args = load_args({"home": str(home)})
    state = args.state_dir()
    hub, decisions = open_hub(args), open_decisions(args)
    hub.close()
    decisions.close()
    auth.ensure_bootstrap_key(state)
    checkpoint.save(state / "checkpoints" / "random", make_policy("random"))
    write_calibration(state / "calibration.json", Calibration(cost_weight=0.5))
    with _file_lock(state / ".models.lock"):
        pass
    names = {os.path.basename(p) for p, _, is_dir in _modes(home) if not is_dir}
    assert {"hub.sqlite", "decisions.sqlite", "keys.sqlite", "bootstrap.key", "calibration.json", "weights.npz"} <= names
    for path, mode, is_dir in _modes(home):
        assert mode == (0o700 if is_dir else 0o600), f"{path}: {oct(mode)}"


def test_wal_files_take_the_private_mode(tmp_path, umask_022):
    """SQLite gives -wal/-shm the main file's mode: an open database in WAL mode shows them."""
    args = load_args({"home": str(tmp_path / "home")})
    store = open_decisions(args)
    try:
        wal = [p for p in args.state_dir().iterdir() if p.name.endswith(("-wal", "-shm"))]
        assert wal and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in wal)
    finally:
        store.close()


def test_existing_state_dir_is_tightened_but_a_named_parent_is_not(tmp_path, umask_022):
    from cmr.state import private_file

    home = tmp_path / "home"
    (home / "serve").mkdir(parents=True, mode=0o755)
    old = home / "serve" / "hub.sqlite"
    old.write_text("")  # an older install's 0644 file
    args = load_args({"home": str(home)})
    assert stat.S_IMODE(args.state_dir().stat().st_mode) == 0o700
    assert stat.S_IMODE(home.stat().st_mode) == 0o755  # the user's folder: left as it was
    private_file(old)
    assert stat.S_IMODE(old.stat().st_mode) == 0o600
