"""Ingress-side coalescing of routing requests: concurrent ``/v1/route`` calls of one ingress
replica go to the router as one ``route_many`` handle call. Each request must still get its own
answer: order kept, a request whose filters match nothing gets its 400 in its own slot, request
ids distinct, feedback accepted for each recorded decision. ``RouterDeployment.route`` (single
request, ``@serve.batch``) keeps working for other callers."""

from __future__ import annotations

import asyncio

import httpx
import pytest

pytestmark = pytest.mark.ray

# a longer batch wait than the default makes the concurrent requests below share batches
APP_ARGS = {"learner": {"enabled": False}, "batch_wait_timeout_s": 0.05, "max_batch_size": 16}

N = 48


async def _fire(url: str, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=len(bodies))) as c:
        return list(await asyncio.gather(*(c.post("/v1/route", json=b) for b in bodies)))


def test_concurrent_routes_each_get_their_own_answer(served):
    with httpx.Client(base_url=served.url, timeout=120) as client:
        ids = sorted(m["id"] for m in client.get("/v1/models").json()["data"] if m["id"] != "auto")
        # slot kinds: 0 = filters match nothing (400), 1 = allow-list of one distinct model (the
        # answer names which request it belongs to), 2 = free choice (compared with a lone request)
        allowed = {i: ids[(7 * i) % len(ids)] for i in range(N) if i % 3 == 1}
        bodies = []
        for i in range(N):
            body = {"query": f"Question {i}: summarise this article about topic number {i * 13}.", "record": i % 3 != 2}
            if i % 3 == 0:
                body["routing"] = {"domains": [f"no-such-domain-{i}"]}
            elif i % 3 == 1:
                body["routing"] = {"allow": [allowed[i]], "k": 2}
            else:
                body["routing"] = {"k": 4, "cost_weight": 0.25 * (i % 4)}
            bodies.append(body)
        resps = asyncio.run(_fire(served.url, bodies))

        got_ids = []
        for i, (body, r) in enumerate(zip(bodies, resps)):
            if i % 3 == 0:
                assert r.status_code == 400, (i, r.text)
                err = r.json()["error"]
                assert err["param"] == "routing" and "filters" in err["message"], err
                continue
            assert r.status_code == 200, (i, r.text)
            d = r.json()
            assert r.headers["x-cmr-request-id"] == d["request_id"] and r.headers["x-cmr-model"] == d["model"]
            got_ids.append(d["request_id"])
            if i % 3 == 1:
                assert d["model"] == allowed[i] and d["alternatives"] == [], (i, d)
            else:
                # the same question alone (embedding now cached: same vector) decides the same; scores
                # agree to float rounding (the policy scores a batch with one matmul)
                alone = client.post("/v1/route", json=body).json()
                assert [alone["model"]] + [a["model"] for a in alone["alternatives"]] == [d["model"]] + [a["model"] for a in d["alternatives"]], i
                assert alone["score"] == pytest.approx(d["score"], abs=1e-6), i
                assert len(d["alternatives"]) == 3 and d["cost_weight"] == body["routing"]["cost_weight"]
        assert len(got_ids) == len(set(got_ids)) == 2 * N // 3

        # feedback reaches the decision each recorded request got, once
        recorded = [r.json()["request_id"] for i, r in enumerate(resps) if i % 3 == 1]
        for rid in recorded:
            fb = client.post("/v1/feedback", json={"request_id": rid, "reward": 1.0})
            assert fb.status_code == 200 and fb.json()["accepted"], fb.text
        again = client.post("/v1/feedback", json={"request_id": recorded[0], "reward": 1.0})
        assert again.status_code == 409
        # not recorded (record=false): nothing to reward
        unrecorded = resps[2].json()["request_id"]
        assert client.post("/v1/feedback", json={"request_id": unrecorded, "reward": 1.0}).status_code == 404


def test_router_route_many_and_single_route(served):
    from ray import serve

    h = serve.get_deployment_handle("Router", app_name="cmr")
    good = {"query": "Translate this sentence into French.", "filters": {}, "k": 3, "record": False}
    out = h.route_many.remote([good, {"query": "x", "filters": {"domains": ["nothing-here"]}, "record": False},
                               {"query": "y", "filters": {"bogus_field": 1}}, {"filters": {}}, dict(good, k=1)]).result()
    assert len(out) == 5
    assert "decision" in out[0] and len(out[0]["decision"]["alternatives"]) == 2
    assert out[1]["status"] == 400 and "filters" in out[1]["error"]
    assert out[2]["status"] == 400 and "bogus_field" in out[2]["error"]  # malformed item: its own slot only
    assert out[3]["status"] == 400 and "query" in out[3]["error"]
    assert out[4]["decision"]["model"] == out[0]["decision"]["model"] and out[4]["decision"]["alternatives"] == []
    assert h.route_many.remote([]).result() == []
    # the single-request entry point (its own @serve.batch) answers the same
    one = h.route.remote(good).result()
    assert one["decision"]["model"] == out[0]["decision"]["model"]
    assert one["decision"]["request_id"] != out[0]["decision"]["request_id"]
