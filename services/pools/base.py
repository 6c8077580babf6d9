"""The engine protocol of model pools, the request/chunk types engines speak, and the factory.

An engine turns one generation request into a stream of text chunks. A pool deployment holds
engines by model id; which engine a model gets comes from its card's ``backend`` (``engine``:
``transformers``, ``vllm`` or ``openai``). Engines are injected through the pool's constructor
(an ``engine_factory``), so tests can give a pool a fake where the real engine cannot run here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, AsyncIterator, Callable, Protocol, runtime_checkable

from cmr.errors import CMRError


class EngineError(CMRError):
    """An engine cannot be built or used (missing optional extra, bad backend settings)."""


class GenerationError(CMRError):
    """A generation that raised inside a pool replica, as a plain message: the engine's own
    exception may not survive Ray's pickling to the ingress (openai's ``APIConnectionError``
    needs keyword arguments), and an ``UnserializableException`` would skip the retry and the
    runner-up fallback."""


@dataclass
class GenRequest:
    """One generation: chat ``messages`` (templated by the engine) or a raw ``prompt``."""

    model: str
    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    max_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GenRequest":
        return cls(**d)


@dataclass
class GenChunk:
    """A piece of generated text; the last chunk has ``finish_reason`` and the token counts."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@runtime_checkable
class Engine(Protocol):
    """A model that generates: stream chunks for a request; raise if unhealthy."""

    def generate(self, request: GenRequest) -> AsyncIterator[GenChunk]: ...

    async def check_health(self) -> None: ...


EngineFactory = Callable[[str, dict[str, Any]], Engine]


def make_engine(model_id: str, backend: dict[str, Any]) -> Engine:
    """Build the engine a card's ``backend`` names (imports the engine's module only then)."""
    name = backend.get("engine")
    if name == "transformers":
        from services.pools.transformers import TransformersEngine

        return TransformersEngine(model_id, backend)
    if name == "vllm":
        from services.pools.vllm import VLLMEngine

        return VLLMEngine(model_id, backend)
    if name == "openai":
        from services.pools.openai_remote import OpenAIEngine

        return OpenAIEngine(model_id, backend)
    raise EngineError(f"field 'backend.engine': model {model_id!r} has engine {name!r}; expected transformers, vllm or openai")
