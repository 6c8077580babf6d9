"""``AppArgs.remote_in_ingress`` (with ``route_in_ingress``): a pool of remote (``openai``) models
runs as the Pool deployment's class in the ingress process. Against ``bench.fake_upstream`` (a
FAKE OpenAI-compatible endpoint: no real remote model can be reached here): chat ``auto``,
streamed and not, a named model, and a remote model whose endpoint is down is retried as a
failed pool replica would be."""

from __future__ import annotations

import json

import httpx
import pytest

pytestmark = pytest.mark.ray

# filled by the ``upstream`` fixture before ``served`` reads it
APP_ARGS: dict = {"learner": {"enabled": False}, "route_in_ingress": True, "remote_in_ingress": True, "tiny_models": False}


@pytest.fixture(scope="module")
def upstream():
    from bench.serve import _free_port, _start_fake_upstream

    proc, base = _start_fake_upstream()
    down = f"http://127.0.0.1:{_free_port()}/v1"  # nothing listens there
    APP_ARGS["pools"] = [{"name": "remote", "models": [
        {"id": "remote-a", "engine": "openai", "base_url": base, "path": "fake", "cost": 0.001, "description": "A remote chat model."},
        {"id": "remote-down", "engine": "openai", "base_url": down, "path": "fake", "cost": 0.002, "description": "A remote chat model, down."}]}]
    yield base
    proc.kill()
    proc.wait()


def test_remote_pool_in_the_ingress(upstream, served):
    from bench.fake_upstream import TEXT

    msgs = [{"role": "user", "content": "Say something short."}]
    with httpx.Client(base_url=served.url, timeout=120) as c:
        r = c.post("/v1/chat/completions", json={"model": "remote-a", "messages": msgs, "max_tokens": 4})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == TEXT and r.json()["usage"]["completion_tokens"] > 0
        r = c.post("/v1/chat/completions", json={"model": "auto", "messages": msgs, "max_tokens": 4, "routing": {"allow": ["remote-a"]}})
        assert r.status_code == 200 and r.json()["model"] == "remote-a", r.text
        with c.stream("POST", "/v1/chat/completions", json={"model": "remote-a", "messages": msgs, "stream": True}) as s:
            lines = [ln for ln in s.iter_lines() if ln.startswith("data: ")]
        text = "".join(json.loads(ln[6:])["choices"][0]["delta"].get("content", "") for ln in lines[:-1] if json.loads(ln[6:])["choices"])
        assert text == TEXT and lines[-1] == "data: [DONE]"
        # an endpoint that is down: a failed generation as from a pool replica, tried twice; a named
        # model has no runner-up, so a 503 that says what failed
        r = c.post("/v1/chat/completions", json={"model": "remote-down", "messages": msgs, "max_tokens": 4})
        assert r.status_code == 503, r.text
        assert r.json()["error"]["message"].count("remote-down: GenerationError") == 2, r.text
