"""Peers that die, stall or vanish: pulls fail within their timeout and never hang; the
owner's pins never outlive the lease."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
import torch
import xxhash

from kvflow.kv.storage import byte_view
from kvflow.peer.client import PeerDownError, connect_peer, pull_into_cpu, slot_views
from kvflow.peer.frames import (
    ErrorCode,
    FrameKind,
    Header,
    pack_checksums,
    pack_pull_frame,
    unpack_error,
)
from kvflow.peer.handshake import client_handshake
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
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def peer_process(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """A peer service in a subprocess holding keys 1..16 (seed 3) in its cpu tier."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-m", "tests.peer_process", str(tmp_path), "16", "3"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # the child prints its port once it listens
        assert line, f"the peer process exited with {proc.wait(10)} before listening"
        yield proc, int(json.loads(line)["port"])
    finally:
        proc.kill()
        proc.wait(10)


async def test_a_killed_peer_fails_the_pull_at_once(
    tmp_path: Path, peer_process: tuple[subprocess.Popen[str], int]
) -> None:
    proc, port = peer_process
    b = make_store(tmp_path, "b")
    expected = put_blocks(make_store(tmp_path, "ref"), "cpu", list(range(1, 17)), seed=3)
    config = peer_config(pull_timeout_s=60)
    me = PeerService(b, config, peer_id="B").identity
    with anyio.fail_after(30):  # far below the pull timeout: the kill ends the pull
        async with connect_peer("127.0.0.1", port, me, config) as client:
            assert await pull_into_cpu(client, b, [1, 2, 3, 4]) == 4
            assert all(torch.equal(cpu_block(b, k), expected[k]) for k in (1, 2, 3, 4))
            proc.send_signal(signal.SIGSTOP)  # the pull below is in flight when it dies
            async with anyio.create_task_group() as tg:
                tg.start_soon(_kill_soon, proc)
                with pytest.raises(PeerDownError, match=r"closed|lost|reset"):
                    await pull_into_cpu(client, b, [5, 6, 7, 8])
            assert client.is_down
            with pytest.raises(PeerDownError):
                await pull_into_cpu(client, b, [5])
    assert b.cpu is not None and b.cpu.lookup(5) is None
    assert no_pins(b)
    b.close()


async def _kill_soon(proc: subprocess.Popen[str]) -> None:
    await anyio.sleep(0.2)
    proc.kill()


async def test_a_stalled_peer_fails_the_pull_after_the_timeout(
    tmp_path: Path, peer_process: tuple[subprocess.Popen[str], int]
) -> None:
    proc, port = peer_process
    b = make_store(tmp_path, "b")
    config = peer_config(pull_timeout_s=0.5)
    me = PeerService(b, config, peer_id="B").identity
    with anyio.fail_after(30):
        async with connect_peer("127.0.0.1", port, me, config) as client:
            proc.send_signal(signal.SIGSTOP)
            with pytest.raises(PeerDownError, match="did not answer a pull of 4 blocks"):
                await pull_into_cpu(client, b, [1, 2, 3, 4])
            assert client.is_down
    assert no_pins(b)
    b.close()


@pytest.mark.parametrize("head_dim", [8, 2048], ids=["on-the-loop", "in-a-thread"])
async def test_a_peer_stalling_mid_transfer_fails_the_pull_after_the_timeout(
    tmp_path: Path, head_dim: int
) -> None:
    """A peer that sends half of a BLOCKS frame and then nothing (blocks small enough to
    be received on the event loop, or 2 MiB ones received by a worker thread)."""
    a = make_store(tmp_path, "a", num_blocks=8, head_dim=head_dim, num_kv_heads=8)
    b = make_store(tmp_path, "b", num_blocks=8, head_dim=head_dim, num_kv_heads=8)
    config = peer_config(pull_timeout_s=0.5)
    stalling = PeerService(a, config, peer_id="A")
    me = PeerService(b, config, peer_id="B").identity
    size = a.bytes_per_block
    stalled = anyio.Event()

    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    port = listener.getsockname()[1]

    async def stall(wire: Wire, header: Header) -> None:
        await wire.send(
            [blocks_head(header.request_id, size, 4), b"\0" * (2 * size)], time.monotonic() + 5
        )
        stalled.set()

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(answer_one_pull, listener, stalling.identity, config, stall)
            async with connect_peer("127.0.0.1", port, me, config) as client:
                with pytest.raises(PeerDownError, match="did not answer"):
                    await pull_into_cpu(client, b, [1, 2, 3, 4])
            assert stalled.is_set()
            tg.cancel_scope.cancel()
    listener.close()
    assert no_pins(b)
    a.close()
    b.close()


async def test_a_block_whose_checksum_differs_ends_the_run(tmp_path: Path) -> None:
    """A peer whose third block arrives with a checksum that does not match its bytes."""
    b = make_store(tmp_path, "b")
    config = peer_config()
    liar = PeerService(make_store(tmp_path, "liar"), config, peer_id="A")
    me = PeerService(b, config, peer_id="B").identity
    size = b.bytes_per_block
    blocks = [bytes([i + 1]) * size for i in range(4)]
    sums = [xxhash.xxh3_64_intdigest(block) for block in blocks]
    sums[2] ^= 1
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)

    async def lie(wire: Wire, header: Header) -> None:
        head = blocks_head(header.request_id, size, 4)
        await wire.send([head, *blocks, pack_checksums(sums)], time.monotonic() + 5)

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(answer_one_pull, listener, liar.identity, config, lie)
            async with connect_peer("127.0.0.1", listener.getsockname()[1], me, config) as client:
                assert await pull_into_cpu(client, b, [1, 2, 3, 4]) == 2
                assert not client.is_down  # the stream stayed aligned: the next pull works
            tg.cancel_scope.cancel()
    listener.close()
    assert b.cpu is not None and b.cpu_storage is not None
    assert [b.cpu.lookup(k) is not None for k in (1, 2, 3, 4)] == [True, True, False, False]
    assert bytes(byte_view(b.cpu_storage.data[b.cpu.lookup(2)])) == blocks[1]
    assert no_pins(b)
    b.close()


async def test_a_client_that_stops_reading_leaves_no_pin_after_the_lease(tmp_path: Path) -> None:
    """Blocks far larger than the socket buffers: the owner's send blocks until the lease
    ends, then the connection is dropped and every pin released."""
    a = make_store(tmp_path, "a", num_blocks=48, head_dim=1024, num_kv_heads=8)  # 1 MiB blocks
    keys = list(range(1, 49))
    put_blocks(a, "cpu", keys)
    config = peer_config(lease_ttl_s=1.0)
    with anyio.fail_after(30):
        async with PeerService(a, config, peer_id="A") as service:
            sock = socket.create_connection(("127.0.0.1", service.port))
            wire = Wire(sock, config.max_frame_bytes)
            await client_handshake(wire, service.identity, config)
            frame = pack_pull_frame(service.identity.fingerprint, 1, keys)
            await wire.send([frame], time.monotonic() + 5)
            await until(lambda: service.stats().num_active_leases == 1)
            assert a.export_pins["cpu"]  # pinned while the transfer is stuck
            await until(lambda: service.stats().num_connections == 0)
            assert service.stats().num_active_leases == 0
            assert no_pins(a)
            wire.close()
    a.close()


def test_slot_views_cover_one_block_each(tmp_path: Path) -> None:
    a = make_store(tmp_path, "a")
    assert a.cpu_storage is not None
    views = slot_views(byte_view(a.cpu_storage.data), [3, 0], a.bytes_per_block)
    assert [len(v) for v in views] == [a.bytes_per_block] * 2
    views[0][:8] = b"\x01" * 8
    assert a.cpu_storage.data[3].flatten()[0].item() != 0
    a.close()


async def test_pulls_past_the_in_flight_limit_are_answered_busy(tmp_path: Path) -> None:
    """With one pull in flight allowed, a second pipelined behind a large first one is
    refused with ERROR busy, after the first's blocks; the connection stays up."""
    a = make_store(tmp_path, "a", num_blocks=24, head_dim=1024, num_kv_heads=8)  # 1 MiB blocks
    keys = list(range(1, 25))
    put_blocks(a, "cpu", keys)
    config = peer_config(max_inflight_pulls=1)
    with anyio.fail_after(30):
        async with PeerService(a, config, peer_id="A") as service:
            sock = socket.create_connection(("127.0.0.1", service.port))
            wire = Wire(sock, config.max_frame_bytes)
            await client_handshake(wire, service.identity, config)
            for request_id, run in ((1, keys), (2, keys[:1])):
                frame = pack_pull_frame(service.identity.fingerprint, request_id, run)
                await wire.send([frame], time.monotonic() + 5)
            replies = []
            for _ in range(2):
                header = await wire.read_header()
                payload = await wire.read_exact(header.payload_length)
                replies.append((header.kind, header.request_id, payload))
            assert [(kind, rid) for kind, rid, _ in replies] == [
                (FrameKind.BLOCKS, 1),
                (FrameKind.ERROR, 2),
            ]
            code, message = unpack_error(replies[1][2])
            assert code == ErrorCode.BUSY and "more than 1 pulls in flight" in message
            assert service.stats().num_connections == 1
            wire.close()
    assert no_pins(a)
    a.close()
