"""Scheduling policies: built-ins and plugins from the entry-point group `kvflow.policies`.

An entry point names a `Policy` subclass or a callable returning a `Policy` instance.
`load(name)` returns that class or callable; `create(name, **options)` calls it and
checks the result.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kvflow.policies.base import Policy, SchedulerView
from kvflow.registry import Registry, UnknownNameError

PolicyFactory = Callable[..., Policy]

BUILTIN_POLICIES = {
    "fcfs": "kvflow.policies.fcfs:FCFSPolicy",
    "lpm": "kvflow.policies.lpm:LPMPolicy",
    "edf": "kvflow.policies.edf:EDFPolicy",
    "priority": "kvflow.policies.priority:PriorityPolicy",
    "fair": "kvflow.policies.fair:FairPolicy",
}

registry: Registry[PolicyFactory] = Registry("policy", "kvflow.policies", BUILTIN_POLICIES)


class PolicyLoadError(TypeError):
    """A registered policy that does not produce a `Policy`."""


def load(name: str) -> PolicyFactory:
    """The policy class or factory registered as `name` (built-in or plugin)."""
    return registry.load(name)


def names() -> list[str]:
    """Every policy name the registry can load, plugins included."""
    return registry.names()


def create(name: str, **options: Any) -> Policy:
    """An instance of the policy `name`, built with `options`."""
    factory = load(name)
    policy = factory(**options)
    if not isinstance(policy, Policy):
        raise PolicyLoadError(
            f"policy {name!r} ({registry.source(name)}) produced {type(policy).__name__}, "
            "not a kvflow.policies.Policy"
        )
    return policy


__all__ = [
    "Policy",
    "PolicyLoadError",
    "SchedulerView",
    "UnknownNameError",
    "create",
    "load",
    "names",
    "registry",
]
