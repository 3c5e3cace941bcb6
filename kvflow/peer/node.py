"""One instance's peer layer beside its engine: the peer service, a connection to each
listed peer, the directory their events feed, and the pulls the store makes through it.

`PeerNode` runs on the event loop that owns the store (the engine's). It serves the
store's blocks (`PeerService`), keeps one connection per address of a static peer list
(reconnecting with exponential backoff), follows each peer's block events into its
`Directory`, marks down a peer not heard from within `peer.heartbeat_timeout_s` (its
entries dropped, its connection closed, then retried), and attaches the directory as
the store's remote tier with a `PeerPuller`, so the scheduler pulls what peers hold.
A restarted peer answers with a new incarnation, whose snapshot replaces its entries.
Peers named later (`ensure_peer`: a handoff's prefill instance) are connected the same
way until a connection attempt to them fails. It also holds the prefill side's handoff
leases (`kvflow.peer.handoff`), expired on the same loop as peers. Following peers is
`kvflow.peer.follow.Follower`'s, which a router uses alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Self

import anyio
import anyio.abc

from kvflow.config import PeerConfig
from kvflow.kv.store import KVStore
from kvflow.peer.client import PeerClient
from kvflow.peer.directory import Directory
from kvflow.peer.follow import Follower, PeerAddress
from kvflow.peer.handoff import Handoffs
from kvflow.peer.pulls import PeerPuller
from kvflow.peer.service import PeerService, ServiceStats


@dataclass(frozen=True, slots=True)
class NodeStats:
    peers_up: int
    """Peers connected and authenticated now."""
    num_pull_failures: int
    """Pulls that landed fewer blocks than asked (stale hint, bad checksum, peer down)."""
    num_refused_peers: int
    """Connections to listed peers refused at the handshake (secret or fingerprint)."""
    service: ServiceStats


class PeerNode:
    """Use as `async with PeerNode(store, config, peers) as node:` on the store's loop.

    Raises (on enter) `PeerConfigError` when `config.host` is not loopback and there is
    no secret, and OSError when the port cannot be bound.
    """

    def __init__(
        self,
        store: KVStore,
        config: PeerConfig,
        peers: Sequence[PeerAddress],
        peer_id: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.config = config
        self.peers = tuple(peers)
        self.clock = clock
        self.service = PeerService(store, config, peer_id)
        self.directory = Directory(config.heartbeat_timeout_s)
        self.follower = Follower(config, self.directory, clock)
        self.handoffs = Handoffs(store, config.handoff_lease_s, clock)
        self.handoff_outcomes: dict[str, int] = {}
        """Handoff tickets taken (decode side), by `kvflow.peer.handoff.AcceptOutcome`."""
        self.service.on_served = self.handoffs.on_served
        self._maintained: set[PeerAddress] = set(self.peers)
        self._puller: PeerPuller | None = None
        self._tg: anyio.abc.TaskGroup | None = None

    async def __aenter__(self) -> Self:
        await self.service.__aenter__()
        try:
            self._tg = anyio.create_task_group()
            await self._tg.__aenter__()
        except BaseException:
            await self.service.aclose()
            raise
        if self.store.cpu_storage is not None:
            self._puller = PeerPuller(self.store, self.directory, lambda: self.clients, self._tg)
            self.directory.puller = self._puller
        self.store.remote = self.directory
        for address in self.peers:
            self._tg.start_soon(self.follower.maintain, address, self.service.identity)
        self._tg.start_soon(self._expire_loop)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.store.remote = None
        self.handoffs.close()
        assert self._tg is not None
        self._tg.cancel_scope.cancel()
        try:
            await self._tg.__aexit__(None, None, None)
        finally:
            await self.service.aclose()

    @property
    def clients(self) -> dict[str, PeerClient]:
        """Connected peers by peer id."""
        return self.follower.clients

    @property
    def num_refused(self) -> int:
        return self.follower.num_refused

    @property
    def port(self) -> int:
        return self.service.port

    def stats(self) -> NodeStats:
        up = sum(1 for c in self.clients.values() if not c.is_down)
        return NodeStats(
            up, self.store.stats.num_failed_pulls, self.num_refused, self.service.stats()
        )

    def ensure_peer(self, address: PeerAddress) -> None:
        """Connect to `address` and follow its events unless already doing so; unlike
        the static peers, it is given up when a connection attempt fails."""
        if address in self._maintained or self._tg is None:
            return
        self._maintained.add(address)
        self._tg.start_soon(self._follow_named, address)

    async def _follow_named(self, address: PeerAddress) -> None:
        try:
            await self.follower.maintain(address, self.service.identity, persistent=False)
        finally:
            self._maintained.discard(address)

    def follows(self, peer_id: str, seq: int) -> bool:
        """Whether the connection to `peer_id` is up and the directory has its events up
        to batch `seq`."""
        return self.follower.follows(peer_id, seq)

    async def wait_following(self, peer_id: str, seq: int) -> None:
        """Return once `follows(peer_id, seq)` (callers bound the wait)."""
        await self.follower.wait_following(peer_id, seq)

    async def _expire_loop(self) -> None:
        """Expire handoff leases, and mark down peers not heard from within the
        heartbeat timeout."""
        while True:
            await anyio.sleep(self.follower.expire_period_s)
            self.handoffs.expire(self.clock())
            self.follower.expire()


__all__ = ["NodeStats", "PeerAddress", "PeerNode"]
