"""HTTP request/response models: OpenAI-compatible chat/completions plus cmr's extensions.

Extension fields ride in the request body (the ``openai`` client sends them with
``extra_body``): ``routing`` (cost weight λ, candidate filters, decision size). The decision
comes back in the response's ``routing`` field and in ``x-cmr-*`` headers.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cmr.types import Id

AUTO = "auto"


class RoutingOptions(BaseModel):
    """How the router chooses: argmax over candidates of score − ``cost_weight``·cost."""

    model_config = ConfigDict(extra="forbid")

    #: None (omitted): the router's default λ — the applied calibration, else ``AppArgs.cost_weight``
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
    #: the request's task or category, as the router's training data names them (a data set's
    #: ``task`` field, e.g. ``gsm8k``): policies that learnt per-task priors use it; a task the
    #: router never saw, or none, is routed as without it
    task: Id | None = None

    def filters(self) -> dict[str, Any]:
        return {"domains": self.domains, "families": self.families, "max_cost": self.max_cost, "allow": self.allow, "deny": self.deny}


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class StreamOptions(BaseModel):
    """OpenAI's ``stream_options``: ``include_usage`` adds a last chunk with the token counts."""

    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


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
    stream_options: StreamOptions | None = None
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


class RegisterBody(BaseModel):
    """``POST /v1/admin/models``: one card (``id``, ``cost``, ``backend``, ``profile``, …) or ``cards``.
    Each card's fields are checked by ``cmr.types.ModelCard`` (the one card validator, shared with
    gRPC and the hub) when the router registers them."""

    model_config = ConfigDict(extra="forbid")

    cards: list[dict[str, Any]] = Field(min_length=1, max_length=10_000)


class RetireBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ids: list[str] = Field(min_length=1, max_length=10_000)


class CalibrationBody(BaseModel):
    """``POST /v1/admin/calibration`` (the console's "apply"): the router's default λ, given as
    ``cost_weight`` or found for ``budget_per_1k`` on the newest ``limit`` logged queries."""

    model_config = ConfigDict(extra="forbid")

    cost_weight: float | None = Field(default=None, ge=0, le=1e12, allow_inf_nan=False)
    budget_per_1k: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    limit: int = Field(default=1000, ge=1, le=100_000)
    #: apply a budget calibration that ``cmr calibrate`` would refuse without --force
    force: bool = False

    @model_validator(mode="after")
    def _one(self) -> "CalibrationBody":
        if (self.cost_weight is None) == (self.budget_per_1k is None):
            raise ValueError("field 'cost_weight': give exactly one of cost_weight or budget_per_1k")
        return self
