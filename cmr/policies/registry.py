"""The one registry of routing policies: name -> class, imported on first use.

Adding a policy = one file in ``cmr/policies/`` plus one line here. Tests iterate
``policy_names()`` so every policy gets the same contract tests.
"""

from __future__ import annotations

import importlib
from typing import Any

from cmr.encoders.base import Encoder
from cmr.errors import UnknownPolicyError
from cmr.policies.base import PolicyConfig, RoutingPolicy

# name -> "module:Class" (lazy: importing cmr.policies must not import torch or faiss)
_REGISTRY: dict[str, str] = {
    "random": "cmr.policies.random:RandomPolicy",
    "oracle": "cmr.policies.oracle:OraclePolicy",
    "zeroshot": "cmr.policies.zeroshot:ZeroShotPolicy",
    "knn": "cmr.policies.knn:KNNPolicy",
    "cluster": "cmr.policies.cluster:ClusterPolicy",
    "carve": "cmr.policies.carve:CarvePolicy",
    "uniroute": "cmr.policies.uniroute:UniRoutePolicy",
    "uniroute-map": "cmr.policies.uniroute_map:UniRouteMapPolicy",
    "linucb": "cmr.policies.linucb:LinUCBPolicy",
    "thompson": "cmr.policies.thompson:ThompsonPolicy",
    "auto": "cmr.policies.auto:AutoPolicy",
}


def register(name: str, target: str) -> None:
    """Register a policy class by ``"module:Class"`` path (for plug-ins outside cmr)."""
    _REGISTRY[name] = target


def policy_names() -> list[str]:
    return sorted(_REGISTRY)


def policy_class(name: str) -> type[RoutingPolicy]:
    try:
        target = _REGISTRY[name]
    except KeyError:
        raise UnknownPolicyError(f"unknown policy {name!r}; known: {', '.join(policy_names())}") from None
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)


def make_policy(name: str, encoder: Encoder | None = None, config: PolicyConfig | dict[str, Any] | None = None) -> RoutingPolicy:
    """Build a registered policy by name."""
    return policy_class(name)(encoder=encoder, config=config)
