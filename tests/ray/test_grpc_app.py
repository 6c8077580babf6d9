"""The gRPC API through Ray Serve's gRPC proxy, with a real grpc client: Route, Chat (server
streaming), Feedback, RegisterModel, ListModels, and status codes naming the field."""

from __future__ import annotations

import json

import grpc
import pytest

pytestmark = pytest.mark.ray

GRPC = True
# no learner; two router replicas: first start (seed, train) must happen once, and a model
# registered through one replica must be routable through the other at once
APP_ARGS = {"learner": {"enabled": False}, "train_limit": 20, "router_replicas": 2}
# vLLM cannot run here: its cards get FakeVLLMEngine, the tiny models their real engine
ENGINE_FACTORY = "fake-vllm"


@pytest.fixture(scope="module")
def stub(served):
    from services.grpc import cmr_pb2_grpc

    channel = grpc.insecure_channel(f"127.0.0.1:{served.grpc_port}")
    grpc.channel_ready_future(channel).result(timeout=60)
    yield cmr_pb2_grpc.CMRStub(channel)
    channel.close()


def test_route_and_feedback(stub):
    from services.grpc import cmr_pb2 as pb

    r = stub.Route(pb.RouteRequest(query="Translate this sentence into French.", routing=pb.Routing(k=3)))
    assert r.request_id.startswith("cmr-") and r.model and len(r.alternatives) == 2
    assert r.score >= r.alternatives[0].score >= r.alternatives[1].score
    f = stub.Feedback(pb.FeedbackRequest(request_id=r.request_id, reward=1.0))
    assert f.accepted and f.offset >= 1
    with pytest.raises(grpc.RpcError) as e:
        stub.Feedback(pb.FeedbackRequest(request_id=r.request_id, reward=1.0))
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS and "request_id" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        stub.Feedback(pb.FeedbackRequest(request_id=r.request_id, reward=1.5))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "reward" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        stub.Route(pb.RouteRequest(query=""))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "query" in e.value.details()
    # the request's task: one validator with HTTP (printable, bounded); a task no policy knows routes as without it
    with pytest.raises(grpc.RpcError) as e:
        stub.Route(pb.RouteRequest(query="Translate this.", routing=pb.Routing(task="t" * 300)))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "task" in e.value.details()
    assert stub.Route(pb.RouteRequest(query="Translate this.", routing=pb.Routing(task="translation"))).model


def test_chat_streams(stub):
    from services.grpc import cmr_pb2 as pb

    chunks = list(stub.Chat(pb.ChatRequest(model="auto", max_tokens=8, messages=[pb.Message(role="user", content="Tell me a story.")])))
    first, last = chunks[0], chunks[-1]
    assert first.routing.model == first.model and first.model in ("tiny-gpt2-a", "tiny-gpt2-b")
    assert last.finish_reason in ("length", "stop") and last.completion_tokens > 0
    assert all(c.request_id == first.request_id for c in chunks)
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Chat(pb.ChatRequest(model="no-such-model", messages=[pb.Message(role="user", content="hi")])))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "model" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Chat(pb.ChatRequest(model="auto")))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "messages" in e.value.details()


def test_unrecorded_route_and_chat(stub):
    from services.grpc import cmr_pb2 as pb

    r = stub.Route(pb.RouteRequest(query="Translate this sentence into French.", routing=pb.Routing(no_record=True)))
    assert r.model and not r.recorded and r.checkpoint_version >= 1  # decided, not recorded
    with pytest.raises(grpc.RpcError) as e:
        stub.Feedback(pb.FeedbackRequest(request_id=r.request_id, reward=1.0))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert stub.Route(pb.RouteRequest(query="Translate this sentence into French.")).recorded
    # a named served model, no record: straight to its pool (no decision, so no score)
    chunks = list(stub.Chat(pb.ChatRequest(model="tiny-gpt2-b", max_tokens=4, routing=pb.Routing(no_record=True),
                                           messages=[pb.Message(role="user", content="Tell me a story.")])))
    first = chunks[0]
    assert first.model == "tiny-gpt2-b" and not first.routing.recorded and first.routing.checkpoint_version == 0
    assert chunks[-1].completion_tokens > 0


def test_register_and_list(stub, served):
    from services.grpc import cmr_pb2 as pb

    before = {m.id for m in stub.ListModels(pb.ListModelsRequest(servable_only=True)).models}
    assert before == {"tiny-gpt2-a", "tiny-gpt2-b"}
    backend = {"engine": "transformers", "path": str(served.args.home_path() / "models" / "tiny-gpt2-b")}
    reg = stub.RegisterModel(pb.RegisterModelRequest(cards=[pb.ModelCard(id="grpc-tiny", cost=0.0002, backend_json=json.dumps(backend))]))
    assert list(reg.registered) == ["grpc-tiny"]
    after = {m.id for m in stub.ListModels(pb.ListModelsRequest(servable_only=True)).models}
    assert after == before | {"grpc-tiny"}
    chunks = list(stub.Chat(pb.ChatRequest(messages=[pb.Message(role="user", content="hi")], max_tokens=4, routing=pb.Routing(allow=["grpc-tiny"]))))
    assert chunks[0].model == "grpc-tiny" and chunks[-1].completion_tokens > 0
    # whichever router replica answers, the new model is there (hub version checked per batch)
    routed = [stub.Route(pb.RouteRequest(query=f"question {i}", no_record=True, routing=pb.Routing(allow=["grpc-tiny"]))).model for i in range(12)]
    assert routed == ["grpc-tiny"] * 12
    with pytest.raises(grpc.RpcError) as e:
        stub.RegisterModel(pb.RegisterModelRequest(cards=[pb.ModelCard(id="grpc-tiny")]))
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS


def test_bad_cards_are_refused_naming_the_field(stub):
    """The same bad cards as over HTTP (tests/bad_cards.py): INVALID_ARGUMENT, nothing stored."""
    from services.grpc import cmr_pb2 as pb
    from tests.bad_cards import BAD_CARDS

    before = {m.id for m in stub.ListModels(pb.ListModelsRequest()).models}
    for card, field in BAD_CARDS:
        fields = {k: v for k, v in card.items() if k != "backend"}
        msg = pb.ModelCard(**fields, backend_json=json.dumps(card.get("backend", {})))
        with pytest.raises(grpc.RpcError) as e:
            stub.RegisterModel(pb.RegisterModelRequest(cards=[msg]))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and f"'cards.0.{field}'" in e.value.details(), (card, e.value.details())
    assert {m.id for m in stub.ListModels(pb.ListModelsRequest()).models} == before


def test_vllm_model_through_the_fake_engine(stub):
    """A runtime-registered ``engine: vllm`` model goes config → pool → engine; here the engine is
    the injected ``FakeVLLMEngine``, which echoes the last user message."""
    from services.grpc import cmr_pb2 as pb

    stub.RegisterModel(pb.RegisterModelRequest(cards=[pb.ModelCard(id="vllm-model", backend_json=json.dumps({"engine": "vllm", "path": "org/model"}))]))
    chunks = list(stub.Chat(pb.ChatRequest(model="vllm-model", max_tokens=3, temperature=0, messages=[pb.Message(role="user", content="one two three four")])))
    assert "".join(c.text for c in chunks) == "one two three" and chunks[-1].completion_tokens == 3


def test_client_example_runs(served):
    """The documented client (services/grpc/client_example.py) works as shown."""
    from services.grpc.client_example import demo

    out = demo(f"127.0.0.1:{served.grpc_port}")
    assert set(out["served"]) >= {"tiny-gpt2-a", "tiny-gpt2-b"}
    assert out["route"]["model"] and len(out["route"]["alternatives"]) == 2
    assert out["chat"]["model"] in out["served"] and out["chat"]["completion_tokens"] > 0
    assert out["feedback"]["accepted"] and out["feedback"]["offset"] >= 1
