"""Frames over a non-blocking TCP socket, without copying bulk bytes.

Sends: a connection sends one frame at a time, so frames never interleave; `send_now`
sends one at once, on the loop's thread without a trip through the loop, when the
socket takes it; what it cannot take waits through the loop. While bytes flow, a send
waits for room in a blocking `poll` of at most `FLOW_WAIT_MS` (a trip through the loop
costs tens of microseconds, and a 4 MiB transfer fills the socket dozens of times);
after a pause that long, or after `SLICE_S` of holding the loop, it waits through the
loop (`anyio.wait_writable`), so other tasks run and a stalled peer holds the loop for
at most one pause. A frame whose parts need blocking work first (disk reads, device
copies) is built and sent in a worker thread (`send_built`).

Reads: the handshake reads with `read_header` / `read_exact`; from then on
`kvflow.peer.receiving` reads the frames as they arrive, on from the same read-ahead
buffer (`ReadAhead`).
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
READ_AHEAD_BYTES = 4096
"""Bytes a read may take past the frame header it needs (see `ReadAhead`); bulk bytes
past these go straight from the socket into their destination."""
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
    """What is left of a frame being sent: the unsent views of the part being sent
    (`num_bytes` of them), and the parts not taken yet."""

    __slots__ = ("num_bytes", "parts", "views")

    def __init__(
        self, views: Sequence[Buffer], num_bytes: int, parts: Iterator[Sequence[Buffer]] | None
    ) -> None:
        self.views = views
        self.num_bytes = num_bytes
        self.parts = parts


class ReadAhead:
    """Bytes read from a socket past what the reader asked for: a frame header is read
    with up to `READ_AHEAD_BYTES` after it, so a small frame (a PULL, a reply's fixed
    fields) takes one `recv`."""

    __slots__ = ("buf", "end", "num_received_apart", "pos", "view")

    def __init__(self) -> None:
        self.buf = bytearray(READ_AHEAD_BYTES)
        self.view = memoryview(self.buf)
        self.pos = self.end = 0
        """The bytes read ahead are `buf[pos:end]`."""
        self.num_received_apart = 0
        """Times `take_bytes` found its bytes not all read ahead (received apart)."""

    def __len__(self) -> int:
        return self.end - self.pos

    def recv(self, sock: socket.socket) -> None:
        """Read what the socket holds, up to the room left; raises BlockingIOError when
        it holds nothing, `PeerClosedError` at its end."""
        if self.pos == self.end:
            self.pos = self.end = 0
        elif self.pos > READ_AHEAD_BYTES // 2 or self.end == READ_AHEAD_BYTES:  # make room
            left = self.end - self.pos
            self.buf[:left] = self.view[self.pos : self.end]
            self.pos, self.end = 0, left
        self.end += recv_some(sock, self.view[self.end :])

    def header(self, max_payload_bytes: int) -> Header:
        """Take the header read ahead (`len(self) >= HEADER_SIZE`), checked."""
        pos = self.pos
        header = unpack_header(self.view[pos : pos + HEADER_SIZE], max_payload_bytes)
        self.pos = pos + HEADER_SIZE
        return header

    def take_bytes(self, num_bytes: int) -> bytearray | None:
        """The next `num_bytes` read ahead, taken (a copy), if they were all read ahead:
        a receiver takes a small payload that came with its header without a buffer
        filled in a round of its own (None: receive them so,
        `kvflow.peer.receiving.receive_bytes`; counted in `num_received_apart`)."""
        pos = self.pos
        end = pos + num_bytes
        if end > self.end:
            self.num_received_apart += 1
            return None
        self.pos = end
        return self.buf[pos:end]

    def take(self, view: memoryview) -> int:
        """Copy into `view` what was read ahead (as much as fits); how many bytes."""
        pos = self.pos
        num = min(len(view), self.end - pos)
        if num:
            view[:num] = self.view[pos : pos + num]
            self.pos = pos + num
        return num


class Wire:
    """One connection's socket: header/payload reads, multi-buffer sends."""

    def __init__(self, sock: socket.socket, max_payload_bytes: int) -> None:
        tune(sock)
        self.sock = sock
        self.max_payload_bytes = max_payload_bytes
        self.incoming = ReadAhead()
        """Bytes read past the frame being read (`kvflow.peer.receiving` reads on)."""
        self.send_poller = _poller(sock, select.POLLOUT)
        self.recv_poller = _poller(sock, select.POLLIN)
        """For waiting in `flowing` while a frame's bytes flow out and in."""
        self._send_turn = anyio.Semaphore(1)
        """One frame is sent at a time (a semaphore, not a lock: a frame begun by one
        task may be finished by another, see `send_now`)."""
        self.closed = False

    # -- reading ---------------------------------------------------------------------
    async def read_header(self, max_payload_bytes: int | None = None) -> Header:
        """The next frame's header, its length checked against `max_payload_bytes`
        (default: the connection's limit) before anything of the payload is read."""
        incoming = self.incoming
        while len(incoming) < HEADER_SIZE:
            await self._recv_ahead()
        limit = self.max_payload_bytes if max_payload_bytes is None else max_payload_bytes
        return incoming.header(limit)

    async def read_exact(self, num_bytes: int) -> bytearray:
        """`num_bytes` (already checked against a limit by the caller)."""
        buf = bytearray(num_bytes)
        await self.recv_into(memoryview(buf))
        return buf

    async def recv_into(self, view: memoryview) -> None:
        """Fill `view` (a small read: headers, control payloads)."""
        got = self.incoming.take(view)
        while got < len(view):
            try:
                got += recv_some(self.sock, view[got:])
            except BlockingIOError:
                await anyio.wait_readable(self.sock)

    async def _recv_ahead(self) -> None:
        while True:
            try:
                self.incoming.recv(self.sock)
                return
            except BlockingIOError:
                await anyio.wait_readable(self.sock)

    # -- writing ---------------------------------------------------------------------
    async def send(self, buffers: Sequence[Buffer], deadline: float) -> None:
        """Send the buffers as one contiguous byte stream (one frame), by the deadline."""
        try:
            rest = self.send_now([buffers], deadline)
        except anyio.WouldBlock:
            await self.send_parts([buffers], deadline)
        else:
            if rest is not None:
                await self.finish_send(rest, deadline)

    async def send_parts(self, parts: Iterable[Sequence[Buffer]], deadline: float) -> None:
        """Send one frame made of `parts`, each taken from the iterable just before it
        is sent (so work that makes a part, such as hashing it, overlaps with the
        other end receiving the parts before)."""
        turn = self._send_turn
        try:
            turn.acquire_nowait()
        except anyio.WouldBlock:
            with anyio.fail_after(max(0.0, deadline - time.monotonic())):
                await turn.acquire()
        try:
            if self.closed:
                raise PeerClosedError("connection already closed")
            await self._send_rest(Outgoing((), 0, iter(parts)), deadline)
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
        try:
            if self.closed:
                raise PeerClosedError("connection already closed")
            if type(parts) is list and len(parts) == 1:  # one part: one sendmsg, mostly
                part = parts[0]
                rest = self._push(part, sum(map(len, part)), None, deadline)
            else:
                slice_end = min(deadline, time.monotonic() + SLICE_S)
                rest = self._push((), 0, iter(parts), deadline, slice_end)
        except BaseException:
            turn.release()
            raise
        if rest is None:
            turn.release()
        return rest

    async def finish_send(self, rest: Outgoing, deadline: float) -> None:
        """Send what `send_now` left, by the deadline; then others may send."""
        try:
            await self._send_rest(rest, deadline)
        finally:
            self._send_turn.release()

    async def _send_rest(self, rest: Outgoing, deadline: float) -> None:
        while True:
            slice_end = min(deadline, time.monotonic() + SLICE_S)
            left = self._push(rest.views, rest.num_bytes, rest.parts, deadline, slice_end)
            if left is None:
                return
            rest = left
            await _wait(anyio.wait_writable, self.sock, deadline, "a send")

    def _push(
        self,
        views: Sequence[Buffer],
        num_bytes: int,
        parts: Iterator[Sequence[Buffer]] | None,
        deadline: float,
        slice_end: float = 0.0,
    ) -> Outgoing | None:
        """Send `views` (`num_bytes` in all), then each part `parts` gives (None: no
        more), as far as the socket takes them: None once all is sent, else what is
        left, when the socket stays full for `FLOW_WAIT_MS` or past `slice_end` (0:
        `SLICE_S` after it first fills, so a frame it takes at once reads no clock)."""
        sock = self.sock
        owned: list[Buffer] | None = None  # `views` copied, once a send took part of them
        while True:
            if num_bytes:
                try:
                    num = sock.sendmsg(views if len(views) <= _IOV_MAX else views[:_IOV_MAX])
                except BlockingIOError:
                    if not slice_end:
                        slice_end = min(deadline, time.monotonic() + SLICE_S)
                    if not flowing(self.send_poller, slice_end):
                        return Outgoing(views, num_bytes, parts)
                    continue
                except OSError as err:
                    raise PeerClosedError(f"connection lost: {err}") from None
                num_bytes -= num
                if num_bytes:
                    if owned is None:
                        views = owned = list(views)
                    _advance(owned, num)
                    continue
            part = None if parts is None else next(parts, None)
            if part is None:
                return None
            views, num_bytes, owned = part, sum(map(len, part)), None

    async def send_built(self, parts: Iterable[Sequence[Buffer]], deadline: float) -> None:
        """Send one frame made of `parts`, taken (built) and sent part by part in one
        worker thread (for a frame whose building blocks too: disk reads, hashing, which
        then overlap with the transfer of the parts before)."""

        def build_and_send() -> None:
            for part in parts:
                views: list[Buffer] = [memoryview(b).cast("B") for b in part]
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


def recv_some(sock: socket.socket, view: memoryview) -> int:
    """`sock.recv_into(view)`: how many bytes, at least one. Raises BlockingIOError while
    nothing has arrived, `PeerClosedError` at the connection's end or on an error."""
    try:
        num = sock.recv_into(view)
    except BlockingIOError:
        raise
    except OSError as err:
        raise PeerClosedError(f"connection lost: {err}") from None
    if num == 0:
        raise PeerClosedError("connection closed by the other end")
    return num


def _poller(sock: socket.socket, event: int) -> select.poll:
    poller = select.poll()
    poller.register(sock, event)
    return poller


def flowing(poller: select.poll, slice_end: float) -> bool:
    """While a frame's bytes flow and the socket has no room (or nothing to read):
    whether it is ready again within `FLOW_WAIT_MS`, before `slice_end` (a blocking
    poll); False hands the wait to the event loop."""
    return time.monotonic() < slice_end and bool(poller.poll(FLOW_WAIT_MS))


def _advance(views: list[Buffer], num_bytes: int) -> None:
    """Drop `num_bytes` sent bytes from the front of `views`."""
    k = 0
    while num_bytes and num_bytes >= len(views[k]):
        num_bytes -= len(views[k])
        k += 1
    del views[:k]
    if num_bytes:
        views[0] = memoryview(views[0])[num_bytes:]
    while views and not len(views[0]):
        del views[0]


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


def send_views_blocking(sock: socket.socket, views: list[Buffer], deadline: float) -> None:
    """`sendmsg` the views in order, waiting with poll (the socket is non-blocking; the
    poller is made only when a send has to wait)."""
    poller: select.poll | None = None
    while views:
        try:
            num = sock.sendmsg(views[:_IOV_MAX])
        except BlockingIOError:
            if poller is None:
                poller = _poller(sock, select.POLLOUT)
            _wait_blocking(poller, deadline, "a send")
            continue
        except OSError as err:
            raise PeerClosedError(f"connection lost: {err}") from None
        _advance(views, num)


def recv_views_blocking(sock: socket.socket, views: Sequence[memoryview], deadline: float) -> None:
    """Fill each view in turn with `recv_into`, waiting with poll."""
    poller = _poller(sock, select.POLLIN)
    for view in views:
        got = 0
        n = len(view)
        while got < n:
            try:
                got += recv_some(sock, view[got:])
            except BlockingIOError:
                _wait_blocking(poller, deadline, "a receive")
