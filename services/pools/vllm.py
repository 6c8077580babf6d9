"""The ``vllm`` engine (GPU; optional extra ``cmr[vllm]``) and ``FakeVLLMEngine`` for machines
without vLLM.

Without the ``vllm`` package, building a ``VLLMEngine`` raises ``EngineError`` with the install
hint: a clear error, never an import crash at start.
"""

from __future__ import annotations

import uuid
from typing import Any, AsyncIterator

from services.pools.base import EngineError, GenChunk, GenRequest


def _vllm():
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise EngineError("engine 'vllm' needs the optional extra: pip install 'cmr[vllm]' (and a GPU)") from None
    return vllm


class VLLMEngine:
    """vLLM's ``AsyncLLMEngine`` over ``backend['path']`` (local folder or hub id)."""

    def __init__(self, model_id: str, backend: dict[str, Any]):
        vllm = _vllm()
        path = backend.get("path")
        if not path:
            raise EngineError(f"field 'backend.path': model {model_id!r} needs a model path for vllm")
        from vllm.engine.arg_utils import AsyncEngineArgs

        self.model_id = model_id
        self.max_new_tokens = int(backend.get("max_new_tokens", 256))
        self.engine = vllm.AsyncLLMEngine.from_engine_args(AsyncEngineArgs(model=path, **backend.get("engine_args", {})))
        self._vllm = vllm

    async def generate(self, request: GenRequest) -> AsyncIterator[GenChunk]:
        params = self._vllm.SamplingParams(
            max_tokens=min(request.max_tokens, self.max_new_tokens), temperature=request.temperature,
            top_p=request.top_p, stop=request.stop or None, seed=request.seed,
        )
        if request.messages is not None:
            tok = await self.engine.get_tokenizer()
            prompt = tok.apply_chat_template(request.messages, tokenize=False, add_generation_prompt=True)
        else:
            prompt = request.prompt or ""
        sent = 0
        final = None
        async for out in self.engine.generate(prompt, params, request_id=uuid.uuid4().hex):
            text = out.outputs[0].text
            if len(text) > sent:
                yield GenChunk(text=text[sent:])
                sent = len(text)
            final = out
        o = final.outputs[0] if final is not None else None
        yield GenChunk(text="", finish_reason=(o.finish_reason if o else "stop") or "stop",
                       prompt_tokens=len(final.prompt_token_ids or []) if final else 0,
                       completion_tokens=len(o.token_ids) if o else 0)

    async def check_health(self) -> None:
        await self.engine.check_health()


class FakeVLLMEngine:
    """Stands in for ``VLLMEngine`` where vLLM cannot run (no GPU): same interface, and it echoes
    the last user message word by word, so tests can check what reached the engine."""

    def __init__(self, model_id: str, backend: dict[str, Any]):
        self.model_id = model_id
        self.max_new_tokens = int(backend.get("max_new_tokens", 256))

    async def generate(self, request: GenRequest) -> AsyncIterator[GenChunk]:
        source = request.messages[-1]["content"] if request.messages else (request.prompt or "")
        words = source.split()[: min(request.max_tokens, self.max_new_tokens)]
        for i, w in enumerate(words):
            yield GenChunk(text=(" " if i else "") + w)
        yield GenChunk(text="", finish_reason="stop", prompt_tokens=len(source.split()), completion_tokens=len(words))

    async def check_health(self) -> None:
        return None


def fake_vllm_factory(model_id: str, backend: dict[str, Any]):
    """An engine factory for machines without vLLM: ``FakeVLLMEngine`` for ``engine: vllm`` cards,
    the real engines for the others (``build_app(args, engine_factory=fake_vllm_factory)``)."""
    from services.pools.base import make_engine

    if backend.get("engine") == "vllm":
        return FakeVLLMEngine(model_id, backend)
    return make_engine(model_id, backend)
