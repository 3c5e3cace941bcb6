"""One instance's peer layer beside its engine: the peer service, a connection to each
listed peer, the directory their events feed, and the pulls the store makes through it.

`PeerNode` runs on the event loop that owns the store (the engine's). It serves the
store's blocks (`PeerService`), keeps one connection per address of a static peer list
(reconnecting with exponential backoff), follows each peer's block events into its
`Directory`, marks down a peer not heard from within `peer.heartbeat_timeout_s` (its
entries dropped, its connection closed, then retried), and attaches the directory as
the store's remote tier with a `PeerPuller`, so the scheduler pulls what peers hold.
A restarted peer answers with a new incarnation, whose snapshot replaces its entries.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Self

import anyio
import anyio.abc

from kvflow.config import PeerConfig
from kvflow.kv.store import KVStore
from kvflow.peer.client import PeerClient, PeerDownError, connect_peer
from kvflow.peer.directory import Directory
from kvflow.peer.handshake import PeerRefusedError
from kvflow.peer.pulls import PeerPuller
from kvflow.peer.service import PeerService, ServiceStats

logger = logging.getLogger("kvflow.peer")

MIN_BACKOFF_S = 0.1
MAX_BACKOFF_S = 2.0


@dataclass(frozen=True, slots=True)
class PeerAddress:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> PeerAddress:
        """`host:port` (an IPv6 host in brackets). Raises ValueError quoting `text`."""
        host, sep, port = text.strip().rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"a peer is host:port with a port in [1, 65535], got {text!r}")
        return cls(host, int(port))

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


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
        self.clients: dict[str, PeerClient] = {}
        self.num_refused = 0
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
            self._tg.start_soon(self._maintain, address)
        self._tg.start_soon(self._expire_loop)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.store.remote = None
        assert self._tg is not None
        self._tg.cancel_scope.cancel()
        try:
            await self._tg.__aexit__(None, None, None)
        finally:
            await self.service.aclose()

    @property
    def port(self) -> int:
        return self.service.port

    def stats(self) -> NodeStats:
        up = sum(1 for c in self.clients.values() if not c.is_down)
        return NodeStats(
            up, self.store.stats.num_failed_pulls, self.num_refused, self.service.stats()
        )

    async def _maintain(self, address: PeerAddress) -> None:
        """Keep a connection to the peer at `address`, following its events."""
        delay = MIN_BACKOFF_S
        me = self.service.identity
        while True:
            peer_id: str | None = None
            try:
                async with connect_peer(address.host, address.port, me, self.config) as client:
                    peer_id = client.peer.peer_id
                    if peer_id == me.peer_id:
                        logger.warning("kvflow: peer %s is this instance: ignored", address)
                        return
                    self.clients[peer_id] = client
                    client.follow(self.directory, self.clock)
                    await client.subscribe()
                    logger.info("kvflow: peer %s (%s) is up", address, peer_id)
                    delay = MIN_BACKOFF_S
                    await client.wait_closed()
                    logger.info("kvflow: peer %s is down: %s", address, client.down_reason)
            except PeerRefusedError as err:
                self.num_refused += 1
                logger.warning("kvflow: peer %s refused: %s", address, err)
            except (PeerDownError, OSError):
                pass  # not up (yet): retried after the backoff
            finally:
                if peer_id is not None:
                    self.clients.pop(peer_id, None)
                    self.directory.mark_down(peer_id)
            await anyio.sleep(delay)
            delay = min(delay * 2, MAX_BACKOFF_S)

    async def _expire_loop(self) -> None:
        """Mark down peers not heard from within the heartbeat timeout."""
        period = min(self.config.heartbeat_interval_s, self.config.heartbeat_timeout_s / 2)
        while True:
            await anyio.sleep(period)
            for peer in self.directory.expire(self.clock()):
                client = self.clients.get(peer)
                if client is not None:
                    client.mark_down(f"no heartbeat for {self.config.heartbeat_timeout_s} s")
