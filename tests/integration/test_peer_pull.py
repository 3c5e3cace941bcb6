"""Pulls between two stores with real tensors over real sockets on loopback: bytes arrive
identical, stale hints become shorter runs, refused peers exchange nothing."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch

from kvflow.kv.store import KVStore
from kvflow.peer.client import (
    PeerClient,
    PeerDownError,
    PeerRequestError,
    connect_peer,
    pull_into_cpu,
)
from kvflow.peer.handshake import PeerRefusedError
from kvflow.peer.identity import PeerConfigError
from kvflow.peer.service import PeerService
from tests.peer_builders import (
    cpu_block,
    make_store,
    no_pins,
    peer_config,
    put_blocks,
    until,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@asynccontextmanager
async def serving(store: KVStore, **settings: Any) -> AsyncIterator[PeerService]:
    async with PeerService(store, peer_config(**settings), peer_id="A") as service:
        yield service


@asynccontextmanager
async def client_of(
    service: PeerService, store: KVStore, **settings: Any
) -> AsyncIterator[PeerClient]:
    b = PeerService(store, peer_config(**settings), peer_id="B")
    async with connect_peer("127.0.0.1", service.port, b.identity, b.config) as client:
        yield client


async def test_b_pulls_blocks_from_every_tier_of_a_byte_identical(tmp_path: Path) -> None:
    a, b = make_store(tmp_path, "a"), make_store(tmp_path, "b")
    blocks = put_blocks(a, "device", [1, 2, 3], seed=1)
    blocks |= put_blocks(a, "cpu", [4, 5], seed=2)
    blocks |= put_blocks(a, "disk", [6, 7, 8], seed=3)
    keys = [1, 2, 3, 4, 5, 6, 7, 8]
    with anyio.fail_after(30):
        async with serving(a) as service, client_of(service, b) as client:
            assert client.peer.peer_id == "A"
            assert await pull_into_cpu(client, b, keys) == len(keys)
            await until(lambda: service.stats().num_blocks_served == len(keys))
    for key in keys:
        assert torch.equal(cpu_block(b, key), blocks[key]), key
    assert no_pins(a) and no_pins(b)
    a.close()
    b.close()


async def test_a_block_dropped_since_the_hint_ends_the_run(tmp_path: Path) -> None:
    a, b = make_store(tmp_path, "a"), make_store(tmp_path, "b")
    blocks = put_blocks(a, "cpu", [10, 11, 12, 13], seed=4)
    assert a.cpu is not None
    a.cpu.reset_prefix_cache()  # every block gone...
    blocks = put_blocks(a, "cpu", [10, 11], seed=5)  # ...and the first two back, new bytes
    with anyio.fail_after(30):
        async with serving(a) as service, client_of(service, b) as client:
            assert await pull_into_cpu(client, b, [10, 11, 12, 13]) == 2
    assert torch.equal(cpu_block(b, 10), blocks[10])
    assert torch.equal(cpu_block(b, 11), blocks[11])
    assert b.cpu is not None and b.cpu.lookup(12) is None and b.cpu.lookup(13) is None
    assert no_pins(a) and no_pins(b)
    a.close()
    b.close()


async def test_a_pull_of_blocks_all_gone_lands_nothing_and_the_connection_stays_up(
    tmp_path: Path,
) -> None:
    a, b = make_store(tmp_path, "a"), make_store(tmp_path, "b")
    blocks = put_blocks(a, "cpu", [20, 21], seed=7)
    with anyio.fail_after(30):
        async with serving(a) as service, client_of(service, b) as client:
            assert await pull_into_cpu(client, b, [30, 31]) == 0  # an empty BLOCKS reply
            assert not client.is_down
            assert await pull_into_cpu(client, b, [20, 21]) == 2
    assert torch.equal(cpu_block(b, 21), blocks[21])
    assert no_pins(a) and no_pins(b)
    a.close()
    b.close()


async def test_pipelined_pulls_on_one_connection(tmp_path: Path) -> None:
    a, b = make_store(tmp_path, "a"), make_store(tmp_path, "b")
    blocks = put_blocks(a, "cpu", list(range(100, 132)), seed=6)
    results: dict[int, int] = {}
    with anyio.fail_after(30):
        async with serving(a) as service, client_of(service, b) as client:

            async def pull(i: int) -> None:
                results[i] = await pull_into_cpu(client, b, list(range(100 + 4 * i, 104 + 4 * i)))

            async with anyio.create_task_group() as tg:
                for i in range(8):
                    tg.start_soon(pull, i)
    assert results == dict.fromkeys(range(8), 4)
    for key, block in blocks.items():
        assert torch.equal(cpu_block(b, key), block)
    a.close()
    b.close()


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_pulls_end_alike_off_asyncio(tmp_path: Path) -> None:
    """On asyncio a pull's task waits on a loop future; elsewhere (here trio, where
    both ends also read in a task, not a reader callback) on an anyio.Event shaped like
    it: pipelined pulls land, a pull of blocks all gone lands nothing, and a pull given
    up (cancelled) takes the connection down."""
    a, b = make_store(tmp_path, "a"), make_store(tmp_path, "b")
    blocks = put_blocks(a, "cpu", list(range(100, 108)), seed=8)
    results: dict[int, int] = {}
    with anyio.fail_after(30):
        async with serving(a) as service, client_of(service, b) as client:

            async def pull(i: int) -> None:
                results[i] = await pull_into_cpu(client, b, list(range(100 + 4 * i, 104 + 4 * i)))

            async with anyio.create_task_group() as tg:
                for i in range(2):
                    tg.start_soon(pull, i)
            assert await pull_into_cpu(client, b, [30, 31]) == 0
            assert not client.is_down
            with anyio.move_on_after(0):
                await pull_into_cpu(client, b, [100])
            assert client.is_down
    assert results == {0: 4, 1: 4}
    for key, block in blocks.items():
        assert torch.equal(cpu_block(b, key), block)
    a.close()
    b.close()


async def test_wrong_secret_is_refused(tmp_path: Path) -> None:
    a, b = make_store(tmp_path, "a"), make_store(tmp_path, "b")
    put_blocks(a, "cpu", [1])
    with anyio.fail_after(30):
        async with serving(a, secret="right") as service:
            with pytest.raises(PeerRefusedError, match="shared secret"):
                async with client_of(service, b, secret="wrong"):
                    pass
            with pytest.raises(PeerRefusedError, match="shared secret"):
                async with client_of(service, b):  # none at all
                    pass
            async with client_of(service, b, secret="right") as client:
                assert await pull_into_cpu(client, b, [1]) == 1
            assert service.stats().num_refused == 2
            await until(lambda: service.stats().num_blocks_served == 1)
    a.close()
    b.close()


async def test_another_models_fingerprint_is_refused(tmp_path: Path) -> None:
    a = make_store(tmp_path, "a")
    b = make_store(tmp_path, "b", dtype="float32")  # same model id, another KV dtype
    put_blocks(a, "cpu", [1])
    with anyio.fail_after(30):
        async with serving(a) as service:
            with pytest.raises(PeerRefusedError, match="fingerprint") as refused:
                async with client_of(service, b):
                    pass
            b_fingerprint = PeerService(b, peer_config()).identity.fingerprint.hex()
            assert service.identity.fingerprint.hex() in str(refused.value)
            assert b_fingerprint in str(refused.value)
            c = make_store(tmp_path, "c")
            with pytest.raises(PeerRefusedError, match="fingerprint"):
                async with client_of(service, c, model_id="other-weights"):
                    pass
            assert service.stats().num_blocks_served == 0
    a.close()
    b.close()
    c.close()


async def test_a_pull_for_another_fingerprint_is_refused_after_the_handshake(
    tmp_path: Path,
) -> None:
    a, b = make_store(tmp_path, "a"), make_store(tmp_path, "b")
    put_blocks(a, "cpu", [1])
    with anyio.fail_after(30):
        async with serving(a) as service, client_of(service, b) as client:
            client.peer = type(client.peer)(client.peer.peer_id, b"\0" * 16, b"\0" * 16)
            with pytest.raises((PeerRequestError, PeerDownError), match="fingerprint"):
                await pull_into_cpu(client, b, [1])
            assert service.stats().num_blocks_served == 0
    assert no_pins(a)
    a.close()
    b.close()


async def test_binding_beyond_loopback_needs_a_secret(tmp_path: Path) -> None:
    a = make_store(tmp_path, "a")
    with anyio.fail_after(30):
        with pytest.raises(PeerConfigError, match=r"peer.host='0.0.0.0'.*peer.secret"):
            async with PeerService(a, peer_config(host="0.0.0.0")):
                pass
        async with PeerService(a, peer_config(host="0.0.0.0", secret="s")) as service:
            assert service.port > 0
    a.close()


async def test_a_corrupt_disk_block_at_the_owner_ends_the_run(tmp_path: Path) -> None:
    a, b = make_store(tmp_path, "a"), make_store(tmp_path, "b")
    blocks = put_blocks(a, "disk", [1, 2, 3], seed=7)
    assert a.disk is not None and a.disk_storage is not None
    slot = a.disk.lookup(2)
    assert slot is not None
    os.pwrite(a.disk_storage.fd, b"\xff" * 8, a.disk_storage.block_offset(slot))  # bit rot on disk
    with anyio.fail_after(30):
        async with serving(a) as service, client_of(service, b) as client:
            assert await pull_into_cpu(client, b, [1, 2, 3]) == 1
    assert torch.equal(cpu_block(b, 1), blocks[1])
    assert b.cpu is not None and b.cpu.lookup(2) is None and b.cpu.lookup(3) is None
    assert a.disk_storage.num_errors == 1
    assert no_pins(a) and no_pins(b)
    a.close()
    b.close()
