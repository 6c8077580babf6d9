"""Property-based fuzzing of the served app (hypothesis), with API keys on: whatever the body,
headers or gRPC message, the answer is never a 5xx (gRPC: never INTERNAL/UNKNOWN), every HTTP
error has the shape ``{"error": {"message": ...}}``, refusals store nothing, and the server
still answers afterwards. Bounded: ~40 examples per endpoint, no deadline."""

from __future__ import annotations

import json
import math
import urllib.parse

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.ray

GRPC = True
APP_ARGS = {"auth": {"open": False, "reload_s": 0.2}, "learner": {"enabled": False}, "train_limit": 10, "hub_limit": 60,
            "max_prompt_chars": 4000}
FUZZ = settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))

# JSON values: scalars (NaN and ±inf included: Python's json writes them), lists, objects
_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=40)
_json = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=12)
_roles = st.sampled_from(["user", "system", "assistant", "robot", "", 3])
_text = st.text(min_size=1, max_size=60)
_unit = st.floats(0, 1)


@st.composite
def _mutated(draw, base: st.SearchStrategy) -> object:
    """A valid body, as is or with one mutation: a field replaced by any JSON, a field dropped, an
    unknown field added, or the whole body replaced by any JSON value."""
    body = draw(base)
    how = draw(st.sampled_from(["valid", "replace", "replace", "drop", "extra", "any"]))
    if how == "replace":
        body[draw(st.sampled_from(sorted(body)))] = draw(_json)
    elif how == "drop":
        body.pop(draw(st.sampled_from(sorted(body))))
    elif how == "extra":
        body[draw(st.text(min_size=1, max_size=10))] = draw(_json)
    elif how == "any":
        return draw(_json)
    return body


_routing = st.fixed_dictionaries({}, optional={"cost_weight": _unit, "k": st.integers(1, 5), "domains": st.lists(_text, max_size=2),
                                               "max_cost": _unit, "deny": st.lists(_text, max_size=2)})
BODIES = {
    "/v1/route": _mutated(st.fixed_dictionaries({"query": _text, "routing": _routing, "record": st.booleans()})),
    "/v1/chat/completions": _mutated(st.fixed_dictionaries({
        "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]), "content": st.text(max_size=60)}),
                             min_size=1, max_size=3),
        "model": st.sampled_from(["auto", "tiny-gpt2-a", "tiny-gpt2-b"]), "max_tokens": st.integers(1, 3), "stream": st.booleans(),
        "temperature": st.floats(0, 2), "seed": st.integers(0, 2**31), "routing": _routing})),
    "/v1/completions": _mutated(st.fixed_dictionaries({"prompt": _text, "max_tokens": st.integers(1, 3), "top_p": st.floats(0.1, 1),
                                                       "model": st.sampled_from(["auto", "tiny-gpt2-b"])})),
    # no fuzzed id names a real decision: every one of these must be refused
    "/v1/feedback": _mutated(st.fixed_dictionaries({"request_id": st.text(max_size=40), "reward": _unit})),
    # cards without a backend: routable, never servable (chat "auto" keeps to the tiny models)
    "/v1/admin/models": _mutated(st.fixed_dictionaries({"id": st.builds(lambda t: f"fz-{t}", _text), "cost": _unit, "description": st.text(max_size=40),
                                                        "domain": _text, "profile": st.dictionaries(st.sampled_from(["p0000", "p0001", "nope"]), _unit, max_size=2)})),
}


@pytest.fixture(scope="module")
def key(served):
    from services.auth import KeyStore

    ks = KeyStore(served.args.state_dir() / "keys.sqlite")
    _, token = ks.create("fuzz", ["infer", "feedback", "admin"], rate_per_s=10_000, burst=10_000)
    ks.close()
    return token


@pytest.fixture(scope="module")
def client(served, key):
    with httpx.Client(base_url=served.url, timeout=120, headers={"Authorization": f"Bearer {key}"}) as c:
        yield c


def _check(r: httpx.Response, what) -> None:
    assert r.status_code < 500, (what, r.status_code, r.text[:500])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert isinstance(err["message"], str) and err["message"], (what, r.text[:500])


@pytest.mark.parametrize("path", list(BODIES))
def test_http_bodies_never_5xx(client, path):
    before = client.get("/healthz").json()["feedback_offset"]
    statuses: list[int] = []

    def hub_version() -> int:
        return client.get("/healthz").json()["hub_version"]

    @FUZZ
    @given(body=BODIES[path])
    def run(body):
        raw = json.dumps(body, allow_nan=True).encode()
        v = hub_version() if path == "/v1/admin/models" else None
        r = client.post(path, content=raw, headers={"content-type": "application/json"})
        _check(r, body)
        if v is not None and r.status_code >= 400:  # a refused registration changes nothing
            assert hub_version() == v, body
        statuses.append(r.status_code)

    run()
    assert len(statuses) >= 30 and any(400 <= c < 500 for c in statuses), statuses
    if path == "/v1/feedback":  # no fuzzed feedback names a real request id: nothing may be stored
        assert client.get("/healthz").json()["feedback_offset"] == before and 200 not in statuses
    else:  # the fuzzer reached the handlers' success path too, not only the validation layer
        assert any(200 <= c < 300 for c in statuses), statuses
    assert client.get("/healthz").json()["status"] == "ok"


@FUZZ
@given(raw=st.binary(max_size=200), ctype=st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded", ""]),
       path=st.sampled_from([*BODIES, "/v1/models", "/v1/admin/profile", "/v1/nowhere"]), method=st.sampled_from(["POST", "GET", "PUT", "DELETE"]))
def test_http_raw_bytes_methods_and_paths(client, raw, ctype, path, method):
    r = client.request(method, path, content=raw, headers={"content-type": ctype} if ctype else {})
    _check(r, (method, path, raw))


# header values as HTTP allows them (control characters are refused by the HTTP server itself,
# with its own plain 400, before the app runs)
_hdr = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=80)


@FUZZ
@given(auth=_hdr | st.just("Bearer ") | st.builds(lambda s: f"Bearer cmr-{s}", _hdr) | st.builds(lambda s: f"Bearer cmr-0123456789ab.{s}", _hdr))
def test_http_authorization_headers(served, auth):
    try:
        r = httpx.post(served.url + "/v1/route", json={"query": "hi"}, headers={"Authorization": auth}, timeout=60)
    except httpx.LocalProtocolError:  # e.g. trailing whitespace: the client itself will not send it
        return
    assert r.status_code == 401 and r.json()["error"]["message"], (auth, r.text)


@FUZZ
@given(ids=st.lists(st.text(max_size=30), max_size=3) | _json, one=st.text(min_size=1, max_size=30))
def test_http_retire_never_5xx(client, ids, one):
    _check(client.request("DELETE", "/v1/admin/models", content=json.dumps({"ids": ids}), headers={"content-type": "application/json"}), ids)
    if one.strip() and one not in ("tiny-gpt2-a", "tiny-gpt2-b"):
        _check(client.delete("/v1/admin/models/" + urllib.parse.quote(one, safe="")), one)


_BAD = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
_floats = st.floats(allow_nan=True, allow_infinity=True)


@pytest.fixture(scope="module")
def stub(served, key):
    from services.grpc import cmr_pb2_grpc

    channel = grpc.insecure_channel(f"127.0.0.1:{served.grpc_port}")
    grpc.channel_ready_future(channel).result(timeout=60)
    yield cmr_pb2_grpc.CMRStub(channel), [("authorization", f"Bearer {key}")]
    channel.close()


def _grpc(call) -> None:
    try:
        call()
    except grpc.RpcError as e:
        assert e.code() not in _BAD, (e.code(), e.details())
        assert e.details(), e.code()


@FUZZ
@given(query=st.text(max_size=60), cw=_floats, k=st.integers(-5, 200), max_cost=st.none() | _floats, allow=st.lists(st.text(max_size=8), max_size=2),
       rid=st.text(max_size=40), reward=_floats, role=_roles.filter(lambda r: isinstance(r, str)), content=st.text(max_size=40),
       cid=st.text(max_size=20), cost=_floats, backend=st.text(max_size=30) | st.builds(json.dumps, _json), score=_floats)
def test_grpc_messages_never_internal(stub, query, cw, k, max_cost, allow, rid, reward, role, content, cid, cost, backend, score):
    from services.grpc import cmr_pb2 as pb

    s, md = stub
    routing = pb.Routing(cost_weight=cw, k=k, allow=allow, **({} if max_cost is None else {"max_cost": max_cost}))
    _grpc(lambda: s.Route(pb.RouteRequest(query=query, routing=routing, no_record=True), metadata=md))
    _grpc(lambda: s.Feedback(pb.FeedbackRequest(request_id=rid, reward=reward), metadata=md))
    if not (math.isfinite(cost) and cost >= 0 and cid.strip()):  # only refusals: keep the hub as it is
        card = pb.ModelCard(id=cid, cost=cost, backend_json=backend, profile={"p0000": score})
        _grpc(lambda: s.RegisterModel(pb.RegisterModelRequest(cards=[card]), metadata=md))
    if role not in ("user", "system", "assistant"):  # refusals only: no generation in the fuzz loop
        _grpc(lambda: list(s.Chat(pb.ChatRequest(messages=[pb.Message(role=role, content=content)], max_tokens=1, routing=routing), metadata=md)))


def test_server_still_healthy_after_fuzzing(client):
    h = client.get("/healthz").json()
    assert h["status"] == "ok" and h["checkpoint_version"] >= 1
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hello"}], "max_tokens": 2})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None
