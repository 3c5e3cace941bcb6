"""The fleet as a router process sees it, live: a `FleetView` over real instances, for
the same `Router`s that route a simulated fleet (`kvflow.cluster.routers`).

What a simulated fleet reads off its instances, a router process learns:

- who holds which block: the instances' block events, followed as a read-only member
  of the peer directory (`kvflow.peer.follow.Follower` into a `Directory`; the router
  holds no KV and serves none). `DirectoryIndex` answers the view's prefix questions;
- load: each instance's `kvflow:num_requests_running` and its KV capacity from its
  /metrics, scraped by the router's health loop, and the router's own requests: those
  sent and not yet answered count their prompt tokens the instance was not expected to
  hold as queued prefill tokens (as the simulated fleet counts them) until their first
  byte comes back; every request in flight counts as running.

Pure and synchronous like the routers: the router process's event loop calls it.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import NamedTuple
from urllib.parse import urlsplit

from kvflow.cluster.index import PrefixIndex
from kvflow.cluster.routers import Router
from kvflow.cluster.view import FleetView
from kvflow.config import KVFlowConfig
from kvflow.engine_adapters.simulated import SimulatedRunner
from kvflow.peer.directory import Directory
from kvflow.peer.follow import Follower, PeerAddress
from kvflow.peer.identity import PeerIdentity, new_incarnation
from kvflow.request import Request

_WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::", "[::]"})
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})


class PeerInfo(NamedTuple):
    """An instance's peer service, as its /metrics states it (`kvflow:peer_service_info`)."""

    peer_id: str
    address: PeerAddress
    fingerprint: bytes
    block_size: int


@dataclass(eq=False)
class LiveInstance:
    """One instance as the router knows it."""

    url: str
    capacity: int
    """Blocks it can cache over all tiers (`kvflow:kv_blocks_total`, once scraped)."""
    healthy: bool = False
    num_running: int = 0
    """`kvflow:num_requests_running` at the latest scrape (every router's requests)."""
    in_flight: int = 0
    """This router's requests sent to it and not finished."""
    num_queued_tokens: int = 0
    """Prompt tokens of this router's requests it has not answered yet, less what it was
    expected to hold cached."""
    num_routed: int = 0
    """Requests it accepted from this router."""
    peer: PeerInfo | None = None


@dataclass(eq=False)
class Ticket:
    """One request routed to `instance`, until it ends."""

    instance: int
    num_queued_tokens: int
    answered: bool = False


class DirectoryIndex(PrefixIndex):
    """A view's prefix index over the peer directory: instance k of the view is the
    peer `peer_ids[k]` (None: not followed, holds nothing as far as routing knows)."""

    def __init__(self, directory: Directory, num_instances: int) -> None:
        self.directory = directory
        self.num_instances = num_instances
        self.peer_ids: list[str | None] = [None] * num_instances
        self.num_blocks = [0] * num_instances

    def refresh(self, peer_ids: Sequence[str | None]) -> None:
        """Point the view's instances at their current peers and count their blocks."""
        self.peer_ids[:] = peer_ids
        held = self.directory.num_held
        self.num_blocks[:] = [0 if p is None else held(p) for p in peer_ids]

    def prefix_runs(self, keys: Sequence[int]) -> list[int]:
        run = self.directory.prefix_run
        return [0 if p is None else run(p, keys) for p in self.peer_ids]


class LiveFleet:
    """The instances behind one router process, and the router deciding among them.

    Args:
        urls: the instances' base URLs (instance i is `urls[i]`).
        config: the fleet's configuration: block size, latency model (`sim.*`),
            capacity until scraped, the peer protocol's settings (secret, timeouts).
        router: made by `kvflow.cluster.routers.create`.
        prefill: prefill instances' base URLs (`kvflow router --prefill`), instances
            `len(urls)` on; they take part in everything but `route`, which chooses
            among `urls` only: `route(..., prefill=True)` chooses among them.
        prefill_router: what chooses among the prefill instances (default `router`).
    """

    def __init__(
        self,
        urls: Sequence[str],
        config: KVFlowConfig,
        router: Router,
        prefill: Sequence[str] = (),
        prefill_router: Router | None = None,
    ) -> None:
        kv = config.kv
        capacity = kv.tier_blocks("device") + kv.tier_blocks("cpu") + kv.tier_blocks("disk")
        self.instances = [LiveInstance(url, capacity) for url in (*urls, *prefill)]
        self.num_serving = len(urls)
        self.prefill_ids = tuple(range(len(urls), len(self.instances)))
        self.router = router
        self.prefill_router = router if prefill_router is None else prefill_router
        self.block_size = kv.block_size
        self.latency = SimulatedRunner.from_config(config.sim).latency
        self.directory = Directory(config.peer.heartbeat_timeout_s)
        self.follower = Follower(config.peer, self.directory)
        self.peer_id = f"kvflow-router-{uuid.uuid4().hex[:8]}"
        self._incarnation = new_incarnation()
        self._views: dict[tuple[int, ...], tuple[FleetView, DirectoryIndex]] = {}

    def identity(self, fingerprint: bytes) -> PeerIdentity:
        """Who the router says it is to an instance of this fingerprint."""
        return PeerIdentity(self.peer_id, fingerprint, self._incarnation)

    # -- routing ---------------------------------------------------------------------
    @property
    def serving(self) -> list[LiveInstance]:
        """The instances that serve whole requests (not the prefill ones)."""
        return self.instances[: self.num_serving]

    def route(
        self, request: Request, tried: Collection[int] = (), prefill: bool = False
    ) -> Ticket | None:
        """Choose among the healthy instances not in `tried` (the prefill instances
        with `prefill`, else the others), and count the request on the chosen one; None
        when there is none to choose.

        Raises:
            ValueError: the router chose outside the view.
        """
        ids = self.prefill_ids if prefill else range(self.num_serving)
        router = self.prefill_router if prefill else self.router
        instances = self.instances
        members = tuple(i for i in ids if instances[i].healthy and i not in tried)
        if not members:
            return None
        view = self.view(members)
        k = router.route(request, view)
        if not 0 <= k < len(members):
            raise ValueError(
                f"router {router.name!r} chose instance {k!r}; the view has 0..{len(members) - 1}"
            )
        runs = view.cached_blocks(request)
        uncached = max(0, len(request.prompt_token_ids) - runs[k] * self.block_size)
        inst = self.instances[members[k]]
        inst.in_flight += 1
        inst.num_queued_tokens += uncached
        return Ticket(members[k], uncached)

    def view(self, members: tuple[int, ...]) -> FleetView:
        """The view over instances `members` (view instance k is `members[k]`), with
        their loads and blocks as of now."""
        made = self._views.get(members)
        if made is None:
            index = DirectoryIndex(self.directory, len(members))
            view = FleetView(
                [self.latency] * len(members),
                [self.instances[i].capacity for i in members],
                index,
                self.block_size,
                None,
            )
            made = self._views[members] = (view, index)
        view, index = made
        view.advance(time.monotonic())
        peer_at = self.follower.peer_at
        peers: list[str | None] = []
        for k, i in enumerate(members):
            inst = self.instances[i]
            view.capacity[k] = inst.capacity
            view.num_queued_tokens[k] = inst.num_queued_tokens
            view.num_running[k] = max(inst.in_flight, inst.num_running)
            view.num_routed[k] = inst.num_routed
            peers.append(None if inst.peer is None else peer_at.get(inst.peer.address))
        index.refresh(peers)
        return view

    def accepted(self, ticket: Ticket) -> None:
        """The instance took the request (answered anything but 503)."""
        self.instances[ticket.instance].num_routed += 1

    def answered(self, ticket: Ticket) -> None:
        """The answer's first byte came back: the prompt is no longer queued."""
        if not ticket.answered:
            ticket.answered = True
            self.instances[ticket.instance].num_queued_tokens -= ticket.num_queued_tokens

    def finished(self, ticket: Ticket) -> None:
        """The request ended (answered, refused, failed or left)."""
        self.answered(ticket)
        self.instances[ticket.instance].in_flight -= 1

    # -- what the health loop learns ---------------------------------------------------
    def scraped(
        self, i: int, num_running: int, capacity: int | None, peer: PeerInfo | None
    ) -> None:
        """Instance i's figures from its /metrics. Its peer service is reached at the
        host of its URL when it binds every address, or loopback on a host the URL says
        is another machine."""
        inst = self.instances[i]
        inst.num_running = num_running
        if capacity:
            inst.capacity = capacity
        if peer is not None:
            host = urlsplit(inst.url).hostname or "127.0.0.1"
            bound = peer.address.host
            if bound in _WILDCARD_HOSTS or (bound in _LOOPBACK and host not in _LOOPBACK):
                peer = peer._replace(address=PeerAddress(host, peer.address.port))
        inst.peer = peer


__all__ = ["DirectoryIndex", "LiveFleet", "LiveInstance", "PeerInfo", "Ticket"]
