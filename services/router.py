"""``RouterDeployment``: the Serve deployment around ``RouterCore``.

The ingress gathers its concurrent requests itself and sends them as one ``route_many`` call;
single ``route`` calls (other callers) are gathered by ``@serve.batch``. Either way a batch is
routed together: one encoder call and one ``policy.score`` per batch. The blocking work (MiniLM,
FAISS, SQLite) runs in a worker thread so the replica keeps accepting requests while a batch is
scored. Hub changes are picked up
per batch (``RouterCore.sync``); the published checkpoint is loaded and swapped in by a watcher thread.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ray import serve

from cmr.decide import Filters
from cmr.errors import CMRError
from cmr.threads import limit_native_threads
from cmr.types import ModelCard
from services.config import AppArgs
from services.routing import RouteRequest, RouterCore
from services import metrics
from services.store import DuplicateFeedbackError, ExpiredRequestError, ForbiddenFeedbackError, SupersededRequestError, UnknownRequestError


def _error(e: Exception, status: int) -> dict[str, Any]:
    # errors travel back through the handle as values: the ingress maps them to HTTP/gRPC codes
    return {"error": str(e), "status": status}


class RouterDeployment:
    """Holds the live hub, the FAISS index, the current policy checkpoint and the decision store."""

    def __init__(self, args: dict[str, Any] | AppArgs):
        self.args = args if isinstance(args, AppArgs) else AppArgs.from_dict(args)
        self.core = RouterCore(self.args)
        # once numpy, FAISS and ONNX Runtime are loaded: their BLAS/OpenMP pools default to a thread
        # per core, which spin between the router's small batches (cmr/threads.py)
        self.native_threads = limit_native_threads(self.args.native_threads)
        self.core.store.configure(ttl_s=self.args.request_ttl_s, max_decisions=self.args.max_decisions)
        if self.args.warmup:
            self.core.warm_up()  # before the first request: lazy initialisation must not set the p99
        # the gauge is re-set on every watcher tick: Ray stops exporting a series that a process
        # has not reported for a while, and the version must be in every scrape
        self.core.start_watcher(tick=lambda: metrics.checkpoint_version(self.core.version, role="router"))
        self.route_batch.set_max_batch_size(self.args.max_batch_size)
        self.route_batch.set_batch_wait_timeout_s(self.args.batch_wait_timeout_s)
        self._batch_slots = asyncio.Semaphore(self.args.router_concurrent_batches)
        self._learner = None
        if self.args.learner.enabled:
            from services.learner import get_or_create_learner

            self._learner = get_or_create_learner(self.args)

    def _parse(self, r: dict[str, Any]) -> RouteRequest:
        return RouteRequest(query=r["query"], lam=None if r.get("lam") is None else float(r["lam"]), filters=Filters(**(r.get("filters") or {})),
                            k=int(r.get("k", self.args.top_k)), servable_only=bool(r.get("servable_only", False)),
                            record=bool(r.get("record", True)), key_id=r.get("key_id"), tenant=r.get("tenant"), task=r.get("task"))

    async def _route_list(self, reqs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Route ``reqs`` as one batch (one encode, one score per filter group); results in order.
        A request that does not parse or whose filters match nothing gets its error in its own slot."""
        parsed: list[RouteRequest | None] = []
        errors: dict[int, dict[str, Any]] = {}
        for i, r in enumerate(reqs):
            try:
                parsed.append(self._parse(r))
            except (CMRError, AttributeError, KeyError, TypeError, ValueError) as e:  # a caller other than the ingress (which validates) sent a bad item
                parsed.append(None)
                errors[i] = _error(CMRError(f"malformed routing request: {type(e).__name__}: {e}"), 400)
        todo = [i for i, p in enumerate(parsed) if p is not None]

        def work() -> list[Any]:
            self.core.sync()
            # recorded with who asked (API key, tenant) in one insert per batch, before the ids reach anyone
            return self.core.route([parsed[i] for i in todo])  # type: ignore[misc]

        # at most ``router_concurrent_batches`` batches at once, each on its own worker thread: the
        # encoder and the BLAS calls run one thread each (cmr/threads.py), so one batch at a time
        # would use one core; more than the cores just race for them
        async with self._batch_slots:
            results = await asyncio.to_thread(work) if todo else []
        counts: dict[str, int] = {}
        for d in results:
            if not isinstance(d, CMRError):
                counts[d.model] = counts.get(d.model, 0) + 1
        for m, n in counts.items():
            metrics.decision(m, n)
        answers = iter(_error(d, 400) if isinstance(d, CMRError) else {"decision": d.to_dict(), "pool": self.core.pool_of(d.model)} for d in results)
        return [errors[i] if i in errors else next(answers) for i in range(len(reqs))]

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def route_batch(self, reqs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Route a batch gathered from single ``route`` calls: each item is ``{query, lam, filters,
        k, servable_only, record, key_id, tenant}``; each result is ``{"decision": {...}, "pool"}``
        or ``{"error": message, "status": code}``."""
        return await self._route_list(reqs)

    async def route(self, req: dict[str, Any]) -> dict[str, Any]:
        """Route one request (gathered with concurrent ones by ``@serve.batch``)."""
        return await self.route_batch(req)

    async def route_many(self, reqs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Route a list the caller already gathered (the ingress coalesces its concurrent requests
        into one handle call) as one batch, without a second ``@serve.batch`` wait here; the
        results come back in order, each as ``route`` would answer it."""
        return await self._route_list(list(reqs))

    async def register(self, cards: list[dict[str, Any]]) -> dict[str, Any]:
        """Add cards (dicts, as HTTP and gRPC send them): each is checked by ``ModelCard`` (the one
        card validator) and its ``backend`` by its engine's typed config, before anything is stored."""
        from services.pools.base import engine_config

        try:
            parsed = [ModelCard.from_dict(c, where=f"cards.{i}") for i, c in enumerate(cards)]
            for i, c in enumerate(parsed):
                if c.backend:
                    engine_config(c.backend, where=f"cards.{i}.backend", policy=self.args.backends)
            v = await asyncio.to_thread(self.core.register, parsed)
        except CMRError as e:
            return _error(e, 409 if "already registered" in str(e) else 400)
        return {"hub_version": v, "registered": [c.id for c in parsed]}

    async def retire(self, model_ids: list[str]) -> dict[str, Any]:
        try:
            v = await asyncio.to_thread(self.core.retire, model_ids)
        except CMRError as e:
            return _error(e, 404)
        return {"hub_version": v, "retired": list(model_ids)}

    async def models(self) -> list[dict[str, Any]]:
        await asyncio.to_thread(self.core.sync)
        return [c.to_dict() for c in self.core.models()]

    async def profile_prompts(self) -> list[dict[str, str]]:
        return list(self.core.profile_prompts)

    async def card(self, model_id: str) -> dict[str, Any]:
        await asyncio.to_thread(self.core.sync)
        try:
            return {"card": self.core.card(model_id).to_dict()}
        except CMRError as e:
            return _error(e, 404)

    async def feedback(self, request_id: str, reward: float, tenant: str | None = None, check_owner: bool = False) -> dict[str, Any]:
        """Append a reward (durably: the offset is returned after the commit). ``check_owner``:
        only ``tenant`` (the tenant of the posting key) may reward its own requests."""
        status = "accepted"
        try:
            off = await asyncio.to_thread(self.core.store.add_feedback, request_id, reward, tenant, check_owner)
        except (CMRError, ValueError) as e:
            status, code = {UnknownRequestError: ("unknown", 404), ExpiredRequestError: ("expired", 410),
                            DuplicateFeedbackError: ("duplicate", 409), ForbiddenFeedbackError: ("forbidden", 403),
                            SupersededRequestError: ("superseded", 409)}.get(type(e), ("invalid", 400))
            return _error(e, code)
        finally:
            metrics.feedback(status)
        if self._learner is not None:
            self._learner.notify.remote()  # fire and forget: the learner batches what is waiting
        return {"offset": off}

    async def supersede(self, request_id: str, by: str) -> None:
        """A fallback answered ``request_id`` under decision ``by``: route its feedback there."""
        await asyncio.to_thread(self.core.store.supersede, request_id, by)

    def __del__(self) -> None:
        core = getattr(self, "core", None)
        if core is not None:
            core.close()

    async def reload(self) -> dict[str, Any]:
        """Swap to the published checkpoint now (the watcher does it within ``reload_check_s``)."""
        v = await asyncio.to_thread(self.core.check_checkpoint)
        return {"checkpoint_version": v}

    async def status(self) -> dict[str, Any]:
        await asyncio.to_thread(self.core.sync)
        out = self.core.status()
        if self._learner is not None:
            try:
                out["learner"] = await asyncio.wait_for(self._learner.status.remote(), timeout=2)
            except asyncio.TimeoutError:
                out["learner"] = {"state": "starting or busy"}  # its constructor loads the encoder
            except Exception as e:  # the router still serves; report what is wrong with the learner
                out["learner"] = {"error": f"{type(e).__name__}: {e}"}
        return out

    # -- console: called only while someone has the console open, never on the request path --
    async def console_decisions(self, after: float, limit: int, tenant: str | None, model: str | None) -> list[dict[str, Any]]:
        """The newest decisions for the console (``DecisionStore.recent``), query text included:
        the ingress drops it for keys without the admin scope."""
        return await asyncio.to_thread(self.core.store.recent, after, limit, tenant, model)

    async def console_usage(self, since: float, until: float, buckets: int, tenant: str | None, limit: int = 20_000) -> dict[str, Any]:
        """Per-model share, cost and reward over ``[since, until)`` (``services.console.usage``) from
        the newest ``limit`` decisions of the window; summed here, so no prompt leaves the router."""
        from services.console import usage

        rows = await asyncio.to_thread(self.core.store.recent, since, limit, tenant, None)
        out = usage(rows, since, until, buckets)
        out["truncated"] = len(rows) >= limit
        return out

    async def console_status(self) -> dict[str, Any]:
        """``status`` plus the served checkpoint's time and the last consolidation."""
        out = await self.status()
        out["checkpoint"] = await asyncio.to_thread(self.core.checkpoint_info)
        return out

    async def whatif(self, limit: int, tenant: str | None, lam: float | None, budget_per_1k: float | None) -> dict[str, Any]:
        """``RouterCore.whatif``: the λ curve on recent logged traffic (a CalibrationError as a 400)."""
        try:
            return await asyncio.to_thread(self.core.whatif, limit, tenant, lam, budget_per_1k)
        except CMRError as e:
            return _error(e, 400)

    async def apply_calibration(self, cost_weight: float | None, budget_per_1k: float | None, limit: int, force: bool = False) -> dict[str, Any]:
        """``RouterCore.apply_calibration``; returns the λ now in force on this replica."""
        try:
            lam = await asyncio.to_thread(self.core.apply_calibration, cost_weight, budget_per_1k, limit, force)
        except CMRError as e:
            return _error(e, 400)
        return {"cost_weight": lam, "calibration": self.core.status()["calibration"]}

    async def check_health(self) -> None:
        if self.core.policy is None:
            raise RuntimeError("router has no policy loaded")
