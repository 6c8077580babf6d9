"""The engine protocol of model pools, the request/chunk types engines speak, and the factory.

An engine turns one generation request into a stream of text chunks. A pool deployment holds
engines by model id; which engine a model gets comes from its card's ``backend``: ``engine`` names
one of ``ENGINES`` (the registry), and the rest is that engine's typed config. Engines are injected through the pool's constructor
(an ``engine_factory``), so tests can give a pool a fake where the real engine cannot run here.
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass, field
from typing import Any, AsyncIterator, Callable, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cmr.errors import CMRError, validation_line


class EngineError(CMRError, ValueError):
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
    """A model that generates: stream chunks for a request; raise if unhealthy. An engine may also
    have ``async complete(request) -> list[GenChunk]``, the same generation in one call, which
    the pool uses for non-streaming requests when it is cheaper than a stream (a remote API)."""

    def generate(self, request: GenRequest) -> AsyncIterator[GenChunk]: ...

    async def check_health(self) -> None: ...


EngineFactory = Callable[[str, dict[str, Any]], Engine]


class EngineConfig(BaseModel):
    """What every engine takes from a card's ``backend``; each engine extends it (one typed config
    per engine, unknown keys refused)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    engine: str
    #: a request's ``max_tokens`` is capped at this
    max_new_tokens: int = Field(default=256, ge=1)
    #: runtime registrations: the pool that serves the model (``PoolConfig.name``)
    pool: str | None = None


class TransformersConfig(EngineConfig):
    """``transformers``: a local model folder, CPU or GPU."""

    engine: Literal["transformers"] = "transformers"
    path: str = Field(min_length=1)
    device: str | None = None
    max_new_tokens: int = Field(default=64, ge=1)


class VLLMConfig(EngineConfig):
    """``vllm``: a local folder or hub id; ``engine_args`` go to vLLM's ``AsyncEngineArgs``."""

    engine: Literal["vllm"] = "vllm"
    path: str = Field(min_length=1)
    engine_args: dict[str, Any] = Field(default_factory=dict)


class FakeConfig(VLLMConfig):
    """``fake``: the fake vLLM engine (named as a fake), for machines without a GPU. Takes what
    ``vllm`` takes, plus the local tokenizer folder it counts tokens with (None: MiniLM's)."""

    engine: Literal["fake", "vllm"] = "fake"
    path: str = "fake/model"
    tokenizer: str | None = None


#: the default name of the variable that holds a remote backend's key (allowed by the default
#: ``BackendPolicy``)
DEFAULT_KEY_ENV = "CMR_BACKEND_KEY_OPENAI"


class OpenAIConfig(EngineConfig):
    """``openai``: a remote OpenAI-compatible endpoint; ``path`` is the remote model name (default
    the model id), the key is read from the env var ``api_key_env`` (keys never live in cards),
    which ``BackendPolicy`` restricts."""

    engine: Literal["openai"] = "openai"
    path: str | None = None
    base_url: str | None = None
    api_key_env: str = Field(default=DEFAULT_KEY_ENV, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    max_new_tokens: int = Field(default=1024, ge=1)


#: engine name -> ("module:Class", typed config): the one engine registry (classes imported on use)
ENGINES: dict[str, tuple[str, type[EngineConfig]]] = {
    "transformers": ("services.pools.transformers:TransformersEngine", TransformersConfig),
    "vllm": ("services.pools.vllm:VLLMEngine", VLLMConfig),
    "openai": ("services.pools.openai_remote:OpenAIEngine", OpenAIConfig),
    "fake": ("services.pools.vllm:FakeVLLMEngine", FakeConfig),
}


class BackendPolicy(BaseModel):
    """What a card's remote backend may name (``AppArgs.backends``). A backend's key is read from
    the pool process's environment by the name the card gives and sent to the card's host, so an
    admin key could otherwise send any variable of the pool (a database password, a cloud token)
    to any host it likes."""

    model_config = ConfigDict(extra="forbid")

    #: ``api_key_env`` must start with one of these ...
    key_env_prefixes: list[str] = Field(default_factory=lambda: ["CMR_BACKEND_KEY_"])
    #: ... or be one of these names (e.g. ``OPENAI_API_KEY``, off by default)
    key_envs: list[str] = Field(default_factory=list)
    #: hosts a ``base_url`` may name (``.example.com`` also allows its subdomains); None: any host
    hosts: list[str] | None = None

    def check(self, cfg: "EngineConfig", pre: str) -> None:
        """``EngineError`` naming the field when ``cfg`` breaks this policy."""
        env = getattr(cfg, "api_key_env", None)
        if env is not None and env not in self.key_envs and not any(env.startswith(p) for p in self.key_env_prefixes if p):
            allowed = [f"{p}*" for p in self.key_env_prefixes if p] + list(self.key_envs)
            raise EngineError(f"field '{pre}api_key_env': {env!r} is not an allowed key variable "
                              f"(allowed: {', '.join(allowed) or 'none'}; AppArgs.backends)")
        url = getattr(cfg, "base_url", None)
        if url is not None:
            from urllib.parse import urlsplit

            try:
                parts = urlsplit(url)
                host = (parts.hostname or "").lower()
            except ValueError:
                parts, host = None, ""
            if parts is None or parts.scheme not in ("http", "https") or not host:
                raise EngineError(f"field '{pre}base_url': must be an http(s) URL with a host, got {url!r}")
            if self.hosts is not None and not any(host == h.lower() or (h.startswith(".") and host.endswith(h.lower()))
                                                  for h in self.hosts):
                raise EngineError(f"field '{pre}base_url': host {host!r} is not an allowed backend host "
                                  f"(allowed: {', '.join(self.hosts) or 'none'}; AppArgs.backends.hosts)")


def engine_config(backend: dict[str, Any], where: str = "backend", policy: BackendPolicy | None = None) -> EngineConfig:
    """A card's ``backend`` as its engine's typed config; ``EngineError`` naming the field if not,
    or if it breaks ``policy`` (None: the structure only — callers that store or build from a
    card pass the app's policy)."""
    name = backend.get("engine") if isinstance(backend, dict) else None
    pre = f"{where}." if where else ""
    if name not in ENGINES:
        raise EngineError(f"field '{pre}engine': must be one of {', '.join(ENGINES)}, got {name!r}")
    try:
        cfg = ENGINES[name][1].model_validate(backend)
    except ValidationError as e:
        raise EngineError(validation_line(e, prefix=pre)) from None
    if policy is not None:
        policy.check(cfg, pre)
    return cfg


def make_engine(model_id: str, backend: dict[str, Any]) -> Engine:
    """Build the engine a card's ``backend`` names (imports the engine's module only then)."""
    cfg = engine_config(backend)
    module, cls = ENGINES[cfg.engine][0].split(":")
    return getattr(importlib.import_module(module), cls)(model_id, cfg)
