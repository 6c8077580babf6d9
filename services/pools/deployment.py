"""``PoolDeployment``: one Serve deployment per pool, serving its models multiplexed by id.

The engine of a model is built on first use from its hub card's ``backend`` (so a model
registered at runtime with a backend is served without a restart) and kept in an LRU of a few
engines per replica (``@serve.multiplexed``). Resources and autoscaling come from ``PoolConfig``.
A generation that raises is counted (``cmr_pool_errors_total``) and re-raised as a picklable
``GenerationError``: the ingress retries it on another replica, then falls back to the
decision's runner-up.
"""

from __future__ import annotations

import logging
from typing import Any, AsyncIterator

from ray import serve

from cmr.errors import CMRError
from services import metrics
from services.config import AppArgs
from services.pools.base import EngineError, EngineFactory, GenerationError, GenRequest, engine_config, make_engine

log = logging.getLogger("ray.serve")


class _NotFound(CMRError):
    pass


class PoolDeployment:
    """Generates with the engine of the requested model (``multiplexed_model_id``)."""

    def __init__(self, args: dict[str, Any] | AppArgs, pool: str, engine_factory: EngineFactory | None = None):
        self.args = args if isinstance(args, AppArgs) else AppArgs.from_dict(args)
        self.pool = pool
        self.engine_factory = engine_factory or make_engine
        from services.store import open_hub

        self.hub = open_hub(self.args)
        from services.routing import effective_pools, prepare_models

        # warm start: build the pool's configured engines while the replica starts (Serve waits for
        # it), not on their first request; the multiplexed loader hands them out on first use
        prepare_models(self.args)
        self._warm: dict[str, Any] = {}
        for m in [m for p in effective_pools(self.args) if p.name == pool for m in p.models][:4]:
            try:
                self._warm[m.id] = self.engine_factory(m.id, m.backend())
            except CMRError:
                pass  # reported to the first request for it, with the field named
        cfg = next((p for p in effective_pools(self.args) if p.name == pool), None)
        if cfg is not None and cfg.native_threads is not None:
            from cmr.threads import limit_native_threads

            limit_native_threads(cfg.native_threads)  # after the engines loaded torch (cmr/threads.py)

    @serve.multiplexed(max_num_models_per_replica=4)
    async def get_engine(self, model_id: str):
        got = self.hub.get(model_id)
        if got is None or got[1]:
            raise _NotFound(f"field 'model': model {model_id!r} is not in the hub")
        card = got[0]
        if not card.backend.get("engine"):
            raise CMRError(f"field 'model': model {model_id!r} has no backend to serve it (route-only hub entry)")
        import asyncio

        # a card stored before the policy (or by another writer of the hub) is checked again here
        engine_config(card.backend, where="backend", policy=self.args.backends)
        warm = self._warm.pop(model_id, None)
        return warm if warm is not None else await asyncio.to_thread(self.engine_factory, model_id, card.backend)

    async def _engine(self, req: GenRequest) -> tuple[Any, dict[str, Any] | None]:
        """The engine of ``req.model``, or ``(None, {"error", "status"})`` when it cannot be had."""
        try:
            return await self.get_engine(req.model), None
        except _NotFound as e:
            return None, {"error": str(e), "status": 404}
        except EngineError as e:  # e.g. vllm not installed: the server cannot serve it, the request was fine
            return None, {"error": f"model {req.model!r} cannot be served here: {e}", "status": 503}
        except CMRError as e:
            return None, {"error": str(e), "status": 400}

    def _failed(self, req: GenRequest, e: Exception) -> GenerationError:
        # counted here (the ingress retries it, then falls back to a runner-up model); re-raised
        # as a GenerationError, which always reaches the ingress as a RayTaskError
        metrics.pool_error(self.pool)
        log.warning("generation of %s failed: %s: %s", req.model, type(e).__name__, e)
        return GenerationError(f"model {req.model!r}: {type(e).__name__}: {e}")

    async def generate(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Stream ``GenChunk`` dicts; a failure to load the model is one ``{"error"}`` item."""
        req = GenRequest.from_dict(request)
        engine, err = await self._engine(req)
        if err is not None:
            yield err
            return
        try:
            async for chunk in engine.generate(req):
                yield chunk.to_dict()
        except Exception as e:
            raise self._failed(req, e) from None

    async def generate_all(self, request: dict[str, Any]) -> list[dict[str, Any]]:
        """The whole generation as one list of ``GenChunk`` dicts (what ``generate`` streams), for
        callers that answer only once it is done (non-streaming requests): one handle reply
        instead of one streamed object per chunk, each of which costs both processes CPU. An
        engine with a non-streaming call of its own (``Engine.complete``) is asked through it."""
        req = GenRequest.from_dict(request)
        engine, err = await self._engine(req)
        if err is not None:
            return [err]
        try:
            if hasattr(engine, "complete"):
                return [c.to_dict() for c in await engine.complete(req)]
            return [chunk.to_dict() async for chunk in engine.generate(req)]
        except Exception as e:
            raise self._failed(req, e) from None

    async def check_health(self) -> None:
        # engines are checked by their own generate path; a pool with a dead hub store is unhealthy
        self.hub.version()
