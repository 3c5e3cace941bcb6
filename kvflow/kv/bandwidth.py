"""Timing the tiered store's copies: the method `benchmarks/tier_bandwidth.py` reports
with, and `kvflow calibrate` fits the simulator's copy model (`kv.transfer.*`) with.

A copy is timed through the store's own copy engine (`TensorCopyEngine`, the code every
demotion, promotion and disk write runs), submitted and settled. Disk reads start from
the storage device: the slab's pages are dropped from the page cache (untimed) first.
`measure_transfer` times each direction at a few batch sizes and fits
time = latency + bytes / bandwidth per direction.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from kvflow.config import KVConfig
from kvflow.kv.storage import DiskStorage, TensorStorage
from kvflow.kv.tensor_copy import TensorCopyEngine
from kvflow.kv.transfer import Direction, Transfer

MIB = 2**20
DIRECTIONS: tuple[Direction, ...] = (
    "device_to_cpu",
    "cpu_to_device",
    "cpu_to_disk",
    "disk_to_device",
)


def best_of_pair(
    repeat: int,
    first: Callable[[], object],
    second: Callable[[], object],
    before_each: Callable[[], object] = lambda: None,
) -> tuple[float, float]:
    """Best times of two operations, measured alternately so that a busy spell on a
    shared machine hits both alike; `before_each` runs untimed before every run."""
    best = [float("inf"), float("inf")]
    for _ in range(repeat):
        for i, fn in enumerate((first, second)):
            before_each()
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best[0], best[1]


def drop_cached_pages(path: Path) -> None:
    """Evict the file's (clean, fsynced) pages from the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def store_copy(
    engine: TensorCopyEngine, direction: Direction, slots: list[int], nbytes: int
) -> Callable[[], None]:
    """A function that copies `slots` (same slot numbers on both sides) in `direction`
    through `engine` and waits for it.

    Raises (when called):
        RuntimeError: the copy failed (a failed copy would time as fast, and be none).
    """

    def run() -> None:
        engine.submit(Transfer(direction, slots, slots, slots, nbytes), 0.0)
        engine.settle()
        ((_, ok),) = engine.completed(0.0)
        if not all(ok):
            raise RuntimeError(f"the store's {direction} copy failed")

    return run


class DirectionFit(NamedTuple):
    direction: Direction
    gbps: float
    latency_us: float
    points: list[tuple[int, float]]
    """(bytes, median seconds) per batch size."""


def _fit_line(points: Sequence[tuple[int, float]]) -> tuple[float, float]:
    """(GB/s, latency in us) of time = latency + bytes / bandwidth, least squares with
    both >= 0 (one point: no latency)."""
    from scipy.optimize import nnls

    matrix = np.array([[1.0, b / 1e9] for b, _ in points])
    times = np.array([t for _, t in points])
    if len(points) < 2:
        return points[0][0] / 1e9 / points[0][1], 0.0
    (latency, s_per_gb), _ = nnls(matrix, times)
    if not s_per_gb > 0:  # no size dependence seen: the largest batch's mean rate
        nbytes, seconds = max(points)
        return nbytes / 1e9 / seconds, 0.0
    return float(1.0 / s_per_gb), float(latency) * 1e6


def measure_transfer(
    kv: KVConfig,
    device: str | torch.device = "cpu",
    *,
    sizes_mib: Sequence[float] = (1, 4, 16),
    repeat: int = 5,
    directory: str | Path | None = None,
) -> list[DirectionFit]:
    """Time the store's copies in every direction at each batch size (at least one
    block) with blocks of `kv`'s layout, median of `repeat` runs each, and fit each
    direction's bandwidth and latency. The slab file lives in a temporary directory
    under `directory` (default: the system's), removed afterwards.

    Raises:
        ValueError: `repeat` < 1 or no sizes.
    """
    if repeat < 1 or not sizes_mib:
        raise ValueError(f"need repeat >= 1 and batch sizes, got {repeat!r}, {sizes_mib!r}")
    bpb = kv.bytes_per_block()
    counts = sorted({max(1, int(size * MIB // bpb)) for size in sizes_mib})
    max_blocks = counts[-1]
    points: dict[Direction, list[tuple[int, float]]] = {d: [] for d in DIRECTIONS}
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        tier = kv.model_copy(
            update={
                "disk": kv.disk.model_copy(
                    update={"num_blocks": max_blocks, "path": f"{tmp}/slab", "fsync": True}
                )
            }
        )
        dev = TensorStorage.allocate(tier, max_blocks, device)
        cpu = TensorStorage.allocate(
            tier, max_blocks, "cpu", pin=torch.device(device).type == "cuda"
        )
        disk = DiskStorage.create(tier, max_blocks)
        dev.data.normal_()
        cpu.data.normal_()
        engine = TensorCopyEngine(dev, cpu, disk)
        try:
            for n in counts:
                slots = list(range(n))
                store_copy(engine, "cpu_to_disk", slots, n * bpb)()  # valid blocks to read
                for direction in DIRECTIONS:
                    run = store_copy(engine, direction, slots, n * bpb)
                    run()  # warm-up
                    times = []
                    for _ in range(repeat):
                        if direction == "disk_to_device":
                            drop_cached_pages(disk.path)
                        t0 = time.perf_counter()
                        run()
                        times.append(time.perf_counter() - t0)
                    points[direction].append((n * bpb, statistics.median(times)))
        finally:
            engine.close()
            disk.close()
    return [DirectionFit(d, *_fit_line(points[d]), points[d]) for d in DIRECTIONS]


def transfer_settings(fits: Sequence[DirectionFit]) -> dict[str, float]:
    """`kv.transfer.*` values from `measure_transfer`'s fits: each direction's GB/s, the
    device<->cpu latency (mean of both directions) as `pcie_latency_us` and the disk's
    as `disk_latency_us`. Rounded to 4 significant digits."""
    by = {f.direction: f for f in fits}

    def r(x: float) -> float:
        return float(f"{x:.4g}")

    out = {f"{d}_gbps": r(by[d].gbps) for d in DIRECTIONS if d in by}
    pcie = [by[d].latency_us for d in ("device_to_cpu", "cpu_to_device") if d in by]
    disk = [by[d].latency_us for d in ("cpu_to_disk", "disk_to_device") if d in by]
    if pcie:
        out["pcie_latency_us"] = r(statistics.fmean(pcie))
    if disk:
        out["disk_latency_us"] = r(statistics.fmean(disk))
    return out


__all__ = [
    "DIRECTIONS",
    "DirectionFit",
    "best_of_pair",
    "drop_cached_pages",
    "measure_transfer",
    "store_copy",
    "transfer_settings",
]
