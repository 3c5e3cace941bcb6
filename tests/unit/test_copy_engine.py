"""The tensor copy engine with real tensors and a real slab file: copies on the caller's
thread and in workers, disk reads split into parts, and what a failed part means."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from kvflow.config import KVFlowConfig
from kvflow.kv.storage import DiskStorage, TensorStorage, byte_view
from kvflow.kv.tensor_copy import TensorCopyEngine
from kvflow.kv.transfer import Direction, Transfer

LAYOUT = {"num_layers": 2, "num_kv_heads": 2, "head_dim": 4, "dtype": "float32"}
NUM_BLOCKS = 8


class Tiers:
    def __init__(self, tmp_path: Path) -> None:
        kv = KVFlowConfig.from_dict(
            {
                "kv": {
                    "block_size": 4,
                    "layout": LAYOUT,
                    "device": {"num_blocks": NUM_BLOCKS},
                    "cpu": {"num_blocks": NUM_BLOCKS},
                    "disk": {"num_blocks": NUM_BLOCKS, "path": str(tmp_path / "kv.slab")},
                }
            }
        ).kv
        self.bytes_per_block = kv.bytes_per_block()
        self.device = TensorStorage.allocate(kv, NUM_BLOCKS, "cpu")
        self.cpu = TensorStorage.allocate(kv, NUM_BLOCKS, "cpu")
        self.disk = DiskStorage.create(kv, NUM_BLOCKS)
        self.cpu.data.copy_(
            torch.randn(self.cpu.data.shape, generator=torch.Generator().manual_seed(0))
        )

    def engine(self, **options: int) -> TensorCopyEngine:
        # Tiny blocks: every block may be a part of its own.
        return TensorCopyEngine(self.device, self.cpu, self.disk, min_part_bytes=1, **options)


@pytest.fixture
def tiers(tmp_path: Path) -> Iterator[Tiers]:
    t = Tiers(tmp_path)
    yield t
    t.disk.close()


def run(
    engine: TensorCopyEngine, direction: Direction, src: list[int], dst: list[int]
) -> list[bool]:
    """Submit one transfer, wait for it, and return its per-block success."""
    num_bytes = len(src) * engine.device.data[0].nbytes
    transfer = Transfer(direction, src, dst, list(range(len(src))), num_bytes)
    engine.submit(transfer, 0.0)
    engine.settle(timeout_s=30)
    ((done, ok),) = engine.completed(0.0)
    assert done is transfer and engine.num_pending == 0
    return ok


@pytest.mark.parametrize("inline_bytes", [2**20, 0], ids=["caller", "worker"])
def test_host_copies_move_exact_bytes_on_the_callers_thread_and_in_workers(
    tiers: Tiers, inline_bytes: int
) -> None:
    engine = tiers.engine(inline_bytes=inline_bytes)
    src, dst = [1, 2, 3, 6, 0], [4, 5, 6, 0, 7]  # two runs and two single blocks
    assert run(engine, "cpu_to_device", src, dst) == [True] * 5
    for s, d in zip(src, dst, strict=True):
        assert torch.equal(tiers.device.data[d], tiers.cpu.data[s])
    engine.close()


@pytest.mark.parametrize("inline_bytes", [2**20, 0], ids=["caller", "worker"])
def test_a_disk_read_in_parts_keeps_block_order_and_misses_only_the_corrupt_block(
    tiers: Tiers, inline_bytes: int
) -> None:
    engine = tiers.engine(max_workers=3, inline_bytes=inline_bytes)
    disk_slots = [7, 6, 5, 4, 3, 2]
    assert run(engine, "cpu_to_disk", [0, 1, 2, 3, 4, 5], disk_slots) == [True] * 6
    with open(tiers.disk.path, "r+b") as f:  # flip a byte of the block in disk slot 3
        f.seek(tiers.disk.block_offset(3) + 5)
        byte = f.read(1)
        f.seek(tiers.disk.block_offset(3) + 5)
        f.write(bytes([byte[0] ^ 0xFF]))

    device_slots = [2, 0, 1, 7, 6, 5]
    ok = run(engine, "disk_to_device", disk_slots, device_slots)
    assert ok == [True, True, True, True, False, True]
    assert tiers.disk.num_errors == 1
    for cpu_slot, (d, good) in enumerate(zip(device_slots, ok, strict=True)):
        if good:
            assert torch.equal(tiers.device.data[d], tiers.cpu.data[cpu_slot])
    engine.close()


def test_disk_reads_are_exact_whether_or_not_the_page_cache_holds_the_blocks(
    tiers: Tiers,
) -> None:
    engine = tiers.engine()
    assert run(engine, "cpu_to_disk", [0, 1, 2, 3], [0, 1, 2, 3]) == [True] * 4
    fd = os.open(tiers.disk.path, os.O_RDONLY)
    os.fsync(fd)  # clean pages can be dropped (where the file system drops any)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    # Small enough to start on the caller's thread, which reads only cached blocks.
    assert run(engine, "disk_to_device", [0, 1, 2, 3], [4, 5, 6, 7]) == [True] * 4
    assert torch.equal(tiers.device.data[4:], tiers.cpu.data[:4])
    assert tiers.disk.num_errors == 0
    engine.close()


def test_a_part_that_raises_fails_its_blocks_and_never_hangs_the_transfer(
    tiers: Tiers, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = tiers.engine(max_workers=2, inline_bytes=0)
    assert run(engine, "cpu_to_disk", [0, 1, 2, 3], [0, 1, 2, 3]) == [True] * 4

    def broken(*args: object, **kwargs: object) -> list[bool]:
        raise OSError("the disk went away")

    monkeypatch.setattr(tiers.disk, "read_into", broken)
    assert run(engine, "disk_to_device", [0, 1, 2, 3], [0, 1, 2, 3]) == [False] * 4
    engine.close()


@pytest.mark.parametrize(
    ("max_workers", "inline_bytes"), [(1, 0), (2, 0), (2, 2**20)], ids=["one", "two", "caller"]
)
def test_a_disk_write_checksummed_beside_it_reads_back_exactly(
    tiers: Tiers, max_workers: int, inline_bytes: int
) -> None:
    engine = tiers.engine(max_workers=max_workers, inline_bytes=inline_bytes)
    # Two runs of consecutive disk slots (two pwritev calls), from scattered cpu blocks.
    assert run(engine, "cpu_to_disk", [3, 0, 5, 1], [4, 5, 6, 1]) == [True] * 4
    assert run(engine, "disk_to_device", [4, 5, 6, 1], [0, 1, 2, 3]) == [True] * 4
    for d, cpu_slot in enumerate([3, 0, 5, 1]):
        assert torch.equal(tiers.device.data[d], tiers.cpu.data[cpu_slot])
    assert tiers.disk.num_errors == 0
    engine.close()


def test_a_disk_write_whose_checksums_fail_lands_nothing_readable(
    tiers: Tiers, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kvflow.kv import storage

    engine = tiers.engine()

    def broken(*args: object) -> list[int]:
        raise MemoryError

    monkeypatch.setattr(storage, "block_digests", broken)
    assert run(engine, "cpu_to_disk", [0, 1], [0, 1]) == [False, False]
    monkeypatch.undo()
    assert run(engine, "disk_to_device", [0, 1], [0, 1]) == [False, False]
    engine.close()


@pytest.mark.parametrize("nowait", ["unsupported", "absent"])
def test_disk_reads_fall_back_to_blocking_reads_where_reads_cannot_be_nonblocking(
    tiers: Tiers, monkeypatch: pytest.MonkeyPatch, nowait: str
) -> None:
    # tmpfs (and overlayfs on older kernels) answers RWF_NOWAIT with EOPNOTSUPP; macOS
    # has no RWF_NOWAIT at all. Either way the caller's share goes to a worker.
    if nowait == "absent":
        monkeypatch.delattr(os, "RWF_NOWAIT", raising=False)
    else:
        preadv = os.preadv

        def preadv_without_nowait(
            fd: int, buffers: list[memoryview], offset: int, flags: int = 0
        ) -> int:
            if flags:
                raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
            return preadv(fd, buffers, offset, flags)

        monkeypatch.setattr(os, "preadv", preadv_without_nowait)
    engine = tiers.engine(max_workers=2)
    assert run(engine, "cpu_to_disk", [0, 1, 2, 3], [0, 1, 2, 3]) == [True] * 4
    assert run(engine, "disk_to_device", [0, 1, 2, 3], [4, 5, 6, 7]) == [True] * 4
    assert torch.equal(tiers.device.data[4:], tiers.cpu.data[:4])
    assert tiers.disk.num_errors == 0
    engine.close()


def test_a_short_disk_write_is_carried_on_where_it_stopped(
    tiers: Tiers, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Linux writes at most 2 GiB - 4 KiB in one call: a run of 1024 blocks of 2 MiB
    # comes back short. Here every call writes at most one and a half blocks.
    pwritev = os.pwritev
    max_bytes = tiers.bytes_per_block * 3 // 2

    def short_pwritev(fd: int, buffers: list[memoryview], offset: int) -> int:
        capped, left = [], max_bytes
        for buf in buffers:
            capped.append(buf[:left])
            left -= len(capped[-1])
            if not left:
                break
        return pwritev(fd, capped, offset)

    monkeypatch.setattr(os, "pwritev", short_pwritev)
    engine = tiers.engine()
    assert run(engine, "cpu_to_disk", [0, 1, 2, 3], [2, 3, 4, 5]) == [True] * 4
    assert run(engine, "disk_to_device", [2, 3, 4, 5], [0, 1, 2, 3]) == [True] * 4
    assert torch.equal(tiers.device.data[:4], tiers.cpu.data[:4])
    assert tiers.disk.num_errors == 0
    engine.close()


def test_blocks_written_before_the_disk_fills_are_synced_and_readable(
    tiers: Tiers, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = DiskStorage(tiers.disk.path.with_name("synced.slab"), tiers.disk.layout, fsync=True)
    pwritev, fsync = os.pwritev, os.fsync
    synced: list[list[int | None]] = []

    def pwritev_until_slot_4(fd: int, buffers: list[memoryview], offset: int) -> int:
        if offset >= disk.block_offset(4):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return pwritev(fd, buffers, offset)

    def recorded_fsync(fd: int) -> None:
        fsync(fd)
        synced.append(list(disk.checksums))

    monkeypatch.setattr(os, "pwritev", pwritev_until_slot_4)
    monkeypatch.setattr(os, "fsync", recorded_fsync)
    cpu_bytes = byte_view(tiers.cpu.data)
    with pytest.warns(RuntimeWarning, match="disk full"):
        ok = disk.write_from(cpu_bytes, [0, 1, 2], [0, 1, 4])  # two runs, the second fails
    assert ok == [True, True, False]
    assert synced == [[None] * NUM_BLOCKS]  # synced once, before any block was readable
    assert disk.read_into([0, 1], byte_view(tiers.device.data), [0, 1]) == [True, True]
    assert torch.equal(tiers.device.data[:2], tiers.cpu.data[:2])
    disk.close()
