"""Faults survived, on the real served app: a pool replica killed mid-request, the learner killed,
a corrupt latest checkpoint, the router replica killed, and a model whose backend always fails
(served by the runner-up). The learner keeps 3 checkpoint versions (retention under the faults).

The pool serving the two tiny models runs two replicas; replicas and the learner are found and
killed with Ray's own API (``ray.util.state.list_actors`` + ``ray.kill``), as an operator would.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

pytestmark = pytest.mark.ray

CHAT = [{"role": "user", "content": "Write a long story about a lighthouse keeper and the sea."}]
#: filled in by the ``_pools`` fixture (before ``served`` reads it): the tiny models, 2 replicas
APP_ARGS: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _pools(tmp_path_factory):
    """The embedded tiny pool, but with two replicas (so one can die while the other serves)."""
    from services.config import AppArgs
    from services.routing import effective_pools, prepare_models

    models_home = AppArgs(home=str(tmp_path_factory.mktemp("tiny_models")))
    prepare_models(models_home)
    pools = [p.model_copy(update={"num_replicas": 2}).model_dump(mode="json") for p in effective_pools(models_home)]
    # keep 3 checkpoint versions: retention runs under the kills below, routers reading meanwhile
    APP_ARGS.update({"pools": pools, "learner": {"poll_s": 0.5, "checkpoint_every_s": 0.5, "keep_checkpoints": 3}})
    if "auth" in AppArgs.model_fields:  # local test server: explicit open mode (no API keys)
        APP_ARGS["auth"] = {"open": True}
    yield


@pytest.fixture(scope="module")
def client(served):
    with httpx.Client(base_url=served.url, timeout=120) as c:
        yield c


def _replicas(deployment: str) -> list:
    """Live replica actors of a deployment of the ``cmr`` app, as actor handles."""
    import ray

    # Serve names replica actors "SERVE_REPLICA::<app>#<deployment>#<id>" in namespace "serve";
    # the names of dead actors are released, so these are the live ones
    rows = ray.util.list_named_actors(all_namespaces=True)
    names = [r["name"] for r in rows if r["namespace"] == "serve" and r["name"].startswith(f"SERVE_REPLICA::cmr#{deployment}#")]
    out = []
    for name in names:
        try:
            out.append(ray.get_actor(name, namespace="serve"))
        except ValueError:  # died between the listing and the lookup
            pass
    return out


def _wait(pred, what: str, deadline_s: float = 90, every: float = 0.3):
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        got = pred()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what} (last: {got!r})")


def _learner_status(client) -> dict:
    return client.get("/healthz").json().get("learner", {})


def test_learner_exactly_once_across_consolidation_and_a_failed_step(tmp_path):
    """No Serve: the learner's checkpoints (consolidations inside ``consume`` included) carry the
    offset ranges they applied, and a step that fails half-way is not applied twice."""
    from cmr import checkpoint
    from cmr.encoders import default_encoder
    from cmr.hub import HubStore, ModelHub
    from cmr.types import Decision, ModelCard
    from services.config import AppArgs
    from services.learner import LearnerActor, audit
    from services.routing import bootstrap, checkpoint_root
    from services.store import DecisionStore

    args = AppArgs(home=str(tmp_path), bench=None, tiny_models=False, profile_size=0,
                   learner={"enabled": False, "poll_s": 0, "events_per_step": 2, "consolidate_every": 3, "checkpoint_every_s": 0.5})
    enc = default_encoder()
    bootstrap(args, enc)
    hub = ModelHub(HubStore(args.state_dir() / "hub.sqlite"))
    hub.add([ModelCard(id="m1", description="translation model"), ModelCard(id="m2", description="summarisation model")])
    store = DecisionStore(args.state_dir() / "decisions.sqlite")

    def feed(start: int, n: int) -> None:
        ds = [Decision(model=f"m{1 + i % 2}", score=0.5, utility=0.5, request_id=f"r{start + i}") for i in range(n)]
        qs = [f"query number {start + i}" for i in range(n)]
        store.record(ds, qs, enc.encode(qs), [0.0] * n)
        for d in ds:
            store.add_feedback(d.request_id, 0.7)

    def rows() -> int:
        # the served default (auto) routes and learns through its inner policy before the choice
        state = checkpoint.load_policy(checkpoint_root(args), encoder=enc).state_dict()
        return len(state.get("inner", state)["memory"]["emb"])

    assert args.policy == "auto"
    rows0 = rows()
    feed(0, 7)
    learner = LearnerActor(args.to_dict(), encoder=enc)
    try:
        learner.step()  # slices of 2; consolidations after events 4 and 7 write the checkpoints
        fps = [checkpoint.open_checkpoint(checkpoint.version_dir(checkpoint_root(args), v)).fingerprint for v in checkpoint.versions(checkpoint_root(args))]
        assert [fp.get("applied") for fp in fps] == [None, [0, 4], [4, 7]] and all(fp.get("consolidation") for fp in fps[1:])
        # the next step fails after applying its first slice in memory: the loop reloads the last checkpoint
        feed(7, 5)
        real, calls = learner.learner.consume, []

        def flaky(part):
            calls.append(part)
            if len(calls) == 2:
                raise RuntimeError("injected failure")
            return real(part)

        learner.learner.consume = flaky
        learner.notify()
        _wait(lambda: learner.failures == 1, "the failed step", 30, 0.05)
        learner.notify()
        _wait(lambda: learner.status()["waiting"] == 0 and learner.status()["offset"] == 12, "the learner to catch up", 30, 0.05)
    finally:
        learner.stop()
    a = audit(args)
    assert (a["learnt"], a["n_lost"], a["n_duplicated"], a["waiting"], a["broken"]) == (12, 0, 0, 0, None), a
    # the served state holds each event once: the memory grew by exactly the 12 events
    assert rows() == rows0 + 12

    # retention: a learner keeping 2 versions prunes after its step; the audit covers the kept chain
    root = checkpoint_root(args)
    args2 = AppArgs.from_dict({**args.to_dict(), "learner": {**args.learner.model_dump(), "keep_checkpoints": 2}})
    learner = LearnerActor(args2.to_dict(), encoder=enc)
    try:
        feed(12, 3)
        assert learner.step() is not None and learner.status()["pruned"] > 0
    finally:
        learner.stop()
    kept = checkpoint.versions(root)
    assert len(kept) == 2 and kept[0] > 1 and not [p for p in root.iterdir() if p.name.startswith(".")]
    a = audit(args2)
    assert a["chain"] == kept and a["audited_from_version"] == kept[0] and a["pruned_upto"] == kept[0] - 1, a
    assert (a["n_lost"], a["n_duplicated"], a["waiting"], a["broken"]) == (0, 0, 0, None), a
    fp0 = checkpoint.open_checkpoint(checkpoint.version_dir(root, kept[0])).fingerprint
    assert a["audited_from_offset"] == fp0["applied"][0] > 0 and a["learnt"] + a["before_chain"] == a["accepted"] == 15, a
    # a version missing inside the kept window is a broken chain, not retention
    from cmr.published import publish
    from services.store import open_published

    publish(open_published(args2), root, checkpoint.save(root, checkpoint.load_policy(root, encoder=enc), {"offset": 15, "applied": [15, 15], "base": kept[-1]}))
    import shutil

    shutil.rmtree(checkpoint.version_dir(root, kept[-1]))
    assert audit(args2)["broken"] == f"base v{kept[-1]} has no readable fingerprint"


def test_pool_replica_killed_mid_request(served, client):
    import ray

    reps = _wait(lambda: len(r := _replicas("Pool-local")) == 2 and r, "two pool replicas")
    # warm both models on both replicas (the multiplexed loaders), so the kill hits generation
    for _ in range(6):
        for m in ("tiny-gpt2-a", "tiny-gpt2-b"):
            assert client.post("/v1/chat/completions", json={"model": m, "messages": CHAT, "max_tokens": 2}).status_code == 200

    async def burst(n: int) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=served.url, timeout=180) as ac:
            # half routed, half naming a model (generation starts beside the recorded decision)
            bodies = [{"model": "auto" if i % 2 else "tiny-gpt2-a", "messages": CHAT, "max_tokens": 256, "temperature": 1.0} for i in range(n)]
            tasks = [asyncio.create_task(ac.post("/v1/chat/completions", json=body)) for body in bodies]

            def busy() -> list:
                counts = ray.get([r.get_num_ongoing_requests.remote() for r in reps])
                return [r for r, c in zip(reps, counts) if c > 0]

            victim = None
            end = time.monotonic() + 60
            while victim is None and time.monotonic() < end:  # kill a replica while it is generating
                b = await asyncio.to_thread(busy)
                victim = b[0] if b else None
                await asyncio.sleep(0.05)
            assert victim is not None, "no pool replica ever had a request in flight"
            ray.kill(victim)
            return await asyncio.gather(*tasks)

    rs = asyncio.run(burst(8))
    assert [r.status_code for r in rs] == [200] * len(rs), [r.text[:200] for r in rs if r.status_code != 200]
    assert all(r.json()["model"] == "tiny-gpt2-a" for r in rs[::2])  # a named model is what answers, fallback or not
    fell = [r for r in rs if "fallback" in r.json()["routing"]]
    assert fell, "the killed replica's requests should say they were retried or fell back"
    for r in fell:
        fb = r.json()["routing"]["fallback"]
        assert fb["reason"] == "replica_died" and fb["attempts"] >= 2 and fb["to"] == r.json()["model"]
        assert json.loads(r.headers["x-cmr-fallback"]) == fb and r.json()["choices"][0]["message"]["content"]
        if fb["to"] != fb["from"]:  # served by a runner-up: its own recorded decision, so feedback rewards it
            assert r.json()["id"] != fb["from_request_id"]
        assert client.post("/v1/feedback", json={"request_id": r.json()["id"], "reward": 1.0}).status_code == 200
    # Serve replaces the dead replica; the pool serves on meanwhile
    _wait(lambda: len(_replicas("Pool-local")) == 2, "the pool back at two replicas", 120)
    assert client.post("/v1/chat/completions", json={"model": "auto", "messages": CHAT, "max_tokens": 4}).status_code == 200


def test_learner_killed_feedback_learnt_exactly_once(served, client):
    import ray

    from cmr import checkpoint
    from services.learner import audit, learner_handle
    from services.routing import checkpoint_root

    before = _wait(lambda: (s := _learner_status(client)).get("waiting") == 0 and s, "an idle learner")
    ids = [client.post("/v1/route", json={"query": f"Translate sentence {i} to German."}).json()["request_id"] for i in range(6)]
    # killed for good (no Ray restart): routing goes on, on the last checkpoint; feedback is still
    # accepted, and the router re-creates the learner on a later call
    ray.kill(learner_handle(served.args))
    for rid in ids:
        assert client.post("/v1/feedback", json={"request_id": rid, "reward": 0.8}).status_code == 200
        r = client.post("/v1/route", json={"query": "routing goes on"})
        assert r.status_code == 200 and r.json()["checkpoint_version"] >= 1
    after = _wait(lambda: (s := _learner_status(client)).get("instance") not in (None, before["instance"]) and s.get("waiting") == 0 and s,
                  "a re-created learner to catch up")
    a = audit(served.args)
    assert a["n_lost"] == 0 and a["n_duplicated"] == 0 and a["broken"] is None, a
    # what the pruned versions learnt is before the audited chain; the kept chain covers the rest once
    assert a["learnt"] + a["before_chain"] == a["accepted"] >= 6 and a["learnt"] >= 1, a
    assert a["waiting"] == 0 and a["checkpoint_version"] == after["checkpoint_version"]
    assert len(checkpoint.versions(checkpoint_root(served.args))) <= 3 + 1  # the newest 3 valid (+ at most one being written)


def test_corrupt_checkpoint_skipped_by_restarted_router(served, client):
    import ray

    from cmr import checkpoint
    from services.learner import audit
    from services.routing import checkpoint_root

    root = checkpoint_root(served.args)
    _wait(lambda: _learner_status(client).get("waiting") == 0, "an idle learner")
    rid = client.post("/v1/route", json={"query": "Summarise this article."}).json()["request_id"]
    assert client.post("/v1/feedback", json={"request_id": rid, "reward": 1.0}).status_code == 200
    newest = _wait(lambda: (h := client.get("/healthz").json())["learner"].get("waiting") == 0
                   and h["checkpoint_version"] == h["learner"]["checkpoint_version"] and h["checkpoint_version"], "the router on the newest checkpoint")
    assert checkpoint.versions(root)[-1] == newest
    good = checkpoint.versions(root)[-2]
    (checkpoint.version_dir(root, newest) / "weights.npz").write_bytes(b"torn write")  # the newest no longer verifies
    card = {"id": "faults/added-before-restart", "description": "a card registered before the router restart", "cost": 0.5}
    assert client.post("/v1/admin/models", json=card).status_code == 201
    pending = client.post("/v1/route", json={"query": "A decision made before the restart."}).json()["request_id"]
    # every process that routes: the Router replicas and, routing in the ingress (the default), the
    # ingress replicas with their own router
    routing = ["Router"] + (["Ingress"] if served.args.route_in_ingress else [])
    routers = [r for d in routing for r in _replicas(d)]
    for r in routers:
        ray.kill(r)
    # the replacement comes back with the newest checkpoint that verifies, the hub and the decision store
    _wait(lambda: (h := _safe_health(client)) and h.get("checkpoint_version") == good
          and (_safe_route_version(client) == good), "a restarted router", 180, 1.0)
    assert not {a._actor_id for a in routers} & {a._actor_id for d in routing for a in _replicas(d)}
    models = {m["id"] for m in client.get("/v1/models").json()["data"]}
    assert card["id"] in models
    r = client.post("/v1/route", json={"query": "Translate to French."})
    assert r.status_code == 200 and r.json()["checkpoint_version"] == good
    chat = client.post("/v1/chat/completions", json={"model": "auto", "messages": CHAT, "max_tokens": 4})
    assert chat.status_code == 200 and chat.json()["routing"]["checkpoint_version"] == good
    # feedback for a decision made before the restart is accepted; the learner (which held the
    # corrupt version's state in memory) writes a newer valid one and the router swaps to it
    assert client.post("/v1/feedback", json={"request_id": pending, "reward": 0.5}).status_code == 200
    _wait(lambda: (_safe_health(client) or {}).get("checkpoint_version", 0) > newest, "the router on the learner's next checkpoint")
    a = audit(served.args)
    assert a["n_lost"] == 0 and a["n_duplicated"] == 0 and a["waiting"] == 0, a


def _safe_route_version(client) -> int | None:
    try:
        r = client.post("/v1/route", json={"query": "Is the router back?", "routing": {"record": False}}, timeout=10)
        return r.json().get("checkpoint_version") if r.status_code == 200 else None
    except Exception:
        return None


def _safe_health(client) -> dict | None:
    try:
        r = client.get("/healthz", timeout=10)
    except httpx.HTTPError:  # the router is restarting
        return None
    return r.json() if r.status_code == 200 else None


BROKEN = "faults/broken-backend"


def test_failing_model_served_by_the_runner_up(served, client):
    """The chosen model's generation fails on every attempt (an ``openai`` backend on a closed
    loopback port): the request is retried once, then served by the runner-up, the response says
    so, and feedback for its id rewards the model that answered."""
    from services.store import DecisionStore

    card = {"id": BROKEN, "description": "a model whose endpoint is down", "cost": 0.0,
            "backend": {"engine": "openai", "base_url": "http://127.0.0.1:9/v1"}}
    assert client.post("/v1/admin/models", json=card).status_code == 201
    try:
        # cost weight 1000: the free broken model wins over the tiny models (costs > 0)
        routing = {"cost_weight": 1000.0, "allow": [BROKEN, "tiny-gpt2-a", "tiny-gpt2-b"]}
        probe = client.post("/v1/route", json={"query": "Tell me about lighthouses.", "routing": routing, "record": False}).json()
        assert probe["model"] == BROKEN and len(probe["alternatives"]) == 2, probe
        runner_up = probe["alternatives"][0]["model"]
        r = client.post("/v1/chat/completions", json={"model": "auto", "messages": CHAT, "max_tokens": 4, "routing": routing})
        assert r.status_code == 200, r.text
        body = r.json()
        fb = body["routing"]["fallback"]
        assert (fb["from"], fb["to"], fb["reason"]) == (BROKEN, runner_up, "pool_error"), fb
        assert fb["attempts"] == 3 and len(fb["errors"]) == 2 and all(e.startswith(f"{BROKEN}: ") for e in fb["errors"]), fb
        assert body["model"] == runner_up and body["routing"]["model"] == runner_up and body["choices"][0]["message"]["content"]
        assert json.loads(r.headers["x-cmr-fallback"]) == fb and r.headers["x-cmr-model"] == runner_up
        # the answer is the runner-up's own recorded decision: its feedback is the runner-up's reward
        assert body["id"] != fb["from_request_id"]
        ok = client.post("/v1/feedback", json={"request_id": body["id"], "reward": 1.0})
        assert ok.status_code == 200, ok.text
        store = DecisionStore(served.args.state_dir() / "decisions.sqlite")
        try:
            ev = [e for e in store.events(after=ok.json()["offset"] - 1, limit=1) if e.request_id == body["id"]]
        finally:
            store.close()
        assert len(ev) == 1 and ev[0].model == runner_up and ev[0].reward == 1.0
        # the failed decision is superseded: a reward for it would credit the model that never answered
        stale = client.post("/v1/feedback", json={"request_id": fb["from_request_id"], "reward": 0.0})
        assert stale.status_code == 409 and body["id"] in stale.json()["error"]["message"], stale.text
        # streaming fails over the same way (before the first chunk is sent)
        with client.stream("POST", "/v1/chat/completions", json={"model": "auto", "messages": CHAT, "max_tokens": 4,
                                                                  "routing": routing, "stream": True}) as s:
            assert s.status_code == 200
            first = json.loads(next(line for line in s.iter_lines() if line.startswith("data: "))[6:])
        assert first["model"] == runner_up and first["routing"]["fallback"]["from"] == BROKEN
    finally:  # auto routing elsewhere must not pick the free broken model
        assert client.delete(f"/v1/admin/models/{BROKEN}").status_code == 200
