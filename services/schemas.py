"""HTTP request/response models: OpenAI-compatible chat/completions plus cmr's extensions.

Extension fields ride in the request body (the ``openai`` client sends them with
``extra_body``): ``routing`` (cost weight λ, candidate filters, decision size). The decision
comes back in the response's ``routing`` field and in ``x-cmr-*`` headers.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

AUTO = "auto"


class RoutingOptions(BaseModel):
    """How the router chooses: argmax over candidates of score − ``cost_weight``·cost."""

    model_config = ConfigDict(extra="forbid")

    #: None (omitted): the router's default λ — its calibration file, else ``AppArgs.cost_weight``
    cost_weight: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    domains: list[str] | None = None
    families: list[str] | None = None
    max_cost: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    allow: list[str] | None = None
    deny: list[str] = Field(default_factory=list)
    k: int = Field(default=3, ge=1, le=100)
    #: record the decision so that feedback can be posted for it. false: nothing is recorded, and
    #: a request naming a model served here goes straight to its pool without the router
    record: bool = True

    def filters(self) -> dict[str, Any]:
        return {"domains": self.domains, "families": self.families, "max_cost": self.max_cost, "allow": self.allow, "deny": self.deny}


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class _GenParams(BaseModel):
    # unknown OpenAI fields (logprobs, tools, …) are accepted and ignored, as OpenAI-compatible servers do
    model_config = ConfigDict(extra="ignore")

    model: str = AUTO
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1)
    user: str | None = None
    routing: RoutingOptions = Field(default_factory=RoutingOptions)

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def token_limit(self) -> int:
        return self.max_completion_tokens or self.max_tokens or 64


class ChatCompletionRequest(_GenParams):
    messages: list[ChatMessage] = Field(min_length=1)

    def query(self) -> str:
        """The text the router sees: the last user message (else the last message)."""
        users = [m.content for m in self.messages if m.role == "user"]
        return users[-1] if users else self.messages[-1].content


class CompletionRequest(_GenParams):
    prompt: str = Field(min_length=1)

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, v: Any) -> Any:
        if isinstance(v, list):
            if len(v) != 1 or not isinstance(v[0], str):
                raise ValueError("only a single string prompt is supported")
            return v[0]
        return v

    def query(self) -> str:
        return self.prompt


class RouteRequestBody(BaseModel):
    """``POST /v1/route``: the decision only, for hubs whose models are not served here."""

    model_config = ConfigDict(extra="forbid")

    query: str = Field(min_length=1)
    routing: RoutingOptions = Field(default_factory=RoutingOptions)
    #: record the decision so that feedback can be posted for it (``routing.record`` false also
    #: turns it off: see ``records``)
    record: bool = True

    def records(self) -> bool:
        """Whether the decision is recorded: neither ``record`` nor ``routing.record`` is false."""
        return self.record and self.routing.record


class FeedbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(min_length=1, max_length=256)
    #: a number (not a string or boolean), finite, in [0, 1]
    reward: float = Field(ge=0, le=1, strict=True, allow_inf_nan=False)


class CardBody(BaseModel):
    """A model card as posted: the typed fields are checked here (a 400 naming the field), other
    keys are kept and go to the card's ``metadata`` (``ModelCard.from_dict``)."""

    model_config = ConfigDict(extra="allow")

    id: str = Field(min_length=1, max_length=256, pattern=r"^[^\x00-\x1f\x7f]*\S[^\x00-\x1f\x7f]*$")
    family: str | None = None
    domain: str | None = None
    description: str = ""
    cost: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    backend: dict[str, Any] = Field(default_factory=dict)
    profile: dict[str, float] = Field(default_factory=dict)
    experience: int | None = None
    added_at: float | None = Field(default=None, allow_inf_nan=False)
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("profile")
    @classmethod
    def _finite_profile(cls, v: dict[str, float]) -> dict[str, float]:
        import math

        bad = next((k for k, x in v.items() if not math.isfinite(x) or not 0 <= x <= 1), None)
        if bad is not None:
            raise ValueError(f"profile score of {bad!r} must be a finite number in [0, 1]")
        return v

    @field_validator("backend")
    @classmethod
    def _engine(cls, v: dict[str, Any]) -> dict[str, Any]:
        engine = v.get("engine")
        if engine is not None and engine not in ("transformers", "vllm", "openai"):
            raise ValueError(f"backend.engine must be transformers, vllm or openai, got {engine!r}")
        return v

    def card_dict(self) -> dict[str, Any]:
        """What ``ModelCard.from_dict`` takes: the fields sent (defaults left to the card)."""
        return self.model_dump(exclude_unset=True, exclude_none=True)


class RegisterBody(BaseModel):
    """``POST /v1/admin/models``: one card (``id``, ``cost``, ``backend``, ``profile``, …) or ``cards``."""

    model_config = ConfigDict(extra="forbid")

    cards: list[CardBody] = Field(min_length=1, max_length=10_000)


class RetireBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ids: list[str] = Field(min_length=1, max_length=10_000)
