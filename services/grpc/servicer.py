"""The gRPC methods of the ingress (``CMR`` service of ``cmr.proto``).

Ray Serve's gRPC proxy calls the ingress deployment's method named after the RPC, so these live
in a mixin that ``Ingress`` inherits: the same routing, validation and pools as HTTP. Errors set
the gRPC status (INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS) with a message naming the field.

Every call is authenticated from its ``authorization`` metadata (``Bearer <key>``) with the
scope of the method (``services.auth.GRPC_SCOPES``): UNAUTHENTICATED (no or bad key),
PERMISSION_DENIED (scope, another tenant's request id), RESOURCE_EXHAUSTED (rate limit, with a
``retry-after`` trailer; message larger than the key's cap).
"""

import json
from typing import Any, AsyncIterator

import grpc
from pydantic import ValidationError

from services import auth
from services.grpc import cmr_pb2 as pb
from services.schemas import AUTO, ChatCompletionRequest, FeedbackBody, RouteRequestBody, RoutingOptions

_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED, 403: grpc.StatusCode.PERMISSION_DENIED,
          404: grpc.StatusCode.NOT_FOUND, 409: grpc.StatusCode.ALREADY_EXISTS, 410: grpc.StatusCode.NOT_FOUND,
          413: grpc.StatusCode.RESOURCE_EXHAUSTED, 429: grpc.StatusCode.RESOURCE_EXHAUSTED, 503: grpc.StatusCode.UNAVAILABLE}


def _routing(r: "pb.Routing") -> dict[str, Any]:
    d: dict[str, Any] = {"deny": list(r.deny)}
    if r.HasField("cost_weight"):  # unset: the router's calibrated default λ
        d["cost_weight"] = r.cost_weight
    for name in ("domains", "families", "allow"):
        if getattr(r, name):
            d[name] = list(getattr(r, name))
    if r.HasField("max_cost"):
        d["max_cost"] = r.max_cost
    if r.k:
        d["k"] = r.k
    if r.no_record:
        d["record"] = False
    if r.HasField("task"):
        d["task"] = r.task
    return d


def _reply(d: dict[str, Any]) -> "pb.RouteReply":
    return pb.RouteReply(request_id=d["request_id"], model=d["model"], score=d["score"] or 0.0, utility=d["utility"] or 0.0,
                         alternatives=[pb.Candidate(model=m, score=s) for m, s in d["alternatives"]],
                         checkpoint_version=d["checkpoint_version"] or 0, recorded=d.get("recorded") is not False)


def _fail(ctx, status: int, message: str) -> None:
    if ctx is not None:
        ctx.set_code(_CODES.get(status, grpc.StatusCode.INTERNAL))
        ctx.set_details(message)


class GrpcAbort(Exception):
    """Raised after the status is set: a streaming method must raise for Serve to send its code."""


def _validation_message(e: ValidationError) -> str:
    first = e.errors()[0]
    return f"field '{'.'.join(str(x) for x in first['loc'])}': {first['msg']}"


def _authenticate(ctx, method: str, request) -> bool:
    """Authenticate the call and set the principal for this request; False (status set) if refused."""
    try:
        p = auth.grpc_authenticate(auth.active(), ctx.invocation_metadata() if ctx is not None else (), method, request.ByteSize())
    except auth.AuthError as e:
        _fail(ctx, e.status, e.message)
        if e.retry_after is not None and ctx is not None:
            ctx.set_trailing_metadata([("retry-after", str(max(1, int(e.retry_after + 0.999))))])
        return False
    auth.set_principal(p)
    return True


def _prompt_error(self, texts: list[tuple[str, str]]) -> str | None:
    cap = self.args.max_prompt_chars
    for name, text in texts:
        if len(text) > cap:
            return f"field '{name}': prompt of {len(text)} characters is longer than the limit of {cap}"
    return None


class GrpcServicerMixin:
    """``Route``, ``Chat`` (server streaming), ``Feedback``, ``RegisterModel``, ``ListModels``."""

    async def Route(self, request: "pb.RouteRequest", grpc_context=None) -> "pb.RouteReply":
        from services.ingress import APIError

        if not _authenticate(grpc_context, "Route", request):
            return pb.RouteReply()
        try:
            body = RouteRequestBody(query=request.query, routing=RoutingOptions(**_routing(request.routing)), record=not request.no_record)
            if (msg := _prompt_error(self, [("query", body.query)])) is not None:
                raise APIError(400, msg, "query")
            return _reply(await self._decide(body.query, body.routing, servable_only=False, record=body.records()))
        except ValidationError as e:
            _fail(grpc_context, 400, _validation_message(e))
        except APIError as e:
            _fail(grpc_context, e.status, e.message)
        return pb.RouteReply()

    async def Chat(self, request: "pb.ChatRequest", grpc_context=None) -> AsyncIterator["pb.ChatChunk"]:
        from services.ingress import APIError

        if not _authenticate(grpc_context, "Chat", request):
            raise GrpcAbort(grpc_context.details() if grpc_context is not None else "refused")
        try:
            fields: dict[str, Any] = {"model": request.model or AUTO, "routing": _routing(request.routing), "stop": list(request.stop) or None,
                                      "messages": [{"role": m.role, "content": m.content} for m in request.messages]}
            if request.max_tokens:
                fields["max_tokens"] = request.max_tokens
            for opt in ("temperature", "top_p", "seed"):
                if request.HasField(opt):
                    fields[opt] = getattr(request, opt)
            body = ChatCompletionRequest(**fields)
            if (msg := _prompt_error(self, [(f"messages.{i}.content", m.content) for i, m in enumerate(body.messages)])) is not None:
                raise APIError(400, msg, "messages")
            # Chat is server streaming: chunks go out as they are generated (retry only before the first)
            d, it, first = await self._start(body, {"messages": [m.model_dump() for m in body.messages]}, collect=False)
        except ValidationError as e:
            _fail(grpc_context, 400, msg := _validation_message(e))
            raise GrpcAbort(msg) from None
        except APIError as e:
            _fail(grpc_context, e.status, e.message)
            raise GrpcAbort(e.message) from None
        yield pb.ChatChunk(request_id=d["request_id"], model=d["model"], routing=_reply(d))
        last = first
        if first["text"]:
            yield pb.ChatChunk(request_id=d["request_id"], model=d["model"], text=first["text"])
        async for ch in it:
            last = ch
            if ch["text"]:
                yield pb.ChatChunk(request_id=d["request_id"], model=d["model"], text=ch["text"])
        yield pb.ChatChunk(request_id=d["request_id"], model=d["model"], finish_reason=last.get("finish_reason") or "stop",
                           prompt_tokens=int(last.get("prompt_tokens", 0)), completion_tokens=int(last.get("completion_tokens", 0)))

    async def Feedback(self, request: "pb.FeedbackRequest", grpc_context=None) -> "pb.FeedbackReply":
        from services import metrics

        if not _authenticate(grpc_context, "Feedback", request):
            return pb.FeedbackReply()
        try:
            body = FeedbackBody(request_id=request.request_id, reward=request.reward)
        except ValidationError as e:
            metrics.feedback("invalid")
            _fail(grpc_context, 400, _validation_message(e))
            return pb.FeedbackReply()
        who = auth.current_principal() or auth.OPEN
        res = await self.router.feedback.remote(body.request_id, body.reward, who.tenant, not self.args.auth.open)
        if "error" in res:
            _fail(grpc_context, int(res["status"]), res["error"])
            return pb.FeedbackReply()
        return pb.FeedbackReply(accepted=True, offset=res["offset"])

    async def RegisterModel(self, request: "pb.RegisterModelRequest", grpc_context=None) -> "pb.RegisterModelReply":
        if not _authenticate(grpc_context, "RegisterModel", request):
            return pb.RegisterModelReply()
        cards = []
        for i, c in enumerate(request.cards):
            try:
                backend = json.loads(c.backend_json) if c.backend_json else {}
            except ValueError:
                _fail(grpc_context, 400, f"field 'cards.{i}.backend_json': model {c.id!r} has invalid JSON")
                return pb.RegisterModelReply()
            # every field is checked by ModelCard in the router (the one card validator, as for HTTP)
            cards.append({"id": c.id, "family": c.family or None, "domain": c.domain or None, "description": c.description,
                          "cost": c.cost, "backend": backend, "profile": dict(c.profile)})
        if not cards:
            _fail(grpc_context, 400, "field 'cards': at least one card is needed")
            return pb.RegisterModelReply()
        res = await self.router.register.remote(cards)
        if "error" in res:
            _fail(grpc_context, int(res["status"]), res["error"])
            return pb.RegisterModelReply()
        await self.refresh_local()
        return pb.RegisterModelReply(hub_version=res["hub_version"], registered=res["registered"])

    async def ListModels(self, request: "pb.ListModelsRequest", grpc_context=None) -> "pb.ListModelsReply":
        if not _authenticate(grpc_context, "ListModels", request):
            return pb.ListModelsReply()
        out = []
        for c in await self.router.models.remote():
            servable = bool(c["backend"].get("engine"))
            if request.servable_only and not servable:
                continue
            out.append(pb.ModelCard(id=c["id"], family=c.get("family") or "", domain=c.get("domain") or "", description=c.get("description") or "",
                                    cost=c["cost"], backend_json=json.dumps(c["backend"]), profile=c.get("profile") or {}, servable=servable))
        return pb.ListModelsReply(models=out)
