"""Throughput of the tiered store's copies beside raw baselines measured the same way.

For 1-64 MiB batches of blocks, times the store's copy engine (the code the store runs
for every demotion, promotion and disk write) in each direction, and the raw
operation on the same bytes: a torch tensor copy for device<->cpu, a sequential file
write + fsync and a sequential read for the disk. Prints one JSON line per direction
and batch size, with the ratio to the baseline.

    python benchmarks/tier_bandwidth.py [--repeat 5] [--dir DIR]

On a machine without CUDA the device tier is a CPU tensor, so device<->cpu is a
memory copy; with CUDA it crosses PCIe (pinned host memory).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from kvflow.config import KVFlowConfig
from kvflow.kv.storage import DiskStorage, TensorStorage
from kvflow.kv.transfer import Direction, TensorCopyEngine, Transfer

MIB = 2**20


def best_of_pair(
    repeat: int, first: Callable[[], object], second: Callable[[], object]
) -> tuple[float, float]:
    """Best times of two operations, measured alternately so that a busy spell on a
    shared machine hits both alike."""
    best = [float("inf"), float("inf")]
    for _ in range(repeat):
        for i, fn in enumerate((first, second)):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best[0], best[1]


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
        engine = TensorCopyEngine(dev, cpu, disk, max_workers=1)
        raw_path = Path(tmp) / "raw.bin"
        try:
            for size in sizes:
                n = size * MIB // bpb
                slots = list(range(n))

                def store_copy(
                    direction: Direction, slots: list[int] = slots
                ) -> Callable[[], None]:
                    def run() -> None:
                        engine.submit(
                            Transfer(direction, slots, slots, slots, len(slots) * bpb), 0.0
                        )
                        engine.settle()
                        engine.completed(0.0)

                    return run

                src_dev = dev.data[:n]
                dst_cpu = cpu.data[:n]
                raw = {
                    "device_to_cpu": lambda s=src_dev, d=dst_cpu: (d.copy_(s), _sync()),
                    "cpu_to_device": lambda s=dst_cpu, d=src_dev: (d.copy_(s), _sync()),
                    "cpu_to_disk": lambda b=dst_cpu: _raw_write(raw_path, b),
                    "disk_to_device": lambda b=dst_cpu, d=src_dev: _raw_read(raw_path, b, d),
                }
                for direction in (
                    "device_to_cpu",
                    "cpu_to_device",
                    "cpu_to_disk",
                    "disk_to_device",
                ):
                    if direction == "disk_to_device":
                        store_copy("cpu_to_disk")()  # something valid to read back
                        _raw_write(raw_path, dst_cpu)
                    t_store, t_raw = best_of_pair(
                        args.repeat,
                        store_copy(direction),
                        raw[direction],  # type: ignore[arg-type]
                    )
                    nbytes = n * bpb
                    print(
                        json.dumps(
                            {
                                "benchmark": "tier_bandwidth",
                                "device": device,
                                "direction": direction,
                                "batch_mib": size,
                                "num_blocks": n,
                                "store_gbps": round(nbytes / t_store / 1e9, 3),
                                "raw_gbps": round(nbytes / t_raw / 1e9, 3),
                                "ratio": round(t_raw / t_store, 3),
                            }
                        ),
                        flush=True,
                    )
        finally:
            engine.close()
            disk.close()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _raw_write(path: Path, tensor: torch.Tensor) -> None:
    data = memoryview(tensor.contiguous().view(torch.uint8).numpy())  # type: ignore[arg-type]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _raw_read(path: Path, host: torch.Tensor, device_dst: torch.Tensor) -> None:
    buf = memoryview(host.view(torch.uint8).numpy()).cast("B")  # type: ignore[arg-type]
    fd = os.open(path, os.O_RDONLY)
    try:
        os.preadv(fd, [buf], 0)
    finally:
        os.close(fd)
    if device_dst.is_cuda:
        device_dst.copy_(host)
        _sync()


if __name__ == "__main__":
    main()
