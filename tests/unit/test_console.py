"""The console's parts without a browser: the decision store's console reads, usage buckets, the
what-if curve, the static files (no path escapes the folder) and the scope rules of its paths."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from cmr.calibrate import cost_per_1k, curve
from cmr.types import Decision
from services import console
from services.auth import PUBLIC_PREFIXES, required_scope
from services.store import open_decision_store


def _record(store, rid, model, cost, tenant, created_at=None, query="q"):
    d = Decision(model=model, score=0.5, utility=0.4, request_id=rid, cost_weight=0.1, latency_s=0.002)
    store.record([d], [query], np.ones((1, 4), np.float32) * len(rid), [cost], [("k", tenant)])
    time.sleep(0.002)  # distinct creation times: "newest first" is well defined


def test_recent_joins_reward_and_fallback_and_filters(tmp_path, store_dsn):
    s = open_decision_store(store_dsn, tmp_path / "d.sqlite")
    _record(s, "r1", "a", 0.1, "t1", query="first prompt")
    _record(s, "r2", "b", 0.2, "t2")
    _record(s, "r3", "a", 0.1, "t1")
    s.add_feedback("r1", 0.9)
    s.supersede("r3", "r4")
    rows = s.recent()
    assert [r["request_id"] for r in rows] == ["r3", "r2", "r1"]
    r1 = rows[2]
    assert (r1["reward"], r1["query"], r1["score"], r1["cost_weight"], r1["latency_s"], r1["tenant"]) == (0.9, "first prompt", 0.5, 0.1, 0.002, "t1")
    assert rows[0]["superseded_by"] == "r4" and rows[1]["reward"] is None
    assert [r["request_id"] for r in s.recent(tenant="t1")] == ["r3", "r1"]
    assert [r["request_id"] for r in s.recent(model="b")] == ["r2"]
    assert [r["request_id"] for r in s.recent(after=r1["created"])] == ["r3", "r2"]
    assert len(s.recent(limit=1)) == 1
    assert s.recent_embeddings(10, tenant="t2").shape == (1, 4) and s.recent_embeddings(2).shape == (2, 4)
    s.close()


def test_usage_buckets_share_cost_reward():
    now = 1000.0
    rows = [{"created": 905.0, "model": "a", "cost": 0.1, "reward": 1.0}, {"created": 906.0, "model": "a", "cost": 0.1, "reward": 0.0},
            {"created": 995.0, "model": "b", "cost": 0.3, "reward": None}, {"created": 10.0, "model": "b", "cost": 9.0, "reward": None}]
    u = console.usage(rows, now - 100, now, 2)
    assert u["decisions"] == 3  # the row outside the window is left out
    a, b = u["models"]["a"], u["models"]["b"]
    assert a["decisions"] == [2, 0] and a["reward"] == [0.5, None] and a["cost"] == pytest.approx([0.2, 0.0])
    assert b["decisions"] == [0, 1] and b["total"]["reward"] is None
    assert a["total"]["share"] == pytest.approx(2 / 3) and a["total"]["feedback"] == 2
    assert u["times"] == [925.0, 975.0]


def test_curve_is_the_routers_rule():
    rng = np.random.default_rng(0)
    scores, costs = rng.random((50, 4)), np.array([0.0, 0.1, 0.5, 1.0])
    pts = curve(scores, costs)
    assert pts[0]["lambda"] == 0 and pts[0]["quality"] == pytest.approx(scores.max(axis=1).mean())
    assert pts[-1]["cost_per_1k"] == pytest.approx(0.0)  # at the top λ the cheapest model wins everywhere
    cost = [p["cost_per_1k"] for p in pts]
    assert all(x >= y - 1e-9 for x, y in zip(cost, cost[1:]))  # cost never rises with λ
    for p in pts[::7]:
        assert p["cost_per_1k"] == pytest.approx(cost_per_1k(scores, costs, p["lambda"])) and sum(p["shares"]) == pytest.approx(1)
    assert [p["lambda"] for p in curve(scores, costs, [0.3, 0.1, 0.3])] == [0.1, 0.3]


def test_static_files_stay_in_their_folder():
    f, media = console.static_file("")
    assert f.name == "index.html" and media.startswith("text/html")
    assert console.static_file("app.js")[1].startswith("text/javascript")
    assert console.static_file("vendor/uplot/uPlot.esm.js") is not None
    for bad in ["../__init__.py", "../../auth.py", "/etc/passwd", "vendor/../../__init__.py", "nope.js", "vendor"]:
        assert console.static_file(bad) is None, bad
    meta = console.VENDORED["uplot"]
    assert f"(v{meta['version']})" in (console.STATIC_DIR / "vendor/uplot/uPlot.esm.js").read_text(encoding="utf-8")[:400]
    assert "MIT" in (console.STATIC_DIR / "vendor/uplot/LICENSE").read_text()


def test_console_scopes():
    # pages public, data behind any valid key, admin actions behind admin
    assert "/console/app.js".startswith(PUBLIC_PREFIXES)
    assert required_scope("GET", "/v1/console/decisions") is None
    assert required_scope("POST", "/v1/admin/calibration") == "admin"
    assert console.visible({"query": "secret", "model": "a"}, admin=False) == {"model": "a"}
    assert console.visible({"query": "secret"}, admin=True)["query"] == "secret"


def test_calibration_body_needs_exactly_one():
    from pydantic import ValidationError

    from services.schemas import CalibrationBody

    assert CalibrationBody(cost_weight=0.5).cost_weight == 0.5
    for bad in [{}, {"cost_weight": 1, "budget_per_1k": 2}, {"cost_weight": -1}, {"budget_per_1k": 0}, {"cost_weight": 1, "x": 1}]:
        with pytest.raises(ValidationError):
            CalibrationBody(**bad)


def test_auth_middleware_serves_console_files_without_a_key_but_no_escape():
    import asyncio

    from services.auth import AuthMiddleware

    seen = []

    async def app(scope, receive, send):
        seen.append(scope["path"])

    sent = []

    async def send(msg):
        sent.append(msg)

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    mw = AuthMiddleware(app, get_auth=lambda: None)  # no authenticator: anything non-public is refused (503)
    for path in ["/console", "/console/", "/console/app.js"]:
        asyncio.run(mw({"type": "http", "path": path, "method": "GET", "headers": []}, receive, send))
    asyncio.run(mw({"type": "http", "path": "/console/../v1/console/decisions", "method": "GET", "headers": []}, receive, send))
    asyncio.run(mw({"type": "http", "path": "/v1/console/decisions", "method": "GET", "headers": []}, receive, send))
    assert seen == ["/console", "/console/", "/console/app.js"]
    assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [503, 503]
    assert json.loads(sent[-1]["body"])["error"]["code"] == 503


def test_router_whatif_and_apply(tmp_path, data_root, encoder):
    """``RouterCore.whatif`` draws the served policy's curve on logged traffic (the tenant's own when
    asked), moves its point with λ and finds the λ of a budget; ``apply_calibration`` sets the λ the
    router uses, refusing a budget fitted on too few queries unless forced, as ``cmr calibrate`` does."""
    from cmr.calibrate import CalibrationError
    from cmr.types import ModelCard
    from services.config import AppArgs
    from services.routing import RouteRequest, RouterCore
    from tests.unit.bench_data import write_mini_cmrbench

    bench = tmp_path / "bench"
    write_mini_cmrbench(data_root / "cmrbench", bench, n_train=25, n_test=10)
    core = RouterCore(AppArgs(home=str(tmp_path / "home"), bench=str(bench), tiny_models=False, profile_size=8, learner={"enabled": False}), encoder)
    assert core.whatif(100)["curve"] == []  # no traffic yet: nothing to draw
    # CMRBench cards cost nothing: a priced model that answered every profile prompt well gives λ something to trade
    core.register([ModelCard(id="premium", description="a strong generalist", cost=1.0, profile={p["id"]: 1.0 for p in core.profile_prompts})])
    queries = [f"question {i}: {w}" for i, w in enumerate(["sort a list in python", "capital of France", "translate to German",
                                                           "prove the theorem", "summarise the news"] * 6)]
    core.route([RouteRequest(query=q, tenant="a" if i % 3 else "b") for i, q in enumerate(queries)])
    w = core.whatif(100, lam=0.0)
    assert w["n_prompts"] == 30 and w["current_lambda"] == 0.0 and w["current"] == w["at"] and len(w["curve"]) > 10
    assert core.whatif(100, tenant="b")["n_prompts"] == 10
    top = w["curve"][-1]
    assert top["cost_per_1k"] <= w["at"]["cost_per_1k"] and core.whatif(100, lam=top["lambda"])["at"]["cost_per_1k"] == top["cost_per_1k"]
    budget = (w["curve"][0]["cost_per_1k"] + top["cost_per_1k"]) / 2
    b = core.whatif(100, budget_per_1k=budget)
    assert b["at"]["cost_per_1k"] <= budget + 1e-9 and b["at"]["lambda"] > 0
    with pytest.raises(CalibrationError, match="only 30 prompts"):
        core.apply_calibration(budget_per_1k=budget)
    assert core.status()["cost_weight"] == 0.0
    lam = core.apply_calibration(budget_per_1k=budget, force=True)
    assert lam == pytest.approx(b["at"]["lambda"]) and core.status()["calibration"]["source"] == "console: logged traffic"
    assert core.apply_calibration(cost_weight=2.5) == 2.5 and core.whatif(100)["current_lambda"] == 2.5
    info = core.checkpoint_info()
    assert info["version"] == core.version and info["written"] > 0
    core.close()
