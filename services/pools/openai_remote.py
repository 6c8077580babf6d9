"""The ``openai`` engine: a remote OpenAI-compatible endpoint, through the official client.

The client runs on its aiohttp transport (the SDK's ``DefaultAioHttpClient``): the same requests
for less CPU than its default httpx one. A request answered whole (non-streaming chat) is one
non-streaming call (``complete``): no event stream to parse.

Base URL from the card's ``backend.base_url`` (else ``CMR_OPENAI_BASE_URL``); the key from the env var
the card names (``backend.api_key_env``, default ``CMR_BACKEND_KEY_OPENAI``; ``AppArgs.backends`` says which
names and hosts are allowed): keys never live in cards.
"""

from __future__ import annotations

from typing import AsyncIterator

from cmr import constants
from services.pools.base import EngineError, GenChunk, GenRequest, OpenAIConfig


class OpenAIEngine:
    """Forwards generation to ``config.path`` (the remote model name, default the model id)."""

    def __init__(self, model_id: str, config: OpenAIConfig):
        from openai import AsyncOpenAI, DefaultAioHttpClient

        base_url = config.base_url or constants.remote_base_url()
        if not base_url:
            raise EngineError(f"field 'backend.base_url': model {model_id!r} needs a base URL (or CMR_OPENAI_BASE_URL)")
        self.model_id = model_id
        self.remote_model = config.path or model_id
        self.max_new_tokens = config.max_new_tokens
        self.client = AsyncOpenAI(base_url=base_url, api_key=constants.secret(config.api_key_env) or "none",
                                  http_client=DefaultAioHttpClient())

    def _common(self, request: GenRequest) -> dict:
        return dict(model=self.remote_model, max_tokens=min(request.max_tokens, self.max_new_tokens), temperature=request.temperature,
                    top_p=request.top_p, stop=request.stop or None, seed=request.seed)

    @staticmethod
    def _last(reason: str | None, usage) -> GenChunk:
        return GenChunk(text="", finish_reason=reason or "stop", prompt_tokens=usage.prompt_tokens if usage else 0,
                        completion_tokens=usage.completion_tokens if usage else 0)

    async def complete(self, request: GenRequest) -> list[GenChunk]:
        """The whole generation in one non-streaming call: ``[text chunk, last chunk]``. Sent with
        the client's plain ``post`` (the SDK's way to a raw endpoint: same base URL, key, timeouts,
        retries and transport), its JSON read as is: the typed ``create`` spends about as much CPU
        again on transforming the parameters and building the reply's models."""
        chat = request.messages is not None
        body = {k: v for k, v in self._common(request).items() if v is not None}
        body.update({"messages": request.messages} if chat else {"prompt": request.prompt or ""})
        r = await self.client.post("/chat/completions" if chat else "/completions", cast_to=object, body=body)
        if not isinstance(r, dict):
            raise TypeError(f"the endpoint answered {type(r).__name__}, not a JSON object")
        c = (r.get("choices") or [{}])[0]
        text = (c.get("message") or {}).get("content") if chat else c.get("text")
        usage = r.get("usage") or {}
        last = GenChunk(text="", finish_reason=c.get("finish_reason") or "stop", prompt_tokens=int(usage.get("prompt_tokens") or 0),
                        completion_tokens=int(usage.get("completion_tokens") or 0))
        return ([GenChunk(text=text)] if text else []) + [last]

    async def generate(self, request: GenRequest) -> AsyncIterator[GenChunk]:
        common = {**self._common(request), "stream": True}
        reason, usage = None, None
        if request.messages is not None:
            stream = await self.client.chat.completions.create(messages=request.messages, stream_options={"include_usage": True}, **common)
            async for ch in stream:
                usage = ch.usage or usage
                for c in ch.choices:
                    reason = c.finish_reason or reason
                    if c.delta.content:
                        yield GenChunk(text=c.delta.content)
        else:
            stream = await self.client.completions.create(prompt=request.prompt or "", **common)
            async for ch in stream:
                usage = ch.usage or usage
                for c in ch.choices:
                    reason = c.finish_reason or reason
                    if c.text:
                        yield GenChunk(text=c.text)
        yield self._last(reason, usage)

    async def check_health(self) -> None:
        await self.client.models.list()
