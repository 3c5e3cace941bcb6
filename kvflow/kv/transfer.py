"""Copies between tiers, and the engines that carry them out.

The store decides what to copy; a `CopyEngine` decides when a copy is done. The
simulator's engine moves no bytes and completes a copy at a virtual time given by a
bandwidth and latency model per direction (copies in one direction queue behind each
other). The tensor engine moves real bytes in worker threads, concurrently with the
step. Either way the store makes a copied block readable only once its copy is done.
"""

from __future__ import annotations

import abc
import contextlib
import heapq
import itertools
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from kvflow.config import TransferConfig

if TYPE_CHECKING:
    import torch

    from kvflow.kv.storage import DiskStorage, TensorStorage

Direction = Literal["device_to_cpu", "cpu_to_device", "cpu_to_disk", "disk_to_device"]
DIRECTIONS: tuple[Direction, ...] = (
    "device_to_cpu",
    "cpu_to_device",
    "cpu_to_disk",
    "disk_to_device",
)
_TIERS: dict[Direction, tuple[str, str]] = {
    "device_to_cpu": ("device", "cpu"),
    "cpu_to_device": ("cpu", "device"),
    "cpu_to_disk": ("cpu", "disk"),
    "disk_to_device": ("disk", "device"),
}
_ids = itertools.count()


@dataclass(eq=False, slots=True)
class Transfer:
    """One batch of block copies in one direction. `keys[i]` is the key of the block
    copied from `src_slots[i]` to `dst_slots[i]`."""

    direction: Direction
    src_slots: list[int]
    dst_slots: list[int]
    keys: list[int]
    num_bytes: int
    submitted_at: float = 0.0
    transfer_id: int = field(default_factory=lambda: next(_ids))

    @property
    def src_tier(self) -> str:
        return _TIERS[self.direction][0]

    @property
    def dst_tier(self) -> str:
        return _TIERS[self.direction][1]


class CopyEngine(abc.ABC):
    """Carries out transfers and reports which are done."""

    @abc.abstractmethod
    def submit(self, transfer: Transfer, now: float) -> None:
        """Start a transfer at time `now`."""

    @abc.abstractmethod
    def completed(self, now: float) -> list[tuple[Transfer, list[bool]]]:
        """Transfers finished by `now`, each with per-block success, in finish order."""

    def next_completion(self) -> float | None:
        """When the next pending transfer finishes on the caller's clock, if known
        (virtual time); None when nothing is pending or the engine cannot tell."""
        return None

    def wait(self, timeout_s: float | None = None) -> None:  # noqa: B027 - optional
        """Block until some pending transfer finishes (real engines)."""

    def settle(self, timeout_s: float | None = None) -> None:  # noqa: B027 - optional
        """Block until every transfer submitted so far has finished (real engines); they
        are still reported by the next `completed`."""

    @property
    @abc.abstractmethod
    def num_pending(self) -> int: ...

    def close(self) -> None:  # noqa: B027 - optional
        """Finish pending work and release threads or files."""


class SimCopyEngine(CopyEngine):
    """Virtual-time copies: a transfer takes latency + bytes / bandwidth, after the
    transfers queued before it in the same direction."""

    def __init__(self, config: TransferConfig) -> None:
        self.bandwidth_bps: dict[Direction, float] = {
            "device_to_cpu": config.device_to_cpu_gbps * 1e9,
            "cpu_to_device": config.cpu_to_device_gbps * 1e9,
            "cpu_to_disk": config.cpu_to_disk_gbps * 1e9,
            "disk_to_device": config.disk_to_device_gbps * 1e9,
        }
        self.latency_s: dict[Direction, float] = {
            "device_to_cpu": config.pcie_latency_us * 1e-6,
            "cpu_to_device": config.pcie_latency_us * 1e-6,
            "cpu_to_disk": config.disk_latency_us * 1e-6,
            "disk_to_device": config.disk_latency_us * 1e-6,
        }
        self._busy_until: dict[Direction, float] = dict.fromkeys(DIRECTIONS, 0.0)
        self._heap: list[tuple[float, int, Transfer]] = []

    def duration_s(self, direction: Direction, num_bytes: int) -> float:
        return self.latency_s[direction] + num_bytes / self.bandwidth_bps[direction]

    def submit(self, transfer: Transfer, now: float) -> None:
        d = transfer.direction
        start = max(now, self._busy_until[d])
        done = start + self.duration_s(d, transfer.num_bytes)
        self._busy_until[d] = done
        heapq.heappush(self._heap, (done, transfer.transfer_id, transfer))

    def completed(self, now: float) -> list[tuple[Transfer, list[bool]]]:
        out = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, _, t = heapq.heappop(heap)
            out.append((t, [True] * len(t.keys)))
        return out

    def next_completion(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    @property
    def num_pending(self) -> int:
        return len(self._heap)


class TensorCopyEngine(CopyEngine):
    """Real copies between tensor pools and a slab file, in worker threads.

    Device<->cpu copies are torch copies (non-blocking from pinned memory on CUDA, on a
    side stream, synchronised before the copy is reported done); cpu->disk writes and
    disk->device reads go through `DiskStorage` (disk reads land in a host bounce
    buffer first when the device is not the CPU).
    """

    def __init__(
        self,
        device: TensorStorage,
        cpu: TensorStorage | None,
        disk: DiskStorage | None,
        max_workers: int = 2,
        inline_bytes: int = 4 * 2**20,
    ) -> None:
        self.storages = {"device": device, "cpu": cpu, "disk": disk}
        # Host-to-host copies this small finish sooner on the caller's thread than the
        # hop to a worker takes; they are what "device" <-> cpu is on a CPU-only host.
        self._inline_bytes = inline_bytes if device.data.device.type == "cpu" else 0
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="kvcopy")
        self._pending: dict[Future[list[bool]], Transfer] = {}
        self._done_inline: list[tuple[Transfer, list[bool]]] = []
        self._lock = threading.Lock()

    def submit(self, transfer: Transfer, now: float) -> None:
        if transfer.num_bytes <= self._inline_bytes and transfer.direction in (
            "device_to_cpu",
            "cpu_to_device",
        ):
            ok = self._run(transfer)
            with self._lock:
                self._done_inline.append((transfer, ok))
            return
        future = self._executor.submit(self._run, transfer)
        with self._lock:
            self._pending[future] = transfer

    def _run(self, t: Transfer) -> list[bool]:
        d = t.direction
        if d in ("device_to_cpu", "cpu_to_device"):
            src = self.storages[t.src_tier]
            dst = self.storages[t.dst_tier]
            assert src is not None and dst is not None
            return _copy_tensor_blocks(src.data, t.src_slots, dst.data, t.dst_slots)  # type: ignore[union-attr]
        if d == "cpu_to_disk":
            cpu = self.storages["cpu"]
            disk = self.storages["disk"]
            return disk.write_from([cpu.data[s] for s in t.src_slots], t.dst_slots)  # type: ignore[union-attr]
        disk = self.storages["disk"]
        device = self.storages["device"]
        return _read_disk_to(disk, t.src_slots, device.data, t.dst_slots)  # type: ignore[arg-type, union-attr]

    def completed(self, now: float) -> list[tuple[Transfer, list[bool]]]:
        with self._lock:
            done = [f for f in self._pending if f.done()]
            transfers = [(f, self._pending.pop(f)) for f in done]
            out, self._done_inline = self._done_inline, []
        for f, t in transfers:
            err = f.exception()
            out.append((t, [False] * len(t.keys) if err is not None else f.result()))
        return out

    def wait(self, timeout_s: float | None = None) -> None:
        with self._lock:
            futures = list(self._pending)
        if futures:
            wait(futures, timeout=timeout_s, return_when=FIRST_COMPLETED)

    def settle(self, timeout_s: float | None = None) -> None:
        with self._lock:
            futures = list(self._pending)
        if futures:
            wait(futures, timeout=timeout_s)

    @property
    def num_pending(self) -> int:
        with self._lock:
            return len(self._pending) + len(self._done_inline)

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
    src: torch.Tensor, src_slots: list[int], dst: torch.Tensor, dst_slots: list[int]
) -> list[bool]:
    cuda = src.is_cuda or dst.is_cuda
    if not cuda:
        for s, d, n in _runs(src_slots, dst_slots):
            dst[d : d + n].copy_(src[s : s + n])
        return [True] * len(src_slots)
    import torch

    stream = torch.cuda.Stream() if cuda else None  # type: ignore[no-untyped-call]
    ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
    with ctx:
        for s, d, n in _runs(src_slots, dst_slots):
            dst[d : d + n].copy_(src[s : s + n], non_blocking=cuda)
    if stream is not None:
        stream.synchronize()
    return [True] * len(src_slots)


def _read_disk_to(
    disk: DiskStorage, disk_slots: list[int], dst: torch.Tensor, dst_slots: list[int]
) -> list[bool]:
    if not dst.is_cuda and dst.device.type == "cpu":
        return disk.read_into(disk_slots, [dst[d] for d in dst_slots])
    import torch

    bounce = torch.empty(
        (len(disk_slots), *dst.shape[1:]), dtype=dst.dtype, pin_memory=torch.cuda.is_available()
    )
    ok = disk.read_into(disk_slots, [bounce[i] for i in range(len(disk_slots))])
    for i, d in enumerate(dst_slots):
        if ok[i]:
            dst[d].copy_(bounce[i], non_blocking=False)
    return ok
