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
leases (`kvflow.peer.handoff`), expired on the same loop as peers.
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
from kvflow.peer.frames import FrameKind, SeqFrame
from kvflow.peer.handoff import Handoffs
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
        self.handoffs = Handoffs(store, config.handoff_lease_s, clock)
        self.handoff_outcomes: dict[str, int] = {}
        """Handoff tickets taken (decode side), by `kvflow.peer.handoff.AcceptOutcome`."""
        self.service.on_served = self.handoffs.on_served
        self._maintained: set[PeerAddress] = set(self.peers)
        self._progress = anyio.Event()
        """Set (and replaced) whenever a peer's frame arrives or its connection ends."""
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
        self.handoffs.close()
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

    def ensure_peer(self, address: PeerAddress) -> None:
        """Connect to `address` and follow its events unless already doing so; unlike
        the static peers, it is given up when a connection attempt fails."""
        if address in self._maintained or self._tg is None:
            return
        self._maintained.add(address)
        self._tg.start_soon(self._maintain, address, False)

    def follows(self, peer_id: str, seq: int) -> bool:
        """Whether the connection to `peer_id` is up and the directory has its events up
        to batch `seq`."""
        client = self.clients.get(peer_id)
        return (
            client is not None
            and not client.is_down
            and not self.directory.needs_resync(peer_id)
            and self.directory.last_seq(peer_id) >= seq
        )

    async def wait_following(self, peer_id: str, seq: int) -> None:
        """Return once `follows(peer_id, seq)` (callers bound the wait)."""
        while not self.follows(peer_id, seq):
            await self._progress.wait()

    def _on_progress(self) -> None:
        self._progress.set()
        self._progress = anyio.Event()

    async def _maintain(self, address: PeerAddress, persistent: bool = True) -> None:
        """Keep a connection to the peer at `address`, following its events (a peer
        not `persistent` is given up when connecting to it fails)."""
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
                    self._notify_frames(client)
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
                    self._on_progress()
            if not persistent and peer_id is None:
                self._maintained.discard(address)
                return
            await anyio.sleep(delay)
            delay = min(delay * 2, MAX_BACKOFF_S)

    def _notify_frames(self, client: PeerClient) -> None:
        follow = client.on_frame
        assert follow is not None

        def on_frame(kind: FrameKind, frame: SeqFrame) -> bool:
            needs_resync = follow(kind, frame)
            self._on_progress()
            return needs_resync

        client.on_frame = on_frame

    async def _expire_loop(self) -> None:
        """Mark down peers not heard from within the heartbeat timeout."""
        period = min(self.config.heartbeat_interval_s, self.config.heartbeat_timeout_s / 2)
        while True:
            await anyio.sleep(period)
            self.handoffs.expire(self.clock())
            for peer in self.directory.expire(self.clock()):
                client = self.clients.get(peer)
                if client is not None:
                    client.mark_down(f"no heartbeat for {self.config.heartbeat_timeout_s} s")
