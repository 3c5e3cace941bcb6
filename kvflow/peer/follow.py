"""Following peers' block events: one connection per peer address, kept up with
reconnection and backoff, each peer's events applied to a `Directory`, and peers not
heard from within the heartbeat timeout marked down.

This is what makes a member of the peer directory. An instance (`PeerNode`) follows its
peers beside the service that serves its own blocks; a router (`kvflow router`) follows
every instance and holds no KV itself: it only reads the directory.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import anyio

from kvflow.config import PeerConfig
from kvflow.peer.client import PeerClient, PeerDownError, connect_peer
from kvflow.peer.directory import Directory
from kvflow.peer.frames import FrameKind, SeqFrame
from kvflow.peer.handshake import PeerRefusedError
from kvflow.peer.identity import PeerIdentity

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


class Follower:
    """Keeps `directory` following the peers it is asked to (`maintain`), on the loop
    that reads the directory.

    Args:
        config: timeouts, frame limits and the shared secret.
        directory: where the peers' entries go.
        clock: the time the directory's heartbeats are judged by.
    """

    def __init__(
        self,
        config: PeerConfig,
        directory: Directory,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.directory = directory
        self.clock = clock
        self.clients: dict[str, PeerClient] = {}
        """Connected peers by peer id."""
        self.peer_at: dict[PeerAddress, str] = {}
        """The peer id answering at each address while connected."""
        self.num_refused = 0
        """Connections refused at the handshake (secret or fingerprint)."""
        self._progress = anyio.Event()
        """Set (and replaced) whenever a peer's frame arrives or its connection ends."""

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

    async def maintain(
        self, address: PeerAddress, me: PeerIdentity, persistent: bool = True
    ) -> None:
        """Keep a connection to the peer at `address` as `me`, following its events,
        until cancelled (or until the address turns out to be `me`, or, not
        `persistent`, a connection attempt fails)."""
        delay = MIN_BACKOFF_S
        told = False  # of the address: up, down, refused or not reachable
        while True:
            peer_id: str | None = None
            try:
                async with connect_peer(address.host, address.port, me, self.config) as client:
                    peer_id = client.peer.peer_id
                    if peer_id == me.peer_id:
                        logger.warning("kvflow: peer %s is this instance: ignored", address)
                        return
                    self.clients[peer_id] = client
                    self.peer_at[address] = peer_id
                    client.follow(self.directory, self.clock)
                    self._notify_frames(client)
                    await client.subscribe()
                    logger.info("kvflow: peer %s (%s) is up", address, peer_id)
                    told = True
                    delay = MIN_BACKOFF_S
                    await client.wait_closed()
                    logger.info("kvflow: peer %s is down: %s", address, client.down_reason)
            except PeerRefusedError as err:
                self.num_refused += 1
                logger.warning("kvflow: peer %s refused: %s", address, err)
                told = True
            except (PeerDownError, OSError) as err:
                # Not up (yet): retried after the backoff, said once (a typo in the
                # list would otherwise go unseen).
                if persistent and not told:
                    logger.warning(
                        "kvflow: peer %s not reachable yet (%s); retrying every %g s at most",
                        address, err or type(err).__name__, MAX_BACKOFF_S,
                    )  # fmt: skip
                    told = True
            finally:
                if peer_id is not None:
                    self.clients.pop(peer_id, None)
                    if self.peer_at.get(address) == peer_id:
                        del self.peer_at[address]
                    self.directory.mark_down(peer_id)
                    self._on_progress()
            if not persistent and peer_id is None:
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

    @property
    def expire_period_s(self) -> float:
        return min(self.config.heartbeat_interval_s, self.config.heartbeat_timeout_s / 2)

    def expire(self) -> None:
        """Mark down the peers not heard from within the heartbeat timeout."""
        for peer in self.directory.expire(self.clock()):
            client = self.clients.get(peer)
            if client is not None:
                client.mark_down(f"no heartbeat for {self.config.heartbeat_timeout_s} s")

    async def expire_loop(self) -> None:
        """`expire` every `expire_period_s` (until cancelled)."""
        while True:
            await anyio.sleep(self.expire_period_s)
            self.expire()


__all__ = ["MAX_BACKOFF_S", "MIN_BACKOFF_S", "Follower", "PeerAddress"]
