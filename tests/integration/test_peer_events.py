"""Block events over real sockets: B's directory follows what A's store holds (stored,
moved, dropped), a restarted A is resynced under its new incarnation, and a silent A is
marked down."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import anyio
import pytest

from kvflow.peer.client import connect_peer, pull_into_cpu
from kvflow.peer.directory import Directory, RunHint
from kvflow.peer.service import PeerService
from tests.peer_builders import make_store, peer_config, put_blocks, until
from tests.serve_process import free_port

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_the_directory_follows_stores_moves_and_drops(tmp_path: Path) -> None:
    a, b = make_store(tmp_path, "a"), make_store(tmp_path, "b")
    put_blocks(a, "disk", [1, 2])
    directory = Directory(heartbeat_timeout_s=5)
    with anyio.fail_after(30):
        async with PeerService(a, peer_config(), peer_id="A") as service:
            me = PeerService(b, peer_config(), peer_id="B").identity
            async with connect_peer("127.0.0.1", service.port, me, service.config) as client:
                client.follow(directory)
                await client.subscribe()
                await until(lambda: directory.held("A") == {1: {"disk"}, 2: {"disk"}})
                put_blocks(a, "cpu", [2, 3])  # 2 now in cpu too: a move up
                await until(
                    lambda: directory.held("A") == {1: {"disk"}, 2: {"cpu", "disk"}, 3: {"cpu"}}
                )
                assert directory.longest_run([1, 2, 3, 4]) == RunHint("A", 3, "disk")
                assert a.disk is not None
                a.disk.reset_prefix_cache()  # the disk copies are dropped
                await until(lambda: directory.held("A") == {2: {"cpu"}, 3: {"cpu"}})
                hint = directory.longest_run([2, 3])
                assert hint == RunHint("A", 2, "cpu")
                assert await pull_into_cpu(client, b, [2, 3][: hint.num_blocks]) == 2
    assert directory.num_gaps == 0
    a.close()
    b.close()


async def test_a_restarted_peer_is_resynced_and_a_silent_one_marked_down(
    tmp_path: Path,
) -> None:
    a, b = make_store(tmp_path, "a"), make_store(tmp_path, "b")
    put_blocks(a, "cpu", [1, 2, 3])
    directory = Directory(heartbeat_timeout_s=0.5)
    me = PeerService(b, peer_config(), peer_id="B").identity
    with anyio.fail_after(30):
        async with (
            PeerService(a, peer_config(), peer_id="A") as first,
            connect_peer("127.0.0.1", first.port, me, first.config) as client,
        ):
            client.follow(directory)
            await client.subscribe()
            await until(lambda: len(directory.held("A")) == 3)
            old = directory._peers["A"].incarnation
        assert a.cpu is not None
        a.cpu.reset_prefix_cache()
        put_blocks(a, "cpu", [7])  # what the restarted instance holds
        async with PeerService(a, peer_config(), peer_id="A") as second:
            assert second.identity.incarnation != old
            async with connect_peer("127.0.0.1", second.port, me, second.config) as client:
                client.follow(directory)
                await client.subscribe()
                await until(lambda: directory.held("A") == {7: {"cpu"}})
                assert directory.num_restarts == 1
        await anyio.sleep(0.6)  # no heartbeat from A any more
        assert directory.expire(time.monotonic()) == ["A"]
        assert directory.longest_run([7]) is None
    a.close()
    b.close()


async def test_a_listed_peer_never_reachable_is_logged_once_and_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A typo in --peers (a host that does not resolve, a port nothing listens on) was
    # retried in silence: nothing told the user their instance shared with nobody.
    from kvflow.peer.node import PeerAddress, PeerNode

    store = make_store(tmp_path, "a")
    nowhere = [PeerAddress("no-such-host.invalid", 9100), PeerAddress("127.0.0.1", free_port())]
    caplog.set_level(logging.INFO, logger="kvflow.peer")
    with anyio.fail_after(30):
        async with PeerNode(store, peer_config(), nowhere, peer_id="A"):
            # Each address tried and logged (a name lookup may be slow on a busy
            # machine), then 1 s more: with a backoff from 0.1 s, several retries each.
            await until(
                lambda: all(any(str(a) in r.getMessage() for r in caplog.records) for a in nowhere)
            )
            await anyio.sleep(1.0)
    store.close()
    for address in nowhere:
        lines = [r.getMessage() for r in caplog.records if str(address) in r.getMessage()]
        assert len(lines) == 1 and "not reachable" in lines[0] and "retrying" in lines[0], lines
