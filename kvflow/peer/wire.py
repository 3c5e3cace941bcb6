"""Frames over a non-blocking TCP socket, without copying bulk bytes.

Bulk transfers run on the event loop's thread, but do not go back to the loop each
time the socket runs dry: while bytes flow, the next ones are awaited in a blocking
`poll` of at most `FLOW_WAIT_MS` (a trip through the loop costs tens of microseconds,
and a 4 MiB transfer runs the socket dry dozens of times). After a pause that long,
or after `SLICE_S` of holding the loop, the transfer waits through the loop
(`anyio.wait_readable` / `wait_writable`), so other tasks run and a stalled peer holds
the loop for at most one pause. A connection sends one frame at a time, so frames
never interleave (`send_now` sends one at once, without the loop, when it can); one task
reads. A frame whose parts need blocking work first
(disk reads, device copies) is built and sent in a worker thread (`send_built`).
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence

import anyio
import anyio.to_thread

from kvflow.peer.frames import HEADER_SIZE, Header, unpack_header

FLOW_WAIT_MS = 1
"""While a transfer's bytes flow, how long it waits for more in a blocking poll before
handing the wait to the event loop."""
SLICE_S = 0.005
"""The longest a transfer holds the event loop before letting other tasks run."""
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


class Outgoing:
    """A frame being sent: the parts not taken yet, and the unsent views of the one
    being sent."""

    __slots__ = ("parts", "poller", "views")

    def __init__(self, parts: Iterable[Sequence[Buffer]]) -> None:
        self.parts: Iterator[Sequence[Buffer]] = iter(parts)
        self.views: list[memoryview] = []
        self.poller: select.poll | None = None


class Wire:
    """One connection's socket: header/payload reads, multi-buffer sends."""

    def __init__(self, sock: socket.socket, max_payload_bytes: int) -> None:
        tune(sock)
        self.sock = sock
        self.max_payload_bytes = max_payload_bytes
        self._send_turn = anyio.Semaphore(1)
        """One frame is sent at a time (a semaphore, not a lock: a frame begun by one
        task may be finished by another, see `send_now`)."""
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
        """Fill `view` (a small read: headers, control payloads)."""
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

    async def recv_views(
        self,
        views: Sequence[memoryview],
        deadline: float,
        on_view: Callable[[int], None] | None = None,
    ) -> None:
        """Fill each of `views` in turn by `deadline` (else TimeoutError); `on_view(i)`
        is called as soon as view `i` is full (to hash it while it is in cache)."""
        sock = self.sock
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        i, got, n = 0, 0, len(views)
        while i < n:
            slice_end = min(deadline, time.monotonic() + SLICE_S)
            while i < n:  # while bytes flow, within the slice
                view = views[i]
                if got == len(view):  # (an empty view)
                    if on_view is not None:
                        on_view(i)
                    i += 1
                    continue
                try:
                    num = sock.recv_into(view[got:] if got else view)
                except BlockingIOError:
                    if time.monotonic() >= slice_end or not poller.poll(FLOW_WAIT_MS):
                        break
                    continue
                except OSError as err:
                    raise PeerClosedError(f"connection lost: {err}") from None
                if num == 0:
                    raise PeerClosedError("connection closed by the other end")
                got += num
                if got == len(view):
                    if on_view is not None:
                        on_view(i)
                    i, got = i + 1, 0
            if i < n:
                await _wait(anyio.wait_readable, sock, deadline, "a receive")

    # -- writing ---------------------------------------------------------------------
    async def send(self, buffers: Sequence[Buffer], deadline: float) -> None:
        """Send the buffers as one contiguous byte stream (one frame), by the deadline."""
        await self.send_parts([buffers], deadline)

    async def send_parts(
        self,
        parts: Iterable[Sequence[Buffer]],
        deadline: float,
        before_waiting: Callable[[], None] | None = None,
    ) -> None:
        """Send one frame made of `parts`, each taken from the iterable just before it
        is sent (so work that makes a part, such as hashing it, overlaps with the
        other end receiving the parts before). `before_waiting()` is called once, just
        before the first time the send has to let the event loop run other tasks (the
        connection's turn to send is held by another frame, the socket stays full):
        until then nothing else has run on this thread."""
        turn = self._send_turn
        try:
            turn.acquire_nowait()
        except anyio.WouldBlock:
            if before_waiting is not None:
                before_waiting()
                before_waiting = None
            with anyio.fail_after(max(0.0, deadline - time.monotonic())):
                await turn.acquire()
        try:
            if self.closed:
                raise PeerClosedError("connection already closed")
            await self._send_rest(Outgoing(parts), deadline, before_waiting)
        finally:
            turn.release()

    def send_now(self, parts: Iterable[Sequence[Buffer]], deadline: float) -> Outgoing | None:
        """Send one frame made of `parts` at once, on this thread, without a trip through
        the event loop: None once it is sent whole; its unsent rest if the socket stayed
        full (for `FLOW_WAIT_MS`, or `SLICE_S` in all), which keeps the connection's turn
        to send until `finish_send(rest)`. Raises `anyio.WouldBlock` (nothing sent)
        while another frame is being sent."""
        turn = self._send_turn
        turn.acquire_nowait()
        out = Outgoing(parts)
        try:
            if self.closed:
                raise PeerClosedError("connection already closed")
            if self._push(out, min(deadline, time.monotonic() + SLICE_S)):
                turn.release()
                return None
        except BaseException:
            turn.release()
            raise
        return out

    async def finish_send(self, rest: Outgoing, deadline: float) -> None:
        """Send what `send_now` left, by the deadline; then others may send."""
        try:
            await self._send_rest(rest, deadline, None)
        finally:
            self._send_turn.release()

    async def _send_rest(
        self, out: Outgoing, deadline: float, before_waiting: Callable[[], None] | None
    ) -> None:
        while not self._push(out, min(deadline, time.monotonic() + SLICE_S)):
            if before_waiting is not None:
                before_waiting()
                before_waiting = None
            await _wait(anyio.wait_writable, self.sock, deadline, "a send")

    def _push(self, out: Outgoing, slice_end: float) -> bool:
        """Send what the socket takes until the frame is sent (True), or the socket
        stays full for `FLOW_WAIT_MS` or past `slice_end` (False)."""
        sock = self.sock
        views = out.views
        while True:
            if not views:
                part = next(out.parts, None)
                if part is None:
                    return True
                views.extend(memoryview(b).cast("B") for b in part)
                continue
            try:
                num = sock.sendmsg(views[:_IOV_MAX])
            except BlockingIOError:
                if out.poller is None:
                    out.poller = select.poll()
                    out.poller.register(sock, select.POLLOUT)
                if time.monotonic() >= slice_end or not out.poller.poll(FLOW_WAIT_MS):
                    return False
                continue
            except OSError as err:
                raise PeerClosedError(f"connection lost: {err}") from None
            _advance(views, num)

    async def send_built(self, parts: Iterable[Sequence[Buffer]], deadline: float) -> None:
        """Send one frame made of `parts`, taken (built) and sent part by part in one
        worker thread (for a frame whose building blocks too: disk reads, hashing, which
        then overlap with the transfer of the parts before)."""

        def build_and_send() -> None:
            for part in parts:
                views = [memoryview(b).cast("B") for b in part]
                send_views_blocking(self.sock, views, deadline)

        async with self._turn_to_send(deadline):
            await anyio.to_thread.run_sync(build_and_send)

    @contextlib.asynccontextmanager
    async def _turn_to_send(self, deadline: float) -> AsyncIterator[None]:
        """The connection's turn to send, waited for no later than `deadline` (a frame
        queued behind a stuck one must not hold its pins past its own lease)."""
        with anyio.fail_after(max(0.0, deadline - time.monotonic())):
            await self._send_turn.acquire()
        try:
            if self.closed:
                raise PeerClosedError("connection already closed")
            yield
        finally:
            self._send_turn.release()

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


async def _wait(
    wait: Callable[[socket.socket], Awaitable[None]],
    sock: socket.socket,
    deadline: float,
    what: str,
) -> None:
    """Wait through the event loop until `sock` is ready, or raise TimeoutError."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError(f"peer connection: {what} did not finish in time")
    with anyio.move_on_after(remaining):
        await wait(sock)
        return
    raise TimeoutError(f"peer connection: {what} did not finish in time")


def _wait_blocking(poller: select.poll, deadline: float, what: str) -> None:
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
            _wait_blocking(poller, deadline, "a send")
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
                _wait_blocking(poller, deadline, "a receive")
                continue
            except OSError as err:
                raise PeerClosedError(f"connection lost: {err}") from None
            if num == 0:
                raise PeerClosedError("connection closed by the other end")
            got += num
