"""The tiered store with real tensors and a real slab file."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from kvflow import policies
from kvflow.config import KVConfig, KVFlowConfig
from kvflow.kv.slab import SlabLayout
from kvflow.kv.storage import byte_view
from kvflow.kv.store import KVStore
from kvflow.request import Request, RequestStatus
from kvflow.scheduler.core import Scheduler
from kvflow.scheduler.plan import StepResult

LAYOUT = {"num_layers": 2, "num_kv_heads": 2, "head_dim": 4, "dtype": "float32"}
SLAB_64 = SlabLayout((1, 2, 1, 2, 4), "float32", num_blocks=4)
"""Four blocks of 64 bytes."""


def tiny_kv(tmp_path: Path, **sections: object) -> KVConfig:
    base: dict[str, object] = {
        "block_size": 4,
        "device": {"num_blocks": 4},
        "cpu": {"num_blocks": 4},
        "disk": {"num_blocks": 8, "path": str(tmp_path / "kv.slab")},
        "layout": LAYOUT,
    }
    base.update(sections)
    return KVFlowConfig.from_dict({"kv": base}).kv


@pytest.fixture
def store(tmp_path: Path) -> Iterator[KVStore]:
    s = KVStore.with_tensors(tiny_kv(tmp_path))
    yield s
    s.close()


def _write_device_block(store: KVStore, key: int, seed: int) -> tuple[int, torch.Tensor]:
    assert store.device_storage is not None
    (block,) = store.device.allocate(1)
    data = torch.randn(
        store.device_storage.data.shape[1:], generator=torch.Generator().manual_seed(seed)
    )
    store.device_storage.data[block].copy_(data)
    assert store.device.seal(block, key)
    return block, data


def test_a_block_goes_down_to_cpu_and_disk_and_back_byte_for_byte(store: KVStore) -> None:
    assert store.cpu_storage is not None and store.disk_storage is not None
    assert store.cpu is not None and store.disk is not None
    block, data = _write_device_block(store, key=111, seed=1)

    # Going cold demotes it to cpu (write_back), and landing in cpu writes it to disk.
    store.release_device([block], now=0.0, keep=True)
    store.drain(now=0.0)
    store.check_integrity([0] * store.device.num_blocks)
    cpu_slot = store.cpu.lookup(111)
    disk_slot = store.disk.lookup(111)
    assert cpu_slot is not None and disk_slot is not None
    assert torch.equal(store.cpu_storage.data[cpu_slot], data)
    with open(store.disk_storage.path, "rb") as f:
        f.seek(store.disk_storage.block_offset(disk_slot))
        on_disk = f.read(store.bytes_per_block)
    assert on_disk == data.numpy().tobytes()

    # Forget it on device and in cpu: only disk has it now.
    store.device.reset_prefix_cache()
    store.cpu.reset_prefix_cache()
    loc = store.locate([111, 222])
    assert (loc.device_tokens, loc.cpu_tokens, loc.disk_tokens) == (0, 0, 4)

    # Promote from disk into a fresh device block.
    sources = store.find_below([111], 0, 1)
    assert sources == [("disk", disk_slot)]
    (target,) = store.device.allocate(1)
    assert store.device_storage is not None
    store.device_storage.data[target].zero_()
    store.start_load(sources, [111], [target], now=1.0)
    assert store.device.lookup(111) is None  # not readable before its copy ends
    store.drain(now=1.0)
    assert store.device.lookup(111) == target
    assert torch.equal(store.device_storage.data[target], data)
    assert store.stats.num_tier_errors == 0
    store.release_device([target], now=1.0, keep=False)

    # Corrupt the disk copy: the next read is a miss and a counted error, never data.
    store.device.reset_prefix_cache()
    with open(store.disk_storage.path, "r+b") as f:
        f.seek(store.disk_storage.block_offset(disk_slot) + 17)
        byte = f.read(1)
        f.seek(store.disk_storage.block_offset(disk_slot) + 17)
        f.write(bytes([byte[0] ^ 0xFF]))
    (target2,) = store.device.allocate(1)
    store.start_load(store.find_below([111], 0, 1), [111], [target2], now=2.0)
    store.drain(now=2.0)
    assert store.stats.num_tier_errors == 1
    assert store.device.lookup(111) is None
    assert store.disk.lookup(111) is None  # forgotten: a later locate is a plain miss
    assert store.locate([111]).total_tokens == 0
    store.release_device([target2], now=2.0, keep=False)
    store.check_integrity([0] * store.device.num_blocks)


def test_a_short_or_failed_disk_read_is_a_miss(store: KVStore) -> None:
    assert store.disk_storage is not None
    block, _ = _write_device_block(store, key=5, seed=2)
    store.release_device([block], now=0.0, keep=True)
    store.drain(now=0.0)
    assert store.disk is not None
    slot = store.disk.lookup(5)
    assert slot is not None
    # Truncate the slab: the read comes back short.
    import os

    os.truncate(store.disk_storage.path, store.disk_storage.block_offset(slot) + 8)
    buf = torch.empty(store.disk_storage.bytes_per_block // 4, dtype=torch.float32)
    assert store.disk_storage.read_into([slot], byte_view(buf), [0]) == [False]
    assert store.disk_storage.num_errors == 1


def test_full_disk_disables_the_tier_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno
    import os

    from kvflow.kv.storage import DiskStorage

    disk = DiskStorage(tmp_path / "kv.slab", SLAB_64)

    # Every write fails as on a full file system (what /dev/full did before kvflow
    # refused device nodes as slabs: test_disk_slab.py).
    def full(fd: int, buffers: list[memoryview], offset: int) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwritev", full)
    with pytest.warns(RuntimeWarning, match="disabled"):
        block = torch.zeros(16, dtype=torch.float32)
        ok = disk.write_from(byte_view(block), [0], [0])
    assert ok == [False]
    assert not disk.enabled
    disk.close()


def test_a_slab_without_posix_fallocate_is_sized_and_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    from kvflow.kv.storage import DiskStorage

    monkeypatch.delattr(os, "posix_fallocate")  # as on macOS
    disk = DiskStorage(tmp_path / "kv.slab", SLAB_64)
    assert disk.enabled and os.path.getsize(disk.path) == disk.data_offset + 4 * 64
    block = torch.arange(16, dtype=torch.float32)
    assert disk.write_from(byte_view(block), [0], [2]) == [True]
    back = torch.zeros(16, dtype=torch.float32)
    assert disk.read_into([2], byte_view(back), [0]) == [True]
    assert torch.equal(back, block)
    disk.close()


def test_locate_reports_a_prefix_spanning_tiers(tmp_path: Path) -> None:
    store = KVStore(tiny_kv(tmp_path, device={"num_blocks": 8}, cpu={"num_blocks": 8}))
    assert store.cpu is not None and store.disk is not None
    keys = [10, 11, 12, 13, 14]
    dev = store.device.allocate(2)
    for b, k in zip(dev, keys[:2], strict=True):
        store.device.seal(b, k)
    cpu = store.cpu.allocate(2)
    for b, k in zip(cpu, keys[2:4], strict=True):
        store.cpu.seal(b, k)
    store.cpu.release(cpu)
    (disk,) = store.disk.allocate(1)
    store.disk.seal(disk, keys[4])
    store.disk.release([disk])
    loc = store.locate(keys)
    assert (loc.device_tokens, loc.cpu_tokens, loc.disk_tokens) == (8, 8, 4)
    assert store.locate([99, *keys]).total_tokens == 0


def test_sizes_in_mib_become_blocks() -> None:
    kv = KVFlowConfig.load(overrides={"kv.cpu.size_mib": 64, "kv.disk.size_mib": 128}).kv
    assert kv.bytes_per_block() == 16 * 2 * 32 * 8 * 128 * 2
    assert kv.tier_blocks("cpu") == 32 and kv.tier_blocks("disk") == 64


def test_a_load_that_fails_is_not_counted_as_a_hit(tmp_path: Path) -> None:
    config = KVFlowConfig.from_dict(
        {
            "kv": {
                "block_size": 4,
                "device": {"num_blocks": 8},
                "cpu": {"num_blocks": 8},
                "disk": {"num_blocks": 8, "path": str(tmp_path / "kv.slab")},
                "layout": LAYOUT,
                "load_policy": "always",
            }
        }
    )
    store = KVStore.with_tensors(config.kv)
    scheduler = Scheduler(config, policies.create("fcfs"), store)
    prompt = list(range(1, 10))  # two full blocks a later request can hit
    try:
        first = scheduler.add(Request("a", prompt, max_new_tokens=1))
        plan = scheduler.plan(0.0)
        scheduler.commit(plan, StepResult([7]), 0.1)
        assert first.status is RequestStatus.FINISHED
        store.drain(0.1)  # demoted to cpu, then written to disk
        store.device.reset_prefix_cache()
        store.cpu.reset_prefix_cache()  # type: ignore[union-attr]
        assert store.disk_storage is not None and store.disk is not None
        bad_slot = store.disk.lookup(first.block_keys[1])
        assert bad_slot is not None
        with open(store.disk_storage.path, "r+b") as f:
            f.seek(store.disk_storage.block_offset(bad_slot))
            f.write(b"\xff" * 8)

        second = scheduler.add(Request("b", prompt, max_new_tokens=1), 1.0)
        assert scheduler.plan(1.0).is_empty
        assert second.status is RequestStatus.WAITING_FOR_KV
        while second.status is RequestStatus.WAITING_FOR_KV:
            store.wait(1.0)
            plan = scheduler.plan(1.0)
        # The first block came from disk; the corrupt second one is recomputed.
        assert store.stats.num_tier_errors == 1
        assert plan.start_positions == [4] and plan.num_tokens == [5]
        stats = scheduler.stats
        assert stats.hit_tokens_by_tier == {"device": 0, "cpu": 0, "disk": 4, "peer": 0}
        assert stats.prefix_hit_tokens == 4
        assert second.num_cached_tokens == 4
        scheduler.commit(plan, StepResult([7]), 1.1)
        store.drain(1.1)
        scheduler.check_integrity()
    finally:
        store.close()
