"""Serving pulls: a `PeerService` hands each PULL frame of its connections to its
`PullServer`.

A pull re-validates its keys against the store, pins the leading run it still holds
under a lease, sends the blocks' bytes straight from the tier buffers, and unpins: every
step that can block is bounded by the lease's deadline, so no pin outlives
`peer.lease_ttl_s` even when the client vanishes. A pull of blocks in host memory is
served at once by the reader when the connection is free to send, and pinned only if
its send has to wait (until then nothing else runs on the store's thread); any other is
pinned at once and sent by a task of its own. A failed pull ends its connection, nothing
else.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, cast

import anyio
import anyio.abc
import xxhash

from kvflow.config import PeerConfig
from kvflow.kv.export import HeldRun, RunBytes, RunReader, find_run, pin, unpin
from kvflow.kv.store import KVStore
from kvflow.peer.frames import (
    BLOCKS_KIND,
    PULL_HEAD,
    ErrorCode,
    FrameError,
    Header,
    blocks_meta_size,
    pack_blocks_head,
    pack_checksums,
    pack_header,
    unpack_pull,
)
from kvflow.peer.handshake import PeerRefusedError, send_error
from kvflow.peer.receiving import FrameReceiver, receive_bytes
from kvflow.peer.wire import PeerClosedError, Wire

if TYPE_CHECKING:
    from kvflow.peer.service import _Connection

digest = xxhash.xxh3_64_intdigest
SEND_PART_BYTES = 1 << 20
"""A reply whose blocks need hashing is sent in parts of about this size (at least a
block), so the puller receives one part while the owner hashes the next; blocks whose
checksums are known go out together (one `sendmsg`, one wakeup of the puller)."""
CONNECTION_ERRORS = (FrameError, PeerClosedError, PeerRefusedError, TimeoutError, OSError)
"""What ends one connection of the service, and nothing else."""


class PullServer:
    """Serves the PULLs of a peer service's connections from `store`.

    `counts` is the service's counters, which the server adds to: "pulls", "blocks" and
    "bytes" served, and "closed_for_errors" for a connection a failed pull ended.
    """

    def __init__(
        self, store: KVStore, config: PeerConfig, fingerprint: bytes, counts: dict[str, int]
    ) -> None:
        self.store = store
        self.config = config
        self.fingerprint = fingerprint
        self.bytes_per_block = store.bytes_per_block
        limit = config.max_frame_bytes - blocks_meta_size(0)
        self.max_blocks_per_pull = max(1, limit // (self.bytes_per_block + 9))
        self._reader = RunReader(store) if store.device_storage is not None else None
        """None: the store has no bytes to serve (events only)."""
        self.num_leases = 0
        """Pulls holding pins (each one's send deadline, the lease's TTL, ends it and
        unpins)."""
        self._counts = counts
        self.on_served: Callable[[Sequence[int]], None] | None = None
        """Told the keys of each pull served in full (the handoff leases end on it)."""

    def receive(self, conn: _Connection, tg: anyio.abc.TaskGroup, header: Header) -> FrameReceiver:
        """The receiver of a PULL frame from `conn` (see `kvflow.peer.receiving`)."""
        if header.payload_length > PULL_HEAD.size + 8 * self.max_blocks_per_pull:
            raise FrameError(
                f"PULL of {header.payload_length} bytes asks for more than "
                f"{self.max_blocks_per_pull} blocks"
            )
        return self._receive_pull(conn, tg, header.request_id, header.payload_length)

    def _receive_pull(
        self, conn: _Connection, tg: anyio.abc.TaskGroup, request_id: int, length: int
    ) -> FrameReceiver:
        payload = conn.wire.incoming.take_bytes(length)  # mostly read with the header
        if payload is None:
            payload = yield from receive_bytes(length)
        if conn.num_inflight >= self.config.max_inflight_pulls:
            message = f"more than {self.config.max_inflight_pulls} pulls in flight"
            tg.start_soon(_try_send_error, conn.wire, request_id, message)
        elif self._reader is None:
            message = "this instance holds no block bytes (events only)"
            tg.start_soon(_try_send_error, conn.wire, request_id, message, True)
        else:
            self._on_pull(conn, tg, self._reader, request_id, payload)

    def _on_pull(
        self,
        conn: _Connection,
        tg: anyio.abc.TaskGroup,
        reader: RunReader,
        request_id: int,
        payload: bytearray,
    ) -> None:
        """Serve a PULL (unpacked, and its run found, here only). Blocks in host memory
        go out at once, on this thread, when the connection is free to send (the common
        case): no task, and no pins unless the socket cannot take the whole reply now.
        Otherwise (blocks to read from disk or a device, another frame being sent, the
        rest of a reply) the run is pinned now and a task sends it (`_send_pinned`). A
        malformed pull, or one for another model, ends the connection (`_refuse`)."""
        try:
            fingerprint: bytes | None
            fingerprint, lease_id, keys = unpack_pull(payload)
        except FrameError:
            fingerprint = None
        if fingerprint != self.fingerprint:
            conn.num_inflight += 1
            tg.start_soon(self._refuse, conn, request_id, fingerprint)
            return
        found = find_run(self.store, keys)
        served: list[int] = []
        deadline = time.monotonic() + self.config.lease_ttl_s
        wire = conn.wire
        send: Callable[[], Awaitable[None]]
        parts: Iterable[Sequence[bytes | memoryview]]
        if not reader.in_host_memory(found):
            parts = self._reply(reader, found, request_id, lease_id, served)
            send = functools.partial(wire.send_built, parts, deadline)  # reads in a thread
        else:
            data = reader.read_run(found, hash_host=False)
            parts = self._reply_parts(reader, found, data, request_id, lease_id, served)
            try:
                rest = wire.send_now(parts, deadline)
            except anyio.WouldBlock:  # another frame is being sent: wait in a task
                send = functools.partial(wire.send_parts, parts, deadline)
            except Exception:  # as in `_send_pinned`: the stream is unusable, end it
                self._counts["closed_for_errors"] += 1
                wire.shutdown()
                return
            else:
                if rest is None:
                    self._count_served(found, served[0])
                    return
                send = functools.partial(wire.finish_send, rest, deadline)
        pin(self.store, found)  # before anything else runs on this thread
        self.num_leases += 1
        conn.num_inflight += 1
        tg.start_soon(self._send_pinned, conn, send, found, served)

    async def _send_pinned(
        self,
        conn: _Connection,
        send: Callable[[], Awaitable[None]],
        run: HeldRun,
        served: list[int],
    ) -> None:
        """Send (`send`) the reply to a pull whose run `_on_pull` pinned, then unpin it."""
        try:
            await send()
            self._count_served(run, served[0])
        except Exception:  # one failed pull ends its connection, nothing else
            # A transfer that failed half-way leaves the stream unusable: end it.
            self._counts["closed_for_errors"] += 1
            conn.wire.shutdown()
        finally:
            unpin(self.store, run)
            self.num_leases -= 1
            conn.num_inflight -= 1

    async def _refuse(self, conn: _Connection, request_id: int, fingerprint: bytes | None) -> None:
        """End the connection of a malformed pull (`fingerprint` None) or of one for
        another model (the puller is told why first)."""
        try:
            if fingerprint is not None:
                message = (
                    f"pull for model fingerprint {fingerprint.hex()}, this instance serves "
                    f"{self.fingerprint.hex()}"
                )
                with contextlib.suppress(Exception):  # it ends either way
                    await send_error(conn.wire, request_id, ErrorCode.FINGERPRINT_MISMATCH, message)
        finally:
            self._counts["closed_for_errors"] += 1
            conn.wire.shutdown()
            conn.num_inflight -= 1

    def _reply(
        self, reader: RunReader, found: HeldRun, request_id: int, lease_id: int, served: list[int]
    ) -> Iterator[Sequence[bytes | memoryview]]:
        """The parts of the BLOCKS reply to a pull that found `found`, made as they are
        taken: the run is read when the first is (see `_reply_parts`)."""
        data = reader.read_run(found, hash_host=False)
        yield from self._reply_parts(reader, found, data, request_id, lease_id, served)

    def _reply_parts(
        self,
        reader: RunReader,
        found: HeldRun,
        data: RunBytes,
        request_id: int,
        lease_id: int,
        served: list[int],
    ) -> Iterable[Sequence[bytes | memoryview]]:
        """The parts of the BLOCKS reply of `data`, the bytes read of `found`: one part
        when every checksum is known (blocks served before: one `sendmsg`), else parts
        made as they are taken, each block still to hash hashed just before its part.
        The number of blocks read is appended to `served`."""
        size = self.bytes_per_block
        n = len(data.views)
        served.append(n)
        payload_length = blocks_meta_size(n) + n * size
        head: list[bytes | memoryview] = [
            pack_header(BLOCKS_KIND, request_id, payload_length),
            pack_blocks_head(lease_id, size, found.tiers[:n]),
        ]
        sums = data.checksums
        if None not in sums:
            return [[*head, *data.views, pack_checksums(cast("list[int]", sums))]]
        return self._hashing_parts(reader, found, data, head)

    def _hashing_parts(
        self, reader: RunReader, found: HeldRun, data: RunBytes, head: list[bytes | memoryview]
    ) -> Iterator[Sequence[bytes | memoryview]]:
        size = self.bytes_per_block
        sums = data.checksums
        part, part_bytes = head, 0
        for i in range(len(data.views)):
            if sums[i] is None:  # to hash: first send what is ready, if much
                if part_bytes >= SEND_PART_BYTES:
                    yield part
                    part, part_bytes = [], 0
                sums[i] = checksum = digest(data.views[i])
                reader.remember(found, i, checksum)
            part.append(data.views[i])
            part_bytes += size
        yield [*part, pack_checksums(cast("list[int]", sums))]

    def _count_served(self, found: HeldRun, num_blocks: int) -> None:
        self._counts["pulls"] += 1
        self._counts["blocks"] += num_blocks
        self._counts["bytes"] += num_blocks * self.bytes_per_block
        if self.on_served is not None:
            self.on_served(found.keys[:num_blocks])


async def _try_send_error(
    wire: Wire, request_id: int, message: str, unavailable: bool = False
) -> None:
    code = ErrorCode.UNAVAILABLE if unavailable else ErrorCode.BUSY
    with contextlib.suppress(*CONNECTION_ERRORS):
        await send_error(wire, request_id, code, message)
