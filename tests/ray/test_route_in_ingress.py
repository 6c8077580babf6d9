"""``AppArgs.route_in_ingress``: the ingress routes with the Router deployment's own class in its
process. The coalescing tests run again against it (each request its own answer, filters, feedback
through the Router deployment for the decisions the ingress recorded), and a chat with
``model: "auto"`` answers with a recorded decision that feedback reaches."""

from __future__ import annotations

import httpx
import pytest

# the same tests, this module's APP_ARGS: pytest collects them here too
from tests.ray.test_coalescing import test_concurrent_routes_each_get_their_own_answer  # noqa: F401

pytestmark = pytest.mark.ray

# a long batch wait: a lone request that sat through it would show (test_a_lone_request_does_not_wait_for_a_batch)
APP_ARGS = {"learner": {"enabled": False}, "batch_wait_timeout_s": 0.5, "max_batch_size": 16, "route_in_ingress": True,
            # the watcher would pick a change up only after this: what this ingress applied must not wait
            "reload_check_s": 30}


def test_auto_chat_routed_in_the_ingress(served):
    with httpx.Client(base_url=served.url, timeout=120) as c:
        r = c.post("/v1/chat/completions", json={"model": "auto", "messages": [{"role": "user", "content": "Write a haiku about rivers."}],
                                                 "max_tokens": 4})
        assert r.status_code == 200, r.text
        d = r.json()
        assert d["model"] == d["routing"]["model"] != "auto" and d["routing"]["score"] is not None
        fb = c.post("/v1/feedback", json={"request_id": d["id"], "reward": 1.0})
        assert fb.status_code == 200 and fb.json()["accepted"], fb.text
        # the Router deployment still serves the hub: it lists the model the ingress chose
        assert d["model"] in {m["id"] for m in c.get("/v1/models").json()["data"]}



def test_a_lone_request_does_not_wait_for_a_batch(served):
    """Routed in the ingress with nothing else in flight, a request is decided at once instead of
    waiting ``batch_wait_timeout_s`` for company (which only concurrent requests can give)."""
    import statistics
    import time

    with httpx.Client(base_url=served.url, timeout=120) as c:
        took = []
        for i in range(5):
            t0 = time.perf_counter()
            assert c.post("/v1/route", json={"query": f"Summarise report number {i}."}).status_code == 200
            took.append(time.perf_counter() - t0)
    assert statistics.median(took) < 0.4, took  # each would take > 0.5 s through the batch wait


def test_a_change_made_through_this_ingress_routes_at_once(served):
    with httpx.Client(base_url=served.url, timeout=120) as c:
        before = c.post("/v1/route", json={"query": "Summarise this report."}).json()["cost_weight"]
        r = c.post("/v1/admin/calibration", json={"cost_weight": before + 7.5})
        assert r.status_code == 200, r.text
        assert c.post("/v1/route", json={"query": "Summarise this report, again."}).json()["cost_weight"] == before + 7.5
        r = c.post("/v1/admin/calibration", json={"cost_weight": before})  # leave the module's router as it was
        assert r.status_code == 200, r.text
