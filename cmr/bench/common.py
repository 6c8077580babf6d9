"""What every benchmark protocol shares: arguments, data-folder resolution, policy construction,
embedding, output folders, run metadata and atomic writes of report.json / report.md / PNG.

Cheap to import (the CLI imports every protocol module to build its parser): numpy, torch,
matplotlib and the encoder are imported inside the functions that need them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time
from dataclasses import fields
from pathlib import Path
from typing import Any, Iterable, Sequence

from cmr import constants
from cmr.errors import CMRError, DataError


class BenchConfigError(CMRError):
    """A bad benchmark option (``--set``, ``--config``, ``--unseen`` ...): names the option."""


# --------------------------------------------------------------------------------------------
# arguments
# --------------------------------------------------------------------------------------------


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Options every protocol takes: policy, data, output folder, seed and policy config."""
    parser.add_argument("--policy", required=True, help="registered policy name (see `cmr policies`)")
    parser.add_argument("--data", default=None, help="data folder (default: under CMR_DATA / the shared data root)")
    parser.add_argument("--out", default=None, help="output folder (default: runs/<protocol>-<dataset>-<policy>-<UTC time>)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the protocol and, unless configured, the policy")
    parser.add_argument(
        "--set",
        dest="sets",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="policy config override, repeatable; VALUE is parsed as JSON when it can be (3, 0.1, true, [1,2])",
    )
    parser.add_argument("--config", default=None, metavar="FILE.json", help="policy config as a JSON object (--set wins)")


def add_embedding_argument(parser: argparse.ArgumentParser) -> None:
    """``--embedding``: what texts are embedded with (``cmr.encoders.lexical.EMBEDDINGS``)."""
    from cmr.encoders.lexical import EMBEDDINGS

    parser.add_argument("--embedding", choices=EMBEDDINGS, default="minilm",
                        help="minilm (default: the policy's own figures): MiniLM alone; minilm+tfidf: MiniLM fused with TF-IDF "
                             "fitted on the train prompts and cards (saved with a checkpoint, as the router runs it); auto: what "
                             "the router serves by default, fused where those texts are enough to fit it")


def parse_sets(items: Sequence[str]) -> dict[str, Any]:
    """``["k=3", "name=abc"]`` -> ``{"k": 3, "name": "abc"}``; values are JSON when they parse."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise BenchConfigError(f"--set {item!r}: expected KEY=VALUE")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw  # a bare word is a string
    return out


def load_config_file(path: str | None) -> dict[str, Any]:
    """The JSON object in ``--config FILE`` (empty when no file is given)."""
    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        raise BenchConfigError(f"--config {path}: file not found")
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise BenchConfigError(f"--config {path}: invalid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(obj, dict):
        raise BenchConfigError(f"--config {path}: must hold a JSON object")
    return obj


def policy_spec(args: argparse.Namespace):
    """``(policy class, config)`` from ``--policy``, the ``--config`` file, then ``--set``
    overrides; ``--seed`` fills the config's ``seed`` unless the config sets it. Cheap: run it
    before loading data or the encoder so that a typo fails at once."""
    from cmr.policies import policy_class

    cls = policy_class(args.policy)  # UnknownPolicyError is a CMRError: one line, exit 2
    cfg = {**load_config_file(getattr(args, "config", None)), **parse_sets(getattr(args, "sets", []) or [])}
    if "seed" in {f.name for f in fields(cls.Config)} and "seed" not in cfg:
        cfg["seed"] = args.seed
    try:
        config = cls.Config.from_dict(cfg)
    except (TypeError, ValueError) as e:
        raise BenchConfigError(f"--set/--config for policy {args.policy!r}: {e}") from None
    return cls, config


def build_policy(args: argparse.Namespace, encoder):
    """The configured policy (see ``policy_spec``) with ``encoder``."""
    cls, config = policy_spec(args)
    return cls(encoder=encoder, config=config)


# --------------------------------------------------------------------------------------------
# data folders
# --------------------------------------------------------------------------------------------


def resolve_cmrbench_dir(arg: str | None) -> Path:
    """``--data`` for the CMRBench format: a CMRBench folder, or a folder holding ``cmrbench/``
    (e.g. the data root); default ``<data_root>/cmrbench``."""
    from cmr.data.cmrbench import is_cmrbench_dir

    root = Path(arg) if arg else constants.data_root() / "cmrbench"
    if is_cmrbench_dir(root):
        return root
    if is_cmrbench_dir(root / "cmrbench"):
        return root / "cmrbench"
    raise DataError(root, None, None, "not a CMRBench folder (no hub.jsonl here or in cmrbench/ under it)")


def resolve_outcome_dir(arg: str | None) -> Path:
    """``--data`` for outcome matrices: a folder with outcomes.csv, or a set name such as
    ``routerbench`` looked up under ``<data_root>/routing/``."""
    from cmr.data.outcomes import is_outcome_dir

    if not arg:
        raise BenchConfigError("--data: give an outcome-matrix folder or a set name (e.g. routerbench)")
    p = Path(arg)
    for cand in (p, constants.data_root() / "routing" / arg, constants.data_root() / arg):
        if is_outcome_dir(cand):
            return cand
    raise DataError(p, None, None, f"not an outcome-matrix folder (no outcomes.csv), nor a set under {constants.data_root() / 'routing'}")


# --------------------------------------------------------------------------------------------
# embedding, progress
# --------------------------------------------------------------------------------------------


def progress(iterable: Iterable | None = None, **kw):
    """A tqdm bar on stderr, off when ``CMR_NO_PROGRESS=1``."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not constants.progress_enabled(), leave=False, **kw)


def encode(encoder, texts: Sequence[str], desc: str = "embed", chunk: int = 2048):
    """``encoder.encode(texts)`` in chunks of ``chunk`` texts, with a progress bar."""
    import numpy as np

    vecs = [np.zeros((0, encoder.dim), np.float32)]
    with progress(total=len(texts), desc=desc, unit="text") as bar:
        for i in range(0, len(texts), chunk):
            vecs.append(encoder.encode(texts[i : i + chunk]))
            bar.update(len(texts[i : i + chunk]))
    return np.concatenate(vecs)


def fitted_encoder(args: argparse.Namespace, train_texts: Sequence[str], cards: Sequence = (), labelled: bool = True):
    """The encoder of ``--embedding`` over the cached MiniLM, fitted (where it needs fitting) on
    ``train_texts`` and the card texts: the same call as ``cmr train`` and the router's first start
    (``labelled=False``: outcome rows, where ``auto`` stays dense; see ``fit_encoder``)."""
    from cmr.encoders import default_encoder
    from cmr.encoders.lexical import fit_encoder

    return fit_encoder(getattr(args, "embedding", "minilm"), default_encoder(), [*train_texts, *(c.text() for c in cards)],
                       labelled=labelled)


def embed(encoder, parts: Sequence, chunk: int = 2048) -> None:
    """Set ``emb`` on each ``Examples`` in ``parts`` (the persistent cache makes repeats instant)."""
    todo = [p for p in parts if p.emb is None]
    texts = [t for p in todo for t in p.texts]
    if not texts:
        return
    allv = encode(encoder, texts, chunk=chunk)
    at = 0
    for p in todo:
        p.emb = allv[at : at + len(p)]
        at += len(p)


class _ChunkedEncoder:
    """An encoder that passes every call through :func:`encode` (chunks and a progress bar)."""

    def __init__(self, inner, desc: str, chunk: int):
        self.inner, self.desc, self.chunk = inner, desc, chunk
        self.name, self.dim = inner.name, inner.dim

    def encode(self, texts: Sequence[str]):
        return encode(self.inner, list(texts), self.desc, self.chunk)


def embed_cards(policy, cards: Sequence, chunk: int = 256) -> float:
    """Embed ``cards`` up front exactly as ``policy`` will (a fresh policy of its class and config
    takes them through ``add_models`` on the same encoder), in chunks with a progress bar; returns
    the seconds spent. The encoder's persistent cache then answers the policy's own embedding of
    them, so the protocol's training clock measures training, not card encoding."""
    if policy.encoder is None or not cards:
        return 0.0
    t0 = time.perf_counter()
    type(policy)(encoder=_ChunkedEncoder(policy.encoder, "embed cards", chunk), config=policy.config).add_models(list(cards))
    return time.perf_counter() - t0


def reveal_if_needed(policy, data) -> None:
    """Evaluation-only policies (the oracle) are shown the truth of ``data`` before scoring it."""
    if getattr(policy, "needs_truth", False):
        policy.reveal(data)


def choice_line(choice: dict[str, Any]) -> str:
    """One line of what a self-configuring policy chose (``RoutingPolicy.describe``) and why."""
    means = "  ".join(f"{n} {v:.3f}" for n, v in choice.get("mean", {}).items())
    return f"chose {choice.get('chosen')}: {choice.get('why', '')}" + (f"; {means}" if means else "")


def check_scores(scores, n_rows: int, n_cols: int, policy_name: str):
    """A policy's score matrix must be ``[n_rows, n_cols]``; anything else is a policy bug."""
    import numpy as np

    s = np.asarray(scores)
    if s.shape != (n_rows, n_cols):
        raise RuntimeError(f"policy {policy_name!r} returned scores of shape {s.shape}, expected {(n_rows, n_cols)}")
    return s


# --------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------


def utc_stamp() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


def out_dir(arg: str | None, protocol: str, dataset: str, policy: str, tag: str = "") -> Path:
    """``--out`` or ``runs/<protocol>-<dataset>-<policy>[-tag]-<UTC timestamp>``; created."""
    if arg:
        p = Path(arg)
    else:
        name = "-".join(x for x in (protocol, dataset, policy, tag, utc_stamp()) if x)
        p = Path("runs") / name
    p.mkdir(parents=True, exist_ok=True)
    return p


def _atomic_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_text(path: Path, text: str) -> None:
    """Write a text file atomically (temp file in the same folder + ``os.replace``)."""
    _atomic_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj: Any) -> None:
    """Write strict JSON atomically (NaN is refused: callers turn it into null)."""
    write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def write_figure(path: Path, fig) -> None:
    """Save a matplotlib figure as PNG atomically, then close it."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    _atomic_bytes(path, buf.getvalue())


def git_commit() -> str | None:
    """The repository's HEAD commit (None outside a git checkout)."""
    try:
        r = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=constants.REPO_ROOT, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() or None if r.returncode == 0 else None


def run_info() -> dict[str, Any]:
    """Where and when a number was measured."""
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            # the CPUs this process may use (a container may see more cores than it gets)
            "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        },
        "git_commit": git_commit(),
    }


def fmt(x: Any, nd: int = 3) -> str:
    """A number for report tables (``—`` for None / NaN)."""
    if x is None:
        return "—"
    if isinstance(x, float):
        if x != x:
            return "—"
        return f"{x:.{nd}f}"
    return str(x)
