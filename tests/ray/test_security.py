"""API keys on the served app (auth on, as the server's default): scopes, tenants, rate limits,
size caps, revocation, expiry, HTTP and gRPC; the official ``openai`` client with ``api_key``;
prompts kept out of the logs; the metrics in Ray's Prometheus export after this traffic."""

from __future__ import annotations

import time
import urllib.request
import uuid
from pathlib import Path

import grpc
import httpx
import pytest

pytestmark = pytest.mark.ray

GRPC = True
APP_ARGS = {"auth": {"open": False, "reload_s": 0.2}, "learner": {"enabled": False}, "train_limit": 10, "hub_limit": 60,
            "request_ttl_s": 4.0, "max_prompt_chars": 2000}
CHAT = [{"role": "user", "content": "Summarise this news article about football in two sentences."}]


@pytest.fixture(scope="module")
def keys(served):
    """Keys made the way an operator makes them (the key store under the app's state folder),
    after the server started: it picks them up within ``reload_s``."""
    from services.auth import KeyStore

    st = KeyStore(served.args.state_dir() / "keys.sqlite")
    out = {
        "acme": st.create("acme", ["infer", "feedback"], rate_per_s=1000, burst=1000)[1],
        "acme_fb": st.create("acme", ["feedback"], rate_per_s=1000, burst=1000)[1],
        "other": st.create("other", ["infer", "feedback"], rate_per_s=1000, burst=1000)[1],
        "admin": st.create("ops", ["admin"], rate_per_s=1000, burst=1000)[1],
        "slow": st.create("acme", ["infer"], rate_per_s=0.01, burst=2)[1],
        "small": st.create("acme", ["infer"], max_body_bytes=2048)[1],
    }
    st.close()
    time.sleep(0.5)
    return out


@pytest.fixture(scope="module")
def client(served):
    with httpx.Client(base_url=served.url, timeout=120) as c:
        yield c


def _h(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _offset(client) -> int:
    return client.get("/healthz").json()["feedback_offset"]


def test_keys_and_scopes(client, keys, served):
    assert client.get("/healthz").status_code == 200  # probes need no key
    body = {"query": "Translate this English sentence to German."}
    r = client.post("/v1/route", json=body)
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    assert r.json()["error"]["type"] == "authentication_error" and "missing API key" in r.json()["error"]["message"]
    assert client.post("/v1/route", json=body, headers=_h(keys["acme"] + "x")).status_code == 401
    assert client.post("/v1/route", json=body, headers={"Authorization": "Basic dXNlcjpwdw=="}).status_code == 401
    r = client.post("/v1/route", json=body, headers=_h(keys["admin"]))
    assert r.status_code == 403 and "'infer' scope" in r.json()["error"]["message"]
    assert client.post("/v1/route", json=body, headers=_h(keys["acme"])).status_code == 200
    card = {"id": f"sec-{uuid.uuid4().hex[:6]}", "cost": 0.1, "domain": "text-generation", "description": "a test model"}
    r = client.post("/v1/admin/models", json=card, headers=_h(keys["acme"]))
    assert r.status_code == 403 and "'admin' scope" in r.json()["error"]["message"]
    assert client.post("/v1/admin/models", json=card, headers=_h(keys["admin"])).status_code == 201
    assert client.get("/v1/models", headers=_h(keys["admin"])).status_code == 403
    # unknown paths: a valid key gets the API's error shape, no key gets 401 (nothing is revealed)
    r = client.get("/v1/nothing", headers=_h(keys["acme"]))
    assert r.status_code == 404 and "error" in r.json()
    assert client.get("/v1/nothing").status_code == 401


def test_openai_client_sends_its_api_key(served, keys):
    import openai
    from openai import OpenAI

    ok = OpenAI(base_url=served.url + "/v1", api_key=keys["acme"], max_retries=0, timeout=120)
    r = ok.chat.completions.create(model="auto", messages=CHAT, max_tokens=4)
    assert r.model in ("tiny-gpt2-a", "tiny-gpt2-b") and r.model_extra["routing"]["request_id"] == r.id
    bad = OpenAI(base_url=served.url + "/v1", api_key="not-a-key", max_retries=0, timeout=120)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="auto", messages=CHAT, max_tokens=4)


def test_feedback_only_from_the_tenant_that_asked(client, keys):
    rid = client.post("/v1/route", json={"query": "What is the capital of France?"}, headers=_h(keys["acme"])).json()["request_id"]
    before = _offset(client)
    r = client.post("/v1/feedback", json={"request_id": rid, "reward": 1.0}, headers=_h(keys["other"]))
    assert r.status_code == 403 and "request_id" in r.json()["error"]["message"]
    r = client.post("/v1/feedback", json={"request_id": rid, "reward": 1.0}, headers=_h(keys["slow"]))  # acme, but no feedback scope
    assert r.status_code == 403 and "'feedback' scope" in r.json()["error"]["message"]
    for bad in ("NaN", "Infinity", "-Infinity", "1.5", "-0.1", '"0.5"', "true", "null"):
        r = client.post("/v1/feedback", content=f'{{"request_id": "{rid}", "reward": {bad}}}'.encode(),
                        headers={**_h(keys["acme"]), "content-type": "application/json"})
        assert r.status_code == 400 and "reward" in r.json()["error"]["message"], (bad, r.text)
    assert _offset(client) == before  # nothing stored by any refusal
    # the same tenant's feedback-only key (an evaluation pipeline) may post it; once
    r = client.post("/v1/feedback", json={"request_id": rid, "reward": 0.5}, headers=_h(keys["acme_fb"]))
    assert r.status_code == 200 and r.json()["offset"] == before + 1
    r = client.post("/v1/feedback", json={"request_id": rid, "reward": 0.5}, headers=_h(keys["acme"]))
    assert r.status_code == 409 and _offset(client) == before + 1


def test_request_ids_expire(client, keys):
    rid = client.post("/v1/route", json={"query": "Write a haiku about autumn."}, headers=_h(keys["acme"])).json()["request_id"]
    time.sleep(4.5)  # request_ttl_s = 4
    r = client.post("/v1/feedback", json={"request_id": rid, "reward": 1.0}, headers=_h(keys["acme"]))
    assert r.status_code == 410 and "expired" in r.json()["error"]["message"]


def test_rate_limit_and_size_caps(client, keys):
    body = {"query": "Classify the sentiment of this review."}
    codes = [client.post("/v1/route", json=body, headers=_h(keys["slow"])).status_code for _ in range(3)]
    assert codes == [200, 200, 429]
    r = client.post("/v1/route", json=body, headers=_h(keys["slow"]))
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1 and r.json()["error"]["type"] == "rate_limit_error"
    r = client.post("/v1/route", json={"query": "x" * 3000}, headers=_h(keys["small"]))  # body over the key's 2048 bytes
    assert r.status_code == 413 and "2048 bytes" in r.json()["error"]["message"]
    r = client.post("/v1/chat/completions", json={"messages": [CHAT[0], {"role": "user", "content": "y" * 2001}]}, headers=_h(keys["acme"]))
    assert r.status_code == 400 and "messages.1.content" in r.json()["error"]["message"]  # prompt over max_prompt_chars
    r = client.post("/v1/route", content=b'{"query": "x"', headers={**_h(keys["acme"]), "content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    assert client.post("/v1/route", json=body, headers=_h(keys["acme"])).status_code == 200  # the server is unaffected


def test_revoked_key_stops_working(client, served):
    from services.auth import KeyStore

    st = KeyStore(served.args.state_dir() / "keys.sqlite")
    rec, key = st.create("temp", ["infer"])
    time.sleep(0.5)
    assert client.post("/v1/route", json={"query": "hello"}, headers=_h(key)).status_code == 200
    st.revoke(rec.id)
    st.close()
    time.sleep(0.5)  # reload_s = 0.2
    r = client.post("/v1/route", json={"query": "hello"}, headers=_h(key))
    assert r.status_code == 401 and "revoked" in r.json()["error"]["message"]


def test_grpc_keys(served, keys):
    from services.grpc import cmr_pb2 as pb
    from services.grpc import cmr_pb2_grpc

    channel = grpc.insecure_channel(f"127.0.0.1:{served.grpc_port}")
    grpc.channel_ready_future(channel).result(timeout=60)
    stub = cmr_pb2_grpc.CMRStub(channel)
    md = lambda k: [("authorization", f"Bearer {keys[k]}")]  # noqa: E731
    try:
        req = pb.RouteRequest(query="Translate this sentence into French.")
        for kwargs, code in [({}, grpc.StatusCode.UNAUTHENTICATED), ({"metadata": [("authorization", "Bearer nope")]}, grpc.StatusCode.UNAUTHENTICATED),
                             ({"metadata": md("admin")}, grpc.StatusCode.PERMISSION_DENIED)]:
            with pytest.raises(grpc.RpcError) as e:
                stub.Route(req, **kwargs)
            assert e.value.code() == code, kwargs
        r = stub.Route(req, metadata=md("acme"))
        with pytest.raises(grpc.RpcError) as e:
            stub.Feedback(pb.FeedbackRequest(request_id=r.request_id, reward=1.0), metadata=md("other"))
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and "request_id" in e.value.details()
        assert stub.Feedback(pb.FeedbackRequest(request_id=r.request_id, reward=1.0), metadata=md("acme")).accepted
        with pytest.raises(grpc.RpcError) as e:
            stub.RegisterModel(pb.RegisterModelRequest(cards=[pb.ModelCard(id="g-sec", cost=0.1)]), metadata=md("acme"))
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Chat(pb.ChatRequest(messages=[pb.Message(role="user", content="hi")], max_tokens=2)))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as e:  # the HTTP test above emptied this key's bucket
            stub.Route(req, metadata=md("slow"))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "rate limit" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            stub.Route(pb.RouteRequest(query="z" * 3000), metadata=md("small"))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "2048 bytes" in e.value.details()
    finally:
        channel.close()


def test_prompts_stay_out_of_the_logs(client, keys):
    marker = f"zebra-{uuid.uuid4().hex}"
    r = client.post("/v1/route", json={"query": f"Explain {marker} to a child."}, headers=_h(keys["acme"]))
    rid = r.json()["request_id"]
    time.sleep(1.0)
    cutoff = time.time() - 1800
    logs = [p for p in Path("/tmp/ray").glob("session_*/logs/**/*") if p.is_file() and p.stat().st_mtime > cutoff]
    text = "\n".join(p.read_text(errors="replace") for p in logs if p.suffix in (".log", ".out", ".err") and p.stat().st_size < 50_000_000)
    assert rid in text  # the structured decision line: request id, model, key id, tenant
    assert marker not in text


def test_metrics_reach_prometheus(client, keys, ray_session):
    """Ray exports what ``services.metrics`` recorded (every ~10 s) on the node's metrics port."""
    port = ray_session.nodes()[0]["MetricsExportPort"]
    want = ["ray_cmr_routing_latency_s_bucket", 'ray_cmr_decisions_total{', 'ray_cmr_feedback_total{', 'status="accepted"',
            'status="forbidden"', 'status="expired"', 'ray_cmr_auth_rejections_total{', 'reason="missing"', 'reason="scope"', 'reason="rate"',
            'reason="size"', 'ray_cmr_checkpoint_version{']
    end, missing = time.monotonic() + 60, want
    while time.monotonic() < end:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        missing = [w for w in want if w not in text]
        if not missing:
            break
        time.sleep(2)
    assert not missing, missing
