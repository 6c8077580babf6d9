"""Calibrate the cost weight λ of ``argmax(score − λ·cost)`` to a traffic target.

Two kinds of target, as RouteLLM's ``calibrate_threshold`` does for its threshold:

* ``share``: at most ``max_share`` of requests go to models whose cost is above ``price``;
* ``budget``: the expected cost of 1,000 requests is at most ``budget_per_1k`` (card costs).

Both are computed from a prompt set scored by the policy (``[n_prompts, n_models]``): a data
set's train prompts, or the query embeddings the serving decisions store logged, re-scored by the
current checkpoint. The decision rule is :func:`cmr.decide.choose` (the router's own), applied to
all prompts at once (no per-model loops):

* share: the chosen model's cost never increases with λ (tie → cheaper), so each prompt has a
  critical λ from which it goes to a model priced ≤ ``price``. All critical λs are found by one
  vectorised bisection (every prompt at once), then the answer is an exact order statistic: the
  smallest λ that leaves at most ``floor(max_share·n)`` prompts above the price.
* budget: the mean chosen cost is non-increasing in λ; a bisection over λ (log-spaced) finds the
  smallest λ whose mean cost fits the budget.

The result is *applied* as a setting published in the state store (``cmr.published``: SQLite in
the serving state folder, or the cluster's PostgreSQL, which NOTIFYs every router replica on every
node); routers use it for requests that give no ``cost_weight``. A ``calibration.json`` left in
the state folder by an older install is moved into the store once (``applied``).
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cmr.errors import CMRError

#: where an older install kept the applied calibration (``$CMR_HOME/serve``): migrated into the store
CALIBRATION_FILE = "calibration.json"
#: the name of the applied calibration among the state store's published settings
SETTING = "calibration"
#: fewest prompts `cmr calibrate` trusts without --force: below it the held-out interval of a
#: share target is wider than most targets themselves
MIN_PROMPTS = 100
#: folds of the held-out check (each prompt is held out once)
HELD_OUT_FOLDS = 5


class CalibrationError(CMRError):
    """An impossible or malformed calibration target, or an unreadable calibration file."""


@dataclass
class CalibrationTarget:
    """What λ must achieve: ``kind`` is ``share`` (``max_share`` of requests above ``price`` at
    most) or ``budget`` (``budget_per_1k``: cost of 1,000 requests at most)."""

    kind: str
    max_share: float | None = None
    price: float | None = None
    budget_per_1k: float | None = None

    def validate(self) -> "CalibrationTarget":
        if self.kind == "share":
            if self.max_share is None or not (0.0 <= float(self.max_share) <= 1.0) or not math.isfinite(self.max_share):
                raise CalibrationError(f"field 'max_share': must be a fraction in [0, 1], got {self.max_share!r}")
            if self.price is None or not math.isfinite(self.price) or self.price < 0:
                raise CalibrationError(f"field 'price': must be a finite cost >= 0, got {self.price!r}")
        elif self.kind == "budget":
            if self.budget_per_1k is None or not math.isfinite(self.budget_per_1k) or self.budget_per_1k < 0:
                raise CalibrationError(f"field 'budget_per_1k': must be a finite cost >= 0, got {self.budget_per_1k!r}")
        else:
            raise CalibrationError(f"field 'kind': must be 'share' or 'budget', got {self.kind!r}")
        return self

    def describe(self) -> str:
        if self.kind == "share":
            return f"at most {100 * self.max_share:g}% of requests to models priced above {self.price:g}"
        return f"at most {self.budget_per_1k:g} per 1,000 requests"

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CalibrationTarget":
        try:
            return cls(**d).validate()
        except TypeError as e:
            raise CalibrationError(f"calibration target: {e}") from None


@dataclass
class Calibration:
    """A calibrated λ and how it was obtained (the file the router reads)."""

    cost_weight: float
    target: dict[str, Any] | None = None
    achieved: dict[str, float] = field(default_factory=dict)
    source: str = "manual"
    n_prompts: int = 0
    #: the target checked on prompts the λ was not fitted on (k-fold): measure, 95 % interval, n
    held_out: dict[str, Any] = field(default_factory=dict)
    checkpoint_version: int | None = None
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "calibration") -> "Calibration":
        if not isinstance(d, dict):
            raise CalibrationError(f"{where}: must be a JSON object")
        lam = d.get("cost_weight")
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
            raise CalibrationError(f"{where}: field 'cost_weight': must be a finite number >= 0, got {lam!r}")
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


# --------------------------------------------------------------------------------------------
# the decision rule over a prompt set
# --------------------------------------------------------------------------------------------


def _clean(scores: np.ndarray) -> np.ndarray:
    """Scores as float64 with non-finite entries ranked last (as the benchmarks do)."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2:
        raise CalibrationError(f"scores: expected a [prompts, models] matrix, got shape {s.shape}")
    fin = np.isfinite(s)
    if not fin.all():
        floor = float(s[fin].min()) - 1.0 if fin.any() else 0.0
        s = np.where(fin, s, floor)
    return s


def _lam_max(scores: np.ndarray, costs: np.ndarray) -> float:
    """A λ above which every prompt goes to a cheapest model: the largest score spread over the
    smallest gap between distinct costs (with margin)."""
    u = np.unique(costs)
    if len(u) < 2:
        return 1.0
    gap = float(np.diff(u).min())
    spread = float((scores.max(axis=1) - scores.min(axis=1)).max()) if scores.size else 0.0
    return 2.0 * (spread + 1e-9) / gap + 1.0


def chosen(scores: np.ndarray, costs: Sequence[float], lam: float | np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Chosen model index per prompt at ``lam`` (a scalar or one λ per prompt), by the router's rule."""
    from cmr.decide import choose

    return choose(_clean(scores), np.asarray(costs, dtype=np.float64), lam, mask)


def share_above(scores, costs, lam: float, price: float, mask=None) -> float:
    """Fraction of prompts routed to a model priced above ``price`` at λ = ``lam``."""
    c = np.asarray(costs, dtype=np.float64)
    return float((c[chosen(scores, c, lam, mask)] > price).mean()) if len(scores) else 0.0


def cost_per_1k(scores, costs, lam: float, mask=None) -> float:
    """Expected cost (card costs) of 1,000 prompts like these at λ = ``lam``."""
    c = np.asarray(costs, dtype=np.float64)
    return float(1000.0 * c[chosen(scores, c, lam, mask)].mean()) if len(scores) else 0.0


def curve(scores, costs, lams: Sequence[float] | None = None, points: int = 40) -> list[dict[str, float]]:
    """The quality / cost trade-off of the router's rule on a prompt set: per λ (``lams``, else 0
    and ``points - 1`` log-spaced values up to the λ where the cheapest model always wins), the
    predicted quality, the cost of 1,000 prompts and each model's share. What ``cmr calibrate``
    picks a point of; the console plots it."""
    s = _clean(scores)
    c = np.asarray(costs, dtype=np.float64)
    if lams is None:
        top = _lam_max(s, c) if len(s) else 1.0
        lams = [0.0, *np.geomspace(top * 1e-4, top, max(points - 1, 1)).tolist()]
    n, out = len(s), []
    for lam in sorted({float(x) for x in lams}):
        pick = chosen(s, c, lam) if n else np.zeros(0, dtype=int)
        out.append({"lambda": lam, "quality": float(s[np.arange(n), pick].mean()) if n else 0.0,
                    "cost_per_1k": float(1000.0 * c[pick].mean()) if n else 0.0,
                    "shares": (np.bincount(pick, minlength=len(c)) / max(n, 1)).tolist()})
    return out


def critical_lambdas(scores, costs, price: float, mask=None, iters: int = 60) -> np.ndarray:
    """Per prompt, a λ from which its choice costs ≤ ``price`` (0 when it already does at λ = 0,
    ``inf`` when no candidate is that cheap). One bisection runs for all prompts at once; the
    value returned is the upper end of each bracket, so the prompt is cheap at it."""
    s = _clean(scores)
    c = np.asarray(costs, dtype=np.float64)
    n = len(s)
    out = np.zeros(n)
    cheap_ok = np.broadcast_to((c <= price)[None, :], s.shape) if mask is None else (mask & (c <= price)[None, :])
    never = ~cheap_ok.any(axis=1)
    out[never] = np.inf
    expensive = (c[chosen(s, c, 0.0, mask)] > price) & ~never
    rows = np.flatnonzero(expensive)
    if rows.size == 0:
        return out
    sub, sm = s[rows], None if mask is None else mask[rows]
    lo = np.zeros(rows.size)
    hi = np.full(rows.size, _lam_max(sub, c))
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        cheap = c[chosen(sub, c, mid, sm)] <= price
        hi = np.where(cheap, mid, hi)
        lo = np.where(cheap, lo, mid)
    out[rows] = hi
    return out


def lambda_for_share(scores, costs, max_share: float, price: float, mask=None) -> tuple[float, float]:
    """Smallest λ that sends at most ``max_share`` of the prompts to models priced above
    ``price``; returns ``(λ, achieved share)``."""
    CalibrationTarget("share", max_share=max_share, price=price).validate()
    n = len(scores)
    if n == 0:
        raise CalibrationError("calibration: no prompts to calibrate on")
    crit = critical_lambdas(scores, costs, price, mask)
    allowed = int(math.floor(max_share * n + 1e-9))  # prompts that may stay above the price
    stuck = int(np.isinf(crit).sum())  # prompts with no candidate priced <= price: above it at any λ
    if stuck > allowed:
        cmin = float(np.min(costs))
        if mask is None or stuck == n:
            raise CalibrationError(f"field 'price': {price:g} is below every model's cost (cheapest {cmin:g}): no λ can meet the share")
        raise CalibrationError(f"field 'max_share': {max_share:g} is unreachable: {stuck} of {n} prompts have no candidate priced <= {price:g}")
    if allowed >= n:
        lam = 0.0
    else:
        lam = float(np.sort(crit)[n - allowed - 1])
    return lam, share_above(scores, costs, lam, price, mask)


def lambda_for_budget(scores, costs, budget_per_1k: float, mask=None, iters: int = 80) -> tuple[float, float]:
    """Smallest λ whose expected cost of 1,000 prompts is at most ``budget_per_1k``; returns
    ``(λ, achieved cost per 1,000)``."""
    CalibrationTarget("budget", budget_per_1k=budget_per_1k).validate()
    if len(scores) == 0:
        raise CalibrationError("calibration: no prompts to calibrate on")
    s = _clean(scores)
    c = np.asarray(costs, dtype=np.float64)
    at0 = cost_per_1k(s, c, 0.0, mask)
    if at0 <= budget_per_1k:
        return 0.0, at0
    hi = _lam_max(s, c)
    floor = cost_per_1k(s, c, hi, mask)
    if floor > budget_per_1k * (1 + 1e-12):
        raise CalibrationError(f"field 'budget_per_1k': {budget_per_1k:g} is below the cheapest routing's cost ({floor:.6g} per 1,000 requests)")
    # bisection on log λ: λ spans many orders of magnitude across hubs' cost units
    lo = max(hi * 1e-12, 1e-300)
    if cost_per_1k(s, c, lo, mask) <= budget_per_1k:
        return lo, cost_per_1k(s, c, lo, mask)
    for _ in range(iters):
        mid = math.sqrt(lo * hi)
        if cost_per_1k(s, c, mid, mask) <= budget_per_1k:
            hi = mid
        else:
            lo = mid
    return hi, cost_per_1k(s, c, hi, mask)


def calibrate(scores, costs, target: CalibrationTarget, mask=None, source: str = "prompts", checkpoint_version: int | None = None) -> Calibration:
    """λ for ``target`` on the scored prompt set ``scores`` (``[n_prompts, n_models]``) with
    per-model ``costs``. Both measures are recorded at that λ."""
    target.validate()
    c = np.asarray(costs, dtype=np.float64)
    if np.asarray(scores).ndim != 2 or np.asarray(scores).shape[1] != len(c):
        raise CalibrationError(f"scores: expected [prompts, {len(c)} models], got shape {np.asarray(scores).shape}")
    if not np.isfinite(c).all() or (c < 0).any():
        raise CalibrationError("costs: every model cost must be a finite number >= 0")
    lam = _fit_lambda(scores, c, target, mask)
    achieved = {"cost_per_1k": cost_per_1k(scores, c, lam, mask)}
    if target.price is not None:
        achieved["share_above_price"] = share_above(scores, c, lam, target.price, mask)
    return Calibration(cost_weight=float(lam), target=target.to_dict(), achieved=achieved, source=source,
                       n_prompts=int(len(scores)), checkpoint_version=checkpoint_version,
                       held_out=held_out_check(scores, c, target, mask))


def _fit_lambda(scores, costs: np.ndarray, target: CalibrationTarget, mask=None) -> float:
    if target.kind == "share":
        return lambda_for_share(scores, costs, target.max_share, target.price, mask)[0]
    return lambda_for_budget(scores, costs, target.budget_per_1k, mask)[0]


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion ``k / n`` (sound at 0 and with few prompts)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    mid = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, mid - half), min(1.0, mid + half)


def held_out_check(scores, costs: np.ndarray, target: CalibrationTarget, mask=None, folds: int = HELD_OUT_FOLDS, seed: int = 0) -> dict[str, Any]:
    """The target measured on prompts λ was not fitted on: k-fold, each prompt held out once and
    routed with the λ fitted on the other folds. Share targets: the held-out share with its 95 %
    Wilson interval; budget targets: the held-out cost per 1,000 with a normal 95 % interval.
    ``met`` says whether the interval's upper end is within the target (empty dict: too few
    prompts to fold)."""
    n = len(scores)
    folds = min(folds, n)
    if folds < 2:
        return {}
    s, m = _clean(scores), None if mask is None else np.asarray(mask)
    fold = np.random.default_rng(seed).permutation(n) % folds
    cost = np.full(n, np.nan)
    for f in range(folds):
        fit, out = fold != f, fold == f
        try:
            lam = _fit_lambda(s[fit], costs, target, None if m is None else m[fit])
        except CalibrationError:
            continue  # this fold's part cannot meet the target at all: its prompts stay unmeasured
        cost[out] = costs[chosen(s[out], costs, lam, None if m is None else m[out])]
    done = ~np.isnan(cost)
    k = int(done.sum())
    if target.kind == "share":
        above = int((cost[done] > target.price).sum())
        lo, hi = wilson_interval(above, k)
        return {"n": k, "share_above_price": above / k if k else None, "interval": [lo, hi], "met": bool(k) and hi <= target.max_share}
    per_1k = 1000.0 * cost[done]
    mean = float(per_1k.mean()) if k else None
    half = 1.96 * float(per_1k.std(ddof=1)) / math.sqrt(k) if k > 1 else math.inf
    return {"n": k, "cost_per_1k": mean, "interval": [mean - half, mean + half] if k else None, "met": bool(k) and mean + half <= target.budget_per_1k}


# --------------------------------------------------------------------------------------------
# prompt sets
# --------------------------------------------------------------------------------------------


def score_prompts(policy, emb: np.ndarray, cards: Sequence, batch: int = 1024) -> np.ndarray:
    """``policy.score`` over ``emb`` in batches: ``[n_prompts, n_cards]``."""
    if len(emb) == 0:
        return np.zeros((0, len(cards)))
    return np.concatenate([np.asarray(policy.score(emb[i : i + batch], cards), dtype=np.float64) for i in range(0, len(emb), batch)])


def logged_embeddings(db_path: Path | str, limit: int | None = None) -> np.ndarray:
    """Query embeddings of the latest ``limit`` decisions in the serving decisions store
    (``services/store.py`` writes them: ``decisions.embedding`` is float32 bytes). Read-only."""
    p = Path(db_path)
    if not p.is_file():
        raise CalibrationError(f"{p}: no decisions store here (has the router served requests?)")
    db = sqlite3.connect(f"file:{p}?mode=ro", uri=True, timeout=30)
    try:
        sql = "SELECT embedding FROM decisions WHERE embedding IS NOT NULL ORDER BY created DESC"
        rows = db.execute(sql + (" LIMIT ?" if limit else ""), (limit,) if limit else ()).fetchall()
    except sqlite3.DatabaseError as e:
        raise CalibrationError(f"{p}: not a decisions store ({e})") from None
    finally:
        db.close()
    if not rows:
        raise CalibrationError(f"{p}: no logged decisions with query embeddings")
    return np.stack([np.frombuffer(r[0], dtype=np.float32) for r in rows])


# --------------------------------------------------------------------------------------------
# the file the router reads
# --------------------------------------------------------------------------------------------


def write_calibration(path: Path | str, calib: Calibration) -> Path:
    """Write ``calib`` as JSON atomically (temp file in the same folder, fsync, rename): a router
    polling the file sees the old or the new λ, never half a file."""
    from cmr.bench.common import write_text  # the one atomic writer (temp + fsync + rename)

    from cmr.state import private_dir

    path = Path(path)
    private_dir(path.parent, own=False)  # a folder made here is 0700; the temp file is 0600
    write_text(path, json.dumps(calib.to_dict(), indent=2, allow_nan=False) + "\n")
    return path


def read_calibration(path: Path | str) -> Calibration | None:
    """The calibration at ``path`` (None when there is no file); a malformed one raises."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CalibrationError(f"{path}: invalid JSON ({e})") from None
    return Calibration.from_dict(d, str(path))


def apply(store, calib: Calibration) -> Calibration:
    """Publish ``calib`` as the λ every router uses (``store``: a ``PublishedStoreProtocol``).
    Checked first: a bad value raises ``CalibrationError`` naming the field, and nothing is stored."""
    d = calib.to_dict()
    checked = Calibration.from_dict(d, "calibration")
    try:
        store.put_setting(SETTING, d)
    except ValueError as e:  # not JSON (NaN in a field)
        raise CalibrationError(f"calibration: {e}") from None
    return checked


def applied(store, legacy_dir: Path | str | None = None) -> Calibration | None:
    """The calibration applied in ``store`` (None: none). With ``legacy_dir`` and nothing in the
    store, an older install's ``calibration.json`` there is stored and renamed ``.migrated`` (once:
    afterwards the store is the only place read). A malformed stored value raises."""
    d = store.setting(SETTING)
    if d is None and legacy_dir is not None:
        old = Path(legacy_dir) / CALIBRATION_FILE
        calib = read_calibration(old)
        if calib is None:
            return None
        apply(store, calib)
        old.replace(old.with_name(CALIBRATION_FILE + ".migrated"))
        return calib
    return None if d is None else Calibration.from_dict(d, f"state store setting {SETTING!r}")


# --------------------------------------------------------------------------------------------
# `cmr calibrate`
# --------------------------------------------------------------------------------------------


def add_arguments(p) -> None:
    """Options of ``cmr calibrate``."""
    t = p.add_argument_group("target (one of)")
    t.add_argument("--max-share", type=float, metavar="X", help="at most this fraction of requests to models priced above --price")
    t.add_argument("--price", type=float, metavar="P", help="the price line of --max-share")
    t.add_argument("--budget", type=float, metavar="B", help="at most B (card cost units) per 1,000 requests")
    t.add_argument("--lambda", dest="lam", type=float, metavar="λ", help="no target: set this λ directly")
    t.add_argument("--from-file", metavar="FILE.json", help="no target: take λ from a calibration or `cmr tune llm` chosen file")
    s = p.add_argument_group("prompt set (one of)")
    s.add_argument("--logged", action="store_true", help="the query embeddings in $CMR_HOME/serve/decisions.sqlite, re-scored by the serving checkpoint")
    s.add_argument("--data", help="a data set's train prompts (a CMRBench folder, an outcome-matrix folder or a set name such as routerbench)")
    p.add_argument("--checkpoint", help="checkpoint (root or version folder) that scores the prompts (default with --logged: the serving one)")
    p.add_argument("--policy", help="with --data and no --checkpoint: fit this policy on the train split; with --logged: the served policy's checkpoints")
    p.add_argument("--set", dest="sets", action="extend", nargs="+", default=[], metavar="KEY=VALUE", help="policy config (with --policy)")
    p.add_argument("--limit", type=int, default=None, help="use at most this many prompts (the latest, with --logged)")
    p.add_argument("--home", help="state folder of the served app (default CMR_HOME)")
    p.add_argument("--apply", action="store_true", help="publish the λ in the state store: every running router replica applies it")
    p.add_argument("--store", help="the served app's state store: a postgresql://… DSN, or 'sqlite' (default CMR_STORE, else the SQLite files under --home)")
    p.add_argument("--min-prompts", type=int, default=MIN_PROMPTS, metavar="N", help=f"refuse a target computed from fewer prompts, unless --force (default {MIN_PROMPTS})")
    p.add_argument("--force", action="store_true", help="apply even below --min-prompts or when the held-out check misses the target")
    p.add_argument("--out", help="also write the calibration file here")


def _target(args) -> CalibrationTarget | None:
    given = [n for n, v in (("--max-share", args.max_share), ("--budget", args.budget), ("--lambda", args.lam), ("--from-file", args.from_file)) if v is not None]
    if len(given) != 1:
        raise CalibrationError("give exactly one of --max-share (with --price), --budget, --lambda, --from-file" + (f" (got {', '.join(given)})" if given else ""))
    if args.max_share is not None:
        if args.price is None:
            raise CalibrationError("--max-share needs --price (the price line)")
        return CalibrationTarget("share", max_share=args.max_share, price=args.price).validate()
    if args.price is not None and args.budget is not None:
        return CalibrationTarget("budget", budget_per_1k=args.budget, price=args.price).validate()
    if args.budget is not None:
        return CalibrationTarget("budget", budget_per_1k=args.budget).validate()
    return None


def _prompt_set(args, serve_dir: Path):
    """(scores [n, m], costs [m], source, checkpoint version) for the chosen prompt set."""
    from cmr import checkpoint
    from cmr.encoders import default_encoder

    encoder = default_encoder()
    version = None
    if args.logged:
        emb = logged_embeddings(serve_dir / "decisions.sqlite", args.limit)
        from cmr.hub import HubStore, ModelHub

        hub_path = serve_dir / "hub.sqlite"
        if not hub_path.is_file():
            raise CalibrationError(f"{hub_path}: no served hub here")
        store = HubStore(hub_path)
        try:
            cards = ModelHub(store).list()
        finally:
            store.close()
        ck_path = Path(args.checkpoint) if args.checkpoint else None
        if ck_path is None:
            roots = sorted(p for p in (serve_dir / "checkpoints").glob("*") if p.is_dir()) if (serve_dir / "checkpoints").is_dir() else []
            if args.policy:
                roots = [r for r in roots if r.name == args.policy]
            if len(roots) != 1:
                raise CalibrationError(f"{serve_dir / 'checkpoints'}: give --policy or --checkpoint (found {', '.join(r.name for r in roots) or 'none'})")
            ck_path = roots[0]
        ck = checkpoint.open_checkpoint(checkpoint.resolve(ck_path))
        version = ck.version
        policy = checkpoint.load_policy(ck.path, encoder=encoder)
        policy.add_models(cards)
        return score_prompts(policy, emb, cards), np.array([c.cost for c in cards]), f"logged:{serve_dir / 'decisions.sqlite'}", version
    from cmr.bench import common
    from cmr.data.cmrbench import is_cmrbench_dir

    p = Path(args.data)
    if is_cmrbench_dir(p) or is_cmrbench_dir(p / "cmrbench") or args.data == "cmrbench":
        from cmr.data import load_cmrbench

        bench = load_cmrbench(common.resolve_cmrbench_dir(None if args.data == "cmrbench" else args.data))
        cards = list(bench.cards)
        from cmr.data.examples import Examples

        train = Examples.concat([e.train for e in bench.experiences])
    else:
        from cmr.data.outcomes import load_outcomes

        data = load_outcomes(common.resolve_outcome_dir(args.data))
        cards, train = list(data.cards), data.train
    if args.limit:
        train = train.subset(np.arange(min(args.limit, len(train))))
    if args.checkpoint:
        ck = checkpoint.open_checkpoint(checkpoint.resolve(args.checkpoint))
        version = ck.version
        policy = checkpoint.load_policy(ck.path, encoder=encoder)
        common.embed(policy.encoder, [train])  # as the checkpoint embeds (MiniLM, or fused with its TF-IDF)
    elif args.policy:
        from cmr.policies.registry import make_policy

        try:
            policy = make_policy(args.policy, encoder=encoder, config=common.parse_sets(args.sets) or None)
        except (TypeError, ValueError) as e:
            raise CalibrationError(f"--set for policy {args.policy!r}: {e}") from None
        from cmr.continual.learner import Learner

        common.embed(encoder, [train])
        policy.add_models(cards)
        Learner(policy).fit(train, cards)
    else:
        raise CalibrationError("--data needs --checkpoint (a trained policy) or --policy (fit on the train split)")
    policy.add_models(cards)
    return score_prompts(policy, train.emb, cards), np.array([c.cost for c in cards]), f"data:{args.data} (train)", version


def _describe_held_out(h: dict[str, Any]) -> str:
    lo, hi = h["interval"] if h.get("interval") else (math.nan, math.nan)
    if "share_above_price" in h:
        return f"share above price {h['share_above_price']:.3g} (95% interval {lo:.3g}–{hi:.3g}) on {h['n']} prompts"
    return f"cost per 1,000 {h['cost_per_1k']:.4g} (95% interval {lo:.4g}–{hi:.4g}) on {h['n']} prompts"


def doubts(calib: Calibration, target: CalibrationTarget, min_prompts: int = MIN_PROMPTS) -> str | None:
    """Why the calibration should not be trusted as it is (None: no doubt): too few prompts, or
    the target missed on held-out prompts. ``cmr calibrate`` and the console refuse it unless forced."""
    if calib.n_prompts < min_prompts:
        held = f", held out: {_describe_held_out(calib.held_out)}" if calib.held_out else ""
        return f"only {calib.n_prompts} prompts (minimum {min_prompts}{held})"
    if calib.held_out and not calib.held_out.get("met"):
        return f"the target is not met on held-out prompts: {_describe_held_out(calib.held_out)}, target {target.describe()}"
    return None


def run(args) -> int:
    """``cmr calibrate``: compute (or set) λ and write the calibration file."""
    from cmr import constants

    if args.limit is not None and args.limit < 1:
        raise CalibrationError("--limit: must be >= 1")
    if args.min_prompts < 1:
        raise CalibrationError("--min-prompts: must be >= 1")
    target = _target(args)
    from cmr.state import check_store

    try:
        dsn = check_store(args.store if args.store is not None else constants.store_dsn())
    except ValueError as e:
        raise CalibrationError(f"--store: {e}") from None
    home = Path(args.home) if args.home else constants.cmr_home()
    serve_dir = home / "serve"
    if target is None:
        if args.logged or args.data:
            raise CalibrationError("--lambda/--from-file set λ directly: drop --logged/--data")
        if args.from_file:
            src = Path(args.from_file)
            calib = read_calibration(src)
            if calib is None:
                raise CalibrationError(f"--from-file {src}: file not found")
            calib.source = f"file:{src}"
        else:
            calib = Calibration(cost_weight=args.lam, source="manual")
            Calibration.from_dict(calib.to_dict(), "--lambda")  # validates λ
    else:
        if bool(args.logged) == bool(args.data):
            raise CalibrationError("give one prompt set: --logged or --data")
        scores, costs, source, version = _prompt_set(args, serve_dir)
        calib = calibrate(scores, costs, target, source=source, checkpoint_version=version)
        doubt = doubts(calib, target, args.min_prompts)
        if doubt and not args.force:
            raise CalibrationError(f"calibration: {doubt}; nothing written (calibrate on more traffic, or pass --force)")
    written, where = [], None
    if args.out:
        written.append(write_calibration(Path(args.out), calib))
    if args.apply:
        from cmr.published import open_published_store
        from cmr.state import redact

        store = open_published_store(dsn, serve_dir / "published.sqlite")
        try:
            apply(store, calib)
        finally:
            store.close()
        where = f"applied: state store {redact(dsn) if dsn else serve_dir / 'published.sqlite'}"
    ach = ", ".join(f"{k} {v:.4g}" for k, v in calib.achieved.items())
    what = CalibrationTarget.from_dict(calib.target).describe() if calib.target else calib.source
    print(f"λ = {calib.cost_weight:.6g} ({what}; {calib.n_prompts} prompts{'; ' + ach if ach else ''})")
    if calib.held_out:
        print("held out: " + _describe_held_out(calib.held_out))
    if target is not None and (doubt := doubts(calib, target, args.min_prompts)):
        print(f"warning: {doubt} (applied anyway: --force)")
    for w in written:
        print(f"written: {w}")
    if where:
        print(where)
    if not written and not where:
        print("(not applied: add --apply to set it on the routers, or --out FILE)")
    return 0
