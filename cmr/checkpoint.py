"""Versioned, atomic, checksummed checkpoints of any routing policy.

Layout: ``<root>/v000001/`` with

* ``weights.npz`` — every numpy array of the policy's ``state_dict()``;
* ``state.json`` — the rest of the state, with arrays replaced by ``{"__array__": key}``; a fitted
  encoder's state (the lexical part of ``minilm+tfidf``) is under ``"encoder"``;
* ``models.json`` — the model-id table (the policy's known models, in row order);
* ``config.json`` — policy name and config, and the embedding it was trained with (``minilm``,
  ``minilm+tfidf``: ``cmr.encoders.lexical``);
* ``fingerprint.json`` — the data fingerprint (what the checkpoint was trained on) and extras;
* ``manifest.json`` — version, policy, creation time and the SHA-256 of every file above.

A version is written into a hidden temp folder, every file fsynced, then renamed into place
(``os.replace`` of a directory is atomic on POSIX), so a reader sees a whole checkpoint or
none. :func:`latest` skips versions whose manifest or checksums do not verify. :func:`prune`
keeps the newest N valid versions (rename to a trash folder, then delete; never a version a
reader holds a lease on, :func:`reading`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import numpy as np

from cmr.errors import CMRError
from cmr.state import private_dir, private_file

_VERSION = re.compile(r"^v(\d{6,})$")
FORMAT = 1
_FILES = ("weights.npz", "state.json", "models.json", "config.json", "fingerprint.json")


class CheckpointError(CMRError):
    """A checkpoint that is missing, partial or corrupt."""


@dataclass
class Checkpoint:
    """One checkpoint: its version and folder (None when kept in memory only) and the policy
    state it holds (loaded lazily from disk when needed)."""

    version: int
    path: Path | None
    policy: str
    fingerprint: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Any] | None = None

    def load_state(self) -> dict[str, Any]:
        if self.state is None:
            if self.path is None:
                raise CheckpointError("in-memory checkpoint has no state")
            self.state = read_state(self.path)
        return self.state


# ------------------------------------------------------------------------------ (de)serialise
def _split_arrays(obj: Any, arrays: dict[str, np.ndarray]) -> Any:
    """Replace numpy arrays in a nested structure by references into ``arrays``."""
    if isinstance(obj, np.ndarray):
        key = f"a{len(arrays)}"
        arrays[key] = obj
        return {"__array__": key}
    if isinstance(obj, dict):
        for k in obj:
            if not isinstance(k, str):
                raise TypeError(f"state_dict keys must be strings, got {k!r}")
        return {k: _split_arrays(v, arrays) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_split_arrays(v, arrays) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (str, bool, int, float)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint")


def _join_arrays(obj: Any, arrays: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__array__"}:
            return arrays[obj["__array__"]]
        return {k: _join_arrays(v, arrays) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join_arrays(v, arrays) for v in obj]
    return obj


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write(path: Path, data: bytes) -> None:
    with open(private_file(path), "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _json(obj: Any) -> bytes:
    return json.dumps(obj, indent=1, sort_keys=True, allow_nan=True).encode("utf-8")


# ------------------------------------------------------------------------------ store
def versions(root: Path | str) -> list[int]:
    """Version numbers present under ``root`` (complete or not), ascending."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir() if p.is_dir() and (m := _VERSION.match(p.name)))


def version_dir(root: Path | str, version: int) -> Path:
    return Path(root) / f"v{version:06d}"


def save(root: Path | str, policy, fingerprint: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> Checkpoint:
    """Write ``policy``'s state (plus ``extra`` entries: the learner's) as the next version under
    ``root``; returns the checkpoint."""
    from cmr.encoders.lexical import embedding_of, encoder_state

    root = Path(root)
    private_dir(root, own=False)
    enc = getattr(policy, "encoder", None)
    state = {**policy.state_dict(), **(extra or {})}
    if (enc_state := encoder_state(enc)) is not None:
        state["encoder"] = enc_state
    arrays: dict[str, np.ndarray] = {}
    skeleton = _split_arrays(state, arrays)
    models = list(getattr(policy, "_models", None) or state.get("card_ids") or [])
    fingerprint = dict(fingerprint or {})
    while True:
        version = (versions(root)[-1] if versions(root) else 0) + 1
        tmp = root / f".tmp-v{version:06d}-{os.getpid()}-{time.monotonic_ns()}"
        private_dir(tmp)
        try:
            with open(private_file(tmp / "weights.npz"), "wb") as f:
                np.savez(f, **arrays)
                f.flush()
                os.fsync(f.fileno())
            _write(tmp / "state.json", _json(skeleton))
            _write(tmp / "models.json", _json(models))
            _write(tmp / "config.json", _json({"policy": policy.name, "config": policy.config.to_dict(), "embedding": embedding_of(enc)}))
            _write(tmp / "fingerprint.json", _json(fingerprint))
            manifest = {
                "format": FORMAT,
                "version": version,
                "policy": policy.name,
                "created": time.time(),
                "files": {name: _sha256(tmp / name) for name in _FILES},
            }
            _write(tmp / "manifest.json", _json(manifest))
            _fsync_dir(tmp)
            final = version_dir(root, version)
            if final.exists():  # another writer took this version meanwhile: try the next
                shutil.rmtree(tmp)
                continue
            os.rename(tmp, final)
            _fsync_dir(root)
            return Checkpoint(version=version, path=final, policy=policy.name, fingerprint=fingerprint, state=state)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def verify(path: Path | str) -> dict[str, Any]:
    """The manifest of a complete, uncorrupted checkpoint folder; raises ``CheckpointError`` otherwise."""
    path = Path(path)
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: no readable manifest.json ({e})") from None
    files = manifest.get("files")
    if not isinstance(files, dict) or set(files) != set(_FILES):
        raise CheckpointError(f"{path}: field 'files': manifest must list {', '.join(_FILES)}")
    for name, digest in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path}: missing {name}")
        if _sha256(f) != digest:
            raise CheckpointError(f"{path}: checksum mismatch for {name}")
    return manifest


def read_state(path: Path | str) -> dict[str, Any]:
    """The policy state stored in a verified checkpoint folder."""
    path = Path(path)
    with reading(path):
        verify(path)
        try:
            skeleton = json.loads((path / "state.json").read_text())
            with np.load(path / "weights.npz", allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError) as e:  # e.g. pruned meanwhile by a reader that held no lease
            raise CheckpointError(f"{path}: unreadable after verification ({e})") from None
    return _join_arrays(skeleton, arrays)


# ------------------------------------------------------------------------------ retention
#: a read lease older than this is taken for one left by a killed process and ignored by prune()
LEASE_STALE_S = 600.0


@contextmanager
def reading(path: Path | str) -> Iterator[None]:
    """Hold a read lease on a version folder while reading it: :func:`prune` leaves it alone.

    The lease is an empty file ``<root>/.read-v000007-<pid>-<ns>`` beside the versions; a
    process killed mid-read leaves one behind, ignored after :data:`LEASE_STALE_S`.
    """
    path = Path(path)
    lease = None
    if _VERSION.match(path.name):
        lease = path.parent / f".read-{path.name}-{os.getpid()}-{time.monotonic_ns()}"
        try:
            lease.touch()
        except OSError:  # a read-only store: nobody prunes it
            lease = None
    try:
        yield
    finally:
        if lease is not None:
            lease.unlink(missing_ok=True)


def _leased(root: Path) -> set[int]:
    now, out = time.time(), set()
    for p in root.glob(".read-v*"):
        m = _VERSION.match(p.name[len(".read-"):].split("-", 1)[0])
        try:
            fresh = now - p.stat().st_mtime < LEASE_STALE_S
        except OSError:  # the reader finished meanwhile
            continue
        if m and fresh:
            out.add(int(m.group(1)))
    return out


def prune(root: Path | str, keep: int) -> list[int]:
    """Remove old versions: keep the newest ``keep`` that verify and everything newer than the
    oldest of them (corrupt ones included: their fingerprints still link the learner's chain).

    Never removes a version under a read lease (:func:`reading`). A version is first renamed
    into ``<root>/.trash-…`` (atomic), then deleted, so a reader sees a whole folder or none.
    Leftover trash (a pruner killed mid-delete) is removed too. Returns the removed versions.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    root = Path(root)
    vs = versions(root)
    valid: list[int] = []
    for v in reversed(vs):
        if len(valid) == keep:
            break
        try:
            verify(version_dir(root, v))
        except CheckpointError:
            continue
        valid.append(v)
    removed: list[int] = []
    if len(valid) == keep:
        oldest, leased = valid[-1], _leased(root)
        for v in vs:
            if v >= oldest:
                break
            if v in leased:
                continue
            trash = root / f".trash-v{v:06d}-{os.getpid()}-{time.monotonic_ns()}"
            try:
                os.rename(version_dir(root, v), trash)
            except FileNotFoundError:  # another pruner took it
                continue
            removed.append(v)
        if removed:
            _fsync_dir(root)
    for t in root.glob(".trash-*"):
        shutil.rmtree(t, ignore_errors=True)
    return removed


def open_checkpoint(path: Path | str) -> Checkpoint:
    """A verified checkpoint folder as a :class:`Checkpoint` (state loaded lazily)."""
    path = Path(path)
    with reading(path):
        manifest = verify(path)
        try:
            fp = json.loads((path / "fingerprint.json").read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: unreadable fingerprint.json ({e})") from None
    return Checkpoint(version=int(manifest["version"]), path=path, policy=str(manifest["policy"]), fingerprint=fp)


def latest(root: Path | str) -> Checkpoint | None:
    """The newest version under ``root`` that verifies; corrupt or partial ones are skipped."""
    for v in reversed(versions(root)):
        try:
            return open_checkpoint(version_dir(root, v))
        except CheckpointError:
            continue
    return None


def resolve(path: Path | str) -> Path:
    """A checkpoint folder, or a root whose latest valid version is used."""
    path = Path(path)
    if (path / "manifest.json").is_file():
        return path
    ck = latest(path)
    if ck is None or ck.path is None:
        raise CheckpointError(f"{path}: no valid checkpoint")
    return ck.path


def stored_config(path: Path | str) -> dict[str, Any]:
    """``{"policy": name, "config": {...}, "embedding": name}`` of the checkpoint folder ``path``
    (``embedding`` is ``minilm`` for checkpoints written before it was recorded)."""
    try:
        return {"embedding": "minilm", **json.loads((Path(path) / "config.json").read_text())}
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable config.json ({e})") from None


def load_policy(path: Path | str, encoder=None):
    """Rebuild the registered policy stored at ``path`` (a version folder or a root: latest).

    ``encoder``: the dense encoder to run (or an encoder over it); the policy gets the encoder the
    checkpoint was trained with, its fitted lexical part restored (``policy.encoder``)."""
    from cmr.encoders.lexical import restore_encoder
    from cmr.policies.registry import make_policy

    path = resolve(path)
    with reading(path):
        cfg = stored_config(path)
        state = read_state(path)
    policy = make_policy(cfg["policy"], encoder=restore_encoder(state.pop("encoder", None), encoder), config=cfg["config"])
    policy.load_state_dict(state)
    return policy


def fingerprint_files(paths: Iterable[Path | str]) -> dict[str, Any]:
    """SHA-256 over the bytes of the given data files (in order), plus their names."""
    h = hashlib.sha256()
    names = []
    for p in paths:
        p = Path(p)
        names.append(str(p))
        h.update(str(p.name).encode())
        h.update(b"\0")
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return {"sha256": h.hexdigest(), "files": names}
