"""The peer service: serves this instance's blocks to authenticated peers and tells
subscribed peers which blocks it holds.

Each connection's frames are read as they arrive (`kvflow.peer.receiving`); requests on
one connection are pipelined (replies carry the request id), and its pulls are served
by the service's `PullServer` (`kvflow.peer.pull_serving`). Anything malformed closes
that connection and nothing else.

A store without block bytes (the simulated engine's) publishes its block events alone:
its pulls are refused (UNAVAILABLE) and the connection stays up, so a router can follow
a simulated fleet's caches.

The service must run on the event loop thread that owns the store (the engine's):
pinning and snapshots touch the store's pools, which are single-threaded.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from types import TracebackType
from typing import Self

import anyio
import anyio.abc
import numpy as np
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from kvflow.config import PeerConfig
from kvflow.kv.export import held_keys
from kvflow.kv.store import BlockEvent, KVStore
from kvflow.peer.frames import (
    PULL_KIND,
    ErrorCode,
    FrameError,
    FrameKind,
    Header,
    KeyRecord,
    SeqFrame,
    pack_header,
    pack_seq,
)
from kvflow.peer.handshake import send_error, server_handshake
from kvflow.peer.identity import (
    PeerConfigError,
    PeerIdentity,
    check_bind,
    model_fingerprint,
    new_incarnation,
)
from kvflow.peer.pull_serving import CONNECTION_ERRORS, PullServer
from kvflow.peer.receiving import FrameReceiver, serve_frames
from kvflow.peer.wire import PeerClosedError, Wire

_SUBSCRIBER_QUEUE = 256
"""EVENTS frames queued for one slow subscriber before it is dropped (it resyncs)."""
SUBSCRIBER_QUEUE_BYTES = 64 << 20
"""Bytes of frames queued for one subscriber past which it is dropped (it resyncs); one
frame alone (a large snapshot) is always let through."""


@dataclass(frozen=True, slots=True)
class ServiceStats:
    num_connections: int
    num_subscribers: int
    num_active_leases: int
    num_pulls: int
    num_blocks_served: int
    num_bytes_served: int
    num_refused: int
    """Connections refused at the handshake (secret, fingerprint, malformed)."""
    num_closed_for_errors: int
    """Connections closed for a malformed frame, a protocol violation or a dead transfer."""
    num_received_apart: int = 0
    """Over the open connections: frame payloads not read ahead with their header, received
    in a round of their own (a peer whose bytes trickle in; see `ReadAhead`)."""


@dataclass(eq=False)
class _Connection:
    wire: Wire
    peer: PeerIdentity | None = None
    num_inflight: int = 0
    events: MemoryObjectSendStream[bytes] | None = None
    num_queued_bytes: int = 0
    connection_id: int = field(default_factory=itertools.count().__next__)


class PeerService:
    """Serves `store`'s blocks on `config.host:config.port`.

    Use as `async with PeerService(store, config) as service:`; `service.port` is the
    bound port. `model_id` defaults to `config.model_id` (see `model_fingerprint`).
    """

    def __init__(self, store: KVStore, config: PeerConfig, peer_id: str | None = None) -> None:
        self.store = store
        self.config = config
        self.identity = PeerIdentity(
            peer_id=peer_id or f"kvflow-{uuid.uuid4().hex[:8]}",
            fingerprint=model_fingerprint(store.config, config.model_id),
            incarnation=new_incarnation(),
        )
        self.seq = 0
        """Sequence number of the last batch of block events published."""
        self._listener: socket.socket | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._connections: dict[int, _Connection] = {}
        self._pending: list[BlockEvent] = []
        self._counts = dict.fromkeys(
            ("pulls", "blocks", "bytes", "refused", "closed_for_errors"), 0
        )
        self._pulls = PullServer(store, config, self.identity.fingerprint, self._counts)
        self._open = False

    @property
    def on_served(self) -> Callable[[Sequence[int]], None] | None:
        """Told the keys of each pull served in full (the handoff leases end on it)."""
        return self._pulls.on_served

    @on_served.setter
    def on_served(self, hook: Callable[[Sequence[int]], None] | None) -> None:
        self._pulls.on_served = hook

    # -- lifecycle -------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        check_bind(self.config)
        family = socket.AF_INET6 if ":" in self.config.host else socket.AF_INET
        host, port = self.config.host, self.config.port
        try:
            listener = socket.create_server((host, port), family=family)
        except OSError as err:
            raise PeerConfigError(
                f"peer.host {host} --peer-port {port}: cannot listen there "
                f"({'in use' if err.errno == errno.EADDRINUSE else err.strerror or err})"
            ) from None
        listener.setblocking(False)
        self._listener = listener
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._open = True
        self.store.add_listener(self._on_block_event)
        self._tg.start_soon(self._accept_loop, listener)
        self._tg.start_soon(self._publish_loop)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        await self.aclose()
        return None

    async def aclose(self) -> None:
        if not self._open:
            return
        self._open = False
        self.store.remove_listener(self._on_block_event)
        assert self._tg is not None and self._listener is not None
        for conn in self._connections.values():
            conn.wire.shutdown()
        self._tg.cancel_scope.cancel()
        await self._tg.__aexit__(None, None, None)
        self._listener.close()

    @property
    def port(self) -> int:
        if self._listener is None:
            raise RuntimeError("the peer service is not started")
        return int(self._listener.getsockname()[1])

    def stats(self) -> ServiceStats:
        c = self._counts
        return ServiceStats(
            num_connections=len(self._connections),
            num_subscribers=sum(1 for x in self._connections.values() if x.events is not None),
            num_active_leases=self._pulls.num_leases,
            num_pulls=c["pulls"],
            num_blocks_served=c["blocks"],
            num_bytes_served=c["bytes"],
            num_refused=c["refused"],
            num_closed_for_errors=c["closed_for_errors"],
            num_received_apart=sum(
                x.wire.incoming.num_received_apart for x in self._connections.values()
            ),
        )

    # -- connections -----------------------------------------------------------------
    async def _accept_loop(self, listener: socket.socket) -> None:
        assert self._tg is not None
        while True:
            await anyio.wait_readable(listener)
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:  # out of fds, aborted handshake: keep serving the others
                await anyio.sleep(0.01)
                continue
            if len(self._connections) >= self.config.max_connections:
                sock.close()
                continue
            self._tg.start_soon(self._serve_connection, sock)

    async def _serve_connection(self, sock: socket.socket) -> None:
        conn = _Connection(Wire(sock, self.config.max_frame_bytes))
        self._connections[conn.connection_id] = conn
        try:
            try:
                with anyio.fail_after(self.config.handshake_timeout_s):
                    conn.peer = await server_handshake(conn.wire, self.identity, self.config)
            except CONNECTION_ERRORS:
                self._counts["refused"] += 1
                return
            async with anyio.create_task_group() as tg:
                try:
                    await serve_frames(conn.wire, partial(self._receive, conn, tg))
                except Exception as err:  # whatever it was, it ends this connection only
                    if not isinstance(err, PeerClosedError):
                        self._counts["closed_for_errors"] += 1
                    if isinstance(err, FrameError):
                        with contextlib.suppress(*CONNECTION_ERRORS), anyio.move_on_after(1):
                            await send_error(conn.wire, 0, ErrorCode.BAD_FRAME, str(err))
                conn.wire.shutdown()
                tg.cancel_scope.cancel()
        except Exception:  # a bug in one connection must not end the service
            self._counts["closed_for_errors"] += 1
        finally:
            if conn.events is not None:
                conn.events.close()
            del self._connections[conn.connection_id]
            conn.wire.close()

    def _receive(self, conn: _Connection, tg: anyio.abc.TaskGroup, header: Header) -> FrameReceiver:
        """The receiver of a frame from a connected peer (see `kvflow.peer.receiving`)."""
        kind = header.kind
        if kind == PULL_KIND:
            return self._pulls.receive(conn, tg, header)
        if kind == FrameKind.RESYNC:
            if header.payload_length:
                raise FrameError("a RESYNC request carries no payload")
            self._subscribe(conn, tg)
            return _nothing()
        if kind == FrameKind.HEARTBEAT:
            return _discard(header.payload_length)
        raise FrameError(f"unexpected {kind.name} frame from a connected peer")

    # -- block events ------------------------------------------------------------------
    def _on_block_event(self, event: BlockEvent) -> None:
        if self._open:
            self._pending.append(event)

    def _subscribe(self, conn: _Connection, tg: anyio.abc.TaskGroup) -> None:
        """Queue a snapshot of every key held (at the current sequence number) for this
        connection, then every later batch."""
        self._flush()
        if conn.events is None:
            send, receive = anyio.create_memory_object_stream[bytes](_SUBSCRIBER_QUEUE)
            conn.events = send
            tg.start_soon(self._send_events, conn, receive)
        records = tuple(KeyRecord("stored", t, k) for t, k in held_keys(self.store).items())
        snapshot = SeqFrame(self.identity.incarnation, self.seq, records)
        self._queue(conn, self._frame(FrameKind.RESYNC, snapshot))

    async def _send_events(
        self, conn: _Connection, frames: MemoryObjectReceiveStream[bytes]
    ) -> None:
        with contextlib.suppress(*CONNECTION_ERRORS):
            async with frames:
                async for frame in frames:
                    deadline = time.monotonic() + self.config.lease_ttl_s
                    await conn.wire.send([frame], deadline)
                    conn.num_queued_bytes -= len(frame)
        conn.wire.shutdown()

    def _frame(self, kind: FrameKind, frame: SeqFrame) -> bytes:
        payload = pack_seq(frame)
        return pack_header(kind, 0, len(payload)) + payload

    def _queue(self, conn: _Connection, frame: bytes) -> None:
        if conn.events is None:
            return
        if len(frame) > self.config.max_frame_bytes:
            return  # not sent: the subscriber sees a gap in the sequence and resyncs
        if conn.num_queued_bytes and conn.num_queued_bytes + len(frame) > SUBSCRIBER_QUEUE_BYTES:
            conn.wire.shutdown()  # too far behind: it reconnects and resyncs
            return
        try:
            conn.events.send_nowait(frame)
        except (anyio.WouldBlock, anyio.BrokenResourceError, anyio.ClosedResourceError):
            conn.wire.shutdown()  # too slow to follow: it reconnects and resyncs
            return
        conn.num_queued_bytes += len(frame)

    def publish_now(self) -> int:
        """Send the block events pending now to the subscribers at once (not at the next
        `event_interval_s` tick); the number of the last batch, which includes them."""
        self._flush()
        return self.seq

    def _flush(self) -> None:
        """Publish the events since the last batch as batch `seq + 1`."""
        if not self._pending:
            return
        events, self._pending = self._pending, []
        self.seq += 1
        records: list[KeyRecord] = []
        i = 0
        while i < len(events):  # merge runs of events of one kind and tier, in order
            e = events[i]
            keys = list(e.keys)
            i += 1
            while i < len(events) and (events[i].kind, events[i].tier) == (e.kind, e.tier):
                keys.extend(events[i].keys)
                i += 1
            records.append(KeyRecord(e.kind, e.tier, np.array(keys, dtype=np.uint64)))
        frame = self._frame(
            FrameKind.EVENTS, SeqFrame(self.identity.incarnation, self.seq, tuple(records))
        )
        for conn in list(self._connections.values()):
            self._queue(conn, frame)

    async def _publish_loop(self) -> None:
        next_heartbeat = time.monotonic()
        while True:
            self._flush()
            now = time.monotonic()
            if now >= next_heartbeat:
                next_heartbeat = now + self.config.heartbeat_interval_s
                beat = self._frame(
                    FrameKind.HEARTBEAT, SeqFrame(self.identity.incarnation, self.seq, ())
                )
                for conn in list(self._connections.values()):
                    self._queue(conn, beat)
            await anyio.sleep(self.config.event_interval_s)


def _nothing() -> FrameReceiver:
    yield from ()


def _discard(length: int) -> FrameReceiver:
    yield [memoryview(bytearray(length))], None
