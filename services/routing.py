"""The router's state and decision path, without Ray: the Serve deployment wraps this.

``RouterCore`` holds the live hub (SQLite), the FAISS index of card embeddings, the current
policy checkpoint and the decision store. A batch of queries is routed as: encode (once, batched)
→ candidates (the live hub, or its servable part, narrowed by the request's filters and, when
``retrieve_k`` > 0, by FAISS) → ``policy.score`` → ``cmr.decide.decide`` → decisions recorded.

Concurrency: the policy reference is swapped atomically under ``_lock``; a batch takes its
snapshot (policy, version, card table) under the lock and scores outside it, so a checkpoint
swap never interrupts or fails a batch in flight.
"""

from __future__ import annotations

import fcntl
import logging
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from cmr import checkpoint
from cmr.data.cmrbench import Experience
from cmr.decide import Filters, decide
from cmr.errors import CMRError, ConfigError, HubError
from cmr.hub import ModelHub
from cmr.state import private_file
from cmr.policies import make_policy, policy_class
from cmr.types import Decision, ModelCard
from services.config import AppArgs
from cmr.published import Published, load_served, open_publication, publish
from services.store import open_decisions, open_hub, open_published

log = logging.getLogger("cmr.serve.router")


class NoCandidateError(CMRError):
    """The request's filters leave no model to route to."""


@dataclass
class RouteRequest:
    """One routing question: the query text, the cost weight λ, filters, decision size."""

    query: str
    #: None: the router's default (the calibrated λ, see ``RouterCore.check_calibration``)
    lam: float | None = None
    filters: Filters = field(default_factory=Filters)
    k: int = 3
    servable_only: bool = False
    record: bool = True
    #: who asked (API key id, tenant): recorded with the decision, so feedback can be checked
    key_id: str | None = None
    tenant: str | None = None
    #: the request's task or category (``RoutingOptions.task``), for policies with per-task priors
    task: str | None = None

    def group_key(self) -> tuple:
        f = self.filters
        return (self.servable_only, tuple(f.domains or ()) if f.domains is not None else None,
                tuple(f.families or ()) if f.families is not None else None, f.max_cost,
                tuple(f.allow) if f.allow is not None else None, tuple(f.deny))


@dataclass(frozen=True)
class _Table:
    """Vectorised view of the live cards: filters become numpy masks, not loops over models."""

    cards: tuple[ModelCard, ...]
    pos: dict[str, int]
    costs: np.ndarray
    domains: np.ndarray
    families: np.ndarray
    servable: np.ndarray
    emb: np.ndarray

    def mask(self, req: RouteRequest) -> np.ndarray:
        f = req.filters
        keep = self.servable.copy() if req.servable_only else np.ones(len(self.cards), dtype=bool)
        if f.domains is not None:
            keep &= np.isin(self.domains, np.asarray(f.domains, dtype=object))
        if f.families is not None:
            keep &= np.isin(self.families, np.asarray(f.families, dtype=object))
        if f.max_cost is not None:
            keep &= self.costs <= f.max_cost
        if f.allow is not None:
            allow = np.zeros(len(self.cards), dtype=bool)
            allow[[self.pos[m] for m in f.allow if m in self.pos]] = True
            keep &= allow
        if f.deny:
            keep[[self.pos[m] for m in f.deny if m in self.pos]] = False
        return keep


def _build_table(cards: Sequence[ModelCard], emb: np.ndarray) -> _Table:
    return _Table(
        cards=tuple(cards),
        pos={c.id: i for i, c in enumerate(cards)},
        costs=np.fromiter((c.cost for c in cards), np.float64, len(cards)),
        domains=np.array([c.domain or "" for c in cards], dtype=object),
        families=np.array([c.family or "" for c in cards], dtype=object),
        servable=np.fromiter((bool(c.backend.get("engine")) for c in cards), bool, len(cards)),
        emb=emb,
    )


@contextmanager
def _file_lock(path: Path):
    """Inter-process lock: first start (seed, train) happens once even with several replicas."""
    with open(private_file(path), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def checkpoint_root(args: AppArgs) -> Path | str:
    """Where the served policy's versioned checkpoints live (``cmr.checkpoint`` layout): under
    ``AppArgs.checkpoints`` (a path or URI), default ``<state>/checkpoints``."""
    return checkpoint.join(args.checkpoints or args.state_dir() / "checkpoints", args.policy)


def served_checkpoint(args: AppArgs) -> checkpoint.Checkpoint | None:
    """The newest published version of the served policy that verifies (``cmr.published``), or None."""
    from cmr.published import load_served

    store = open_published(args)
    try:
        return load_served(store, args.policy)
    finally:
        store.close()


def check_checkpoint_config(args: AppArgs) -> None:
    """Refuse a ``policy_config`` (or an explicit ``embedding``) that the served router would ignore.

    Once a checkpoint exists the router is restored from it, config included; an option set in
    ``policy_config`` (a tuned ``chosen_serve.yaml``) that differs from the checkpoint's would
    silently not apply. Raises ``ConfigError`` naming the options and what to do instead.
    """
    root = checkpoint_root(args)
    # nothing published yet: the newest whole version, which the first start publishes
    ck = (served_checkpoint(args) or checkpoint.latest(root)) if args.policy_config or "embedding" in args.model_fields_set else None
    if ck is None:
        return
    made_with = checkpoint.stored_config(ck.path)["embedding"]
    if "embedding" in args.model_fields_set and args.embedding not in ("auto", made_with):
        raise ConfigError(
            f"field 'embedding': {args.embedding!r} differs from checkpoint v{ck.version} under {root} ({made_with!r}), which the "
            f"router is restored from; to serve it retrain (move {root} away: the next start trains with it), or drop embedding")
    if not args.policy_config:
        return
    cls = policy_class(args.policy).Config
    want = cls.from_dict(args.policy_config).to_dict()
    have = cls.from_dict(checkpoint.stored_config(ck.path)["config"]).to_dict()
    diff = sorted(k for k in args.policy_config if want[k] != have[k])
    if diff:
        what = ", ".join(f"{k}={want[k]!r} (checkpoint: {have[k]!r})" for k in diff)
        raise ConfigError(
            f"field 'policy_config': {what} differs from checkpoint v{ck.version} under {root}, which the router is restored "
            f"from; to serve this config retrain: move {root} away (the next start trains with policy_config) or write a "
            f"checkpoint there with `cmr train --policy {args.policy} --config FILE --out {root}`; to serve the checkpoint, "
            f"drop {', '.join(diff)} from policy_config")


def effective_pools(args: AppArgs) -> list:
    """The pools to deploy: the configured ones, or the embedded ``local`` pool of tiny models."""
    from services.config import PoolConfig, ServedModel
    from services.pools.tiny import TINY_SPECS

    if args.pools or not args.tiny_models:
        return list(args.pools)
    root = args.home_path() / "models"
    # costs differ (bigger model, higher cost) so that the cost weight λ has something to trade
    models = [ServedModel(id=m, path=str(root / m), family="tiny-gpt2", domain="text-generation", cost=0.001 * hidden * layers / 64,
                          description=f"Tiny randomly initialised GPT-2 ({layers} layers, width {hidden}) for offline chat tests.")
              for m, _, hidden, layers in TINY_SPECS]
    return [PoolConfig(name="local", models=models)]


def prepare_models(args: AppArgs) -> dict[str, Path]:
    """Create the tiny local chat models on first start (once, under the bootstrap lock)."""
    if not (args.tiny_models and not args.pools):
        return {}
    from services.pools.tiny import ensure_tiny_models

    bench = args.bench_path()
    with _file_lock(args.state_dir() / ".models.lock"):
        return ensure_tiny_models(args.home_path() / "models", bench / "hub.jsonl" if bench else None)


def profile_path(args: AppArgs) -> Path:
    return args.state_dir() / "profile_prompts.jsonl"


def _set_profile_prompts(args: AppArgs, policy, bench_data, encoder) -> None:
    """Pick the profile prompts (UniRoute: a new model joins by answering them) from the train
    splits, give them to the policy, and publish them for ``GET /v1/admin/profile``."""
    import json
    import os
    import tempfile

    rows = [(e, i) for e in bench_data.experiences for i in range(len(e.train))]
    rng = np.random.default_rng(1)
    pick = rng.choice(len(rows), min(args.profile_size, len(rows)), replace=False)
    texts = [rows[j][0].train.texts[rows[j][1]] for j in pick]
    ids = [f"p{n:04d}" for n in range(len(texts))]
    policy.set_profile_prompts(ids, encoder.encode(texts))
    path = profile_path(args)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".profile.")
    with os.fdopen(fd, "w") as f:
        f.writelines(json.dumps({"id": i, "prompt": t}) + "\n" for i, t in zip(ids, texts))
    os.replace(tmp, path)


def read_profile_prompts(args: AppArgs) -> list[dict[str, str]]:
    import json

    path = profile_path(args)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def bootstrap(args: AppArgs, encoder) -> None:
    """First start, idempotent: tiny models, hub seeded with the bench and served cards, and a
    first checkpoint of ``args.policy`` trained on the bench's train splits in experience order."""
    state = args.state_dir()
    with _file_lock(state / ".bootstrap.lock"):
        check_checkpoint_config(args)  # before anything is written
        prepare_models(args)
        hub = ModelHub(open_hub(args))
        bench_data = None
        if hub.version == 0:
            cards = []
            if args.bench_path() is not None:
                from cmr.data import load_cmrbench

                bench_data = load_cmrbench(args.bench_path())
                cards = list(bench_data.cards)
            if cards:
                hub.add(cards)
        # served models of the config join the hub on every start (a config may add pools later)
        served = [ModelCard.from_dict(m.card_dict()) for p in effective_pools(args) for m in p.models]
        served = [c for c in served if c.id not in hub]
        if served:
            hub.add(served)
        root = checkpoint_root(args)
        published = open_published(args)
        ck = load_served(published, args.policy, adopt=root)
        if ck is None:
            from cmr.continual.learner import Learner
            from cmr.encoders.lexical import embedding_of, fit_encoder

            if args.bench_path() is not None and bench_data is None:
                from cmr.data import load_cmrbench

                bench_data = load_cmrbench(args.bench_path())
            if args.embedding == "minilm+tfidf" and bench_data is None:
                raise ConfigError(f"field 'embedding': {args.embedding!r} is fitted on the bench's train prompts; set bench")
            # what the first training sees, in order, as the continual protocol says
            rng = np.random.default_rng(0)
            trains = []
            for exp in bench_data.experiences if bench_data is not None else ():
                tr = exp.train
                if args.train_limit is not None and len(tr) > args.train_limit:
                    tr = tr.subset(np.sort(rng.choice(len(tr), args.train_limit, replace=False)))
                trains.append((exp, tr))
            # the lexical part (if any) is fitted once, on those prompts and the hub's cards (labels
            # unused), as `cmr bench cmr` and `cmr train` do; `auto` fuses only where they are enough
            # (no training prompts: cards alone say nothing of how queries read, so auto stays dense)
            embedding = "minilm" if args.embedding == "auto" and not trains else args.embedding
            encoder = fit_encoder(embedding, encoder, [t for _, tr in trains for t in tr.texts] + [c.text() for c in hub.list()])
            log.info("first start embeds with %s", embedding_of(encoder))
            policy = make_policy(args.policy, encoder=encoder, config=args.policy_config or None)
            learner = Learner(policy)  # in-memory checkpoints per experience; one written at the end
            if args.bench_path() is not None:
                if args.profile_size:
                    _set_profile_prompts(args, policy, bench_data, encoder)
                for exp, tr in trains:
                    tr.emb = encoder.encode(tr.texts)
                    learner.train_experience(Experience(exp.k, tr, exp.test), bench_data.cards_upto(exp.k))
                    log.info("trained %s on experience %d (%d requests)", args.policy, exp.k, len(tr))
            policy.add_models(hub.list())
            ck = checkpoint.save(root, policy, {"offset": 0, "trained_on": str(args.bench_path()), "train_limit": args.train_limit,
                                                "encoder": policy.encoder.name}, {"learner": learner.state_dict()})
            publish(published, root, ck)  # written whole: now routers on every node may load it
        published.close()
        hub.store.close()


class RouterCore:
    """Live hub + index + policy + decision store; thread-safe."""

    def __init__(self, args: AppArgs, encoder=None):
        if encoder is None:
            from cmr.encoders import default_encoder

            encoder = default_encoder(backend=args.encoder, threads=args.encoder_threads,
                                      single_threads=args.encoder_single_threads if args.encoder != "torch" else None)
        from cmr.encoders import MemoryCachedEncoder

        self.args = args
        bootstrap(args, encoder)
        #: names this router in the request ids it issues: decisions of every replica, on every
        #: node, share one store and stay attributable
        self.instance = uuid.uuid4().hex[:8]
        self.store = open_decisions(args)
        self.profile_prompts = read_profile_prompts(args)
        self.ckpt_root = checkpoint_root(args)
        self.published = open_published(args)
        self._hub_store = open_hub(args)
        self._lock = threading.RLock()
        self._reload_lock = threading.Lock()
        self.encoder = encoder
        self.policy, self.version = self._load_policy(None)
        # what the checkpoint embeds with (MiniLM, or MiniLM fused with its fitted TF-IDF): cards,
        # profile prompts, first-start training, through the persistent cache
        self.encoder = self.policy.encoder
        # routed queries: an in-memory LRU over the encoder itself (no disk write per batch)
        self.query_encoder = MemoryCachedEncoder(self.query_view(self._uncached()), args.query_cache_size)
        from cmr.index import ModelIndex

        self.index = ModelIndex(self.encoder.dim, precision=args.index_precision)
        self.hub = ModelHub(self._hub_store)
        self._emb: dict[str, np.ndarray] = {}
        self._seen = self.published.current(args.policy)
        self._rebuild()
        self._closed = threading.Event()
        self._wake = threading.Event()
        self.published.on_change(self._wake.set)  # PostgreSQL: a publication or calibration on any node wakes the watcher
        self.calibration = None
        self.default_lam = float(args.cost_weight)
        self.check_calibration()

    # -- state -------------------------------------------------------------------------------
    def query_view(self, encoder):
        """``encoder`` as routed queries see it: its dense part truncated to
        ``AppArgs.query_max_tokens`` where the encoder supports it (onnx), else unchanged."""
        from cmr.encoders.lexical import dense_part

        n, dense = self.args.query_max_tokens, dense_part(encoder)
        if not (n and hasattr(dense, "with_max_tokens")):
            return encoder
        return encoder.with_dense(dense.with_max_tokens(n)) if dense is not encoder else dense.with_max_tokens(n)

    def _uncached(self):
        """The router's encoder without the persistent cache (queries must not be written to disk)."""
        from cmr.encoders.lexical import dense_part

        dense = dense_part(self.encoder)
        inner = getattr(dense, "inner", dense)  # CachedEncoder: the encoder itself
        return self.encoder.with_dense(inner) if dense is not self.encoder else inner

    def _load_policy(self, pub: Published | None):
        """The policy of publication ``pub`` (None: the newest published version that verifies)."""
        ck = load_served(self.published, self.args.policy) if pub is None else open_publication(pub)
        if ck is None:
            raise checkpoint.CheckpointError(f"{self.ckpt_root}: no published checkpoint of {self.args.policy} verifies")
        policy = checkpoint.load_policy(ck.path, encoder=self.encoder)
        made_with = ck.fingerprint.get("encoder")
        if made_with and made_with != policy.encoder.name:  # served: measured harmless exact -> int8 (services/README.md)
            log.info("checkpoint v%d was trained with encoder %s, the router encodes with %s (cmr train --encoder)",
                     ck.version, made_with, policy.encoder.name)
        if getattr(self, "policy", None) is not None and policy.encoder.name != self.encoder.name:
            # query vectors, card index and recorded decisions live in the served embedding space
            raise checkpoint.CheckpointError(f"checkpoint v{ck.version} embeds with {policy.encoder.name}, this router with "
                                             f"{self.encoder.name}: restart the router to serve it")
        return policy, ck.version

    def _embed_cards(self, cards: Sequence[ModelCard]) -> None:
        new = [c for c in cards if c.id not in self._emb]
        if new:
            for c, v in zip(new, self.encoder.encode([c.text() for c in new])):
                self._emb[c.id] = v

    def _rebuild(self) -> None:
        """Re-read the live hub into the index, the policy and the card table (under the lock)."""
        with self._lock:
            cards = self.hub.list()
            self._embed_cards(cards)
            live = {c.id for c in cards}
            gone = [m for m in self.index.ids if m not in live]
            self.index.remove(gone)
            add = [c.id for c in cards if c.id not in self.index]
            if add:
                self.index.add(add, np.stack([self._emb[m] for m in add]))
            self.policy.add_models(cards)
            emb = np.stack([self._emb[c.id] for c in cards]) if cards else np.zeros((0, self.encoder.dim), np.float32)
            self._table = _build_table(cards, emb)
            self._hub_version = self.hub.version

    def sync(self) -> None:
        """Pick up hub changes made elsewhere (another replica, the CLI): cheap, run per batch."""
        if self._hub_store.version() != self._hub_version:
            with self._lock:
                if self._hub_store.version() != self._hub_version:
                    self.hub = ModelHub(self._hub_store)
                    self._rebuild()

    def check_checkpoint(self) -> int:
        """Swap to the published version when a new one was published; returns the served version.

        Reading the publication is cheap (PostgreSQL: a local view, queried only after a NOTIFY);
        a published version is fetched and verified once, and one that fails verification is
        skipped (the router keeps serving what it has).
        """
        pub = self.published.current(self.args.policy)
        if pub is not None and pub != self._seen:
            self._seen = pub
            try:
                return self.reload(pub)
            except checkpoint.CheckpointError:
                log.exception("published checkpoint v%d does not verify; still serving v%d", pub.version, self.version)
        return self.version

    def start_watcher(self, tick: Callable[[], None] | None = None) -> None:
        """Watch for new checkpoints (and hub changes) in a daemon thread, every ``reload_check_s``:
        loading happens beside the serving path, which only ever sees the finished swap. ``tick``
        runs after each check (the deployment reports its gauges there)."""
        def loop() -> None:
            while not self._closed.is_set():
                self._wake.wait(self.args.reload_check_s or 0.5)
                self._wake.clear()
                if self._closed.is_set():
                    return
                try:
                    self.sync()
                    self.check_checkpoint()
                    self.check_calibration()
                    if tick is not None:
                        tick()
                except Exception:  # a bad checkpoint must not kill the watcher: keep serving the old one
                    log.exception("checkpoint watcher")

        threading.Thread(target=loop, name="cmr-checkpoint-watcher", daemon=True).start()

    def close(self) -> None:
        self._closed.set()
        self._wake.set()

    def warm_up(self) -> float:
        """Encode and route a spread of query lengths once, singly and as one full batch, past the
        embedding cache and recording nothing: lazy initialisation (encoder sessions and buffers,
        FAISS, the policy's first call) happens here instead of in the first requests, which would
        otherwise set the p99. Returns the seconds it took."""
        t0 = time.perf_counter()
        inner = self._uncached()  # the encoder itself must run
        texts = [" ".join(["Which model should answer this routing question?"] * n) for n in (1, 3, 8, 24, 64)]
        batch = (texts * self.args.max_batch_size)[: self.args.max_batch_size]
        for group in [[t] for t in texts] + [batch]:
            self.route([RouteRequest(query=t, k=self.args.top_k, record=False) for t in group], emb=inner.encode(group))
        return time.perf_counter() - t0

    def reload(self, pub: Published | None = None) -> int:
        """Load publication ``pub`` (default: the newest published that verifies) beside the
        current one, then swap.

        Requests keep using the old policy until the swap, which is one reference assignment under
        the lock: nothing in flight is dropped or failed. Concurrent reloads coalesce.
        """
        if not self._reload_lock.acquire(blocking=False):
            return self.version
        try:
            if pub is not None and pub.version == self.version:
                return self.version
            policy, v = self._load_policy(pub)
            if v == self.version:
                return v
            policy.add_models(list(self._table.cards))  # embed cards now, not on the request path
            with self._lock:
                policy.add_models(list(self._table.cards))  # cards registered while it loaded (memoised: cheap)
                self.policy, self.version = policy, v
            log.info("router swapped to checkpoint v%d", v)
            return v
        finally:
            self._reload_lock.release()

    # -- hub admin ---------------------------------------------------------------------------
    def register(self, cards: Sequence[ModelCard]) -> int:
        """Add cards to the hub: routable as soon as this returns (from their card text, and from
        their answers to the profile prompts when given)."""
        known = {p["id"] for p in self.profile_prompts}
        for c in cards:
            bad = next((k for k in c.profile if k not in known), None)
            if bad is not None:
                raise HubError(f"field 'profile.{bad}': not a profile prompt id (GET /v1/admin/profile lists them)")
        self._embed_cards(cards)  # encode first, outside the lock
        with self._lock:
            v = self.hub.add(list(cards))
            self._rebuild()
        return v

    def retire(self, model_ids: Sequence[str]) -> int:
        with self._lock:
            v = self.hub.retire(list(model_ids))
            self._rebuild()
        return v

    def pool_of(self, model_id: str) -> str | None:
        """The pool a card's ``backend.pool`` asks for (runtime registrations into a named pool)."""
        t = self._table
        j = t.pos.get(model_id)
        return None if j is None else t.cards[j].backend.get("pool")

    def models(self) -> list[ModelCard]:
        return list(self._table.cards)

    def card(self, model_id: str) -> ModelCard:
        t = self._table
        if model_id not in t.pos:
            raise HubError(f"field 'model': unknown model {model_id!r}")
        return t.cards[t.pos[model_id]]

    # -- routing -----------------------------------------------------------------------------
    def route(self, reqs: Sequence[RouteRequest], emb: np.ndarray | None = None) -> list[Decision | CMRError]:
        """Decide a batch; a request whose filters match nothing gets an error in its slot."""
        t0 = time.perf_counter()
        if emb is None:
            emb = self.query_encoder.encode([r.query for r in reqs])
        with self._lock:
            policy, version, table, lam0 = self.policy, self.version, self._table, self.default_lam
        # requests without a cost weight get the router's (calibrated) default
        reqs = [r if r.lam is not None else replace(r, lam=lam0) for r in reqs]
        out: list[Decision | CMRError | None] = [None] * len(reqs)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(reqs):
            groups.setdefault(r.group_key(), []).append(i)
        for rows in groups.values():
            mask = table.mask(reqs[rows[0]])
            cand = np.flatnonzero(mask)
            if cand.size == 0:
                for i in rows:
                    out[i] = NoCandidateError("no model matches the request's filters (routing.domains/families/max_cost/allow)")
                continue
            q = emb[rows]
            tasks = [reqs[i].task for i in rows] if any(reqs[i].task for i in rows) else None
            k = max(reqs[i].k for i in rows)
            rk = self.args.retrieve_k
            if rk and cand.size > rk:
                # per-query FAISS pre-selection (exact search over the masked cards when filtered)
                if mask.all():
                    names, _ = self.index.search(q, rk)
                    per = [np.array([table.pos[m] for m in ns if m in table.pos]) for ns in names]
                else:
                    sims = q @ table.emb[cand].T
                    top = np.argpartition(-sims, rk - 1, axis=1)[:, :rk]
                    per = [cand[t] for t in top]
                union = np.unique(np.concatenate(per))
                cards = [table.cards[j] for j in union]
                scores = policy.score(q, cards, tasks=tasks)
                col = {int(j): c for c, j in enumerate(union)}
                for r_i, i in enumerate(rows):
                    cols = np.array([col[int(j)] for j in per[r_i]])
                    d = decide(scores[r_i : r_i + 1, cols], [cards[c] for c in cols], lam=reqs[i].lam, k=reqs[i].k, checkpoint_version=version)[0]
                    out[i] = d
            else:
                cards = table.cards if cand.size == len(table.cards) else [table.cards[j] for j in cand]
                scores = policy.score(q, cards, tasks=tasks)
                lam = np.array([reqs[i].lam for i in rows], dtype=np.float64)
                costs = table.costs if cards is table.cards else table.costs[cand]
                for i, d in zip(rows, decide(scores, cards, lam=lam, k=k, checkpoint_version=version, costs=costs)):
                    d.alternatives = d.alternatives[: reqs[i].k - 1]
                    out[i] = d
        rec = [(i, d) for i, d in enumerate(out) if isinstance(d, Decision)]
        took = time.perf_counter() - t0
        for i, d in rec:
            d.request_id = f"cmr-{self.instance}{uuid.uuid4().hex[:24]}"
            d.latency_s = took
            d.task = reqs[i].task
        keep = [(i, d) for i, d in rec if reqs[i].record]
        if keep:
            self.store.record([d for _, d in keep], [reqs[i].query for i, _ in keep], emb[[i for i, _ in keep]],
                              [table.costs[table.pos[d.model]] for _, d in keep], [(reqs[i].key_id, reqs[i].tenant) for i, _ in keep])
        return out  # type: ignore[return-value]

    def status(self) -> dict[str, Any]:
        calib = self.calibration
        return {"checkpoint_version": self.version, "hub_version": self._hub_version, "models": len(self._table.cards),
                "servable": int(self._table.servable.sum()), "policy": self.args.policy, "feedback_offset": self.store.last_offset(),
                # what a self-configuring policy (auto) chose and why; {} for the others
                "policy_choice": self.policy.describe() if self.policy is not None else {},
                # the λ used for requests that give no cost_weight, and where it came from
                "cost_weight": self.default_lam,
                "calibration": None if calib is None else {k: calib.to_dict()[k] for k in ("target", "achieved", "held_out", "source", "n_prompts", "checkpoint_version", "created")}}

    def check_calibration(self) -> float:
        """Apply the calibration published in the state store when it changed (``cmr calibrate
        --apply`` or the console, on any node); returns the default λ. None applied:
        ``AppArgs.cost_weight``. Cheap (PostgreSQL: a local view, queried only after a NOTIFY); a
        malformed stored value is logged and the previous λ kept. An older install's
        ``calibration.json`` is moved into the store on the first check."""
        from cmr.calibrate import CalibrationError, applied

        try:
            calib = applied(self.published, self.args.state_dir())
        except CalibrationError:
            log.exception("the applied calibration does not parse; still using λ = %g", self.default_lam)
            return self.default_lam
        if calib == self.calibration:
            return self.default_lam
        with self._lock:
            self.calibration = calib
            self.default_lam = float(self.args.cost_weight) if calib is None else float(calib.cost_weight)
        log.info("default cost weight λ = %g (%s)", self.default_lam, "AppArgs.cost_weight" if calib is None else calib.source)
        return self.default_lam

    # -- console (read on demand: nothing here runs per request) ----------------------------
    def _scored_traffic(self, limit: int, tenant: str | None):
        """The served policy's scores on the newest ``limit`` logged queries (of ``tenant``), with
        the live cards' costs: the prompt set of the what-if curve and of a console calibration."""
        from cmr.calibrate import score_prompts

        emb = self.store.recent_embeddings(limit, tenant)
        with self._lock:
            policy, table, version = self.policy, self._table, self.version
        scores = score_prompts(policy, emb, table.cards) if len(emb) and table.cards else np.zeros((0, len(table.cards)))
        return scores, table, version

    def whatif(self, limit: int, tenant: str | None = None, lam: float | None = None, budget_per_1k: float | None = None) -> dict[str, Any]:
        """What another λ would do on recent traffic: ``cmr.calibrate.curve`` of the served policy
        over the newest ``limit`` logged queries, the point at the router's λ and at ``lam`` (or at
        the λ that meets ``budget_per_1k``, found by ``cmr.calibrate.lambda_for_budget``)."""
        from cmr.calibrate import curve, lambda_for_budget

        scores, table, version = self._scored_traffic(limit, tenant)
        lam0 = self.default_lam
        out: dict[str, Any] = {"n_prompts": len(scores), "checkpoint_version": version, "models": [c.id for c in table.cards],
                               "costs": table.costs.tolist(), "current_lambda": lam0, "curve": [], "current": None, "at": None}
        if not len(scores):
            return out
        if budget_per_1k is not None:
            lam = lambda_for_budget(scores, table.costs, budget_per_1k)[0]
        out["curve"] = curve(scores, table.costs)
        out["current"] = curve(scores, table.costs, [lam0])[0]
        if lam is not None:
            out["at"] = curve(scores, table.costs, [lam])[0]
        return out

    def apply_calibration(self, cost_weight: float | None = None, budget_per_1k: float | None = None, limit: int = 1000,
                          force: bool = False) -> float:
        """Set the default λ of every router replica the way ``cmr calibrate --apply`` does (a
        setting published in the state store): ``cost_weight`` as given, or the λ that
        meets ``budget_per_1k`` on the newest ``limit`` logged queries, refused as the CLI refuses
        it (too few queries, target missed on held-out ones) unless ``force``. Returns the λ in force."""
        from cmr.calibrate import Calibration, CalibrationError, CalibrationTarget, apply, calibrate, doubts

        if budget_per_1k is not None:
            scores, table, version = self._scored_traffic(limit, None)
            if not len(scores):
                raise CalibrationError("field 'budget_per_1k': no logged traffic to calibrate on yet")
            target = CalibrationTarget("budget", budget_per_1k=budget_per_1k)
            calib = calibrate(scores, table.costs, target, source="console: logged traffic", checkpoint_version=version)
            doubt = doubts(calib, target)
            if doubt and not force:
                raise CalibrationError(f"field 'budget_per_1k': {doubt}; nothing applied (route more traffic, or send force: true)")
        else:
            calib = Calibration.from_dict({"cost_weight": cost_weight, "source": "console"}, "body")
        apply(self.published, calib)
        return self.check_calibration()

    def checkpoint_info(self, scan: int = 50) -> dict[str, Any]:
        """The served checkpoint (version, when written) and the newest consolidation among the
        last ``scan`` versions (the learner marks those in their fingerprint)."""
        def read(v: int, name: str) -> dict[str, Any]:
            return checkpoint.read_json(self.ckpt_root, v, name) or {}

        def when(v: int) -> float | None:
            return read(v, "manifest.json").get("created")

        out: dict[str, Any] = {"version": self.version, "written": when(self.version), "last_consolidation": None}
        for v in reversed(checkpoint.versions(self.ckpt_root)[-scan:]):
            if read(v, "fingerprint.json").get("consolidation"):
                out["last_consolidation"] = {"version": v, "written": when(v)}
                break
        return out
