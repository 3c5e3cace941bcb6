"""Random, truncated, oversized and wrong-version frames against a running peer service,
before and after authentication: each closes its own connection and nothing else, no
large buffer is allocated for a length the limits refuse, and a good client is served
correctly afterwards. The random run is marked slow (2,000 connections take ~30 s on a
busy machine) and checks the process's peak memory, which earlier tests in the same
process may already have raised, and that it leaves no socket open; the targeted run of
lengths past the limits checks traced allocations exactly."""

from __future__ import annotations

import os
import resource
import socket
import struct
import time
import tracemalloc
from pathlib import Path

import anyio
import pytest
import torch
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvflow.config import PeerConfig
from kvflow.peer.client import connect_peer, pull_into_cpu
from kvflow.peer.frames import (
    HEADER,
    HEADER_SIZE,
    MAGIC,
    PROTOCOL_VERSION,
    PULL_HEAD,
    FrameKind,
    pack_header,
    pack_pull_frame,
)
from kvflow.peer.handshake import client_handshake
from kvflow.peer.identity import PeerIdentity
from kvflow.peer.service import PeerService
from kvflow.peer.wire import PeerClosedError, Wire
from tests.peer_builders import cpu_block, make_store, no_pins, peer_config, put_blocks, until

MAX_FRAME = PeerConfig().max_frame_bytes
"""The default limit (256 MiB): a service that allocated what a header announces would
show it in the process's peak memory."""
KINDS = [int(k) for k in FrameKind]


def headers() -> st.SearchStrategy[bytes]:
    """Headers with every field drawn near and far from valid values."""
    return st.builds(
        HEADER.pack,
        st.sampled_from([MAGIC, b"KVFQ", b"\0\0\0\0"]),
        st.sampled_from([PROTOCOL_VERSION, 0, 2, 255]),
        st.sampled_from([*KINDS, 0, 10, 255]),
        st.sampled_from([0, 0, 0, 1, 0x8000]),
        st.integers(0, 2**32 - 1),
        st.one_of(
            st.integers(0, 64),
            st.sampled_from([2**20, 2**27, MAX_FRAME, MAX_FRAME + 1, 2**40, 2**64 - 1]),
            st.integers(0, 2**64 - 1),
        ),
    )


def frames() -> st.SearchStrategy[bytes]:
    """A header and then some bytes, possibly fewer or more than it announces."""
    return st.one_of(
        st.binary(max_size=256),
        st.builds(lambda h, p: h + p, headers(), st.binary(max_size=256)),
        st.builds(
            lambda kind, rid, p, cut: (pack_header(kind, rid, len(p)) + p)[:cut],
            st.sampled_from(KINDS),
            st.integers(0, 2**32 - 1),
            st.binary(max_size=256),
            st.integers(0, 300),
        ),
        st.builds(
            lambda keys, n, cut: _pull_frame(keys, n)[:cut],
            st.lists(st.integers(0, 2**64 - 1), max_size=16),
            st.integers(0, 2**32 - 1),
            st.integers(0, 400),
        ),
    )


def _pull_frame(keys: list[int], announced: int) -> bytes:
    frame = pack_pull_frame(b"\0" * 16, 1, keys)
    count_at = HEADER_SIZE + PULL_HEAD.size - 4  # the payload's number of keys
    count = struct.pack("!I", announced % (len(keys) + 2))  # often a wrong one
    return frame[:count_at] + count + frame[count_at + 4 :]


def send_unauthenticated(port: int, data: bytes) -> None:
    """Send `data` on a fresh connection, end it, and read until the service closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):
                pass
        except TimeoutError:  # the service hung on this input
            raise
        except OSError:  # it closed first (reset, broken pipe): what bad input gets
            pass


async def send_authenticated(port: int, me: PeerIdentity, config: PeerConfig, data: bytes) -> None:
    sock = socket.create_connection(("127.0.0.1", port))
    wire = Wire(sock, MAX_FRAME)
    try:
        with anyio.fail_after(10):
            await client_handshake(wire, me, config)
            try:
                await wire.send([data], time.monotonic() + 5)
                sock.shutdown(socket.SHUT_WR)
            except OSError:  # it closed first: what bad input gets
                return
            buf = memoryview(bytearray(65536))
            while True:  # until the service closes the connection
                try:
                    await wire.recv_into(buf[:1])
                except PeerClosedError:
                    break
    finally:
        wire.close()


async def good_pull(port: int, me: PeerIdentity, config: PeerConfig, store_b: object) -> int:
    with anyio.fail_after(10):
        async with connect_peer("127.0.0.1", port, me, config) as client:
            return await pull_into_cpu(client, store_b, [1, 2, 3])  # type: ignore[arg-type]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def no_connections(service: PeerService) -> None:
    """Wait until the service has closed every connection (the last client's too)."""
    with anyio.fail_after(10):
        await until(lambda: service.stats().num_connections == 0)


FUZZ = settings(
    max_examples=1000,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)


@pytest.mark.slow
def test_fuzzed_frames_close_only_their_connection(tmp_path: Path) -> None:
    a, b = make_store(tmp_path, "a"), make_store(tmp_path, "b")
    blocks = put_blocks(a, "cpu", [1, 2, 3])
    config = peer_config(max_frame_bytes=MAX_FRAME)
    me = PeerService(b, config, peer_id="B").identity
    portal: BlockingPortal
    with (
        start_blocking_portal() as portal,
        portal.wrap_async_context_manager(PeerService(a, config, peer_id="A")) as service,
    ):
        assert portal.call(good_pull, service.port, me, config, b) == 3
        portal.call(no_connections, service)
        fds_before = open_fds()
        peak_rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        num_cases = 0

        @FUZZ
        @given(data=frames())
        def before_auth(data: bytes) -> None:
            nonlocal num_cases
            num_cases += 1
            send_unauthenticated(service.port, data)

        @FUZZ
        @given(data=frames())
        def after_auth(data: bytes) -> None:
            nonlocal num_cases
            num_cases += 1
            portal.call(send_authenticated, service.port, me, config, data)

        before_auth()
        after_auth()
        assert num_cases >= 2000
        growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - peak_rss_before
        assert growth < 64 * 2**20, f"peak memory grew by {growth} B over {num_cases} cases"
        assert b.cpu is not None
        b.cpu.reset_prefix_cache()
        assert portal.call(good_pull, service.port, me, config, b) == 3
        portal.call(no_connections, service)
        assert open_fds() == fds_before  # every fuzzed connection's socket was closed
        stats = service.stats()
        assert stats.num_active_leases == 0
        assert stats.num_refused + stats.num_closed_for_errors >= num_cases // 2
    for key, block in blocks.items():
        assert torch.equal(cpu_block(b, key), block)
    assert no_pins(a)
    a.close()
    b.close()


def test_announced_lengths_past_the_limits_allocate_nothing(tmp_path: Path) -> None:
    """Every kind with a length past its limit (or just under the frame limit for a kind
    that may not be that large), before and after authentication: the service's peak of
    traced allocations stays far below what any of those lengths would take."""
    a, b = make_store(tmp_path, "a"), make_store(tmp_path, "b")
    config = peer_config()
    me = PeerService(b, config, peer_id="B").identity
    lengths = [2**27, MAX_FRAME, MAX_FRAME + 1, 2**40]
    with (
        start_blocking_portal() as portal,
        portal.wrap_async_context_manager(PeerService(a, config, peer_id="A")) as service,
    ):
        tracemalloc.start()
        try:
            for kind in FrameKind:
                for length in lengths:
                    frame = pack_header(kind, 1, length) + b"\0" * 64
                    send_unauthenticated(service.port, frame)
                    portal.call(send_authenticated, service.port, me, config, frame)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 16 * 2**20, f"peak of {peak} bytes traced"
        assert service.stats().num_active_leases == 0
    a.close()
    b.close()
