"""``AppArgs``: the one configuration of the served app (pydantic, so that ``serve run``'s YAML,
KubeRay's ``serveConfigV2`` and ``cmr serve --config`` all load the same thing).

Everything has a default: ``AppArgs()`` is the embedded laptop setup (the CMRBench hub for
``/v1/route``, a router trained at first start, two tiny local chat models, the learner on).
All state lives under ``home`` (default ``CMR_HOME``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from cmr import constants
from cmr.continual.learner import CONSOLIDATE_EVERY, EVENTS_PER_STEP
from cmr.encoders.lexical import Embedding
from cmr.errors import ConfigError, validation_line
from services.pools.base import BackendPolicy

__all__ = ["AppArgs", "ConfigError", "load_args", "read_config"]


class _Strict(BaseModel):
    # unknown keys are a typo in a config file: refuse them with the key's name
    model_config = ConfigDict(extra="forbid")


class ServedModel(_Strict):
    """One model a pool serves: its hub card fields and its engine settings (the card's ``backend``)."""

    id: str = Field(min_length=1)
    #: a registered engine (``services.pools.base.ENGINES``); the fields below that it takes form
    #: the card's ``backend``, checked by that engine's typed config
    engine: str = "transformers"
    #: transformers/vllm: a local model directory (or hub id for vllm); openai: the remote model name
    path: str | None = None
    #: openai engine: base URL of the remote OpenAI-compatible endpoint (else ``CMR_OPENAI_BASE_URL``)
    base_url: str | None = None
    #: openai engine: name of the env var that holds the API key (the key itself is never in
    #: config); ``AppArgs.backends`` says which names are allowed
    api_key_env: str = "CMR_BACKEND_KEY_OPENAI"
    cost: float = Field(default=0.0, ge=0)
    family: str | None = None
    domain: str | None = None
    description: str = ""
    device: str | None = None
    max_new_tokens: int = Field(default=64, ge=1)

    @model_validator(mode="after")
    def _engine_config(self) -> "ServedModel":
        from services.pools.base import engine_config

        engine_config(self.backend(), where="")  # an EngineError (a ValueError) names the field
        return self

    def backend(self) -> dict[str, Any]:
        """The card's ``backend`` dict (what an engine is built from): the fields its engine takes."""
        from services.pools.base import ENGINES

        if self.engine not in ENGINES:
            return {"engine": self.engine}
        takes = ENGINES[self.engine][1].model_fields
        b = {"engine": self.engine, "path": self.path, "base_url": self.base_url, "api_key_env": self.api_key_env, "device": self.device, "max_new_tokens": self.max_new_tokens}
        return {k: v for k, v in b.items() if v is not None and k in takes}

    def card_dict(self) -> dict[str, Any]:
        return {"id": self.id, "family": self.family, "domain": self.domain, "description": self.description, "cost": self.cost, "backend": self.backend()}


class PoolConfig(_Strict):
    """A Serve deployment that serves some models (multiplexed by model id).

    ``autoscaling_config``, ``num_replicas`` and ``ray_actor_options`` pass straight through to
    ``serve.deployment(...).options``.
    """

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_\-]+$")
    models: list[ServedModel] = Field(default_factory=list)
    num_replicas: int | Literal["auto"] | None = 1
    autoscaling_config: dict[str, Any] | None = None
    ray_actor_options: dict[str, Any] = Field(default_factory=lambda: {"num_cpus": 0})
    max_ongoing_requests: int = Field(default=16, ge=1)
    #: threads of torch/BLAS/OpenMP per replica (None: the libraries' default, a thread per core).
    #: 1 by default: with ``num_cpus`` 0 nothing else caps them, and idle pool threads spin
    native_threads: int | None = Field(default=1, ge=1)


class LearnerArgs(_Strict):
    """The detached learner actor: consumes feedback, updates the policy, writes checkpoints."""

    enabled: bool = True
    name: str = "cmr-learner"
    namespace: str = "cmr"
    #: consume once this many new feedback events are waiting (``POST /v1/feedback`` nudges it)
    min_events: int = Field(default=1, ge=1)
    #: also poll the feedback store every this many seconds (0 = only when nudged)
    poll_s: float = Field(default=5.0, ge=0)
    #: ``Learner.consume``: events per bounded online step, events between consolidations
    #: (defaults: the learner's own, which the benchmarks use)
    events_per_step: int = Field(default=EVENTS_PER_STEP, ge=1)
    consolidate_every: int = Field(default=CONSOLIDATE_EVERY, ge=1)
    #: a checkpoint is written (and published) once this many events were learnt since the last
    #: one, or this many seconds after the first of them, whichever comes first; events learnt in
    #: between live in memory (a restart learns them again, once) and reach routers with it
    checkpoint_every_events: int = Field(default=1000, ge=1)
    checkpoint_every_s: float = Field(default=10.0, gt=0)
    #: checkpoint versions kept after each write: the newest this many that verify
    #: (``cmr.checkpoint.prune``); 0 keeps every version (and ignores the two limits below)
    keep_checkpoints: int = Field(default=20, ge=0)
    #: ... and fewer when they would exceed this many bytes in all, or be older than this many
    #: seconds (0: no such limit); the newest valid version is always kept
    keep_checkpoint_bytes: int = Field(default=1 << 30, ge=0)
    keep_checkpoint_age_s: float = Field(default=0.0, ge=0)
    #: extra Ray actor options of the learner (e.g. ``{"resources": {"learner": 1}}`` to place it
    #: on chosen nodes); it always asks for 0 CPUs unless this sets ``num_cpus``
    actor_options: dict[str, Any] = Field(default_factory=dict)


class AuthArgs(_Strict):
    """API keys and request limits (``services.auth``). Keys live in ``<state>/keys.sqlite``
    (``cmr keys create``); ``open`` serves without keys, for local use only, never the default."""

    #: serve without API keys (every request is allowed; the body cap still applies)
    open: bool = False
    #: key store file (default ``<state>/keys.sqlite``)
    keys_path: str | None = None
    #: token bucket of a key that sets none: requests per second, and burst
    rate_per_s: float = Field(default=50.0, gt=0)
    burst: float = Field(default=100.0, ge=1)
    #: request-body cap (HTTP body or gRPC message) of a key that sets none, and in open mode
    max_body_bytes: int = Field(default=1 << 20, ge=1024)
    #: a created or revoked key takes effect within this many seconds
    reload_s: float = Field(default=1.0, gt=0)

    def settings(self):
        from services.auth import AuthSettings

        return AuthSettings(open=self.open, rate_per_s=self.rate_per_s, burst=self.burst, max_body_bytes=self.max_body_bytes, reload_s=self.reload_s)


class FrontDoorArgs(_Strict):
    """Ray Serve's HAProxy front door of a Ray that ``cmr serve`` starts (Ray reads them when its
    processes start; a running cluster keeps its own). Its files (config, admin socket, server
    state) are always in a 0700 folder of the state dir (``services.proxy.front_door_dir``)."""

    #: HAProxy's read-only stats page and Prometheus exporter (unauthenticated; Ray binds them on
    #: every interface and reads neither): None keeps them off, a port binds them to 127.0.0.1 only
    #: (``services.proxy.front_door_wrapper`` edits the config Ray renders)
    stats_port: int | None = Field(default=None, ge=1, le=65535)
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    #: HAProxy's client inactivity limit (Ray's default: an hour)
    client_timeout_s: int = Field(default=60, ge=1)
    #: a request whose headers are not complete this long after it starts is closed with a 408
    #: (HAProxy's ``timeout http-request``, which Ray leaves unset: half-sent requests held a
    #: connection for the whole client timeout)
    http_request_timeout_s: int = Field(default=10, ge=1)
    #: connections HAProxy holds at once (Ray's ``maxconn``)
    max_connections: int = Field(default=4096, ge=16)
    #: gRPC messages larger than this are refused by the gRPC server before they are read into
    #: memory, key or not (Serve's default: 2 GiB); keep it above the largest key body cap
    grpc_max_message_bytes: int = Field(default=4 << 20, ge=1024, le=(1 << 31) - 1)
    #: idle keep-alive connections are closed after this (Serve's ``HTTPOptions``; also HAProxy's)
    keep_alive_timeout_s: int = Field(default=30, ge=1)


class AppArgs(_Strict):
    """Arguments of ``build_app``: the whole served app in one object."""

    home: str | None = None
    #: durable state (hub, decisions and feedback, API keys): None or ``sqlite``: SQLite files under
    #: ``home`` (one node); ``postgresql://…``: one database shared by replicas on every node
    #: (``cmr.state``). Unset: ``CMR_STORE``
    store: str | None = None
    #: where checkpoint versions are written: a path (local or a network mount) or a URI
    #: (``s3://…``, ``gs://…``, any pyarrow/fsspec filesystem), as Ray Train's ``storage_path``;
    #: None: ``<state>/checkpoints``. Routers load the version published in ``store``
    #: (``cmr.published``), so every node serves the same one
    checkpoints: str | None = None
    #: registered policy name (``cmr policies``); used for the router and the learner. ``auto``
    #: chooses one by cross-validation on the first start's training rows (``/healthz``
    #: ``policy_choice`` says which and why); until a fit brings enough rows, knn routes
    policy: str = "auto"
    policy_config: dict[str, Any] = Field(default_factory=dict)
    #: CMRBench-format folder that seeds the hub and trains the router at first start (None: no seed)
    bench: str | None = "default"
    #: the router is trained on at most this many requests per experience (None = all)
    train_limit: int | None = Field(default=None, ge=1)
    #: seed the hub with at most this many CMRBench cards (None = all; tests keep hubs small)
    hub_limit: int | None = Field(default=None, ge=1)
    #: profile prompts drawn from the bench's train splits at first start: a model registered
    #: with its scores on them (card ``profile``) is routed by those answers, not only its card
    profile_size: int = Field(default=32, ge=0)
    #: create and serve two tiny local transformers chat models (offline) when no pool is configured
    tiny_models: bool = True
    pools: list[PoolConfig] = Field(default_factory=list)
    #: FAISS pre-selection: the policy scores only the ``retrieve_k`` live models nearest the query
    #: in card-embedding space (0 = the policy scores every live model)
    retrieve_k: int = Field(default=0, ge=0)
    #: number of models in a decision (chosen + runner-ups)
    top_k: int = Field(default=3, ge=1, le=100)
    #: λ for requests that give no ``cost_weight`` while no calibration is applied
    #: (``cmr calibrate --apply`` publishes one in the state store, which takes precedence)
    cost_weight: float = Field(default=0.0, ge=0)
    max_batch_size: int = Field(default=16, ge=1)
    batch_wait_timeout_s: float = Field(default=0.005, ge=0)
    #: the router's encoder (queries, cards, first-start training): ``onnx-int8`` (ONNX Runtime,
    #: per-channel int8 weights: the default; with 64-token queries the only setting measured with
    #: a decision p99 under 10 ms at 2k models on 2 cores, and within 0.5 points of exact for
    #: ``knn``, not for ``carve``), ``onnx`` (exact fp32, the same embeddings as ``torch``),
    #: ``onnx-int8-fp32ffn`` (int8 with the FFN output projections in fp32: nearer exact, slower),
    #: ``torch`` (sentence-transformers). Measured side by side: docs/results/encoder-exactness/.
    #: A checkpoint is trained with the encoder it is served with
    encoder: Literal["onnx", "torch", "onnx-int8", "onnx-int8-fp32ffn"] = "onnx-int8"
    #: what texts are embedded with: ``minilm`` (the encoder above alone), ``minilm+tfidf`` (fused
    #: with TF-IDF fitted at first start on the bench's train prompts and the cards, saved in every
    #: checkpoint: ``cmr.encoders.lexical``) or ``auto`` (the default: fused where the first start
    #: trains on prompts and they and the cards are texts enough to fit it, else ``minilm``). A
    #: served checkpoint keeps the embedding it was trained with; set explicitly (other than
    #: ``auto``), it must agree with it (else refused, as ``policy_config``)
    embedding: Embedding = "auto"
    #: intra-op threads of the router's encoder for batches (1: on a busy 2-core host a second
    #: thread waits for a core)
    encoder_threads: int = Field(default=1, ge=1)
    #: threads for a lone query (onnx encoders only; None: as batches). 1 by default: a second
    #: session of 2 threads took a lone 2k-model decision only from p99 9.0 to 7.9 ms for twice its
    #: CPU, and with spinning threads it cost the chat path 21-25 instead of 7-9 ms of router CPU per request
    #: (services/README.md, "Serving benchmark"); worth it only where cores sit idle
    encoder_single_threads: int | None = Field(default=1, ge=1)
    #: batches a router replica encodes and scores at the same time, each on its own thread (its
    #: encoder and BLAS calls use ``encoder_threads`` / ``native_threads`` each): 2 keeps both
    #: cores of a small host busy; the ingress keeps up to 2 batches in flight per replica
    router_concurrent_batches: int = Field(default=2, ge=1)
    #: how the FAISS pre-selection index stores card vectors (``cmr.index.ModelIndex``): fp16
    #: halves the bytes a lone query streams (100k models: 12.6 -> 7.6 ms), top-256 recall 0.9998
    index_precision: Literal["fp16", "fp32"] = "fp16"
    #: threads of the numeric libraries (BLAS, OpenMP, torch) in a router replica (cmr/threads.py)
    native_threads: int = Field(default=1, ge=1)
    #: routed queries are truncated to this many tokens, keeping their end (onnx encoders; None:
    #: the encoder's 256). The longest prompts set the decision p99 (p99 length 126 tokens, a
    #: 64-token query costs ~2x a median one); 3.8 % of CMRBench prompts are longer than 64, and
    #: truncating them costs ~0.4 points of CMRBench test D accuracy (96 or 128 tokens: less, but
    #: a p99 over 10 ms; docs/results/encoder-exactness/). Cards and training data are not truncated
    query_max_tokens: int | None = Field(default=64, ge=8, le=256)
    #: routed query embeddings kept in an in-memory LRU (repeated prompts skip the encoder); query
    #: embeddings are never written to the persistent embedding cache. 0: off
    query_cache_size: int = Field(default=4096, ge=0)
    #: at replica start, encode and route a spread of query lengths once, so that the first
    #: requests do not pay for lazy initialisation (they set the p99 otherwise)
    warmup: bool = True
    router_replicas: int = Field(default=1, ge=1)
    #: each ingress replica routes with a RouterCore of its own (the same ``RouterDeployment``
    #: code, in its process) instead of calling the Router deployment: no hop, no serialisation
    #: per batch; routing then scales with the ingress replicas. The Router deployment still
    #: serves the hub, feedback and the console. False: routing in the Router replicas, scaled
    #: and placed on their own (``router_replicas``; the KubeRay sample's choice)
    route_in_ingress: bool = True
    #: each ingress replica generates for the pools whose models are all remote (``openai``
    #: engine: nothing local to hold) with the Pool deployment's own class in its process: no hop
    #: per request. Retries and fallbacks as for a pool replica
    remote_in_ingress: bool = True
    router_actor_options: dict[str, Any] = Field(default_factory=lambda: {"num_cpus": 0})
    ingress_actor_options: dict[str, Any] = Field(default_factory=lambda: {"num_cpus": 0})
    learner: LearnerArgs = Field(default_factory=LearnerArgs)
    auth: AuthArgs = Field(default_factory=AuthArgs)
    front_door: FrontDoorArgs = Field(default_factory=FrontDoorArgs)
    #: which key variables and hosts a remote (openai) backend may name, in config and in cards
    #: registered at runtime (``services.pools.base.BackendPolicy``)
    backends: BackendPolicy = Field(default_factory=BackendPolicy)
    #: feedback is accepted for this long after the decision (then 410); older decisions without
    #: feedback are purged
    request_ttl_s: float = Field(default=7 * 24 * 3600.0, gt=0)
    #: the newest this many decisions are kept, older ones only if they have feedback (retention by
    #: size as well as age; None: age only). Bytes per decision: services/README.md, "Feedback, durably"
    max_decisions: int | None = Field(default=1_000_000, ge=1)
    #: longest prompt (a message's content, a completion prompt, a route query), in characters
    max_prompt_chars: int = Field(default=32_000, ge=1)
    #: how often (seconds) a router's watcher thread checks for a newer checkpoint
    reload_check_s: float = Field(default=0.5, gt=0)

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, v: str) -> str:
        from cmr.policies import policy_names

        if v not in policy_names():
            raise ValueError(f"unknown policy {v!r}; known: {', '.join(policy_names())}")
        return v

    @field_validator("policy_config")
    @classmethod
    def _typed_policy_config(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        """Checked against the chosen policy's typed config (kept as given: the keys set here are
        the ones compared with a checkpoint's, ``services.routing.check_checkpoint_config``)."""
        from cmr.policies import policy_class

        if "policy" in info.data:  # else the policy name itself was refused
            policy_class(info.data["policy"]).Config.from_dict(v)
        return v

    @field_validator("checkpoints")
    @classmethod
    def _known_location(cls, v: str | None) -> str | None:
        from cmr.checkpoint import check_location

        return None if v is None else check_location(v)

    @field_validator("store")
    @classmethod
    def _known_store(cls, v: str | None) -> str | None:
        from cmr.state import check_store

        check_store(v)
        return v

    @model_validator(mode="after")
    def _backends_allowed(self) -> "AppArgs":
        from services.pools.base import engine_config

        for i, p in enumerate(self.pools):
            for j, m in enumerate(p.models):
                engine_config(m.backend(), where=f"pools.{i}.models.{j}", policy=self.backends)
        return self

    @model_validator(mode="after")
    def _unique(self) -> "AppArgs":
        names = [p.name for p in self.pools]
        if len(set(names)) != len(names):
            raise ValueError("pools: pool names must be unique")
        ids = [m.id for p in self.pools for m in p.models]
        if len(set(ids)) != len(ids):
            raise ValueError("pools: a model id may be served by one pool only")
        return self

    # -- derived paths -----------------------------------------------------------------------
    def home_path(self) -> Path:
        return Path(self.home) if self.home else constants.cmr_home()

    def bench_path(self) -> Path | None:
        if self.bench is None:
            return None
        return constants.data_root() / "cmrbench" if self.bench == "default" else Path(self.bench)

    def state_dir(self) -> Path:
        """Folder for this app's state: hub, decisions/feedback, checkpoints; created (with
        ``CMR_HOME`` when missing) and kept mode 0700 (``cmr.state.private_dir``)."""
        from cmr.state import private_dir

        return private_dir(self.home_path() / "serve")  # 0700: prompts, keys and weights live here

    def store_dsn(self) -> str | None:
        """The PostgreSQL DSN of the state store, or None for the SQLite files in ``state_dir``."""
        from cmr.state import check_store

        if self.store:
            return check_store(self.store)
        try:
            return check_store(constants.store_dsn())
        except ValueError as e:
            raise ConfigError(f"CMR_STORE: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AppArgs":
        return cls.model_validate(d)


def load_args(data: dict[str, Any] | None, source: str = "config") -> AppArgs:
    """Validate ``data`` as ``AppArgs``; errors become one ``ConfigError`` line naming the field."""
    try:
        return AppArgs.model_validate(data or {})
    except ValidationError as e:
        raise ConfigError(validation_line(e, source)) from None


def read_config(path: str | Path) -> dict[str, Any]:
    """AppArgs fields from a YAML file: either the fields at top level, or a Serve config file
    (``applications[0].args``), so ``cluster/serve.yaml`` works as ``cmr serve --config``."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: invalid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the config must be a mapping")
    if "applications" in data:
        apps = data["applications"] or []
        if not apps or not isinstance(apps[0], dict):
            raise ConfigError(f"{p}: field 'applications': no application")
        data = apps[0].get("args") or {}
    return data
