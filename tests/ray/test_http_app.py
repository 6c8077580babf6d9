"""The served app over HTTP with real clients (httpx, the official ``openai`` client): the embedded
default (CMRBench hub trained at first start, two tiny local chat models, learner on)."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

pytestmark = pytest.mark.ray

CHAT = [{"role": "user", "content": "Summarise this news article about football in two sentences."}]


@pytest.fixture(scope="module")
def client(served):
    with httpx.Client(base_url=served.url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def oai(served):
    from openai import OpenAI

    return OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _wait_version(client, above: int, deadline_s: float = 60) -> int:
    """Poll /healthz until the router serves a checkpoint newer than ``above``."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        v = client.get("/healthz").json()["checkpoint_version"]
        if v > above:
            return v
        time.sleep(0.2)
    raise AssertionError(f"router still on checkpoint <= {above}")


def test_health_and_models(client):
    h = client.get("/healthz").json()
    assert h["status"] == "ok" and h["checkpoint_version"] >= 1
    end = time.monotonic() + 60
    while "checkpoint_version" not in h["learner"]:  # the learner actor may still be loading
        assert "error" not in h["learner"] and time.monotonic() < end, h["learner"]
        time.sleep(0.5)
        h = client.get("/healthz").json()
    assert h["learner"]["checkpoint_version"] >= 1 and h["learner"]["waiting"] == 0
    data = client.get("/v1/models").json()["data"]
    ids = {m["id"] for m in data}
    # the whole CMRBench hub is routable, the two tiny models are servable too
    assert len(data) == 2315 + 2 + 1 and {"auto", "tiny-gpt2-a", "tiny-gpt2-b"} <= ids
    assert {m["id"] for m in data if m["servable"]} == {"auto", "tiny-gpt2-a", "tiny-gpt2-b"}
    prompts = client.get("/v1/admin/profile").json()["prompts"]
    assert len(prompts) == 32 and len({p["id"] for p in prompts}) == 32 and all(p["prompt"] for p in prompts)


def test_route_decision_and_filters(client):
    r = client.post("/v1/route", json={"query": "Translate this English sentence to German.", "routing": {"k": 4}})
    assert r.status_code == 200
    d = r.json()
    assert d["request_id"].startswith("cmr-") and len(d["alternatives"]) == 3
    assert r.headers["x-cmr-model"] == d["model"] and r.headers["x-cmr-request-id"] == d["request_id"]
    scores = [d["score"]] + [a["score"] for a in d["alternatives"]]
    assert scores == sorted(scores, reverse=True)  # λ = 0: utility = score, best first
    # a domain filter keeps only that domain's models
    dom = client.post("/v1/route", json={"query": "Detect the objects in this photo.", "routing": {"domains": ["Computer Vision Object Detection"], "k": 3}})
    assert dom.status_code == 200
    cards = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    picked = [dom.json()["model"]] + [a["model"] for a in dom.json()["alternatives"]]
    assert all(cards[m]["domain"] == "Computer Vision Object Detection" for m in picked)
    # a task the router never learnt (its training data names none) is routed as without it
    same = client.post("/v1/route", json={"query": "Translate this English sentence to German.", "routing": {"k": 4, "task": "translation"}})
    assert same.status_code == 200 and same.json()["model"] == d["model"]
    # an allow-list of one decides that model
    one = client.post("/v1/route", json={"query": "anything", "routing": {"allow": ["tiny-gpt2-a"]}}).json()
    assert one["model"] == "tiny-gpt2-a" and one["alternatives"] == []


def test_cost_weight_prefers_cheaper(client):
    q = {"query": "Write a short poem about the sea.", "routing": {"allow": ["tiny-gpt2-a", "tiny-gpt2-b"]}}
    costs = {m["id"]: m["cost"] for m in client.get("/v1/models").json()["data"] if m["id"] in ("tiny-gpt2-a", "tiny-gpt2-b")}
    cheap = min(costs, key=costs.get)
    q["routing"]["cost_weight"] = 1000.0  # any score gap is dwarfed by the cost gap
    d = client.post("/v1/route", json=q).json()
    assert (d["model"], d["cost_weight"]) == (cheap, 1000.0)
    del q["routing"]["cost_weight"]  # omitted: the router's default (no calibration applied here: AppArgs.cost_weight)
    assert client.post("/v1/route", json=q).json()["cost_weight"] == 0.0


def test_bad_requests_name_the_field(client):
    cases = [
        ("/v1/route", {"routing": {}}, 400, "query"),
        ("/v1/route", {"query": "x", "routing": {"cost_weight": -1}}, 400, "routing.cost_weight"),
        ("/v1/route", {"query": "x", "routing": {"domains": ["no such domain"]}}, 400, "filters"),
        ("/v1/route", {"query": "x", "routing": {"task": "a\u0000b"}}, 400, "routing.task"),
        ("/v1/route", {"query": "x", "routing": {"task": "t" * 300}}, 400, "routing.task"),
        ("/v1/chat/completions", {"model": "auto"}, 400, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role"),
        ("/v1/chat/completions", {"model": "no-such-model", "messages": CHAT}, 404, "model"),
        ("/v1/chat/completions", {"model": "bert-base-uncased", "messages": CHAT}, 404, "model"),  # route-only hub entry
        ("/v1/completions", {"prompt": "hi", "temperature": 5}, 400, "temperature"),
        ("/v1/feedback", {"request_id": "cmr-unknown", "reward": 1.0}, 404, "request_id"),
        ("/v1/feedback", {"request_id": "cmr-unknown", "reward": 2.0}, 400, "reward"),
        ("/v1/admin/models", {"id": "", "cost": 0}, 400, "id"),
        ("/v1/admin/models", {"id": "m-neg", "cost": -1}, 400, "cost"),
        ("/v1/admin/models", {"id": "m-eng", "backend": {"engine": "tgi"}}, 400, "backend.engine"),
        ("/v1/admin/models", {"cards": []}, 400, "cards"),
        ("/v1/admin/models", {"cards": ["not a card"]}, 400, "cards.0"),
        ("/v1/admin/models", {"id": "m-prof", "profile": {"p0000": "high"}}, 400, "profile.p0000"),
        ("/v1/chat/completions", {"messages": CHAT, "stream": True, "stream_options": "x"}, 400, "stream_options"),
        ("/v1/admin/models", {"id": "m-cost", "cost": 1e308}, 400, "cost"),
    ]
    for path, body, status, field in cases:
        r = client.post(path, json=body)
        assert r.status_code == status, (path, body, r.text)
        msg = r.json()["error"]["message"]
        assert field in msg, (path, body, msg)
    assert client.delete("/v1/admin/models/no-such-model").status_code == 404


def test_bad_cards_are_refused_naming_the_field(client):
    """The same bad cards as over gRPC (tests/bad_cards.py): 400 naming the field, nothing stored."""
    from tests.bad_cards import BAD_CARDS

    before = client.get("/v1/models").json()
    for card, field in BAD_CARDS:
        r = client.post("/v1/admin/models", json=card)
        assert r.status_code == 400 and f"'cards.0.{field}'" in r.json()["error"]["message"], (card, r.text)
    assert client.get("/v1/models").json() == before


def test_openai_chat_auto(oai):
    resp = oai.chat.completions.create(model="auto", messages=CHAT, max_tokens=12, temperature=0)
    assert resp.model in ("tiny-gpt2-a", "tiny-gpt2-b")
    assert resp.usage.completion_tokens > 0 and resp.choices[0].finish_reason in ("length", "stop")
    assert resp.model_extra["routing"]["model"] == resp.model and resp.id == resp.model_extra["routing"]["request_id"]
    again = oai.chat.completions.create(model="auto", messages=CHAT, max_tokens=12, temperature=0)
    assert again.choices[0].message.content == resp.choices[0].message.content  # greedy: same model, same text


def test_openai_chat_streaming(oai):
    stream = oai.chat.completions.create(model="auto", messages=CHAT, max_tokens=16, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    usage = [c.usage for c in chunks if c.usage]
    assert chunks[0].model_extra["routing"]["model"] == chunks[0].model
    assert finish and usage and usage[0].completion_tokens > 0
    assert len(chunks) >= 3 and isinstance(text, str)


def test_openai_completions_concrete_model(oai):
    r = oai.completions.create(model="tiny-gpt2-b", prompt="Once upon a time", max_tokens=6, temperature=0)
    assert r.model == "tiny-gpt2-b" and r.usage.completion_tokens > 0
    s = list(oai.completions.create(model="tiny-gpt2-a", prompt="Once upon a time", max_tokens=6, stream=True))
    assert all(c.model == "tiny-gpt2-a" for c in s) and s[-1].choices[0].finish_reason in ("length", "stop")


def test_unrecorded_requests_skip_the_record_and_named_ones_the_router(client, oai):
    before = client.get("/healthz").json()["feedback_offset"]
    # a served model named with routing.record false: straight to its pool, no decision made
    r = oai.chat.completions.create(model="tiny-gpt2-b", messages=CHAT, max_tokens=4, extra_body={"routing": {"record": False}})
    rt = r.model_extra["routing"]
    assert r.model == "tiny-gpt2-b" and r.usage.completion_tokens > 0
    assert rt["recorded"] is False and rt["score"] is None and rt["alternatives"] == [] and rt["checkpoint_version"] is None
    fb = client.post("/v1/feedback", json={"request_id": r.id, "reward": 1.0})
    assert fb.status_code == 404 and "request_id" in fb.json()["error"]["message"]  # nothing to reward
    raw = client.post("/v1/chat/completions", json={"model": "tiny-gpt2-a", "messages": CHAT, "max_tokens": 2, "routing": {"record": False}})
    assert raw.status_code == 200 and "x-cmr-score" not in raw.headers and raw.headers["x-cmr-model"] == "tiny-gpt2-a"
    # auto without a record: routed (a score, a checkpoint) but not recorded
    a = oai.chat.completions.create(model="auto", messages=CHAT, max_tokens=2, extra_body={"routing": {"record": False}})
    assert a.model_extra["routing"]["score"] is not None and a.model_extra["routing"]["recorded"] is False
    assert client.post("/v1/feedback", json={"request_id": a.id, "reward": 0.0}).status_code == 404
    q = client.post("/v1/route", json={"query": "Translate to German.", "routing": {"record": False}}).json()
    assert q["recorded"] is False and client.post("/v1/feedback", json={"request_id": q["request_id"], "reward": 0.5}).status_code == 404
    # a named model of no pool, unrecorded: still refused with the field named
    bad = client.post("/v1/chat/completions", json={"model": "no-such-model", "messages": CHAT, "routing": {"record": False}})
    assert bad.status_code == 404 and "model" in bad.json()["error"]["message"]
    assert client.get("/healthz").json()["feedback_offset"] == before


def test_runtime_registration_receives_traffic(client, oai, served):
    assert "tiny-gpt2-new" not in {m["id"] for m in client.get("/v1/models").json()["data"]}
    folder = served.args.home_path() / "models" / "tiny-gpt2-a"  # a real local model folder
    r = client.post("/v1/admin/models", json={
        "id": "tiny-gpt2-new", "family": "tiny-gpt2", "domain": "text-generation", "cost": 0.0001,
        "description": "A tiny chat model registered at runtime.",
        "backend": {"engine": "transformers", "path": str(folder)},
    })
    assert r.status_code == 201, r.text
    assert client.post("/v1/admin/models", json={"id": "tiny-gpt2-new"}).status_code == 409
    resp = oai.chat.completions.create(model="auto", messages=CHAT, max_tokens=5, extra_body={"routing": {"allow": ["tiny-gpt2-new"]}})
    assert resp.model == "tiny-gpt2-new" and resp.usage.completion_tokens > 0
    # retired: gone from routing at once
    assert client.delete("/v1/admin/models/tiny-gpt2-new").status_code == 200
    # a card may name its pool; an unknown one is a clear 400
    r = client.post("/v1/admin/models", json={"id": "tiny-bad-pool", "backend": {"engine": "transformers", "path": str(folder), "pool": "gpu"}})
    assert r.status_code == 201
    bad = client.post("/v1/chat/completions", json={"model": "tiny-bad-pool", "messages": CHAT})
    assert bad.status_code == 400 and "backend.pool" in bad.json()["error"]["message"]
    assert client.delete("/v1/admin/models/tiny-bad-pool").status_code == 200
    gone = client.post("/v1/route", json={"query": "x", "routing": {"allow": ["tiny-gpt2-new"]}})
    assert gone.status_code == 400
    # an id no header can carry as it is: routed, the header percent-encoded, the body exact
    uid = "模型/ünïcode-router"
    assert client.post("/v1/admin/models", json={"id": uid, "description": "A model with a non-Latin-1 id."}).status_code == 201
    r = client.post("/v1/route", json={"query": "hello", "routing": {"allow": [uid]}})
    assert r.status_code == 200 and r.json()["model"] == uid, r.text
    from urllib.parse import unquote

    assert unquote(r.headers["x-cmr-model"]) == uid and r.headers["x-cmr-model"].isascii()
    assert client.delete(f"/v1/admin/models/{uid}").status_code == 200


def test_engine_that_cannot_run_here_is_a_clear_error(client, oai):
    """A vLLM model on a machine without vLLM: 503 with the install hint, and the pool keeps serving."""
    try:
        import vllm  # noqa: F401

        pytest.skip("vllm is installed here")
    except ImportError:
        pass
    r = client.post("/v1/admin/models", json={"id": "needs-vllm", "backend": {"engine": "vllm", "path": "some/model"}})
    assert r.status_code == 201
    bad = client.post("/v1/chat/completions", json={"model": "needs-vllm", "messages": CHAT, "max_tokens": 2})
    assert bad.status_code == 503 and "cmr[vllm]" in bad.json()["error"]["message"]
    ok = oai.chat.completions.create(model="tiny-gpt2-a", messages=CHAT, max_tokens=2)
    assert ok.model == "tiny-gpt2-a"
    assert client.delete("/v1/admin/models/needs-vllm").status_code == 200


def test_feedback_changes_later_decisions(client, oai, served):
    import ray

    from services.learner import learner_handle

    v0 = client.get("/healthz").json()["checkpoint_version"]
    # decide first (all on the same checkpoint), then give partial feedback: the auto-chosen
    # model did badly; the other one, asked for by name, did well
    auto = [oai.chat.completions.create(model="auto", messages=CHAT, max_tokens=2) for _ in range(3)]
    loser = auto[0].model
    assert {r.model for r in auto} == {loser}
    winner = "tiny-gpt2-b" if loser == "tiny-gpt2-a" else "tiny-gpt2-a"
    named = [oai.chat.completions.create(model=winner, messages=CHAT, max_tokens=2) for _ in range(3)]
    assert {r.model for r in named} == {winner}
    for r in auto:
        assert client.post("/v1/feedback", json={"request_id": r.id, "reward": 0.0}).status_code == 200
    for r in named:
        assert client.post("/v1/feedback", json={"request_id": r.id, "reward": 1.0}).status_code == 200
    assert client.post("/v1/feedback", json={"request_id": named[0].id, "reward": 1.0}).status_code == 409
    learner = learner_handle(served.args)
    end = time.monotonic() + 60
    while True:  # until the learner has learnt all six events and the router serves that checkpoint
        st = ray.get(learner.status.remote())
        if st["waiting"] == 0 and st["checkpoint_version"] > v0 and client.get("/healthz").json()["checkpoint_version"] >= st["checkpoint_version"]:
            break
        assert time.monotonic() < end, st
        time.sleep(0.2)
    after = oai.chat.completions.create(model="auto", messages=CHAT, max_tokens=2)
    assert after.model == winner
    assert after.model_extra["routing"]["checkpoint_version"] > v0


def test_checkpoint_swap_under_concurrent_requests(client, served, encoder):
    """Requests keep streaming in (8 concurrent workers) while two new checkpoint versions are
    written and swapped in: no request fails, and answers come from old and new versions alike."""
    from cmr import checkpoint
    from cmr.published import publish
    from services.routing import checkpoint_root
    from services.store import open_published

    root = checkpoint_root(served.args)
    published = open_published(served.args)
    v0 = client.get("/healthz").json()["checkpoint_version"]

    async def run() -> tuple[list[httpx.Response], list[int]]:
        done = asyncio.Event()
        responses: list[httpx.Response] = []
        async with httpx.AsyncClient(base_url=served.url, timeout=120) as ac:
            async def worker(w: int) -> None:
                i = 0
                while not done.is_set():
                    responses.append(await ac.post("/v1/route", json={"query": f"Classify review {w}-{i}.", "record": False}))
                    i += 1

            workers = [asyncio.create_task(worker(w)) for w in range(8)]
            swapped = []
            for _ in range(2):  # a new version of the same policy, written as the learner writes
                # over a dense encoder, as the learner loads it: the fitted lexical part (the
                # default embedding fuses here) is restored and saved again, so the router swaps
                policy = await asyncio.to_thread(checkpoint.load_policy, root, encoder)
                ck = await asyncio.to_thread(checkpoint.save, root, policy, {"note": "hot-swap test"})
                await asyncio.to_thread(publish, published, root, ck)  # written whole, then published: routers switch
                v = ck.version
                deadline = time.monotonic() + 120
                while (await ac.get("/healthz")).json()["checkpoint_version"] < v:  # served while the workers keep going
                    assert time.monotonic() < deadline, f"checkpoint v{v} not swapped in within 120 s"
                    await asyncio.sleep(0.05)
                swapped.append(v)
            n = len(responses)
            while len(responses) < n + 16:  # some requests on the last version too
                await asyncio.sleep(0.05)
            done.set()
            await asyncio.gather(*workers)
        return responses, swapped

    responses, swapped = asyncio.run(run())
    # the learner may also write a version meanwhile, so versions are checked by order, not value
    assert len(swapped) == 2 and v0 < swapped[0] < swapped[1]
    assert {r.status_code for r in responses} == {200}
    versions = {r.json()["checkpoint_version"] for r in responses}
    assert min(versions) >= v0 and max(versions) >= swapped[1]
    assert len(versions) >= 2  # answers came from old and new versions alike


def test_openai_engine_forwards_to_a_remote_endpoint(client, oai, served):
    """A model served by the ``openai`` engine: the remote endpoint here is this server's own
    OpenAI-compatible API (loop-back), so the forwarded call really generates with tiny-gpt2-b."""
    r = client.post("/v1/admin/models", json={
        "id": "remote-tiny", "cost": 0.0003, "description": "tiny-gpt2-b behind an OpenAI-compatible endpoint",
        "backend": {"engine": "openai", "base_url": served.url + "/v1", "path": "tiny-gpt2-b"},
    })
    assert r.status_code == 201, r.text
    direct = oai.chat.completions.create(model="tiny-gpt2-b", messages=CHAT, max_tokens=6, temperature=0)
    via = oai.chat.completions.create(model="remote-tiny", messages=CHAT, max_tokens=6, temperature=0)
    assert via.model == "remote-tiny" and via.choices[0].message.content == direct.choices[0].message.content
    assert via.usage.completion_tokens == direct.usage.completion_tokens
    streamed = list(oai.chat.completions.create(model="remote-tiny", messages=CHAT, max_tokens=6, temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == direct.choices[0].message.content
    assert client.delete("/v1/admin/models/remote-tiny").status_code == 200
