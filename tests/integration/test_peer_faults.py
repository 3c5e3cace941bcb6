"""Peers that answer with garbage, and slow links. A peer that, after a good handshake,
answers a pull with anything malformed (random bytes, another protocol version, an
unknown or unexpected frame, blocks for another request, of another size or too many, a
length past the limits, undecodable events) fails the pull at once, long before its
timeout: the client is down, nothing it sent is indexed, no slot is left pinned. Over a
slow link a pull either lands byte for byte within its timeout or fails at the timeout,
and then the owner's pins go with the lease."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.abc
import pytest
import torch
from anyio.abc import SocketStream

from kvflow.kv.store import KVStore
from kvflow.peer.client import PeerDownError, connect_peer, pull_into_cpu
from kvflow.peer.frames import (
    HEADER,
    MAGIC,
    PROTOCOL_VERSION,
    FrameKind,
    Header,
    pack_header,
)
from kvflow.peer.service import PeerService
from kvflow.peer.wire import Wire
from tests.peer_builders import (
    answer_one_pull,
    blocks_head,
    cpu_block,
    make_store,
    no_pins,
    peer_config,
    put_blocks,
    until,
)

pytestmark = pytest.mark.anyio
KEYS = [1, 2, 3, 4]
Answer = Callable[[Wire, Header, int], Awaitable[None]]
"""Sends a fake peer's answer to the PULL `header` (blocks of `bytes_per_block`)."""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _send(wire: Wire, *parts: bytes) -> None:
    await wire.send(list(parts), time.monotonic() + 5)


async def random_bytes(wire: Wire, pull: Header, size: int) -> None:
    await _send(wire, os.urandom(64))


async def another_version(wire: Wire, pull: Header, size: int) -> None:
    await _send(
        wire, HEADER.pack(MAGIC, PROTOCOL_VERSION + 1, FrameKind.BLOCKS, 0, pull.request_id, 0)
    )


async def an_unknown_kind(wire: Wire, pull: Header, size: int) -> None:
    await _send(wire, HEADER.pack(MAGIC, PROTOCOL_VERSION, 77, 0, pull.request_id, 0))


async def an_unexpected_kind(wire: Wire, pull: Header, size: int) -> None:
    await _send(wire, pack_header(FrameKind.PULL, pull.request_id, 0))


async def blocks_for_another_request(wire: Wire, pull: Header, size: int) -> None:
    await _send(wire, blocks_head(pull.request_id + 1, size, 4), b"\0" * (4 * size))


async def blocks_of_another_size(wire: Wire, pull: Header, size: int) -> None:
    await _send(wire, blocks_head(pull.request_id, 2 * size, 4), b"\0" * (8 * size))


async def more_blocks_than_asked(wire: Wire, pull: Header, size: int) -> None:
    await _send(wire, blocks_head(pull.request_id, size, 8), b"\0" * (8 * size))


async def a_length_past_the_limit(wire: Wire, pull: Header, size: int) -> None:
    await _send(wire, blocks_head(pull.request_id, size, 4, payload_length=2**40))


async def undecodable_events(wire: Wire, pull: Header, size: int) -> None:
    payload = os.urandom(40)
    await _send(wire, pack_header(FrameKind.EVENTS, 0, len(payload)), payload)


async def a_reset_mid_frame(wire: Wire, pull: Header, size: int) -> None:
    await _send(wire, blocks_head(pull.request_id, size, 4), b"\0" * size)
    wire.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    wire.close()  # RST


@pytest.mark.parametrize(
    "answer",
    [
        random_bytes,
        another_version,
        an_unknown_kind,
        an_unexpected_kind,
        blocks_for_another_request,
        blocks_of_another_size,
        more_blocks_than_asked,
        a_length_past_the_limit,
        undecodable_events,
        a_reset_mid_frame,
    ],
    ids=lambda f: f.__name__,
)
async def test_a_peer_answering_garbage_fails_the_pull_at_once(
    tmp_path: Path, answer: Answer
) -> None:
    b = make_store(tmp_path, "b")
    config = peer_config(pull_timeout_s=60)  # the garbage ends the pull, not the timeout
    liar = PeerService(make_store(tmp_path, "liar"), config, peer_id="A")
    me = PeerService(b, config, peer_id="B").identity
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)

    async def garbage(wire: Wire, pull: Header) -> None:
        await answer(wire, pull, b.bytes_per_block)

    assert b.cpu is not None
    free_before = b.cpu.num_free_blocks
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(answer_one_pull, listener, liar.identity, config, garbage)
            async with connect_peer("127.0.0.1", listener.getsockname()[1], me, config) as client:
                with pytest.raises(PeerDownError) as failed:
                    await pull_into_cpu(client, b, KEYS)
                assert client.is_down and client.down_reason
                assert "did not answer" not in str(failed.value)  # the garbage, not a timeout
            tg.cancel_scope.cancel()
    listener.close()
    assert all(b.cpu.lookup(k) is None for k in KEYS)  # nothing it sent is a block
    assert b.cpu.num_free_blocks == free_before and no_pins(b)
    b.close()


async def _pump(src: SocketStream, dst: SocketStream, bytes_per_s: float | None) -> None:
    """Copy `src` to `dst` (at `bytes_per_s` at most, 16 KiB at a time) until either end
    closes."""
    try:
        while True:
            data = await src.receive(16 * 1024)
            await dst.send(data)
            if bytes_per_s is not None:
                await anyio.sleep(len(data) / bytes_per_s)
    except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        with contextlib.suppress(Exception):
            await dst.send_eof()


@asynccontextmanager
async def slow_link(target_port: int, bytes_per_s: float) -> AsyncIterator[int]:
    """A TCP proxy to `target_port` on loopback whose answers travel at `bytes_per_s`;
    yields its port."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")

    async def forward(inbound: SocketStream) -> None:
        outbound = await anyio.connect_tcp("127.0.0.1", target_port)
        async with inbound, outbound, anyio.create_task_group() as tg:
            tg.start_soon(_pump, inbound, outbound, None)
            tg.start_soon(_pump, outbound, inbound, bytes_per_s)

    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, forward)
        yield listener.extra(anyio.abc.SocketAttribute.local_port)
        tg.cancel_scope.cancel()


async def test_a_pull_whose_frames_trickle_in_a_few_bytes_at_a_time_lands_whole(
    tmp_path: Path,
) -> None:
    """Through a proxy that forwards 5 bytes at a time each way (each a separate send,
    with a pause), the owner gets a PULL's payload apart from its header and the puller
    a reply's fixed fields and tier codes apart from theirs (counted: they took the
    slow path): received in rounds of their own instead of from the bytes read with
    the header, they land the same."""
    a, b = make_store(tmp_path, "a"), make_store(tmp_path, "b")
    expected = put_blocks(a, "cpu", KEYS, seed=6)
    config = peer_config()
    me = PeerService(b, config, peer_id="B").identity
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")

    async def trickle(src: SocketStream, dst: SocketStream) -> None:
        for _ in range(400):  # the first 2,000 bytes (the handshake's, the PULL, the
            data = await src.receive(5)  # reply's head), 5 at a time; then the rest
            await dst.send(data)
            await anyio.sleep(0.0005)
        await _pump(src, dst, None)

    async def forward(inbound: SocketStream) -> None:
        outbound = await anyio.connect_tcp("127.0.0.1", service.port)
        async with inbound, outbound, anyio.create_task_group() as tg:
            tg.start_soon(trickle, inbound, outbound)
            tg.start_soon(trickle, outbound, inbound)

    with anyio.fail_after(30):
        async with (
            PeerService(a, config, peer_id="A") as service,
            listener,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(listener.serve, forward)
            port = listener.extra(anyio.abc.SocketAttribute.local_port)
            async with connect_peer("127.0.0.1", port, me, config) as client:
                for _ in range(3):  # (the later ones past the trickle, read ahead)
                    assert await pull_into_cpu(client, b, KEYS) == 4
                assert service.stats().num_received_apart > 0  # PULL payloads
                assert client.wire.incoming.num_received_apart > 0  # replies' fixed fields
            tg.cancel_scope.cancel()
    assert all(torch.equal(cpu_block(b, k), expected[k]) for k in KEYS)
    assert no_pins(a) and no_pins(b)
    a.close()
    b.close()


def _big_block_stores(tmp_path: Path) -> tuple[KVStore, KVStore]:
    """Stores of 1 MiB blocks: four of them take 0.5 s at 8 MiB/s."""
    big = {"num_blocks": 8, "head_dim": 1024, "num_kv_heads": 8}
    return make_store(tmp_path, "a", **big), make_store(tmp_path, "b", **big)


async def test_a_pull_over_a_slow_link_lands_whole_within_its_timeout(tmp_path: Path) -> None:
    a, b = _big_block_stores(tmp_path)
    expected = put_blocks(a, "cpu", KEYS, seed=5)
    config = peer_config(pull_timeout_s=20)
    me = PeerService(b, config, peer_id="B").identity
    with anyio.fail_after(30):
        async with (
            PeerService(a, config, peer_id="A") as service,
            slow_link(service.port, bytes_per_s=8 * 2**20) as port,
            connect_peer("127.0.0.1", port, me, config) as client,
        ):
            assert await pull_into_cpu(client, b, KEYS) == 4
            await until(lambda: service.stats().num_active_leases == 0)
    assert all(torch.equal(cpu_block(b, k), expected[k]) for k in KEYS)
    assert no_pins(a) and no_pins(b)
    a.close()
    b.close()


async def test_a_pull_over_a_link_too_slow_fails_at_its_timeout_and_pins_go(
    tmp_path: Path,
) -> None:
    a, b = _big_block_stores(tmp_path)
    put_blocks(a, "cpu", KEYS, seed=5)
    config = peer_config(pull_timeout_s=0.5, lease_ttl_s=1.0)
    me = PeerService(b, config, peer_id="B").identity
    with anyio.fail_after(30):
        async with (
            PeerService(a, config, peer_id="A") as service,
            slow_link(service.port, bytes_per_s=2**20) as port,
        ):
            async with connect_peer("127.0.0.1", port, me, config) as client:
                with pytest.raises(PeerDownError, match="did not answer a pull of 4 blocks"):
                    await pull_into_cpu(client, b, KEYS)
            assert b.cpu is not None and all(b.cpu.lookup(k) is None for k in KEYS)
            assert no_pins(b)
            await until(lambda: service.stats().num_active_leases == 0)
            await until(lambda: no_pins(a))
    a.close()
    b.close()
