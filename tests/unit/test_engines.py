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
