"""Pulling blocks from a peer: connect, authenticate, and receive straight into slots.

`connect_peer` opens an authenticated connection; `PeerClient.pull(keys, views)` asks for
the blocks, and the connection's reader (`kvflow.peer.receiving`) `recv_into`s their
bytes straight into the destination views (slots of the local cpu tier) as they arrive,
hashing each block with xxh3 as soon as it lands: the result is how many leading blocks
landed intact. Pulls on one connection are pipelined. A peer that stalls past
`peer.pull_timeout_s`, closes, or sends anything malformed fails every pending pull with
`PeerDownError` and the client is down (`down_reason`); no byte is written into a
destination after its pull has returned or raised.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import socket
import time
from collections.abc import AsyncIterator, Callable, Generator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import anyio
import anyio.abc
import xxhash

from kvflow.config import PeerConfig
from kvflow.kv.store import KVStore
from kvflow.peer.directory import Directory
from kvflow.peer.frames import (
    BLOCKS_HEAD,
    BLOCKS_KIND,
    FrameError,
    FrameKind,
    Header,
    SeqFrame,
    pack_header,
    pack_pull_frame,
    unpack_blocks_head,
    unpack_checksums,
    unpack_error,
    unpack_seq,
    unpack_tier_codes,
)
from kvflow.peer.handshake import PeerRefusedError, client_handshake
from kvflow.peer.identity import PeerIdentity
from kvflow.peer.receiving import FrameReceiver, receive_bytes, serve_frames
from kvflow.peer.wire import Wire

digest = xxhash.xxh3_64_intdigest
FrameHandler = Callable[[FrameKind, SeqFrame], bool]
"""Told each EVENTS, RESYNC and HEARTBEAT frame a subscribed connection receives;
returns whether it needs a fresh snapshot (a gap), which the client then asks for."""


class PeerDownError(ConnectionError):
    """The peer died, stalled or misbehaved; it is marked down and the pull failed."""


class PeerRequestError(RuntimeError):
    """The peer refused one request (ERROR frame); the connection stays up."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class PullResult(NamedTuple):
    num_blocks: int
    """Leading blocks that landed with a good checksum (the rest are misses)."""
    tiers: tuple[str, ...]
    """Where the owner held each of them."""


class _PullEnded:
    """Off asyncio, how a pull's task learns that its pull ended: an `anyio.Event` with
    the surface of the asyncio future used on asyncio (where making an `anyio.Event`
    per pull cost ~10 us more than the future)."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event = anyio.Event()

    def done(self) -> bool:
        return self._event.is_set()

    def set_result(self, _: None) -> None:
        self._event.set()

    def __await__(self) -> Generator[Any, None, None]:
        return self._event.wait().__await__()


@dataclass(eq=False, slots=True)
class _Pull:
    views: Sequence[memoryview]
    deadline: float
    ended: asyncio.Future[None] | _PullEnded
    """Told once `result` or `error` is set (unless its task has given it up)."""
    receiving: bool = False
    """Its reply's blocks have begun to arrive."""
    result: PullResult | None = None
    error: Exception | None = None

    def end(self) -> None:
        if not self.ended.done():  # (a cancelled task's future is done already)
            self.ended.set_result(None)


class PeerClient:
    """One authenticated connection to a peer's service (see `connect_peer`)."""

    def __init__(self, wire: Wire, me: PeerIdentity, peer: PeerIdentity, config: PeerConfig):
        self.wire = wire
        self.me = me
        self.peer = peer
        """The peer's identity from its CHALLENGE."""
        self.config = config
        self.down_reason: str | None = None
        self.on_frame: FrameHandler | None = None
        self._pending: dict[int, _Pull] = {}
        self._request_ids = itertools.cycle(range(1, 2**32))  # 0: the connection itself
        self._reader_done = anyio.Event()
        try:
            self._new_ended: Callable[[], asyncio.Future[None] | _PullEnded] = (
                asyncio.get_running_loop().create_future
            )
        except RuntimeError:  # another anyio backend
            self._new_ended = _PullEnded
        """Makes each pull's signal that it ended: a loop future on asyncio, else a
        `_PullEnded` (which works on any backend)."""
        self._resync_asked = False
        self._tg: anyio.abc.TaskGroup | None = None
        """The connection's tasks (the reader, the watchdog, resync requests)."""

    @property
    def is_down(self) -> bool:
        return self.down_reason is not None

    async def pull(self, keys: Sequence[int], views: Sequence[memoryview]) -> PullResult:
        """Pull the blocks `keys` into `views` (one per key, each one block long).
        Returns how many leading blocks landed intact; raises `PeerDownError` when the
        peer fails (then `views` hold garbage) or `PeerRequestError` when it refuses."""
        if len(keys) != len(views):
            raise ValueError(f"{len(keys)} keys but {len(views)} destination views")
        if self.down_reason is not None:
            raise PeerDownError(self.down_reason)
        if not keys:
            return PullResult(0, ())
        request_id = next(self._request_ids)
        pull = _Pull(views, time.monotonic() + self.config.pull_timeout_s, self._new_ended())
        self._pending[request_id] = pull
        try:
            frame = pack_pull_frame(self.peer.fingerprint, request_id, keys)
            await self.wire.send((frame,), pull.deadline)
            await pull.ended  # told by the reader, or when the peer is marked down
        except OSError as err:
            self.mark_down(f"peer {self.peer.peer_id!r}: sending a pull failed: {err}")
        finally:
            del self._pending[request_id]
            if pull.result is None and pull.error is None:
                # Given up (cancelled): the reader must not write into `views`.
                self.mark_down(f"peer {self.peer.peer_id!r}: a pull was given up")
        if pull.error is not None:
            raise pull.error
        if pull.result is None:
            raise PeerDownError(self.down_reason or "connection closed")
        return pull.result

    async def wait_closed(self) -> None:
        """Return once the connection is down (closed, failed or marked down)."""
        await self._reader_done.wait()

    async def subscribe(self) -> None:
        """Ask for the peer's key set (a RESYNC frame) and its block events from then on,
        delivered to `on_frame`."""
        self._resync_asked = True
        deadline = time.monotonic() + self.config.pull_timeout_s
        await self.wire.send([pack_header(FrameKind.RESYNC, 0, 0)], deadline)

    def follow(self, directory: Directory, clock: Callable[[], float] = time.monotonic) -> None:
        """Keep `directory`'s entries for this peer from the frames of a subscription
        (call `subscribe` next); a gap asks for a resync."""
        peer = self.peer.peer_id
        appliers = {
            FrameKind.EVENTS: directory.apply_events,
            FrameKind.RESYNC: directory.apply_resync,
            FrameKind.HEARTBEAT: directory.heartbeat,
        }

        def on_frame(kind: FrameKind, frame: SeqFrame) -> bool:
            appliers[kind](peer, frame, clock())
            return directory.needs_resync(peer)

        self.on_frame = on_frame

    def mark_down(self, reason: str) -> None:
        """Fail every pending pull and close the connection."""
        if self.down_reason is None:
            self.down_reason = reason
        self.wire.shutdown()

    # -- reading -----------------------------------------------------------------------
    async def _read_loop(self) -> None:
        try:
            await serve_frames(self.wire, self._receive)
        except Exception as err:  # whatever went wrong, this peer is down
            self.mark_down(f"peer {self.peer.peer_id!r}: {err}")
        finally:
            self._fail_pending()
            self._reader_done.set()

    def _fail_pending(self) -> None:
        reason = self.down_reason or "connection closed"
        for pull in self._pending.values():
            if pull.result is None and pull.error is None:
                pull.error = PeerDownError(reason)
                pull.end()

    async def _watch(self) -> None:
        """Mark the peer down once a pull has waited past its deadline: this task sleeps
        until the oldest pending pull's deadline (and looks again an eighth of
        `pull_timeout_s` after finding none pending), not a timer per pull."""
        timeout = self.config.pull_timeout_s
        while True:
            oldest = next(iter(self._pending.values()), None)  # pulls expire in order
            if oldest is None:
                await anyio.sleep(timeout / 8)
            elif oldest.deadline > time.monotonic():
                await anyio.sleep(oldest.deadline - time.monotonic())
            else:
                stalled = " (stalled mid-transfer)" if oldest.receiving else ""
                self.mark_down(
                    f"peer {self.peer.peer_id!r} did not answer a pull of "
                    f"{len(oldest.views)} blocks within {timeout} s{stalled}"
                )
                self._fail_pending()
                return

    def _receive(self, header: Header) -> FrameReceiver:
        """The receiver of a frame from the peer (see `kvflow.peer.receiving`)."""
        kind = header.kind
        if kind == BLOCKS_KIND:
            return self._receive_blocks(header.request_id, header.payload_length)
        if kind in (FrameKind.ERROR, FrameKind.EVENTS, FrameKind.RESYNC, FrameKind.HEARTBEAT):
            return self._receive_control(kind, header.request_id, header.payload_length)
        raise FrameError(f"unexpected {kind.name} frame from the peer")

    def _receive_control(self, kind: FrameKind, request_id: int, length: int) -> FrameReceiver:
        payload = bytearray(length)
        yield [memoryview(payload)], None
        if kind == FrameKind.ERROR:
            self._on_error(request_id, *unpack_error(payload))
            return
        frame = unpack_seq(payload, kind)
        if kind == FrameKind.RESYNC:
            self._resync_asked = False
        wants_resync = self.on_frame is not None and self.on_frame(kind, frame)
        if wants_resync and not self._resync_asked and self._tg is not None:
            self._resync_asked = True
            self._tg.start_soon(self._resubscribe)

    async def _resubscribe(self) -> None:
        try:
            await self.subscribe()
        except Exception as err:  # as any failure of the connection
            self.mark_down(f"peer {self.peer.peer_id!r}: asking for a resync failed: {err}")

    def _on_error(self, request_id: int, code: int, message: str) -> None:
        pull = self._pending.get(request_id)
        if pull is None:
            raise PeerRefusedError(code, message)
        pull.error = PeerRequestError(code, message)
        pull.end()

    def _receive_blocks(self, request_id: int, payload_length: int) -> FrameReceiver:
        pull = self._pending.get(request_id)
        if pull is None:
            raise FrameError(f"BLOCKS for request {request_id}, which is not pending")
        pull.receiving = True
        incoming = self.wire.incoming
        fixed = incoming.take_bytes(BLOCKS_HEAD.size)  # mostly read with the header
        if fixed is None:
            fixed = yield from receive_bytes(BLOCKS_HEAD.size)
        head = unpack_blocks_head(fixed, payload_length)
        n = head.num_blocks
        if n > len(pull.views):
            raise FrameError(f"BLOCKS has {n} blocks for a pull of {len(pull.views)}")
        views = pull.views[:n]
        if n and head.bytes_per_block != len(views[0]):
            raise FrameError(
                f"BLOCKS of {head.bytes_per_block} bytes per block, expected {len(views[0])}"
            )
        trailer = memoryview(bytearray(8 * n))
        codes = incoming.take_bytes(n)
        if codes is None:  # (a round of its own: yielded with the blocks, it would be hashed)
            codes = yield from receive_bytes(n)
        digests: list[int] = []  # each block's, as soon as it lands (while it is in cache)
        yield [*views, trailer], digests  # (hashing the trailer too costs less than a round)
        tiers = unpack_tier_codes(codes)
        num_good = _num_matching(digests[:n], unpack_checksums(trailer, n))
        pull.result = PullResult(num_good, tiers[:num_good])
        pull.end()


def _num_matching(digests: Sequence[int], checksums: Sequence[int]) -> int:
    """The leading run of blocks whose digest matches the owner's checksum."""
    if tuple(digests) == tuple(checksums):
        return len(digests)
    for i, (got, expected) in enumerate(zip(digests, checksums, strict=True)):
        if got != expected:
            return i
    return len(digests)


def slot_views(
    pool_bytes: memoryview, slots: Sequence[int], bytes_per_block: int
) -> list[memoryview]:
    """One view per slot of a pool's bytes (`kvflow.kv.storage.byte_view`)."""
    size = bytes_per_block
    return [pool_bytes[s * size : (s + 1) * size] for s in slots]


async def pull_into_cpu(client: PeerClient, store: KVStore, keys: Sequence[int]) -> int:
    """Pull `keys` from the peer into fresh slots of `store`'s cpu tier and index the
    leading run that landed intact (the rest of the slots go back). Returns its length;
    raises like `PeerClient.pull`. Run on the thread that owns the store."""
    from kvflow.kv.storage import byte_view

    cpu, storage = store.cpu, store.cpu_storage
    if cpu is None or storage is None:
        raise ValueError("pulling from a peer needs a cpu tier with tensors")
    slots = cpu.allocate(len(keys))
    try:
        views = slot_views(byte_view(storage.data), slots, store.bytes_per_block)
        result = await client.pull(keys, views)
        n = result.num_blocks
        cpu.seal_many(slots[:n], keys[:n])
        return n
    finally:
        cpu.release(slots)


@asynccontextmanager
async def connect_peer(
    host: str, port: int, me: PeerIdentity, config: PeerConfig
) -> AsyncIterator[PeerClient]:
    """An authenticated connection to the peer service at `host:port`, closed on exit.
    Raises `PeerRefusedError` (secret or fingerprint differ) or `PeerDownError`."""
    try:
        with anyio.fail_after(config.handshake_timeout_s):
            sock = await _connect(host, port)
    except (OSError, TimeoutError) as err:
        raise PeerDownError(f"cannot connect to peer {host}:{port}: {err}") from None
    wire = Wire(sock, config.max_frame_bytes)
    try:
        try:
            with anyio.fail_after(config.handshake_timeout_s):
                peer = await client_handshake(wire, me, config)
        except PeerRefusedError:
            raise
        except (FrameError, OSError, TimeoutError) as err:
            raise PeerDownError(f"handshake with peer {host}:{port} failed: {err}") from None
        client = PeerClient(wire, me, peer, config)
        async with anyio.create_task_group() as tg:
            client._tg = tg
            tg.start_soon(client._read_loop)
            tg.start_soon(client._watch)
            try:
                yield client
            finally:
                client.mark_down("connection closed by this instance")
                tg.cancel_scope.cancel()
    finally:
        wire.close()


async def _connect(host: str, port: int) -> socket.socket:
    infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        err = sock.connect_ex(address)
        if err not in (0, errno.EINPROGRESS):
            raise OSError(err, errno.errorcode.get(err, str(err)))
        await anyio.wait_writable(sock)
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, errno.errorcode.get(err, str(err)))
    except BaseException:
        sock.close()
        raise
    return sock
