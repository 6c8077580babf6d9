"""What both sweeps share: storage path, precomputed embeddings, the Tuner run (on cmr.raycluster)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from cmr import constants
from cmr.errors import CMRError


class TuneError(CMRError):
    """A bad ``cmr tune`` option (names it)."""


def storage_path(arg: str | None) -> str:
    """Tune ``RunConfig.storage_path``: ``--storage`` (a local folder or a URI such as
    ``s3://bucket/cmr`` on a cluster), default ``$CMR_HOME/tune``. Local paths are made absolute."""
    if arg and "://" in arg:
        return arg
    return str((Path(arg) if arg else constants.cmr_home() / "tune").expanduser().resolve())


def local_dir(storage: str, name: str) -> Path | None:
    """The experiment folder when the storage is local (None for a URI)."""
    return None if "://" in storage else Path(storage) / name


class RecordingEncoder:
    """Wraps the real (cached) encoder and keeps every text → vector it produced, so trials can be
    handed the exact embeddings a policy asks for (card texts) without loading MiniLM again."""

    def __init__(self, inner):
        self.inner, self.name, self.dim = inner, inner.name, inner.dim
        self.table: dict[str, np.ndarray] = {}

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        v = self.inner.encode(list(texts))
        self.table.update(zip(texts, v))
        return v


class PrecomputedEncoder:
    """Answers from a table of real MiniLM embeddings computed by the driver; on a text it has
    not seen it loads the real cached encoder (slow, but never wrong)."""

    def __init__(self, table: dict[str, np.ndarray], name: str, dim: int):
        self.table, self.name, self.dim = table, name, dim
        self._real = None

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        missing = [t for t in texts if t not in self.table]
        if missing:
            if self._real is None:
                from cmr.encoders import default_encoder

                self._real = default_encoder()
            self.table.update(zip(missing, self._real.encode(missing)))
        if not len(texts):
            return np.zeros((0, self.dim), np.float32)
        return np.stack([self.table[t] for t in texts]).astype(np.float32, copy=False)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x and abs(x) != float("inf")


def final_only_optuna(metrics: list[str], modes: list[str], seed: int, points: list[dict[str, Any]] | None):
    """``OptunaSearch`` (multi-objective, TPE) that tells Optuna only about trials that reported
    every objective: the objectives are NaN until the last experience (Tune wants every metric in
    every result), so a trial ASHA stopped early is *pruned* for Optuna instead of being scored on
    fewer experiences."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    class _FinalOnly(OptunaSearch):
        def on_trial_complete(self, trial_id, result=None, error=False):
            if result is not None and any(not _finite(result.get(m)) for m in metrics):
                result = None  # → PRUNED (no error) in OptunaSearch
            super().on_trial_complete(trial_id, result, error)

    return _FinalOnly(metric=metrics, mode=modes, sampler=optuna.samplers.TPESampler(seed=seed), points_to_evaluate=points)


def run_tuner(trainable: Callable, space: dict[str, Any], *, objectives: list[str], modes: list[str], asha_metric: str | None,
              asha_mode: str, max_t: int, trials: int, concurrent: int, storage: str, name: str, seed: int,
              points: list[dict[str, Any]] | None, cpus_per_trial: float = 1.0, address: str | None = None, num_cpus: int | None = None):
    """Run the sweep on Ray (joined at ``address`` or started with ``num_cpus``: ``cmr.raycluster``);
    returns the ``ResultGrid``. ASHA stops trials by ``asha_metric`` at each iteration (grace
    period 1); Optuna proposes configs for all objectives."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from cmr import raycluster

    sched = ASHAScheduler(metric=asha_metric, mode=asha_mode, time_attr="training_iteration", max_t=max_t, grace_period=1, reduction_factor=2) \
        if asha_metric and max_t > 1 else FIFOScheduler()
    with raycluster.running(address, num_cpus):  # before the Tuner: it would start a Ray of its own
        return tune.Tuner(
            tune.with_resources(trainable, {"cpu": cpus_per_trial}),
            param_space=space,
            tune_config=tune.TuneConfig(search_alg=final_only_optuna(objectives, modes, seed, points), scheduler=sched,
                                        num_samples=trials, max_concurrent_trials=concurrent, reuse_actors=True),
            run_config=tune.RunConfig(name=name, storage_path=storage, verbose=0),
        ).fit()


def trial_rows(grid, keys: Sequence[str]) -> list[dict[str, Any]]:
    """One row per trial: its config, last result's ``keys``, iterations done and status."""
    rows = []
    for r in grid:
        m = r.metrics or {}
        rows.append({"trial": m.get("trial_id") or (r.path.rsplit("/", 1)[-1] if r.path else "?"), "config": dict(r.config or {}),
                     "iterations": m.get("training_iteration", 0), "error": None if r.error is None else str(r.error).splitlines()[0][:200],
                     **{k: (m.get(k) if m.get(k) is None or isinstance(m.get(k), str) or _finite(m.get(k)) else None) for k in keys}})
    return rows
