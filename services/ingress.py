"""The HTTP ingress (FastAPI through ``@serve.ingress``): OpenAI-compatible chat and completions
(streaming included), ``/v1/route``, ``/v1/feedback``, ``/v1/models``, ``/v1/admin/models``,
``/healthz``, and the operator's console (``/console/``, ``/v1/console/*``, ``/v1/admin/calibration``;
``services/console``).

Routing decisions come from the router deployment (or, with ``AppArgs.route_in_ingress``, from
the same ``RouterDeployment`` class run in this process); generation from the pool that serves the
chosen model. Bad input gets a 4xx whose message names the field, in OpenAI's error shape.
"""

# no ``from __future__ import annotations`` here: FastAPI must see real types in the route
# signatures that ``@serve.ingress`` rewrites, or bodies would be taken for query parameters
import asyncio
import json
import logging
import time
import uuid
from typing import Any, AsyncIterator
from urllib.parse import quote

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from fastapi.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.exceptions import RayActorError, RayTaskError, UnserializableException
from ray.serve.handle import DeploymentHandle

from services import metrics
from services import auth
from services import console
from services.config import AppArgs
from services.grpc.servicer import GrpcServicerMixin
from services.pools.base import GenerationError
from services.schemas import AUTO, CalibrationBody, ChatCompletionRequest, CompletionRequest, FeedbackBody, RegisterBody, RetireBody, RouteRequestBody

#: a pool replica that died or became unreachable, or a generation that raised: retried, then fallen back
# (UnserializableException: an engine error that could not cross the process boundary;
# GenerationError: raised as it is by a pool run in this process, ``remote_in_ingress``)
_REPLICA_FAILURES = (RayActorError, RayTaskError, UnserializableException, GenerationError)

app = FastAPI(title="cmr", description="Continual model router: OpenAI-compatible API with routing extensions")
# API keys, scopes, rate limits and the body cap, before any route runs (services/auth.py)
app.add_middleware(auth.AuthMiddleware)

#: one structured line per decision (request id, model, key id, tenant; never the prompt): the
#: "ray.serve" logger lands in the replica's Serve log, JSON with Serve's LoggingConfig
_decision_log = logging.getLogger("ray.serve")


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param"}}`` with ``status``."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


_error_body = auth.error_dict


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    # name the field: "field 'messages.0.role': Input should be 'system', 'user', …"
    errs = exc.errors()
    first = errs[0] if errs else {"loc": (), "msg": "invalid request"}
    parts = list(first.get("loc", ()))
    if parts and parts[0] in ("body", "query", "path"):
        parts = parts[1:]
    loc = ".".join(str(x) for x in parts)
    if first.get("type") == "json_invalid":  # loc is a character position, not a field
        loc, msg = "", f"request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))} at character {parts[0] if parts else '?'}"
    else:
        msg = f"field '{loc}': {first.get('msg')}" if loc else str(first.get("msg"))
    if len(errs) > 1:
        msg += f" (and {len(errs) - 1} more)"
    if request.url.path == "/v1/feedback":
        metrics.feedback("invalid")
    return JSONResponse(_error_body(400, msg, loc or None), status_code=400)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # unknown paths (404), wrong methods (405): the same error shape as everything else
    return JSONResponse(_error_body(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}"), status_code=exc.status_code,
                        headers=getattr(exc, "headers", None))


@app.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(_error_body(exc.status, exc.message, exc.param), status_code=exc.status)


def _check(result: dict[str, Any], param: str | None = None) -> dict[str, Any]:
    if "error" in result:
        raise APIError(int(result.get("status", 400)), result["error"], param)
    return result


def _routing_field(d: dict[str, Any]) -> dict[str, Any]:
    return {
        "request_id": d["request_id"], "model": d["model"], "score": d["score"], "utility": d["utility"],
        "alternatives": [{"model": m, "score": s} for m, s in d["alternatives"]], "checkpoint_version": d["checkpoint_version"],
        "cost_weight": d.get("cost_weight"),
        **({"fallback": d["fallback"]} if d.get("fallback") else {}),
        **({"recorded": False} if d.get("recorded") is False else {}),
    }


#: characters kept as they are in the x-cmr-model header (RFC 3986 path characters): ASCII ids read unchanged
_HEADER_SAFE = "/:@!$&'()*+,;=-._~"


def _headers(d: dict[str, Any]) -> dict[str, str]:
    return {
        # percent-encoded (UTF-8): an id may hold characters a header cannot; routing.model is exact
        "x-cmr-request-id": d["request_id"], "x-cmr-model": quote(d["model"], safe=_HEADER_SAFE),
        **({"x-cmr-score": f"{d['score']:.6g}"} if d["score"] is not None else {}),
        **({"x-cmr-checkpoint-version": str(d["checkpoint_version"])} if d["checkpoint_version"] is not None else {}),
        "x-cmr-alternatives": json.dumps([m for m, _ in d["alternatives"]]),
        **({"x-cmr-fallback": json.dumps(d["fallback"])} if d.get("fallback") else {}),
    }


def _unrouted(model: str, pool: str | None) -> dict[str, Any]:
    """The "decision" of a request that named a served model and asked for no record: the router
    was not asked, so there is no score, no runner-up and nothing to post feedback for."""
    return {"request_id": f"cmr-{uuid.uuid4().hex}", "model": model, "score": None, "utility": None, "alternatives": [],
            "checkpoint_version": None, "pool": pool, "recorded": False}


async def _prepend(first: dict[str, Any], it: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    yield first
    async for ch in it:
        yield ch


async def _replay(chunks: list[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    for ch in chunks:
        yield ch


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _usage(last: dict[str, Any]) -> dict[str, int]:
    p, c = int(last.get("prompt_tokens", 0)), int(last.get("completion_tokens", 0))
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


@serve.ingress(app)
class Ingress(GrpcServicerMixin):
    """Validates requests, asks the router, streams from the chosen model's pool (HTTP and gRPC)."""

    def __init__(self, args: dict[str, Any], router: DeploymentHandle, pools: dict[str, DeploymentHandle]):
        from services.routing import effective_pools

        self.args = AppArgs.from_dict(args)
        self.router = router
        self.pools = pools
        # route_in_ingress: the Router deployment's own class, run here (one routing code path)
        self._local_router = None
        if self.args.route_in_ingress:
            from services.router import RouterDeployment

            self._local_router = RouterDeployment(self.args)
        # remote_in_ingress: remote-only pools run here, as the Pool deployment's own class
        self._local_pools: dict[str, Any] = {}
        if self.args.remote_in_ingress:
            from services.pools.deployment import PoolDeployment

            for p in effective_pools(self.args):
                if p.models and all(m.engine == "openai" for m in p.models):
                    self._local_pools[p.name] = PoolDeployment(self.args, p.name)
        self.pool_of = {m.id: p.name for p in effective_pools(self.args) for m in p.models}
        # models registered at runtime with a backend are served by the first pool
        self.default_pool = next(iter(pools), None)
        # requests of this replica deciding / generating now: a decision with no company does not
        # wait for a batch to fill (``_decide``)
        self._deciding = self._generating = 0
        # concurrent decisions of this replica go to the router as one handle call (``_route_coalesced``)
        self._route_coalesced.set_max_batch_size(self.args.max_batch_size)
        self._route_coalesced.set_batch_wait_timeout_s(self.args.batch_wait_timeout_s)
        a = self.args.auth
        self.auth = auth.Authenticator(a.settings(), None if a.open else auth.keys_path(self.args.state_dir(), a.keys_path),
                                       dsn=self.args.store_dsn())
        auth.activate(self.auth)  # this replica's middleware and gRPC methods use it

    def _check_prompt(self, texts: list[tuple[str, str]]) -> None:
        """400 naming the field when a prompt is longer than ``AppArgs.max_prompt_chars``."""
        cap = self.args.max_prompt_chars
        for name, text in texts:
            if len(text) > cap:
                raise APIError(400, f"field '{name}': prompt of {len(text)} characters is longer than the limit of {cap}", name)

    # -- routing -----------------------------------------------------------------------------
    async def _decide(self, query: str, opts, servable_only: bool, model: str | None = None, record: bool = True,
                      beside: bool = False) -> dict[str, Any]:
        """The decision for one request (``beside``: made while the request's own generation runs)."""
        filters = opts.filters()
        if model is not None and model != AUTO:
            filters = {**filters, "allow": [model]}  # a concrete model bypasses the choice, still recorded
        who = auth.current_principal() or auth.OPEN
        t0 = time.perf_counter()
        req = {"query": query, "lam": opts.cost_weight, "filters": filters, "k": opts.k, "task": opts.task,
               "servable_only": servable_only, "record": record, "key_id": who.key_id, "tenant": who.tenant}
        self._deciding += 1
        try:
            if self._local_router is not None and self._deciding + self._generating - beside <= 1:
                # routed here and nothing else in flight: waiting for a batch to fill would only add
                # its timeout to this request; with company, batches form and share the encoder call
                res = (await self._local_router.route_many([req]))[0]
            else:
                res = await self._route_coalesced(req)
        finally:
            self._deciding -= 1
        metrics.routing_latency(time.perf_counter() - t0, "generate" if servable_only else "route")
        if "error" in res and model not in (None, AUTO):
            raise APIError(404, f"field 'model': model {model!r} is not served here", "model")
        res = _check(res, "routing")
        d = res["decision"]
        _decision_log.info("cmr decision %s -> %s", d["request_id"], d["model"], extra={
            "cmr_request_id": d["request_id"], "cmr_model": d["model"], "cmr_checkpoint_version": d["checkpoint_version"],
            "cmr_key_id": who.key_id, "cmr_tenant": who.tenant})
        return {**d, "pool": res.get("pool"), **({} if record else {"recorded": False})}

    # two batches in flight: the router encodes and scores ``AppArgs.router_concurrent_batches``
    # at once (one per core on a small host); one batch waiting here while another is routed
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005, max_concurrent_batches=2)
    async def _route_coalesced(self, reqs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Concurrent ``_decide`` calls of this replica, gathered (up to ``AppArgs.max_batch_size``,
        waiting at most ``batch_wait_timeout_s``) and sent as ONE handle call: Serve's per-call cost
        (handle routing, replica request handling, the router's own batching) is paid once per
        batch instead of once per request. Each caller gets its own slot of the answer, errors too."""
        if self._local_router is not None:
            return await self._local_router.route_many(reqs)
        return await self.router.route_many.remote(reqs)

    @app.post("/v1/route")
    async def route(self, body: RouteRequestBody) -> JSONResponse:
        self._check_prompt([("query", body.query)])
        d = await self._decide(body.query, body.routing, servable_only=False, record=body.records())
        return JSONResponse(_routing_field(d), headers=_headers(d))

    @app.post("/v1/feedback")
    async def feedback(self, body: FeedbackBody) -> dict[str, Any]:
        who = auth.current_principal() or auth.OPEN
        res = await self.router.feedback.remote(body.request_id, body.reward, who.tenant, not self.args.auth.open)
        # one structured line per feedback event, accepted or not (never the reward's request text)
        _decision_log.info("cmr feedback %s -> %s", body.request_id[:64], res.get("status", 200), extra={
            "cmr_request_id": body.request_id[:64], "cmr_feedback_status": res.get("status", 200), "cmr_offset": res.get("offset"),
            "cmr_key_id": who.key_id, "cmr_tenant": who.tenant})
        res = _check(res, "request_id")
        return {"request_id": body.request_id, "accepted": True, "offset": res["offset"]}

    # -- hub ---------------------------------------------------------------------------------
    @app.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        cards = await self.router.models.remote()
        data = [{"id": AUTO, "object": "model", "created": 0, "owned_by": "cmr", "servable": True}]
        data += [{"id": c["id"], "object": "model", "created": int(c.get("added_at") or 0), "owned_by": c.get("family") or "cmr",
                  "servable": bool(c["backend"].get("engine")), "cost": c["cost"], "domain": c.get("domain")} for c in cards]
        return {"object": "list", "data": data}

    @app.post("/v1/admin/models")
    async def register(self, request: Request) -> JSONResponse:
        try:
            raw = await request.json()
        except ValueError:
            raise APIError(400, "request body must be JSON") from None
        cards = raw["cards"] if isinstance(raw, dict) and "cards" in raw else raw if isinstance(raw, list) else [raw]
        try:
            body = RegisterBody(cards=cards)
        except ValidationError as e:
            first = e.errors()[0]
            loc = ".".join(str(x) for x in first["loc"])
            raise APIError(400, f"field '{loc}': {first['msg']} (a card is a JSON object; several go in 'cards')", loc) from None
        res = _check(await self.router.register.remote(body.cards), "id")
        await self.refresh_local()
        return JSONResponse(res, status_code=201)

    @app.get("/v1/admin/profile")
    async def profile(self) -> dict[str, Any]:
        """The profile prompts: a new model's card may carry its scores on them (``profile``)."""
        return {"prompts": await self.router.profile_prompts.remote()}

    @app.delete("/v1/admin/models/{model_id:path}")
    async def retire_one(self, model_id: str) -> dict[str, Any]:
        res = _check(await self.router.retire.remote([model_id]), "id")
        await self.refresh_local()
        return res

    @app.delete("/v1/admin/models")
    async def retire(self, body: RetireBody) -> dict[str, Any]:
        res = _check(await self.router.retire.remote(body.ids), "ids")
        await self.refresh_local()
        return res

    async def refresh_local(self) -> None:
        """route_in_ingress: a change made through this ingress (hub, calibration) is in force for
        its next request at once; other replicas pick it up from the store (their watcher)."""
        if self._local_router is not None:
            core = self._local_router.core
            await asyncio.to_thread(lambda: (core.sync(), core.check_calibration()))

    @app.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        # the state of the router that routes this ingress's requests: its own when routing here
        # (its checkpoint and hub versions are what the next answer comes from)
        st = await self._local_router.status() if self._local_router is not None else await self.router.status.remote()
        return {"status": "ok", **st}

    # -- generation --------------------------------------------------------------------------
    def _pool(self, model: str, asked: str | None = None) -> DeploymentHandle:
        """The configured pool of ``model``, else the pool its card's ``backend.pool`` names, else
        the first pool (runtime registrations)."""
        name = self.pool_of.get(model) or asked or self.default_pool
        if name is None or name not in self.pools:
            raise APIError(400, f"field 'backend.pool': no pool {name!r} serves {model!r}; pools: {', '.join(self.pools) or 'none'}", "model")
        return self.pools[name]

    async def _start(self, body, gen: dict[str, Any], collect: bool | None = None) -> tuple[dict[str, Any], AsyncIterator[dict[str, Any]], dict[str, Any]]:
        """Decide, open the pool's stream, and read its first chunk (so load errors become 4xx).

        A pool replica that dies (or a generation that raises) is survived: the request runs once
        more on the same model (Serve routes it to another replica of the pool), then on the
        decision's runner-ups in order; ``d["fallback"]`` says so. ``collect`` (default: not
        ``body.stream``) reads the whole generation here, so a non-streaming request is retried
        whole; a streaming one only until its first chunk (later failures are reported in-band).
        """
        gen = {**gen, "max_tokens": body.token_limit(), "temperature": body.temperature,
               "top_p": body.top_p, "stop": body.stop_list(), "seed": body.seed}
        collect = not getattr(body, "stream", False) if collect is None else collect
        first_try: tuple[AsyncIterator[dict[str, Any]], dict[str, Any]] | None = None
        failures: list[tuple[str, str]] = []
        named = body.model not in (None, AUTO) and body.model in self.pool_of
        if named and not body.routing.record:
            # named, served here, no record wanted: straight to the pool, the router is not asked
            d = _unrouted(body.model, self.pool_of[body.model])
        elif named:
            # a concrete model of a configured pool bypasses the choice: generation starts at once
            # and the decision (recorded, so that feedback can be posted for it) is made beside it,
            # off the request's critical path
            decision = asyncio.ensure_future(self._decide(body.query(), body.routing, servable_only=True, model=body.model, beside=True))
            try:
                first_try = await self._open({"model": body.model, "pool": self.pool_of[body.model]}, gen, collect)
            except _REPLICA_FAILURES as e:
                failures.append(self._failed(body.model, None, 0, e))
            except BaseException:
                decision.cancel()
                raise
            d = await decision  # its 4xx (e.g. a retired model) wins over whatever was generated
        else:
            d = await self._decide(body.query(), body.routing, servable_only=True, model=body.model, record=body.routing.record)
        plan = [d["model"], d["model"]] + [m for m, _ in d["alternatives"] if m != d["model"]]
        cur = d
        for attempt, model in enumerate(plan):
            if attempt == 0 and (first_try is not None or failures):
                if first_try is not None:
                    return cur, *first_try
                continue  # the concurrent first try failed: on to the retry
            if model != cur["model"]:
                try:  # a decision of its own, recorded: feedback then rewards the model that answered
                    alt = await self._decide(body.query(), body.routing, servable_only=True, model=model, record=body.routing.record)
                except APIError:
                    continue
                rest = [a for a in d["alternatives"] if a[0] != model]
                cur = {**alt, "alternatives": rest}
            try:
                it, first = await self._open(cur, gen, collect)
            except _REPLICA_FAILURES as e:
                failures.append(self._failed(model, cur.get("pool"), attempt, e))
                continue
            if failures:
                reason = failures[-1][0]
                cur = {**cur, "fallback": {"from": d["model"], "to": cur["model"], "reason": reason, "attempts": attempt + 1,
                                           "errors": [f for _, f in failures], "from_request_id": d["request_id"]}}
                metrics.fallback(reason if cur["model"] == d["model"] else f"{reason}_next_model")
                if cur["request_id"] != d["request_id"] and body.routing.record:  # feedback for the failed decision must not credit its model
                    await self.router.supersede.remote(d["request_id"], cur["request_id"])
            return cur, it, first
        raise APIError(503, "generation failed on every replica and fallback model: " + "; ".join(f for _, f in failures), "model")

    def _failed(self, model: str, pool: str | None, attempt: int, e: BaseException) -> tuple[str, str]:
        """Count and log a failed generation; ``(reason, "model: error type")`` for the fallback record."""
        died = isinstance(e, RayActorError)  # ActorDiedError, ActorUnavailableError
        if died:  # the pool counts its own generation errors; a dead replica cannot
            metrics.pool_error(self.pool_of.get(model) or pool or self.default_pool or "?")
        logging.getLogger("cmr.serve.ingress").warning("generation of %s failed (attempt %d): %s", model, attempt + 1, e)
        return ("replica_died" if died else "pool_error", f"{model}: {type(e).__name__}")

    async def _open(self, d: dict[str, Any], gen: dict[str, Any], collect: bool) -> tuple[AsyncIterator[dict[str, Any]], dict[str, Any]]:
        """Open the pool stream for ``d``'s model; the first chunk read (or all of them with ``collect``)."""
        self._generating += 1
        try:
            return await self._open_pool(d, gen, collect)
        finally:
            self._generating -= 1

    async def _open_pool(self, d: dict[str, Any], gen: dict[str, Any], collect: bool) -> tuple[AsyncIterator[dict[str, Any]], dict[str, Any]]:
        pool = self._pool(d["model"], d.get("pool"))
        local = self._local_pools.get(self.pool_of.get(d["model"], ""))
        if local is not None:  # remote_in_ingress: the same PoolDeployment methods, called here
            if collect:
                chunks = await local.generate_all({**gen, "model": d["model"]})
                first, it = (chunks[0] if chunks else {"text": "", "finish_reason": "stop"}), _replay(chunks[1:])
            else:
                it = local.generate({**gen, "model": d["model"]}).__aiter__()
                first = await it.__anext__()
        elif collect:  # the answer is sent once complete: one reply from the pool, not a stream of chunks
            chunks = await pool.options(multiplexed_model_id=d["model"]).generate_all.remote({**gen, "model": d["model"]})
            first, it = (chunks[0] if chunks else {"text": "", "finish_reason": "stop"}), _replay(chunks[1:])
        else:
            it = pool.options(stream=True, multiplexed_model_id=d["model"]).generate.remote({**gen, "model": d["model"]}).__aiter__()
            first = await it.__anext__()
        if "error" in first:
            raise APIError(int(first.get("status", 400)), first["error"], "model")
        return it, first

    async def _collect(self, it, first) -> tuple[str, dict[str, Any]]:
        text, last = first["text"], first
        async for ch in it:
            text += ch["text"]
            last = ch
        return text, last

    @app.post("/v1/chat/completions")
    async def chat(self, body: ChatCompletionRequest, request: Request):
        self._check_prompt([(f"messages.{i}.content", m.content) for i, m in enumerate(body.messages)])
        d, it, first = await self._start(body, {"messages": [m.model_dump() for m in body.messages]})
        created = int(time.time())
        if body.stream:
            usage_wanted = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(self._sse_chat(d, it, first, created, usage_wanted), media_type="text/event-stream", headers=_headers(d))
        text, last = await self._collect(it, first)
        out = {
            "id": d["request_id"], "object": "chat.completion", "created": created, "model": d["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": last.get("finish_reason") or "stop", "logprobs": None}],
            "usage": _usage(last), "routing": _routing_field(d),
        }
        return JSONResponse(out, headers=_headers(d))

    async def _sse_chat(self, d, it, first, created, usage_wanted) -> AsyncIterator[str]:
        base = {"id": d["request_id"], "object": "chat.completion.chunk", "created": created, "model": d["model"]}
        yield _sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}], "routing": _routing_field(d)})
        last = first
        try:
            async for ch in _prepend(first, it):
                last = ch
                if ch["text"]:
                    yield _sse({**base, "choices": [{"index": 0, "delta": {"content": ch["text"]}, "finish_reason": None}]})
        except Exception as e:  # headers are sent: report the failure in-band, as OpenAI's API does
            metrics.pool_error(self.pool_of.get(d["model"]) or d.get("pool") or self.default_pool or "?")
            yield _sse(_error_body(500, f"generation failed: {type(e).__name__}: {e}"))
            yield "data: [DONE]\n\n"
            return
        yield _sse({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": last.get("finish_reason") or "stop"}]})
        if usage_wanted:
            yield _sse({**base, "choices": [], "usage": _usage(last)})
        yield "data: [DONE]\n\n"

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest, request: Request):
        self._check_prompt([("prompt", body.prompt)])
        d, it, first = await self._start(body, {"prompt": body.prompt})
        created = int(time.time())
        if body.stream:
            usage_wanted = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(self._sse_completion(d, it, first, created, usage_wanted), media_type="text/event-stream", headers=_headers(d))
        text, last = await self._collect(it, first)
        out = {
            "id": d["request_id"], "object": "text_completion", "created": created, "model": d["model"],
            "choices": [{"index": 0, "text": text, "finish_reason": last.get("finish_reason") or "stop", "logprobs": None}],
            "usage": _usage(last), "routing": _routing_field(d),
        }
        return JSONResponse(out, headers=_headers(d))

    async def _sse_completion(self, d, it, first, created, usage_wanted) -> AsyncIterator[str]:
        base = {"id": d["request_id"], "object": "text_completion", "created": created, "model": d["model"]}
        last = first
        sent_routing = False
        try:
            async for ch in _prepend(first, it):
                last = ch
                if ch["text"]:
                    extra = {} if sent_routing else {"routing": _routing_field(d)}
                    sent_routing = True
                    yield _sse({**base, "choices": [{"index": 0, "text": ch["text"], "finish_reason": None, "logprobs": None}], **extra})
        except Exception as e:  # headers are sent: report the failure in-band
            metrics.pool_error(self.pool_of.get(d["model"]) or d.get("pool") or self.default_pool or "?")
            yield _sse(_error_body(500, f"generation failed: {type(e).__name__}: {e}"))
            yield "data: [DONE]\n\n"
            return
        yield _sse({**base, "choices": [{"index": 0, "text": "", "finish_reason": last.get("finish_reason") or "stop", "logprobs": None}],
                    **({} if sent_routing else {"routing": _routing_field(d)})})
        if usage_wanted:
            yield _sse({**base, "choices": [], "usage": _usage(last)})
        yield "data: [DONE]\n\n"

    # -- console (services/console): pages public, data behind the key's scopes. Declared last:
    # Starlette tries routes in order, so the API's own paths match before any console one
    @app.get("/console")
    async def console_page(self) -> RedirectResponse:
        return RedirectResponse("/console/", status_code=308)

    @app.get("/console/{path:path}")
    async def console_file(self, path: str) -> Response:
        found = console.static_file(path)
        if found is None:
            raise APIError(404, f"no console file {path!r}", "path")
        f, media = found
        return Response(f.read_bytes(), media_type=media, headers=console.HEADERS)

    @staticmethod
    def _viewer(tenant: str | None = None) -> tuple[auth.Principal, bool, str | None]:
        """The key asking, whether it has the admin scope, and the tenant whose data it may see
        (its own without admin; with admin, ``tenant`` or every tenant)."""
        who = auth.current_principal() or auth.OPEN
        admin = "admin" in who.scopes
        # a key always has a tenant; "" (matches nothing) guards against one that would not
        return who, admin, (tenant if admin else who.tenant or "")

    @app.get("/v1/console/whoami")
    async def console_whoami(self) -> dict[str, Any]:
        who, admin, _ = self._viewer()
        return {"key_id": who.key_id, "tenant": who.tenant, "scopes": list(who.scopes), "admin": admin, "open": self.args.auth.open}

    @app.get("/v1/console/decisions")
    async def console_decisions(self, after: float = Query(0.0, ge=0, allow_inf_nan=False), limit: int = Query(50, ge=1, le=500),
                                model: str | None = Query(None, max_length=256), tenant: str | None = Query(None, max_length=256)) -> dict[str, Any]:
        """The newest decisions made after time ``after`` (a short poll), newest first."""
        _, admin, tenant = self._viewer(tenant)
        rows = await self.router.console_decisions.remote(after, limit, tenant, model)
        return {"decisions": [console.visible(r, admin) for r in rows]}

    @app.get("/v1/console/usage")
    async def console_usage(self, window_s: float = Query(3600.0, gt=0, le=30 * 86400, allow_inf_nan=False),
                            buckets: int = Query(30, ge=1, le=500), tenant: str | None = Query(None, max_length=256)) -> dict[str, Any]:
        _, _, tenant = self._viewer(tenant)
        now = time.time()
        return await self.router.console_usage.remote(now - window_s, now, buckets, tenant)

    @app.get("/v1/console/status")
    async def console_status(self) -> dict[str, Any]:
        return await self.router.console_status.remote()

    @app.get("/v1/console/models/{model_id:path}")
    async def console_card(self, model_id: str) -> dict[str, Any]:
        return _check(await self.router.card.remote(model_id), "model")

    @app.get("/v1/console/whatif")
    async def console_whatif(self, limit: int = Query(500, ge=1, le=20_000), cost_weight: float | None = Query(None, ge=0, le=1e12, allow_inf_nan=False),
                             budget_per_1k: float | None = Query(None, gt=0, allow_inf_nan=False)) -> dict[str, Any]:
        """Predicted quality and cost on the newest ``limit`` logged queries (the viewer's tenant's
        without admin) over a range of λ, at the router's λ, and at ``cost_weight`` / ``budget_per_1k``."""
        _, _, tenant = self._viewer()
        return _check(await self.router.whatif.remote(limit, tenant, cost_weight, budget_per_1k), "budget_per_1k")

    @app.post("/v1/admin/calibration")
    async def apply_calibration(self, body: CalibrationBody) -> dict[str, Any]:
        """Set the router's default λ (what ``cmr calibrate --apply`` writes)."""
        res = _check(await self.router.apply_calibration.remote(body.cost_weight, body.budget_per_1k, body.limit, body.force), "cost_weight")
        await self.refresh_local()
        return res
