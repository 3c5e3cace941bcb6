"""Reading a connection's frames as their bytes arrive, on the event loop's thread.

`serve_frames(wire, receive)` reads frame after frame until the connection fails. For
each header, `receive(header)` returns the frame's receiver: a generator that yields the
buffers its payload goes into next, in order (bulk bytes land there straight from the
socket, each buffer hashed with xxh3 as soon as it is full, while it is in cache, when
the receiver asks for it), and acts on them once they are filled. A small payload that
was read with its header (a PULL, a reply's fixed fields) the receiver takes straight
from the read-ahead buffer (`ReadAhead.take_bytes`), without a round of its own.

Reading needs no task switch: on asyncio (uvloop included) a reader callback registered
once for the connection's life reads whatever has arrived and runs the receivers (a
task waiting for each frame would cost the loop a readiness registration, a future and
a task wake per frame, more than the rest of a small pull). While a frame's bytes flow,
the next ones are awaited in a blocking `poll` of at most `FLOW_WAIT_MS`; after a pause
that long, or after `SLICE_S` of holding the loop, reading goes on at the next readiness
(other tasks run meanwhile). On other anyio backends one task does the same.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Generator, Sequence
from typing import NoReturn

import anyio
import xxhash

from kvflow.peer.frames import HEADER_SIZE, Header
from kvflow.peer.wire import SLICE_S, PeerClosedError, Wire, flowing, recv_some

FrameReceiver = Generator[tuple[Sequence[memoryview], list[int] | None], None, None]
"""One frame's receiver: yields the buffers to fill next with its payload, in order, and
a list each one's xxh3 is appended to as soon as it is full (or None); acts on what it
received once resumed; returns when its payload is all received (see `serve_frames`)."""

digest = xxhash.xxh3_64_intdigest


def receive_bytes(
    num_bytes: int,
) -> Generator[tuple[Sequence[memoryview], None], None, bytearray]:
    """A receiver's round of its own for `num_bytes` that did not all come with their
    header (`ReadAhead.take_bytes` returned None): yields a fresh buffer to fill, and
    returns it filled (`payload = yield from receive_bytes(n)`)."""
    buf = bytearray(num_bytes)
    yield [memoryview(buf)], None
    return buf


async def serve_frames(wire: Wire, receive: Callable[[Header], FrameReceiver]) -> NoReturn:
    """Read `wire`'s frames with `receive` until the connection fails, then raise why:
    `PeerClosedError` once it is closed (either end), or what a receiver raised."""
    feed = _Feed(wire, receive)
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # another anyio backend
        await _read_in_task(feed)
    await _read_in_callback(feed, loop)


async def _read_in_task(feed: _Feed) -> NoReturn:
    """This task reads whenever the socket is readable."""
    while True:
        feed.on_readable()
        await anyio.wait_readable(feed.wire.sock)


async def _read_in_callback(feed: _Feed, loop: asyncio.AbstractEventLoop) -> NoReturn:
    """A reader callback registered with the loop reads whenever the socket is readable;
    this task waits for the connection to fail."""
    sock = feed.wire.sock
    failed: asyncio.Future[None] = loop.create_future()

    def on_readable() -> None:
        try:
            feed.on_readable()
        except Exception as err:  # the connection is done: stop reading, tell the task
            loop.remove_reader(sock)
            if not failed.done():
                failed.set_exception(err)

    feed.on_readable()  # what was read ahead of the first frames (a handshake's last)
    _name_the_library_for_callbacks()
    loop.add_reader(sock, on_readable)  # (the callback runs in a copy of this context)
    try:
        await failed
    finally:
        loop.remove_reader(sock)
    raise AssertionError("unreachable: `failed` only ever holds an exception")


def _name_the_library_for_callbacks() -> None:
    """Receivers start tasks (anyio task groups), which needs anyio to find its backend
    outside any task: through sniffio's context variable when sniffio is installed,
    which a loop anyio did not start (uvicorn's) leaves unset. Set in this task's
    context, copied into the reader callback's. (Without sniffio, anyio finds asyncio
    by its running loop, in callbacks too.)"""
    try:
        import sniffio
    except ImportError:
        return
    sniffio.current_async_library_cvar.set("asyncio")


class _Feed:
    """The reading state of one connection: the frame being received, its buffers."""

    def __init__(self, wire: Wire, receive: Callable[[Header], FrameReceiver]) -> None:
        self.wire = wire
        self.receive = receive
        self.frame: FrameReceiver | None = None
        self.views: Sequence[memoryview] = ()
        self.digests: list[int] | None = None
        self.i = 0
        """The first buffer of `views` not full yet,"""
        self.got = 0
        """and how many bytes it holds."""

    def on_readable(self) -> None:
        """Read and act on what has arrived, until the socket has nothing more for now or
        a transfer has held the loop for `SLICE_S`."""
        wire = self.wire
        incoming = wire.incoming
        slice_end = time.monotonic() + SLICE_S
        received = False
        while not wire.closed:
            if self.frame is None:  # the next frame's header
                if incoming.end - incoming.pos < HEADER_SIZE:
                    if received:  # the loop tells when more comes: no recv just to
                        return  # learn that nothing has, as is most often the case
                    try:
                        incoming.recv(wire.sock)
                    except BlockingIOError:
                        return
                    received = True
                    continue
                self.frame = self.receive(incoming.header(wire.max_payload_bytes))
            elif self._fill(slice_end):
                received = True
            else:
                return
            try:
                self.views, self.digests = next(self.frame)
            except StopIteration:
                self.frame = None
            self.i = self.got = 0
        raise PeerClosedError("connection closed by this end")

    def _fill(self, slice_end: float) -> bool:
        """Fill the frame's buffers: from what was read ahead, then straight from the
        socket while bytes flow. False if they stopped flowing for `FLOW_WAIT_MS` or the
        slice is over before the buffers are full."""
        sock = self.wire.sock
        incoming = self.wire.incoming
        views, digests = self.views, self.digests
        i, got, n = self.i, self.got, len(views)
        while i < n and incoming.pos < incoming.end:  # what was read ahead
            view = views[i]
            got += incoming.take(view[got:])
            if got == len(view):
                if digests is not None:
                    digests.append(digest(view))
                i, got = i + 1, 0
        try:
            while i < n:
                view = views[i]
                size = len(view)
                while got < size:
                    try:
                        got += recv_some(sock, view[got:] if got else view)
                    except BlockingIOError:
                        if not flowing(self.wire.recv_poller, slice_end):
                            return False
                if digests is not None:
                    digests.append(digest(view))
                i, got = i + 1, 0
            return True
        finally:
            self.i, self.got = i, got
