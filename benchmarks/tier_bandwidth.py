"""Throughput of the tiered store's copies beside raw baselines measured the same way.

For 1-64 MiB batches of blocks, times the store's copy engine (the code the store runs
for every demotion, promotion and disk write, with the worker threads
`KVStore.with_tensors` gives it) in each direction, and the raw operation on the same
bytes: a torch tensor copy for device<->cpu; for the disk, a sequential write + fsync
and a sequential read of the same bytes at the same offsets of the store's own slab
file (into the same destination). Store and raw runs alternate, and each keeps its
best time. Prints one JSON line per direction and batch size, with the ratio to the
baseline.

Disk reads are measured twice. `"source": "storage"`: the file's pages are dropped
from the page cache (`posix_fadvise(DONTNEED)`, untimed) before every read, store and
raw alike, so both read from the storage device, which is what the disk tier is for.
`"source": "page_cache"`: both read pages cached by the write. That read is a memory
copy, and the xxh3 checksum the store verifies on every block takes half as long
again on one core, so a batch read on one thread (1 MiB: too small to pay for waking
a worker) reaches about two thirds of it; larger batches are read and checked by two
threads at once.

Raw and store use the one slab file because a file's page-cache history changes its
own write speed: once its pages have been dropped and read back, a 4 MiB write + fsync
to it took 2.6 ms instead of 1.1 ms on the machine the README figures come from.

    python benchmarks/tier_bandwidth.py [--repeat 5] [--dir DIR]

On a machine without CUDA the device tier is a CPU tensor, so device<->cpu is a
memory copy; with CUDA it crosses PCIe (pinned host memory).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch

from kvflow.config import KVFlowConfig
from kvflow.kv.bandwidth import MIB, best_of_pair, drop_cached_pages, store_copy
from kvflow.kv.storage import DiskStorage, TensorStorage
from kvflow.kv.transfer import Direction, TensorCopyEngine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dir", default=None, help="directory for the slab file")
    parser.add_argument("--sizes-mib", default="1,4,16,64")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (copies are memory-bound; "
        "more threads than free cores slow small copies tenfold on a shared machine)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sizes = [int(s) for s in args.sizes_mib.split(",")]
    # 512 KiB blocks: 8 layers x 2 x 16 tokens x 8 heads x 128 dims x bf16.
    layout = {"num_layers": 8, "num_kv_heads": 8, "head_dim": 128, "dtype": "bfloat16"}
    max_blocks = max(sizes) * MIB // (512 * 1024)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        kv = KVFlowConfig.from_dict(
            {
                "kv": {
                    "block_size": 16,
                    "layout": layout,
                    "device": {"num_blocks": max_blocks},
                    "cpu": {"num_blocks": max_blocks},
                    "disk": {"num_blocks": max_blocks, "path": f"{tmp}/slab", "fsync": True},
                }
            }
        ).kv
        bpb = kv.bytes_per_block()
        dev = TensorStorage.allocate(kv, max_blocks, device)
        cpu = TensorStorage.allocate(kv, max_blocks, "cpu", pin=True)
        disk = DiskStorage.create(kv, max_blocks)
        dev.data.normal_()
        cpu.data.normal_()
        engine = TensorCopyEngine(dev, cpu, disk)
        try:
            for size in sizes:
                n = size * MIB // bpb
                slots = list(range(n))

                src_dev = dev.data[:n]
                dst_cpu = cpu.data[:n]
                raw = {
                    "device_to_cpu": lambda s=src_dev, d=dst_cpu: (d.copy_(s), _sync()),
                    "cpu_to_device": lambda s=dst_cpu, d=src_dev: (d.copy_(s), _sync()),
                    "cpu_to_disk": lambda b=dst_cpu: _raw_write(disk.path, disk.data_offset, b),
                    "disk_to_device": lambda h=dst_cpu, d=src_dev: _raw_read(
                        disk.path, disk.data_offset, h, d
                    ),
                }
                cases: list[tuple[Direction, str | None]] = [
                    ("device_to_cpu", None),
                    ("cpu_to_device", None),
                    ("cpu_to_disk", None),
                    ("disk_to_device", "storage"),
                    ("disk_to_device", "page_cache"),
                ]
                for direction, source in cases:
                    if direction == "disk_to_device":
                        store_copy(
                            engine, "cpu_to_disk", slots, n * bpb
                        )()  # something valid to read back
                    t_store, t_raw = best_of_pair(
                        args.repeat,
                        store_copy(engine, direction, slots, n * bpb),
                        raw[direction],  # type: ignore[arg-type]
                        (lambda: drop_cached_pages(disk.path))
                        if source == "storage"
                        else lambda: None,
                    )
                    nbytes = n * bpb
                    row: dict[str, object] = {
                        "benchmark": "tier_bandwidth",
                        "device": device,
                        "direction": direction,
                    }
                    if source is not None:
                        row["source"] = source
                    row |= {
                        "batch_mib": size,
                        "num_blocks": n,
                        "store_gbps": round(nbytes / t_store / 1e9, 3),
                        "raw_gbps": round(nbytes / t_raw / 1e9, 3),
                        "ratio": round(t_raw / t_store, 3),
                    }
                    print(json.dumps(row), flush=True)
        finally:
            engine.close()
            disk.close()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _raw_write(path: Path, offset: int, tensor: torch.Tensor) -> None:
    """The tensor's bytes to the file at `offset` (the slab's block 0), then fsync. On
    the slab they are the bytes the store writes there, so its blocks and checksums
    stay valid."""
    data = memoryview(tensor.contiguous().view(torch.uint8).numpy())  # type: ignore[arg-type]
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def _raw_read(path: Path, offset: int, host: torch.Tensor, dst: torch.Tensor) -> None:
    """`dst.nbytes` bytes of the file from `offset` (the slab's block 0) into `dst`:
    straight in when it is host memory, else through the (pinned) host tensor `host`,
    as the store does."""
    if not dst.is_cuda:
        host = dst
    buf = memoryview(host.view(torch.uint8).numpy()).cast("B")  # type: ignore[arg-type]
    fd = os.open(path, os.O_RDONLY)
    try:
        os.preadv(fd, [buf], offset)
    finally:
        os.close(fd)
    if dst.is_cuda:
        dst.copy_(host)
        _sync()


if __name__ == "__main__":
    main()
