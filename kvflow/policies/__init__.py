"""Scheduling policies: built-ins and plugins from the entry-point group `kvflow.policies`.

An entry point names a `Policy` subclass or a callable returning a `Policy` instance.
`load(name)` returns that class or callable; `create(name, **options)` calls it and
checks the result.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kvflow.policies.base import Policy, SchedulerView
from kvflow.registry import PluginLoadError, Registry, UnknownNameError

if TYPE_CHECKING:
    from kvflow.config import KVFlowConfig

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
    """A registered policy that does not produce a `Policy` (or raises instead)."""


def load(name: str) -> PolicyFactory:
    """The policy class or factory registered as `name` (built-in or plugin)."""
    return registry.load(name)


def names() -> list[str]:
    """Every policy name the registry can load, plugins included."""
    return registry.names()


def create(name: str, **options: Any) -> Policy:
    """An instance of the policy `name`, built with `options`.

    Raises:
        UnknownNameError: no such policy (the message lists the known ones).
        PluginLoadError: a plugin's entry point fails to load.
        ValueError: a built-in policy's option out of range (quoting the value).
        PolicyLoadError: a plugin's factory raises, or a factory returns something else
            than a `Policy`; the message names the policy and where it comes from.
    """
    factory = load(name)
    source = registry.source(name)
    try:
        policy = factory(**options)
    except Exception as err:
        if source == "built-in":
            raise
        # Third-party code can raise anything: one line naming the plugin, not a traceback.
        raise PolicyLoadError(
            f"policy {name!r} ({source}) fails to build: {type(err).__name__}: {err}"
        ) from err
    if not isinstance(policy, Policy):
        raise PolicyLoadError(
            f"policy {name!r} ({source}) produced {type(policy).__name__}, "
            "not a kvflow.policies.Policy"
        )
    return policy


def make_policy(name: str, config: KVFlowConfig) -> Policy:
    """The policy `name`, with its options from `config.policies` when it has a section."""
    section = getattr(config.policies, name, None)
    options = section.model_dump() if section is not None else {}
    return create(name, **options)


__all__ = [
    "PluginLoadError",
    "Policy",
    "PolicyLoadError",
    "SchedulerView",
    "UnknownNameError",
    "create",
    "load",
    "make_policy",
    "names",
    "registry",
]
