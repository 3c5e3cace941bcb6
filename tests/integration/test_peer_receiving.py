"""Reading frames as their bytes arrive (`kvflow.peer.receiving`) and sending them at once
(`Wire.send_now`), over a real loopback socket pair.

Each reading test runs with both readers: the reader callback registered with the event
loop (asyncio and uvloop) and the task that reads on other anyio backends."""

from __future__ import annotations

import asyncio
import itertools
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import anyio
import anyio.lowlevel
import pytest
import uvloop
import xxhash

from kvflow.peer import receiving
from kvflow.peer.client import connect_peer, pull_into_cpu
from kvflow.peer.frames import (
    HEADER,
    MAGIC,
    PROTOCOL_VERSION,
    FrameError,
    FrameKind,
    Header,
    SeqFrame,
    pack_header,
)
from kvflow.peer.receiving import FrameReceiver
from kvflow.peer.service import PeerService
from kvflow.peer.wire import READ_AHEAD_BYTES, PeerClosedError, Wire
from tests.peer_builders import make_store, no_pins, peer_config, put_blocks

pytestmark = pytest.mark.anyio

LIMIT = 1 << 20
Reader = Callable[[Wire, Callable[[Header], FrameReceiver]], Awaitable[NoReturn]]


@pytest.fixture(
    params=[
        pytest.param(("asyncio", {"use_uvloop": False}), id="asyncio"),
        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    return request.param  # type: ignore[no-any-return]


async def _in_task(wire: Wire, receive: Callable[[Header], FrameReceiver]) -> NoReturn:
    await receiving._read_in_task(receiving._Feed(wire, receive))


@pytest.fixture(params=["callback", "task"])
def read_frames(request: pytest.FixtureRequest) -> Reader:
    """`serve_frames` (a reader callback on asyncio), or the task other backends use."""
    return receiving.serve_frames if request.param == "callback" else _in_task


@contextmanager
def socket_pair() -> Iterator[tuple[Wire, socket.socket]]:
    """A wire to read from, and the blocking socket at its other end."""
    listener = socket.create_server(("127.0.0.1", 0))
    writer = socket.create_connection(listener.getsockname())
    reader, _ = listener.accept()
    listener.close()
    wire = Wire(reader, LIMIT)
    try:
        yield wire, writer
    finally:
        writer.close()
        wire.close()


class Recorder:
    """Receives each frame's payload into buffers cut at the given offsets, hashed, and
    records what arrived once the frame is done."""

    def __init__(self, cuts: tuple[int, ...] = ()) -> None:
        self.cuts = cuts
        self.frames: list[tuple[FrameKind, int, bytes, list[int]]] = []
        self.started = 0

    def pieces(self, body: bytes) -> list[bytes]:
        ends = [0, *(c for c in self.cuts if c < len(body)), len(body)]
        return [body[a:b] for a, b in itertools.pairwise(ends)]

    def __call__(self, header: Header) -> FrameReceiver:
        self.started += 1
        return self._receive(header)

    def _receive(self, header: Header) -> FrameReceiver:
        sizes = map(len, self.pieces(bytes(header.payload_length)))
        views = [memoryview(bytearray(n)) for n in sizes]
        digests: list[int] = []
        yield views, digests
        body = b"".join(bytes(v) for v in views)
        self.frames.append((header.kind, header.request_id, body, digests))


def frame(kind: FrameKind, request_id: int, payload: bytes) -> bytes:
    return pack_header(kind, request_id, len(payload)) + payload


def payload(n: int, seed: int) -> bytes:
    return bytes((i * 31 + seed) % 251 for i in range(n))


async def send_in_chunks(sock: socket.socket, data: bytes, chunks: Iterator[int]) -> None:
    """Send `data` in chunks of the given sizes, letting the reader run after each, then
    end the stream."""
    sent = 0
    while sent < len(data):
        n = next(chunks)
        sock.sendall(data[sent : sent + n])
        sent += n
        await anyio.lowlevel.checkpoint()
    sock.shutdown(socket.SHUT_WR)


async def test_frames_packed_together_or_split_anywhere_land_whole(read_frames: Reader) -> None:
    """Three frames: a small one, one whose payload spans three buffers and more than
    the read-ahead buffer, an empty one; sent in one write, in chunks of one byte (the
    headers) then 997, and in chunks of 3, 5,000, 17 and 1 bytes."""
    frames = [
        (FrameKind.HEARTBEAT, 7, payload(40, 2)),
        (FrameKind.BLOCKS, 8, payload(2 * READ_AHEAD_BYTES + 123, 1)),
        (FrameKind.ERROR, 9, b""),
    ]
    data = b"".join(frame(*f) for f in frames)
    one_by_one = itertools.chain([1] * 200, itertools.repeat(997))  # headers byte by byte
    for chunks in (iter([len(data)]), one_by_one, itertools.cycle([3, 5000, 17, 1])):
        recorder = Recorder(cuts=(10, 5010))
        with socket_pair() as (wire, writer), anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(send_in_chunks, writer, data, chunks)
                with pytest.raises(PeerClosedError, match="closed by the other end"):
                    await read_frames(wire, recorder)
        assert [(kind, rid, body) for kind, rid, body, _ in recorder.frames] == frames
        for _, _, body, digests in recorder.frames:
            assert digests == [xxhash.xxh3_64_intdigest(p) for p in recorder.pieces(body)]


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (HEADER.pack(b"XXXX", PROTOCOL_VERSION, 5, 0, 1, 8), "bad magic"),
        (pack_header(FrameKind.BLOCKS, 1, LIMIT + 1), f"exceeds the limit of {LIMIT}"),
        (pack_header(FrameKind.HEARTBEAT, 1, 64 * 1024 + 1), "HEARTBEAT frame of 65537 bytes"),
        (HEADER.pack(MAGIC, PROTOCOL_VERSION, 99, 0, 1, 8), "unknown frame kind 99"),
    ],
    ids=["garbled", "oversized", "oversized-control", "unknown-kind"],
)
async def test_a_bad_header_fails_reading_before_any_receiver_runs(
    read_frames: Reader, header: bytes, message: str
) -> None:
    recorder = Recorder()
    with socket_pair() as (wire, writer), anyio.fail_after(10):
        writer.sendall(header + b"\0" * 64)
        with pytest.raises(FrameError, match=message):
            await read_frames(wire, recorder)
    assert recorder.started == 0


async def test_a_frame_cut_short_fails_with_the_connection_and_is_never_acted_on(
    read_frames: Reader,
) -> None:
    recorder = Recorder()
    with socket_pair() as (wire, writer), anyio.fail_after(10):
        writer.sendall(pack_header(FrameKind.BLOCKS, 1, 100_000) + payload(50_000, 3))
        writer.shutdown(socket.SHUT_WR)
        with pytest.raises(PeerClosedError, match="closed by the other end"):
            await read_frames(wire, recorder)
    assert recorder.started == 1 and recorder.frames == []


async def test_what_a_receiver_raises_ends_reading(read_frames: Reader) -> None:
    def refuse(header: Header) -> FrameReceiver:
        raise FrameError(f"unexpected {header.kind.name} frame")

    with socket_pair() as (wire, writer):
        writer.sendall(frame(FrameKind.AUTH, 1, b"{}"))
        with anyio.fail_after(10), pytest.raises(FrameError, match="unexpected AUTH frame"):
            await read_frames(wire, refuse)


async def test_nothing_is_written_into_a_buffer_once_the_wire_is_shut_down(
    read_frames: Reader,
) -> None:
    """The other end sends half a payload, this end shuts its wire down (a pull given
    up), then the other end sends the rest: the buffer's second half stays untouched."""
    size = 256 * 1024
    target = memoryview(bytearray(size))

    def receive(header: Header) -> FrameReceiver:
        yield [target], None

    with socket_pair() as (wire, writer):
        writer.sendall(pack_header(FrameKind.BLOCKS, 1, size) + b"\x01" * (size // 2))
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:

                async def give_up() -> None:
                    await anyio.sleep(0.2)
                    wire.shutdown()
                    writer.sendall(b"\x02" * (size // 2))

                tg.start_soon(give_up)
                with pytest.raises(PeerClosedError):
                    await read_frames(wire, receive)
    assert bytes(target[: size // 2]) == b"\x01" * (size // 2)
    assert bytes(target[size // 2 :]) == b"\0" * (size // 2)


async def test_send_now_sends_what_the_socket_takes_and_leaves_the_rest_to_finish() -> None:
    with socket_pair() as (wire, reader):
        for sock in (wire.sock, reader):  # small buffers: 8 MiB cannot go at once
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        deadline = time.monotonic() + 10
        assert wire.send_now([[b"small", memoryview(b"frame")]], deadline) is None
        assert reader.recv(10) == b"smallframe"

        big = bytes(range(256)) * (8 << 12)  # 8 MiB
        rest = wire.send_now([[big[: 4 << 20]], [big[4 << 20 :]]], deadline)
        assert rest is not None
        with pytest.raises(anyio.WouldBlock):  # the rest holds the turn to send
            wire.send_now([[b"x"]], deadline)
        received = bytearray()

        def drain() -> None:
            while len(received) < len(big) + 1:
                received.extend(reader.recv(1 << 20))

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(anyio.to_thread.run_sync, drain)
                await wire.finish_send(rest, deadline)
                await wire.send([b"!"], deadline)  # the turn was given back
        assert bytes(received) == big + b"!"

        wire.shutdown()
        with pytest.raises(PeerClosedError):
            wire.send_now([[b"late"]], deadline)
        with pytest.raises(PeerClosedError):  # refused at once: the turn was not kept
            await wire.send([b"late"], deadline)


async def _pulls_and_events(tmp_path: Path) -> None:
    a, b = make_store(tmp_path, "a"), make_store(tmp_path, "b")
    put_blocks(a, "cpu", [1, 2])
    put_blocks(a, "disk", [3, 4], seed=1)
    config = peer_config()
    with anyio.fail_after(30):
        async with PeerService(a, config, peer_id="A") as service:
            me = PeerService(b, config, peer_id="B").identity
            async with connect_peer("127.0.0.1", service.port, me, config) as client:
                resynced = anyio.Event()

                def on_frame(kind: FrameKind, frame: SeqFrame) -> bool:
                    if kind == FrameKind.RESYNC:
                        resynced.set()
                    return False

                client.on_frame = on_frame
                await anyio.sleep(0.1)  # so the request comes to the reader callback
                await client.subscribe()  # the service starts a task to send events
                assert await pull_into_cpu(client, b, [1, 2]) == 2  # served in the reader
                assert await pull_into_cpu(client, b, [3, 4]) == 2  # a task reads the disk
                await resynced.wait()
                assert not client.is_down
                assert service.stats().num_closed_for_errors == 0
    assert no_pins(a)
    a.close()
    b.close()


@pytest.mark.parametrize(
    "new_loop", [asyncio.new_event_loop, uvloop.new_event_loop], ids=["asyncio", "uvloop"]
)
def test_on_a_loop_anyio_did_not_start_receivers_can_start_tasks(
    tmp_path: Path, new_loop: Callable[[], asyncio.AbstractEventLoop]
) -> None:
    """As under uvicorn: a subscription and a pull of disk blocks, which the reader
    callback answers by starting tasks, outside any task of a loop anyio did not start."""
    with asyncio.Runner(loop_factory=new_loop) as runner:
        runner.run(_pulls_and_events(tmp_path))
