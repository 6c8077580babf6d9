"""The same bad model cards for every front door (HTTP, gRPC): ``(card fields, field named)``.
All are refused by ``ModelCard``, the one card validator, and none is stored."""

BAD_CARDS = [
    ({"id": "nul\x00id"}, "id"),
    ({"id": "bell\x07id"}, "id"),
    ({"id": "zero\u200bwidth"}, "id"),
    ({"id": "x" * 10_000}, "id"),
    ({"id": "bad-profile-high", "profile": {"p0000": 1.5}}, "profile.p0000"),
    ({"id": "bad-profile-neg", "profile": {"p0000": -0.1}}, "profile.p0000"),
    ({"id": "bad-cost-neg", "cost": -1.0}, "cost"),
    ({"id": "bad-cost-huge", "cost": 1e12}, "cost"),
    ({"id": "bad-engine", "backend": {"engine": "tgi"}}, "backend.engine"),
    ({"id": "bad-engine-key", "backend": {"engine": "vllm", "path": "org/m", "gpu": 1}}, "backend.gpu"),
    # issue 14 (5): a backend that would send a pool variable (here the store's DSN) to any host
    ({"id": "steal-env", "backend": {"engine": "openai", "base_url": "http://127.0.0.1:9/v1", "api_key_env": "CMR_STORE"}}, "backend.api_key_env"),
    ({"id": "steal-default", "backend": {"engine": "openai", "base_url": "http://127.0.0.1:9/v1", "api_key_env": "OPENAI_API_KEY"}}, "backend.api_key_env"),
    ({"id": "bad-url", "backend": {"engine": "openai", "base_url": "file:///etc/passwd"}}, "backend.base_url"),
    ({"id": "deep-backend", "backend": {"engine": "openai", "a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": {"i": 1}}}}}}}}}}, "backend"),
]
