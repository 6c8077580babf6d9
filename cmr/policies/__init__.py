"""Routing policies: the interface, the registry, and one file per policy."""

from cmr.policies.base import PolicyConfig, RoutingPolicy
from cmr.policies.registry import make_policy, policy_class, policy_names, register

__all__ = ["PolicyConfig", "RoutingPolicy", "make_policy", "policy_class", "policy_names", "register"]
