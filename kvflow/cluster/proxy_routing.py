"""Routing decisions of the router process (`kvflow router`): which live instance gets
an HTTP request, from loads scraped off the instances' /metrics, the router's own
in-flight counts, and the router's record of which prompt prefixes it sent where.

The fleet branch's routers (`kvflow.cluster.routers`, `route(Request, FleetView)`)
route simulated requests from a block index fed by block events; instances do not
publish block events over HTTP yet, so the router process decides here, behind one
small interface (`ProxyRouter.route(info, view)`), and `create` is the one place that
maps a router name to an implementation.
"""

from __future__ import annotations

import hashlib
import json
import random
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

BLOCK_CHARS = 64
"""Characters of prompt text per block key (text prompts and chat messages)."""
BLOCK_TOKENS = 16
"""Token ids per block key (token-id prompts)."""


@dataclass(frozen=True)
class RequestInfo:
    """What routing needs of one request: its prompt's chained block keys."""

    block_keys: tuple[int, ...]


def _chain(chunks: Sequence[bytes]) -> tuple[int, ...]:
    """Chained keys: each block's key hashes its parent's key and its bytes, so a key
    stands for the whole prefix up to its block (as the KV store's keys do)."""
    keys: list[int] = []
    parent = b""
    for chunk in chunks:
        digest = hashlib.blake2b(parent + chunk, digest_size=8).digest()
        keys.append(int.from_bytes(digest, "little"))
        parent = digest
    return tuple(keys)


def _text_blocks(text: str) -> list[bytes]:
    data = text.encode()
    return [data[i : i + BLOCK_CHARS] for i in range(0, len(data) - BLOCK_CHARS + 1, BLOCK_CHARS)]


def request_info(path: str, body: dict[str, Any]) -> RequestInfo:
    """The block keys of a completions or chat request's prompt (only full blocks: a
    partial tail says nothing about what an instance cached). A chat's messages are
    serialized in order, so a conversation's later turn extends its earlier turns'
    text and shares their keys; a prompt of token ids is keyed by id blocks."""
    if path.endswith("/chat/completions"):
        messages = body.get("messages")
        parts = []
        if isinstance(messages, list):
            for m in messages:
                if isinstance(m, dict):
                    content = m.get("content")
                    if not isinstance(content, str):
                        content = json.dumps(content, sort_keys=True)
                    parts.append(f"<{m.get('role')}>{content}\n")
        return RequestInfo(_chain(_text_blocks("".join(parts))))
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        prompt = prompt[0]  # a batch of prompts: keyed by its first
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return RequestInfo(_chain(_text_blocks(prompt)))
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        n = len(prompt) // BLOCK_TOKENS * BLOCK_TOKENS
        chunks = [
            b"".join(t.to_bytes(8, "little", signed=True) for t in prompt[i : i + BLOCK_TOKENS])
            for i in range(0, n, BLOCK_TOKENS)
        ]
        return RequestInfo(_chain(chunks))
    return RequestInfo(())


@dataclass
class InstanceState:
    """One instance as the router knows it."""

    url: str
    healthy: bool = False
    num_running: int = 0
    """kvflow:num_requests_running at the latest scrape."""
    num_waiting: int = 0
    """kvflow:num_requests_waiting at the latest scrape."""
    in_flight: int = 0
    """Requests this router has sent it that have not finished."""
    num_routed: int = 0

    @property
    def load(self) -> int:
        # The scrape counts every router's requests but lags; the own count is exact
        # for this router's: the larger of the two is the better guess.
        return max(self.num_running + self.num_waiting, self.in_flight)


@dataclass
class ProxyView:
    """The fleet as the router process sees it."""

    instances: list[InstanceState]
    candidates: list[int] = field(default_factory=list)
    """The instances this request may go to (healthy, not yet tried for it)."""


class ProxyRouter(ABC):
    """Chooses an instance among `view.candidates` (never empty when called)."""

    name = ""

    @abstractmethod
    def route(self, info: RequestInfo, view: ProxyView) -> int: ...

    def routed(self, info: RequestInfo, instance: int) -> None:
        """The request was accepted by `instance` (cache-aware records its prefix)."""
        return None


class RoundRobin(ProxyRouter):
    name = "round-robin"

    def __init__(self) -> None:
        self._next = 0

    def route(self, info: RequestInfo, view: ProxyView) -> int:
        n = len(view.instances)
        for step in range(n):
            i = (self._next + step) % n
            if i in view.candidates:
                self._next = i + 1
                return i
        return view.candidates[0]


def _least_loaded(view: ProxyView, among: Sequence[int]) -> int:
    return min(among, key=lambda i: (view.instances[i].load, view.instances[i].num_routed, i))


class LeastLoaded(ProxyRouter):
    name = "least-loaded"

    def route(self, info: RequestInfo, view: ProxyView) -> int:
        return _least_loaded(view, view.candidates)


class PowerOfTwo(ProxyRouter):
    name = "power-of-two"

    def __init__(self, seed: int = 0) -> None:
        self._rng = random.Random(seed)

    def route(self, info: RequestInfo, view: ProxyView) -> int:
        if len(view.candidates) == 1:
            return view.candidates[0]
        return _least_loaded(view, self._rng.sample(view.candidates, 2))


class CacheAware(ProxyRouter):
    """The candidate holding the longest leading run of the prompt's blocks, as the
    router's own record of where it sent which prefixes says; the least loaded when
    none holds any, or when the holder's load exceeds the least load by more than
    `balance_abs` and `balance_rel` times (one hot prefix must not pile every request
    onto one instance).

    Args:
        max_keys: block keys remembered (least recently routed forgotten first).
    """

    name = "cache-aware"

    def __init__(self, max_keys: int = 1 << 20, balance_abs: int = 16, balance_rel: float = 2.0):
        self.max_keys = max_keys
        self.balance_abs = balance_abs
        self.balance_rel = balance_rel
        self._where: OrderedDict[int, set[int]] = OrderedDict()

    def prefix_run(self, keys: Sequence[int], instance: int) -> int:
        """Leading blocks of `keys` the record says `instance` holds."""
        run = 0
        for key in keys:
            holders = self._where.get(key)
            if holders is None or instance not in holders:
                break
            run += 1
        return run

    def route(self, info: RequestInfo, view: ProxyView) -> int:
        least = _least_loaded(view, view.candidates)
        runs = {i: self.prefix_run(info.block_keys, i) for i in view.candidates}
        best = max(view.candidates, key=lambda i: (runs[i], -view.instances[i].load, -i))
        if runs[best] == 0:
            return least
        low, high = view.instances[least].load, view.instances[best].load
        if high - low > self.balance_abs and high > (low + 1) * self.balance_rel:
            return least
        return best

    def routed(self, info: RequestInfo, instance: int) -> None:
        where = self._where
        for key in info.block_keys:
            holders = where.get(key)
            if holders is None:
                where[key] = {instance}
            else:
                holders.add(instance)
                where.move_to_end(key)
        while len(where) > self.max_keys:
            where.popitem(last=False)

    def forget(self, instance: int) -> None:
        """An instance left the rotation: its cache is not to be counted on."""
        for holders in self._where.values():
            holders.discard(instance)


ROUTERS: dict[str, type[ProxyRouter]] = {
    r.name: r for r in (RoundRobin, LeastLoaded, PowerOfTwo, CacheAware)
}


def names() -> list[str]:
    return sorted(ROUTERS)


def create(name: str) -> ProxyRouter:
    """A router by name.

    Raises:
        ValueError: no such router (the message lists the known ones).
    """
    cls = ROUTERS.get(name)
    if cls is None:
        raise ValueError(f"unknown router {name!r}; known: {', '.join(names())}")
    return cls()


__all__ = [
    "CacheAware",
    "InstanceState",
    "LeastLoaded",
    "PowerOfTwo",
    "ProxyRouter",
    "ProxyView",
    "RequestInfo",
    "RoundRobin",
    "create",
    "names",
    "request_info",
]
