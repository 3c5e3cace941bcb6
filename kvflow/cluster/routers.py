"""Routers: which instance of a fleet serves a request.

A router is pure and synchronous like the scheduler: `route(request, view)` reads the
`FleetView` (loads, latency models, the block index built from the instances' block
events) and returns an instance index, so the same code routes in virtual time and in
a router process. Built-ins and plugins (entry-point group `kvflow.routers`) come out
of one `Registry`; `create(name, config)` takes the router's options from the config's
`router` section.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

from kvflow.cluster.view import FleetView
from kvflow.config import KVFlowConfig
from kvflow.registry import Registry, UnknownNameError
from kvflow.request import Request


class Router(ABC):
    """Chooses an instance for each request."""

    name: str = ""

    @abstractmethod
    def route(self, request: Request, view: FleetView) -> int:
        """The instance (0..view.num_instances-1) that should serve `request`.

        Args:
            request: the arriving request.
            view: the fleet at this moment (read only).
        """


class RoundRobinRouter(Router):
    """Instances in turn, whatever they hold or carry."""

    name = "round-robin"

    def __init__(self) -> None:
        self._next = 0

    def route(self, request: Request, view: FleetView) -> int:
        i = self._next % view.num_instances
        self._next = i + 1
        return i


class LeastLoadedRouter(Router):
    """The instance with the least queued prefill tokens + running requests (on ties,
    the one that got the fewest requests, then the lowest-numbered)."""

    name = "least-loaded"

    def route(self, request: Request, view: FleetView) -> int:
        loads = view.loads()
        routed = view.num_routed
        return min(range(view.num_instances), key=lambda i: (loads[i], routed[i]))


class PowerOfTwoRouter(Router):
    """The less loaded of two instances picked at random (seeded: repeatable)."""

    name = "power-of-two"

    def __init__(self, seed: int = 0) -> None:
        self._rng = random.Random(seed)

    def route(self, request: Request, view: FleetView) -> int:
        n = view.num_instances
        if n == 1:
            return 0
        a, b = self._rng.sample(range(n), 2)
        return a if view.load(a) <= view.load(b) else b


class CacheAwareRouter(Router):
    """The instance with the least expected time to first token:

        T_queue (its queued work) + T_prefill (prompt tokens it does not hold)
        + T_transfer (pulling, when peers are on, the blocks another instance holds
        beyond its own, where that is faster than prefilling them)

    each from the instance's latency model and the network model (Mooncake's conductor
    weighs the same three). An instance whose device tier cannot take the request now
    (the blocks its admitted requests hold, plus those its queued prefill and the
    request's uncached prompt need, exceed its device blocks) ranks after every one
    that can: there the request would wait for running requests to finish, which no
    queue term foresees. When loads diverge (the highest exceeds the lowest by more
    than `balance_abs_threshold` and more than `balance_rel_threshold` times), the
    least loaded instance gets the request instead, so one hot prefix cannot pile every
    request onto the instance that holds it (SGLang's router does the same).

    Ties (equal expected TTFT: typically idle instances holding the same prefix, or
    none of it) go to the least loaded, then the one whose cache holds the fewest
    blocks, then the one that got the fewest requests: new prefixes spread over the
    fleet's caches instead of filling the first instance's."""

    name = "cache-aware"

    def __init__(
        self, balance_abs_threshold: int = 65536, balance_rel_threshold: float = 4.0
    ) -> None:
        self.balance_abs_threshold = balance_abs_threshold
        self.balance_rel_threshold = balance_rel_threshold

    def route(self, request: Request, view: FleetView) -> int:
        queued, running = view.num_queued_tokens, view.num_running
        loads = view.loads()
        lowest, highest = min(loads), max(loads)
        if (
            highest - lowest > self.balance_abs_threshold
            and highest > (lowest + 1) * self.balance_rel_threshold
        ):
            return loads.index(lowest)
        runs = view.cached_blocks(request)
        best_run = max(runs)
        bs = view.block_size
        num_prompt = len(request.prompt_token_ids)
        network = view.network
        held = view.index.num_blocks
        routed = view.num_routed
        device, used, capacity = view.device_blocks, view.num_used_blocks, view.capacity
        best, best_rank = 0, (True, float("inf"), 0, 0, 0)
        # One pass, the per-instance terms inlined: it runs for every instance at every
        # arrival. Queue time = queued prefill tokens x prefill_token_us + running
        # requests x decode_seq_us (one decode each before a new prefill starts).
        for i, lat in enumerate(view.latency):
            prefill_us = lat.prefill_token_us
            run = runs[i]
            num_uncached = num_prompt - run * bs
            num_device = device[i]
            short = num_device > 0 and used[i] + (queued[i] + num_uncached) // bs > num_device
            cost = (queued[i] * prefill_us + running[i] * lat.decode_seq_us) * 1e-6
            if network is not None and best_run > run:
                num_pull = best_run - run
                pull = network.pull_time_s(num_pull)
                if pull < num_pull * bs * prefill_us * 1e-6:
                    cost += pull
                    num_uncached -= num_pull * bs
            # What it computes it caches, evicting blocks others may want back: on a
            # full cache, recomputing them later costs about as much again.
            fill = held[i] / capacity[i]
            if fill > 1.0:
                fill = 1.0
            cost += num_uncached * prefill_us * 1e-6 * (1.0 + fill)
            if short is best_rank[0] and cost > best_rank[1]:
                continue  # ranks after the best so far: no tuple to build
            rank = (short, cost, loads[i], held[i], routed[i])
            if rank < best_rank:
                best, best_rank = i, rank
        return best


RouterFactory = Callable[..., Router]

BUILTIN_ROUTERS = {
    "round-robin": "kvflow.cluster.routers:RoundRobinRouter",
    "least-loaded": "kvflow.cluster.routers:LeastLoadedRouter",
    "power-of-two": "kvflow.cluster.routers:PowerOfTwoRouter",
    "cache-aware": "kvflow.cluster.routers:CacheAwareRouter",
}

registry: Registry[RouterFactory] = Registry("router", "kvflow.routers", BUILTIN_ROUTERS)


class RouterLoadError(ValueError):
    """A registered router that does not produce a `Router`."""


def names() -> list[str]:
    """Every router name the registry can load, plugins included."""
    return registry.names()


def router_options(name: str, config: KVFlowConfig) -> dict[str, Any]:
    """The options of router `name` from `config.router` (its section is the name with
    `-` as `_`); none when it has no section."""
    section = getattr(config.router, name.replace("-", "_"), None)
    return section.model_dump() if isinstance(section, BaseModel) else {}


def create(name: str, config: KVFlowConfig | None = None) -> Router:
    """A router by name (built-in or plugin), with its options from `config`.

    Raises:
        UnknownNameError: no such router; the message lists the known ones.
        RouterLoadError: the plugin made something that is not a `Router`.
    """
    factory = registry.load(name)
    options = router_options(name, config) if config is not None else {}
    router = factory(**options)
    if not isinstance(router, Router):
        raise RouterLoadError(
            f"router {name!r} ({registry.source(name)}) produced {type(router).__name__}, "
            "not a kvflow.cluster.routers.Router"
        )
    if not router.name:
        router.name = name
    return router


__all__ = [
    "BUILTIN_ROUTERS",
    "CacheAwareRouter",
    "LeastLoadedRouter",
    "PowerOfTwoRouter",
    "RoundRobinRouter",
    "Router",
    "RouterLoadError",
    "UnknownNameError",
    "create",
    "names",
    "registry",
]
