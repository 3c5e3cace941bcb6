"""A persistent disk tier across real process restarts: a writer SIGKILLed mid-stream
leaves a slab from which the next process recovers only whole, correct blocks, and a
restarted instance's surviving blocks reach its peers' directories and pull byte for
byte."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
import torch

from kvflow.peer.client import connect_peer, pull_into_cpu
from kvflow.peer.directory import Directory, RunHint
from kvflow.peer.service import PeerService
from tests.disk_builders import block_data, compute_blocks, load_from_disk, open_store
from tests.peer_builders import cpu_block, make_store, peer_config, until

ROOT = Path(__file__).resolve().parents[2]


def test_a_writer_that_exits_leaves_its_last_blocks_for_the_next_process(
    tmp_path: Path,
) -> None:
    path = tmp_path / "kv.slab"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-m", "tests.disk_writer_process", str(path), "11"]
    done = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.split() == [str(key) for key in range(1, 12)]
    store = open_store(path)
    try:
        assert store.disk is not None
        assert sorted(store.disk._cached) == list(range(4, 12))  # the last 8 written
        assert store.stats.num_disk_blocks_dropped == 0
        for key in range(4, 12):
            back = load_from_disk(store, key)
            assert back is not None and torch.equal(back, block_data(store, key))
    finally:
        store.close()


@pytest.mark.parametrize("num_before_kill", [3, 13])
def test_a_writer_killed_mid_stream_leaves_only_whole_blocks(
    tmp_path: Path, num_before_kill: int
) -> None:
    path = tmp_path / "kv.slab"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-m", "tests.disk_writer_process", str(path), "100000"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    done: list[int] = []
    try:
        assert proc.stdout is not None
        for _ in range(num_before_kill):  # bounded: the writer prints one line a block
            line = proc.stdout.readline()
            assert line, f"the writer exited with {proc.wait(10)} after {done}"
            done.append(int(line))
        proc.send_signal(signal.SIGKILL)  # mid-write of a later block, most likely
    finally:
        proc.kill()
        assert proc.wait(30) == -signal.SIGKILL

    store = open_store(path)
    try:
        assert store.disk is not None
        recovered = sorted(store.disk._cached)
        # The writer went on past the last key read here (its lines wait in the pipe)
        # and writes keys in order into 8 disk blocks, evicting the oldest: what is
        # left is the last run it wrote, at least 7 blocks long (the block being
        # written when killed may have taken the slot of the oldest of the last 8).
        assert recovered, "nothing recovered"
        last = recovered[-1]
        assert last >= done[-1]
        assert recovered == list(range(last - len(recovered) + 1, last + 1))
        assert min(7, done[-1]) <= len(recovered) <= 8
        assert store.stats.num_disk_blocks_dropped <= 1
        assert store.stats.num_disk_blocks_recovered == len(recovered)
        for key in recovered:
            back = load_from_disk(store, key)
            assert back is not None, f"recovered block {key} failed its read"
            assert torch.equal(back, block_data(store, key)), f"block {key} differs"
        assert store.stats.num_tier_errors == 0
    finally:
        store.close()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_a_restarted_instance_announces_its_surviving_blocks_to_peers(
    tmp_path: Path,
) -> None:
    path = tmp_path / "a.slab"
    first = open_store(path)
    written = compute_blocks(first, [1, 2, 3])
    first.close()  # instance A stops; its slab stays

    a = open_store(path)  # A restarted: its disk tier starts with 1, 2, 3
    b = make_store(tmp_path, "b", num_layers=2, num_kv_heads=2, head_dim=4)
    directory = Directory(heartbeat_timeout_s=5)
    try:
        with anyio.fail_after(30):
            async with PeerService(a, peer_config(), peer_id="A") as service:
                me = PeerService(b, peer_config(), peer_id="B").identity
                async with connect_peer("127.0.0.1", service.port, me, service.config) as client:
                    client.follow(directory)
                    await client.subscribe()
                    await until(lambda: len(directory.held("A")) == 3)
                    assert directory.held("A") == {1: {"disk"}, 2: {"disk"}, 3: {"disk"}}
                    assert directory.longest_run([1, 2, 3, 4]) == RunHint("A", 3, "disk")
                    assert await pull_into_cpu(client, b, [1, 2, 3]) == 3
        for key, data in written.items():
            assert torch.equal(cpu_block(b, key), data)
    finally:
        a.close()
        b.close()
