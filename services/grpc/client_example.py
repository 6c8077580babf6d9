"""A gRPC client of cmr, end to end: ListModels, Route, streaming Chat, Feedback.

    python -m services.grpc.client_example --target 127.0.0.1:9000 --key "$(cat ~/.cmr/serve/bootstrap.key)"

The stubs are the generated ``cmr_pb2`` / ``cmr_pb2_grpc`` (other languages: generate them from
``services/grpc/cmr.proto``). Every call carries the API key as ``authorization: Bearer <key>``
metadata (omit it against ``cmr serve --open``). ``tests/ray/test_grpc_app.py`` runs this file.
"""

from __future__ import annotations

import argparse
from typing import Any


def demo(target: str, key: str | None = None, query: str = "Translate this sentence into French.") -> dict[str, Any]:
    """Run the four calls once against ``target`` (host:port); returns what each answered."""
    import grpc

    from services.grpc import cmr_pb2 as pb
    from services.grpc import cmr_pb2_grpc

    meta = [("authorization", f"Bearer {key}")] if key else []
    with grpc.insecure_channel(target) as channel:
        stub = cmr_pb2_grpc.CMRStub(channel)
        served = [m.id for m in stub.ListModels(pb.ListModelsRequest(servable_only=True), metadata=meta, timeout=30).models]

        # the decision only: top-3 over the whole hub, cost weight λ = 0.1 (utility = score − λ·cost)
        route = stub.Route(pb.RouteRequest(query=query, routing=pb.Routing(k=3, cost_weight=0.1)), metadata=meta, timeout=30)

        # routed generation, streamed: the first chunk carries the decision, the last the token counts
        text, first, last = [], None, None
        request = pb.ChatRequest(model="auto", max_tokens=16, messages=[pb.Message(role="user", content=query)])
        for chunk in stub.Chat(request, metadata=meta, timeout=120):
            first = first or chunk
            last = chunk
            text.append(chunk.text)

        # partial feedback for that answer: a reward in [0, 1] for its request id (once)
        fb = stub.Feedback(pb.FeedbackRequest(request_id=first.request_id, reward=1.0), metadata=meta, timeout=30)
    return {
        "served": served,
        "route": {"model": route.model, "score": route.score, "alternatives": [a.model for a in route.alternatives], "request_id": route.request_id},
        "chat": {"model": first.model, "text": "".join(text), "finish_reason": last.finish_reason, "completion_tokens": last.completion_tokens},
        "feedback": {"accepted": fb.accepted, "offset": fb.offset},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default="127.0.0.1:9000", help="host:port of cmr's gRPC port")
    p.add_argument("--key", help="API key (none against `cmr serve --open`)")
    p.add_argument("--query", default="Translate this sentence into French.")
    ns = p.parse_args(argv)
    import json

    print(json.dumps(demo(ns.target, ns.key, ns.query), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
