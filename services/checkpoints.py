"""Versioned policy checkpoints in a folder: ``v000001.pkl`` … plus ``LATEST`` (JSON with the
version and the payload's SHA-256).

Writes are atomic (temp file + ``os.replace``) and ``LATEST`` moves only after the payload is
on disk, so a reader sees either the old or the new version, never half of one. A payload whose
checksum does not match is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

from cmr.errors import CMRError


class CheckpointError(CMRError):
    """A missing or corrupt checkpoint."""


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class CheckpointDir:
    """A folder of versioned checkpoints of one policy."""

    def __init__(self, path: Path | str):
        self.path = Path(path)

    def latest(self) -> int | None:
        """The newest complete version, or None when there is none."""
        try:
            return int(json.loads((self.path / "LATEST").read_text())["version"])
        except FileNotFoundError:
            return None
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{self.path / 'LATEST'}: unreadable ({e})") from None

    def save(self, state: dict[str, Any], meta: dict[str, Any]) -> int:
        """Write ``state`` (a policy's ``state_dict``) with ``meta`` as the next version; returns it.

        Only one writer (the learner, or the first-start bootstrap under a file lock) at a time.
        """
        version = (self.latest() or 0) + 1
        payload = pickle.dumps({"version": version, "meta": meta, "state": state}, protocol=pickle.HIGHEST_PROTOCOL)
        _atomic_write(self.path / f"v{version:06d}.pkl", payload)
        _atomic_write(self.path / "LATEST", json.dumps({"version": version, "sha256": hashlib.sha256(payload).hexdigest()}).encode())
        return version

    def load(self, version: int | None = None) -> dict[str, Any]:
        """``{"version", "meta", "state"}`` of ``version`` (default: the latest), checksum verified."""
        latest = json.loads((self.path / "LATEST").read_text()) if (self.path / "LATEST").exists() else None
        if version is None:
            if latest is None:
                raise CheckpointError(f"{self.path}: no checkpoint")
            version = int(latest["version"])
        f = self.path / f"v{version:06d}.pkl"
        try:
            payload = f.read_bytes()
        except FileNotFoundError:
            raise CheckpointError(f"{f}: no such checkpoint version") from None
        if latest is not None and int(latest["version"]) == version and hashlib.sha256(payload).hexdigest() != latest["sha256"]:
            raise CheckpointError(f"{f}: checksum mismatch")
        return pickle.loads(payload)
