"""Frames over a non-blocking TCP socket, without copying bulk bytes.

Small reads and writes run on the event loop (`anyio.wait_readable` /
`wait_writable` around non-blocking calls). Large ones run in a worker thread that
polls the same socket with a deadline: a 64 MiB transfer would otherwise hold the loop
for its whole duration, and a thread blocked on a dead peer would never return. Sends
of one connection are serialised by a lock, so frames never interleave; one task reads.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence

import anyio
import anyio.to_thread

from kvflow.peer.frames import HEADER_SIZE, Header, unpack_header

THREAD_BYTES = 4 << 20
"""Transfers larger than this run in a worker thread instead of on the event loop. A hop
to a worker and back wakes two threads, each of which waits for a core on a busy host:
between two processes on the loaded 2-core VM, pulls of 1 and 4 MiB took 6.9 and 15.9
ms (medians) through threads against 1.9 and 4.1 ms on the loop
(benchmarks/p2p_bandwidth.py). Larger transfers would hold the loop too long."""
SOCKET_BUFFER_BYTES = 4 << 20
"""SO_SNDBUF / SO_RCVBUF of peer sockets (the benchmark's raw socket uses the same)."""
_IOV_MAX = min(os.sysconf("SC_IOV_MAX"), 1024)

Buffer = bytes | bytearray | memoryview


class PeerClosedError(ConnectionError):
    """The other end closed the connection (or it was shut down here)."""


def tune(sock: socket.socket) -> None:
    """Non-blocking, no Nagle delay (a pull is one request frame), large buffers."""
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER_BYTES)


class Wire:
    """One connection's socket: header/payload reads, multi-buffer sends."""

    def __init__(self, sock: socket.socket, max_payload_bytes: int) -> None:
        tune(sock)
        self.sock = sock
        self.max_payload_bytes = max_payload_bytes
        self._send_lock = anyio.Lock()
        self.closed = False

    # -- reading ---------------------------------------------------------------------
    async def read_header(self, max_payload_bytes: int | None = None) -> Header:
        """The next frame's header, its length checked against `max_payload_bytes`
        (default: the connection's limit) before anything of the payload is read."""
        data = await self.read_exact(HEADER_SIZE)
        limit = self.max_payload_bytes if max_payload_bytes is None else max_payload_bytes
        return unpack_header(data, limit)

    async def read_exact(self, num_bytes: int) -> bytearray:
        """`num_bytes` (already checked against a limit by the caller)."""
        buf = bytearray(num_bytes)
        await self.recv_into(memoryview(buf))
        return buf

    async def recv_into(self, view: memoryview) -> None:
        """Fill `view` on the event loop (for small reads)."""
        sock = self.sock
        got = 0
        n = len(view)
        while got < n:
            try:
                num = sock.recv_into(view[got:])
            except BlockingIOError:
                await anyio.wait_readable(sock)
                continue
            except OSError as err:
                raise PeerClosedError(f"connection lost: {err}") from None
            if num == 0:
                raise PeerClosedError("connection closed by the other end")
            got += num

    async def recv_views(self, views: Sequence[memoryview], deadline: float) -> None:
        """Fill each of `views` in turn, in a worker thread when they are large."""
        total = sum(len(v) for v in views)
        if total <= THREAD_BYTES:
            with anyio.fail_after(max(0.0, deadline - time.monotonic())):
                for v in views:
                    await self.recv_into(v)
            return
        await anyio.to_thread.run_sync(recv_views_blocking, self.sock, views, deadline)

    # -- writing ---------------------------------------------------------------------
    async def send(self, buffers: Sequence[Buffer], deadline: float) -> None:
        """Send the buffers as one contiguous byte stream (one frame), by the deadline."""
        views = [memoryview(b).cast("B") for b in buffers]
        total = sum(len(v) for v in views)
        async with self._locked(deadline):
            if total > THREAD_BYTES:
                await anyio.to_thread.run_sync(send_views_blocking, self.sock, views, deadline)
                return
            sock = self.sock
            with anyio.fail_after(max(0.0, deadline - time.monotonic())):
                while views:
                    try:
                        num = sock.sendmsg(views[:_IOV_MAX])
                    except BlockingIOError:
                        await anyio.wait_writable(sock)
                        continue
                    except OSError as err:
                        raise PeerClosedError(f"connection lost: {err}") from None
                    _advance(views, num)

    async def send_built(
        self, parts: Callable[[], Iterable[Sequence[Buffer]]], deadline: float
    ) -> None:
        """Send one frame made of `parts()`, built lazily and sent part by part in one
        worker thread (for a frame whose building blocks too: disk reads, hashing, which
        then overlap with the transfer of the parts before)."""

        def build_and_send() -> None:
            for part in parts():
                views = [memoryview(b).cast("B") for b in part]
                send_views_blocking(self.sock, views, deadline)

        async with self._locked(deadline):
            await anyio.to_thread.run_sync(build_and_send)

    @contextlib.asynccontextmanager
    async def _locked(self, deadline: float) -> AsyncIterator[None]:
        """The send lock, waited for no later than `deadline` (a frame queued behind a
        stuck one must not hold its pins past its own lease)."""
        with anyio.fail_after(max(0.0, deadline - time.monotonic())):
            await self._send_lock.acquire()
        try:
            if self.closed:
                raise PeerClosedError("connection already closed")
            yield
        finally:
            self._send_lock.release()

    def shutdown(self) -> None:
        """End the connection both ways: blocked reads see EOF, blocked sends fail, so
        every thread working on it returns promptly. The fd stays open until `close`."""
        if not self.closed:
            self.closed = True
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.shutdown()
        self.sock.close()


def _advance(views: list[memoryview], num_bytes: int) -> None:
    """Drop `num_bytes` sent bytes from the front of `views`."""
    while num_bytes:
        head = views[0]
        if num_bytes >= len(head):
            num_bytes -= len(head)
            views.pop(0)
        else:
            views[0] = head[num_bytes:]
            num_bytes = 0
    while views and not len(views[0]):
        views.pop(0)


def _wait(poller: select.poll, deadline: float, what: str) -> None:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError(f"peer connection: {what} did not finish in time")
    poller.poll(remaining * 1000)


def send_views_blocking(sock: socket.socket, views: list[memoryview], deadline: float) -> None:
    """`sendmsg` the views in order, waiting with poll (the socket is non-blocking)."""
    poller = select.poll()
    poller.register(sock, select.POLLOUT)
    while views:
        try:
            num = sock.sendmsg(views[:_IOV_MAX])
        except BlockingIOError:
            _wait(poller, deadline, "a send")
            continue
        except OSError as err:
            raise PeerClosedError(f"connection lost: {err}") from None
        _advance(views, num)


def recv_views_blocking(sock: socket.socket, views: Sequence[memoryview], deadline: float) -> None:
    """Fill each view in turn with `recv_into`, waiting with poll."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    for view in views:
        got = 0
        n = len(view)
        while got < n:
            try:
                num = sock.recv_into(view[got:])
            except BlockingIOError:
                _wait(poller, deadline, "a receive")
                continue
            except OSError as err:
                raise PeerClosedError(f"connection lost: {err}") from None
            if num == 0:
                raise PeerClosedError("connection closed by the other end")
            got += num
