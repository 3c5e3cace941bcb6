"""Real copies between the tiers' tensors and the slab file, in worker threads
(`TensorCopyEngine`, the store's copy engine whenever it holds real bytes)."""

from __future__ import annotations

import contextlib
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvflow.kv.transfer import ThreadedCopyEngine, Transfer

if TYPE_CHECKING:
    import torch

    from kvflow.kv.storage import DiskStorage, TensorStorage


@dataclass(eq=False, slots=True)
class _Job:
    """A transfer whose blocks are copied in parts, possibly by several threads."""

    transfer: Transfer
    num_parts_left: int
    # first block index of a part -> per-block success of that part
    results: dict[int, list[bool]] = field(default_factory=dict)
    # a disk write's checksums, computed beside the write (None if that failed)
    digests: list[int] | None = None
    # CUDA: an event recorded on the device's stream at submission; the copy waits for
    # it, so it never overtakes kernels queued before it that write or read its blocks
    ready: torch.cuda.Event | None = None

    def merged(self) -> list[bool]:
        if len(self.results) == 1:
            return next(iter(self.results.values()))
        return [ok for lo in sorted(self.results) for ok in self.results[lo]]


class TensorCopyEngine(ThreadedCopyEngine):
    """Real copies between tensor pools and a slab file, in worker threads.

    Device<->cpu copies are torch copies (non-blocking from pinned memory on CUDA, on a
    side stream, synchronised before the copy is reported done); cpu->disk writes and
    disk->device reads go through `DiskStorage` (disk reads land in a host bounce
    buffer first when the device is not the CPU). A disk read is split across up to
    `max_workers` threads, which read and checksum their share of the blocks at once (so
    is a host copy on a CPU-only host); a disk write's checksums are computed while a
    worker writes and syncs the blocks.

    On a CPU-only host, transfers of at most `inline_bytes` start on the caller's
    thread, which finishes them sooner than the hop to a worker takes: host copies
    entirely, disk reads for the caller's share of the blocks as far as the page cache
    holds them (what it does not hold goes to a worker, never blocking the caller), and
    disk writes' checksums. A copy is split only into parts of at least
    `min_part_bytes`: waking a worker takes tens of microseconds (more on an idle VM),
    as long as reading and checksumming 1 MiB.
    """

    def __init__(
        self,
        device: TensorStorage,
        cpu: TensorStorage | None,
        disk: DiskStorage | None,
        max_workers: int = 2,
        inline_bytes: int = 4 * 2**20,
        min_part_bytes: int = 2 * 2**20,
    ) -> None:
        from kvflow.kv.storage import byte_view

        self.device = device
        self.cpu = cpu
        self.disk = disk
        self.max_workers = max_workers
        on_host = device.data.device.type == "cpu"
        self._inline_bytes = inline_bytes if on_host else 0
        self._min_part_bytes = max(1, min_part_bytes)
        self._bytes_per_block = math.prod(device.data.shape[1:]) * device.data.element_size()
        self._device_bytes = byte_view(device.data) if on_host else None
        self._cpu_bytes = byte_view(cpu.data) if cpu is not None else None
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="kvcopy")
        super().__init__()

    def submit(self, transfer: Transfer, now: float) -> None:
        direction = transfer.direction
        inline = transfer.num_bytes <= self._inline_bytes
        if inline and direction in ("device_to_cpu", "cpu_to_device"):
            self._report(transfer, self._copy_host_bytes(transfer), started=False)
            return
        n = len(transfer.keys)
        self._start(transfer)
        if direction == "cpu_to_disk":
            job = _Job(transfer, num_parts_left=2)
            self._executor.submit(self._run_part, job, 0, n)
            if inline:
                self._run_digests(job)
            else:
                self._executor.submit(self._run_digests, job)
            return
        num_parts = 1
        if direction == "disk_to_device" or self._device_bytes is not None:  # not CUDA
            num_parts = max(1, min(n, self.max_workers, transfer.num_bytes // self._min_part_bytes))
        bounds = [n * i // num_parts for i in range(num_parts + 1)]
        job = _Job(transfer, num_parts, ready=self._device_ready())
        reads_inline = inline and direction == "disk_to_device"
        futures = [
            self._executor.submit(self._run_part, job, bounds[i], bounds[i + 1])
            for i in range(1 if reads_inline else 0, num_parts)
        ]
        if reads_inline:
            self._run_part(job, bounds[0], bounds[1], cached_only=True)
            # A part no worker has started yet (all cores busy) is the caller's to read.
            for i, future in enumerate(futures, start=1):
                if future.cancel():
                    self._run_part(job, bounds[i], bounds[i + 1], cached_only=True)

    def _run_part(self, job: _Job, lo: int, hi: int, cached_only: bool = False) -> None:
        try:
            ok = self._copy(job.transfer, lo, hi, cached_only, job.ready)
        except Exception:  # a copy that fails fails its blocks; it never hangs a transfer
            ok = [False] * (hi - lo)
        if ok:
            job.results[lo] = ok
        if len(ok) < hi - lo:  # the page cache held only the first blocks
            with self._cond:
                job.num_parts_left += 1
            self._executor.submit(self._run_part, job, lo + len(ok), hi)
        self._part_done(job)

    def _run_digests(self, job: _Job) -> None:
        from kvflow.kv.storage import block_digests

        assert self._cpu_bytes is not None
        with contextlib.suppress(Exception):  # no digests: the written blocks stay misses
            job.digests = block_digests(
                self._cpu_bytes, job.transfer.src_slots, self._bytes_per_block
            )
        self._part_done(job)

    def _part_done(self, job: _Job) -> None:
        with self._cond:
            job.num_parts_left -= 1
            if job.num_parts_left:
                return
        t = job.transfer
        ok = job.merged()
        if t.direction == "cpu_to_disk":
            assert self.disk is not None
            ok = self.disk.set_checksums(t.dst_slots, job.digests, ok, t.keys, t.depths)
        self._report(t, ok)

    def _device_ready(self) -> torch.cuda.Event | None:
        """On CUDA, an event marking the work queued so far on the device's stream."""
        data = self.device.data
        if not data.is_cuda:
            return None
        import torch

        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record(torch.cuda.current_stream(data.device))
        return event

    def _copy(
        self,
        t: Transfer,
        lo: int,
        hi: int,
        cached_only: bool,
        ready: torch.cuda.Event | None = None,
    ) -> list[bool]:
        src_slots, dst_slots = t.src_slots[lo:hi], t.dst_slots[lo:hi]
        if t.direction in ("device_to_cpu", "cpu_to_device"):
            pools = (self.device, self.cpu)
            src, dst = pools if t.direction == "device_to_cpu" else pools[::-1]
            assert src is not None and dst is not None  # the store copies between tiers it has
            _copy_tensor_blocks(src.data, src_slots, dst.data, dst_slots, ready)
            return [True] * (hi - lo)
        disk = self.disk
        assert disk is not None
        if t.direction == "cpu_to_disk":
            assert self._cpu_bytes is not None
            return disk.write_from(self._cpu_bytes, src_slots, dst_slots, checksum=False)
        if self._device_bytes is not None:
            return disk.read_into(src_slots, self._device_bytes, dst_slots, nowait=cached_only)
        return _read_through_bounce(disk, src_slots, self.device.data, dst_slots, ready)

    def _copy_host_bytes(self, t: Transfer) -> list[bool]:
        # A memoryview slice assignment is a plain memcpy, without the dispatch of two
        # tensor slices and a torch copy, which costs a sixth of a 1 MiB copy.
        device, cpu = self._device_bytes, self._cpu_bytes
        src, dst = (device, cpu) if t.direction == "device_to_cpu" else (cpu, device)
        assert src is not None and dst is not None
        size = self._bytes_per_block
        for s, d, n in _runs(t.src_slots, t.dst_slots):
            dst[d * size : (d + n) * size] = src[s * size : (s + n) * size]
        return [True] * len(t.keys)

    def close(self) -> None:
        self._executor.shutdown(wait=True)


def _runs(src: list[int], dst: list[int]) -> list[tuple[int, int, int]]:
    """(src_start, dst_start, length) runs where both slot lists are consecutive."""
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src, dst, strict=True):
        if runs:
            s0, d0, n = runs[-1]
            if s == s0 + n and d == d0 + n:
                runs[-1] = (s0, d0, n + 1)
                continue
        runs.append((s, d, 1))
    return runs


def _copy_tensor_blocks(
    src: torch.Tensor,
    src_slots: list[int],
    dst: torch.Tensor,
    dst_slots: list[int],
    ready: torch.cuda.Event | None = None,
) -> None:
    """Copy blocks between pools; on CUDA on a side stream of the pool's device that
    first waits for `ready` (work queued on the device before the copy was submitted)."""
    cuda = src.is_cuda or dst.is_cuda
    if not cuda:
        for s, d, n in _runs(src_slots, dst_slots):
            dst[d : d + n].copy_(src[s : s + n])
        return
    import torch

    device = src.device if src.is_cuda else dst.device
    with torch.cuda.device(device):
        stream = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
        if ready is not None:
            stream.wait_event(ready)
        with torch.cuda.stream(stream):
            for s, d, n in _runs(src_slots, dst_slots):
                dst[d : d + n].copy_(src[s : s + n], non_blocking=True)
        stream.synchronize()


def _read_through_bounce(
    disk: DiskStorage,
    disk_slots: list[int],
    dst: torch.Tensor,
    dst_slots: list[int],
    ready: torch.cuda.Event | None = None,
) -> list[bool]:
    """Disk blocks into a device that is not host memory, through a host bounce buffer
    (pinned when CUDA is available)."""
    import torch

    from kvflow.kv.storage import byte_view

    bounce = torch.empty(
        (len(disk_slots), *dst.shape[1:]), dtype=dst.dtype, pin_memory=torch.cuda.is_available()
    )
    ok = disk.read_into(disk_slots, byte_view(bounce), range(len(disk_slots)))
    good = [i for i, g in enumerate(ok) if g]
    _copy_tensor_blocks(bounce, good, dst, [dst_slots[i] for i in good], ready)
    return ok
