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
keeps the newest valid versions by count, total bytes and age (rename to a trash folder, then delete; never a version a
reader holds a lease on, :func:`reading`).

A root may also be a URI (``s3://bucket/ckpt``, ``gs://…``, any pyarrow filesystem, or an fsspec
one such as ``memory://``), the way Ray Train's ``storage_path`` works: a version is staged in a
local temp folder, uploaded file by file with ``manifest.json`` last (a version without its
manifest is incomplete and never read), and read back through :func:`fetch` into a local cache
folder whose checksums are verified before use. Which version is *served* is not decided here but
by a row in the state store (``cmr.published``): a version is published only once written whole.
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
from urllib.parse import urlsplit

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


# ------------------------------------------------------------------------------ locations
def is_remote(root: Path | str) -> bool:
    """True for a URI naming a filesystem other than this node's (``file://`` and plain paths are local)."""
    return isinstance(root, str) and "://" in root and urlsplit(root).scheme not in ("", "file")


def local_path(root: Path | str) -> Path:
    """A local root as a Path (``file:///x`` -> ``/x``)."""
    return Path(urlsplit(root).path) if isinstance(root, str) and root.startswith("file://") else Path(root)


#: schemes pyarrow's own filesystems serve (others go through fsspec)
_PYARROW_SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")


def check_location(value: str) -> str:
    """The one validator of a checkpoint location: a path, or a URI whose scheme pyarrow or fsspec knows."""
    scheme = urlsplit(value).scheme if is_remote(value) else ""
    if scheme and scheme not in _PYARROW_SCHEMES:
        import fsspec

        try:
            fsspec.get_filesystem_class(scheme)
        except (ValueError, ImportError) as e:
            raise ValueError(f"no filesystem for {scheme}:// ({e})") from None
    return value


def _filesystem(uri: str):
    """(pyarrow filesystem, path) of a remote URI: pyarrow's own filesystems, else fsspec's."""
    import pyarrow
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(uri)
    except pyarrow.ArrowInvalid:  # a scheme pyarrow does not know (memory://, …): through fsspec
        import fsspec

        fs, path = fsspec.core.url_to_fs(uri)
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def join(root: Path | str, name: str) -> Path | str:
    """``root/name`` for a local Path or a URI."""
    return f"{root.rstrip('/')}/{name}" if is_remote(root) else local_path(root) / name


# ------------------------------------------------------------------------------ store
def versions(root: Path | str) -> list[int]:
    """Version numbers present under ``root`` (complete or not), ascending."""
    if is_remote(root):
        import pyarrow.fs as pafs

        fs, path = _filesystem(root)
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        return sorted(int(m.group(1)) for i in infos if i.type == pafs.FileType.Directory and (m := _VERSION.match(i.base_name)))
    root = local_path(root)
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir() if p.is_dir() and (m := _VERSION.match(p.name)))


def version_dir(root: Path | str, version: int) -> Path:
    """The folder of ``version`` under a local root."""
    return local_path(root) / f"v{version:06d}"


def version_uri(root: Path | str, version: int) -> str:
    """Where ``version`` lives under ``root``, as a string (a path or a URI): what is published."""
    return str(join(root, f"v{version:06d}"))


def manifest_digest(path: Path | str) -> str:
    """SHA-256 of a version folder's ``manifest.json``: the checksum published with it (the
    manifest holds every other file's SHA-256, so it pins the whole version)."""
    return _sha256(Path(path) / "manifest.json")


def _write_folder(tmp: Path, version: int, policy, skeleton: Any, arrays: dict[str, np.ndarray], models: list, fingerprint: dict) -> None:
    """Every file of one version into ``tmp``, each fsynced; the manifest last."""
    from cmr.encoders.lexical import embedding_of
    private_dir(tmp)
    with open(private_file(tmp / "weights.npz"), "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    _write(tmp / "state.json", _json(skeleton))
    _write(tmp / "models.json", _json(models))
    _write(tmp / "config.json", _json({"policy": policy.name, "config": policy.config.to_dict(), "embedding": embedding_of(getattr(policy, "encoder", None))}))
    _write(tmp / "fingerprint.json", _json(fingerprint))
    manifest = {"format": FORMAT, "version": version, "policy": policy.name, "created": time.time(),
                "files": {name: _sha256(tmp / name) for name in _FILES}}
    _write(tmp / "manifest.json", _json(manifest))
    _fsync_dir(tmp)


def save(root: Path | str, policy, fingerprint: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> Checkpoint:
    """Write ``policy``'s state (plus ``extra`` entries: the learner's) as the next version under
    ``root`` (a local folder or a URI); returns the checkpoint (``path``: its local folder, for a
    URI the staged copy, which stays as the node's cache of it)."""
    from cmr.encoders.lexical import encoder_state

    enc = getattr(policy, "encoder", None)
    state = {**policy.state_dict(), **(extra or {})}
    if (enc_state := encoder_state(enc)) is not None:
        state["encoder"] = enc_state
    arrays: dict[str, np.ndarray] = {}
    skeleton = _split_arrays(state, arrays)
    models = list(getattr(policy, "_models", None) or state.get("card_ids") or [])
    fingerprint = dict(fingerprint or {})
    if is_remote(root):
        return _save_remote(root, policy, state, skeleton, arrays, models, fingerprint)
    root = local_path(root)
    private_dir(root, own=False)
    while True:
        version = (versions(root)[-1] if versions(root) else 0) + 1
        tmp = root / f".tmp-v{version:06d}-{os.getpid()}-{time.monotonic_ns()}"
        try:
            _write_folder(tmp, version, policy, skeleton, arrays, models, fingerprint)
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


def _save_remote(root: str, policy, state, skeleton, arrays, models, fingerprint) -> Checkpoint:
    # object stores have no atomic folder rename: upload the files, the manifest last; a version
    # without a manifest is incomplete (never fetched), and only a published one is ever served
    fs, base = _filesystem(root)
    version = (versions(root)[-1] if versions(root) else 0) + 1
    cache = _cache_dir(root)
    tmp = cache / f".tmp-v{version:06d}-{os.getpid()}-{time.monotonic_ns()}"
    try:
        _write_folder(tmp, version, policy, skeleton, arrays, models, fingerprint)
        dest = f"{base.rstrip('/')}/v{version:06d}"
        fs.create_dir(dest, recursive=True)
        for name in (*_FILES, "manifest.json"):
            with open(tmp / name, "rb") as src, fs.open_output_stream(f"{dest}/{name}") as out:
                shutil.copyfileobj(src, out, 1 << 20)
        final = version_dir(cache, version)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Checkpoint(version=version, path=final, policy=policy.name, fingerprint=fingerprint, state=state)


def _cache_dir(root: str) -> Path:
    """This node's copies of a remote root's versions: ``$CMR_HOME/checkpoint-cache/<hash of root>``."""
    from cmr import constants

    return private_dir(constants.cmr_home() / "checkpoint-cache" / hashlib.sha256(root.rstrip("/").encode()).hexdigest()[:16])


def fetch(location: Path | str) -> Path:
    """A version folder on this node: a local location as is; a remote one (``root/vNNNNNN``)
    downloaded into the node's cache (temp folder, then rename), verified. Raises
    ``CheckpointError`` for a version that is missing, incomplete or corrupt."""
    if not is_remote(location):
        return local_path(location)
    root, name = str(location).rstrip("/").rsplit("/", 1)
    if not _VERSION.match(name):
        raise CheckpointError(f"{location}: not a version folder (…/v000001)")
    final = _cache_dir(root) / name
    try:
        verify(final)
        return final
    except CheckpointError:
        shutil.rmtree(final, ignore_errors=True)
    fs, path = _filesystem(str(location))
    tmp = final.parent / f".fetch-{name}-{os.getpid()}-{time.monotonic_ns()}"
    private_dir(tmp)
    try:
        for f in ("manifest.json", *_FILES):  # no manifest: incomplete, stop before the big files
            try:
                with fs.open_input_stream(f"{path}/{f}") as src, open(private_file(tmp / f), "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
            except (FileNotFoundError, OSError) as e:
                raise CheckpointError(f"{location}: missing {f} ({e})") from None
        verify(tmp)
        try:
            os.rename(tmp, final)
        except OSError:  # another reader placed it meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def read_fingerprint(root: Path | str, version: int) -> dict[str, Any] | None:
    """``fingerprint.json`` of one version (not verified: the learner's audit reads the chain of
    a corrupt version too), or None when unreadable."""
    return read_json(root, version, "fingerprint.json")


def read_json(root: Path | str, version: int, name: str) -> Any:
    """One JSON file of a version, local or remote, unverified (None when unreadable)."""
    try:
        if is_remote(root):
            fs, path = _filesystem(version_uri(root, version))
            with fs.open_input_stream(f"{path}/{name}") as f:
                return json.loads(f.read())
        return json.loads((version_dir(root, version) / name).read_text())
    except (OSError, ValueError):
        return None


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


def _kept(newest_first: Iterable[tuple[int, int, float] | None], keep: int, max_bytes: int, max_age_s: float) -> tuple[list[int], bool]:
    """Which valid versions retention keeps, from ``(version, bytes, created)`` newest first
    (None: a version that does not verify, skipped): the newest always, then up to ``keep`` while
    the total stays within ``max_bytes`` and each is younger than ``max_age_s`` (0: no limit).
    Returns the kept versions and whether a limit was reached (else nothing may go)."""
    kept: list[int] = []
    total, now = 0, time.time()
    for item in newest_first:
        if item is None:
            continue
        v, size, created = item
        if len(kept) == keep or kept and ((max_bytes and total + size > max_bytes) or (max_age_s and now - created > max_age_s)):
            return kept, True
        total += size
        kept.append(v)
    return kept, len(kept) == keep


def prune(root: Path | str, keep: int, max_bytes: int = 0, max_age_s: float = 0.0) -> list[int]:
    """Remove old versions: keep the newest that verifies, and more of the newest valid ones up
    to ``keep`` versions, ``max_bytes`` in all and ``max_age_s`` of age (0: no such limit), plus
    everything newer than the oldest kept (corrupt ones included: their fingerprints still link
    the learner's chain).

    Never removes a version under a read lease (:func:`reading`). A version is first renamed
    into ``<root>/.trash-…`` (atomic), then deleted, so a reader sees a whole folder or none.
    Leftover trash (a pruner killed mid-delete) is removed too. Returns the removed versions.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    if is_remote(root):
        return _prune_remote(root, keep, max_bytes, max_age_s)
    root = local_path(root)
    vs = versions(root)

    def info(v: int) -> tuple[int, int, float] | None:
        d = version_dir(root, v)
        try:
            m = verify(d)
            return v, sum(f.stat().st_size for f in d.iterdir()), float(m.get("created", 0))
        except (CheckpointError, OSError):
            return None

    valid, limited = _kept((info(v) for v in reversed(vs)), keep, max_bytes, max_age_s)
    removed: list[int] = []
    if limited and valid:
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


def _prune_remote(root: str, keep: int, max_bytes: int, max_age_s: float) -> list[int]:
    # no read leases on an object store: a reader fetches a whole copy first (``fetch``), so a
    # version deleted meanwhile fails that fetch cleanly; complete = has its manifest (not
    # re-verified here: that would download every version)
    import pyarrow.fs as pafs

    fs, base = _filesystem(root)
    vs = versions(root)

    def info(v: int) -> tuple[int, int, float] | None:
        files = fs.get_file_info(pafs.FileSelector(f"{base.rstrip('/')}/v{v:06d}"))
        man = next((f for f in files if f.base_name == "manifest.json"), None)
        if man is None:
            return None
        created = man.mtime.timestamp() if man.mtime is not None else time.time()
        return v, sum(f.size or 0 for f in files), created

    kept, limited = _kept((info(v) for v in reversed(vs)), keep, max_bytes, max_age_s)
    if not (limited and kept):
        return []
    removed = [v for v in vs if v < kept[-1]]
    for v in removed:
        fs.delete_dir(f"{base.rstrip('/')}/v{v:06d}")
    return removed


def open_checkpoint(path: Path | str) -> Checkpoint:
    """A verified checkpoint folder (local, or a remote one fetched first) as a :class:`Checkpoint`
    (state loaded lazily)."""
    path = fetch(path)
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
            return open_checkpoint(version_uri(root, v))
        except CheckpointError:
            continue
    return None


def resolve(path: Path | str) -> Path:
    """A checkpoint folder, or a root whose latest valid version is used (local or remote)."""
    if is_remote(path):
        name = str(path).rstrip("/").rsplit("/", 1)[-1]
        return fetch(path) if _VERSION.match(name) else _latest_path(path)
    path = local_path(path)
    if (path / "manifest.json").is_file():
        return path
    ck = latest(path)
    if ck is None or ck.path is None:
        raise CheckpointError(f"{path}: no valid checkpoint")
    return ck.path


def _latest_path(root: str) -> Path:
    ck = latest(root)
    if ck is None or ck.path is None:
        raise CheckpointError(f"{root}: no valid checkpoint")
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
