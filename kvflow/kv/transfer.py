"""Copies between tiers, and the engines that carry them out.

The store decides what to copy; a `CopyEngine` decides when a copy is done. The
simulator's engine moves no bytes and completes a copy at a virtual time given by a
bandwidth and latency model per direction (copies in one direction queue behind each
other). The tensor engine (`kvflow.kv.tensor_copy`) moves real bytes in worker threads,
concurrently with the step. Either way the store makes a copied block readable only
once its copy is done.
"""

from __future__ import annotations

import abc
import heapq
import itertools
import threading
from dataclasses import dataclass, field
from typing import Literal

from kvflow.config import TransferConfig

Direction = Literal[
    "device_to_cpu", "cpu_to_device", "cpu_to_disk", "disk_to_device", "peer_to_cpu"
]
DIRECTIONS: tuple[Direction, ...] = (
    "device_to_cpu",
    "cpu_to_device",
    "cpu_to_disk",
    "disk_to_device",
)
"""The copies between this instance's tiers (what `StoreStats.bytes_moved` counts)."""
PEER_DIRECTION: Direction = "peer_to_cpu"
"""A pull from another instance into the cpu tier: modelled by `SimCopyEngine`, carried
out for real by `kvflow.peer`."""
_TIERS: dict[Direction, tuple[str, str]] = {
    "device_to_cpu": ("device", "cpu"),
    "cpu_to_device": ("cpu", "device"),
    "cpu_to_disk": ("cpu", "disk"),
    "disk_to_device": ("disk", "device"),
    "peer_to_cpu": ("peer", "cpu"),
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
    peer: str | None = None
    """The peer a `peer_to_cpu` transfer pulls from (its `src_slots` are empty)."""
    depths: list[int] | None = None
    """The blocks' indexes in their chains (`BlockPool.depths`), where the source pool
    does not hold them: a `cpu_to_disk` copy's, for a persistent slab's records
    (`kvflow.kv.persist`), and a pull's, for the cpu pool."""

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


class ThreadedCopyEngine(CopyEngine):
    """A copy engine whose transfers finish off the store's thread (in worker threads,
    or tasks of an event loop): each is running from `_start` until `_report` (or
    `_give_up_running`), then handed to the store by `completed`; `wait` and `settle`
    may block any thread."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._running: dict[int, Transfer] = {}
        """Transfers started and not reported yet, by id."""
        self._finished: list[tuple[Transfer, list[bool]]] = []

    def _start(self, transfer: Transfer) -> None:
        with self._cond:
            self._running[transfer.transfer_id] = transfer

    def _report(self, transfer: Transfer, ok: list[bool], *, started: bool = True) -> None:
        """`transfer` is done (`started=False`: it finished in `submit`, never started).
        A started transfer no longer running was reported already (given up): not again."""
        with self._cond:
            if started and self._running.pop(transfer.transfer_id, None) is None:
                return
            self._finished.append((transfer, ok))
            self._cond.notify_all()

    def _give_up_running(self) -> None:
        """Report every running transfer failed now; their own `_report`s, later, are
        ignored."""
        with self._cond:
            self._finished += [(t, [False] * len(t.keys)) for t in self._running.values()]
            self._running.clear()
            self._cond.notify_all()

    def completed(self, now: float) -> list[tuple[Transfer, list[bool]]]:
        with self._cond:
            out, self._finished = self._finished, []
        return out

    def wait(self, timeout_s: float | None = None) -> None:
        with self._cond:
            if not self._finished and self._running:
                self._cond.wait(timeout_s)

    def settle(self, timeout_s: float | None = None) -> None:
        with self._cond:
            self._cond.wait_for(lambda: not self._running, timeout_s)

    @property
    def num_pending(self) -> int:
        with self._cond:
            return len(self._running) + len(self._finished)


class SimCopyEngine(CopyEngine):
    """Virtual-time copies: a transfer takes latency + bytes / bandwidth, after the
    transfers queued before it in the same direction."""

    def __init__(self, config: TransferConfig) -> None:
        self.bandwidth_bps: dict[Direction, float] = {
            "device_to_cpu": config.device_to_cpu_gbps * 1e9,
            "cpu_to_device": config.cpu_to_device_gbps * 1e9,
            "cpu_to_disk": config.cpu_to_disk_gbps * 1e9,
            "disk_to_device": config.disk_to_device_gbps * 1e9,
            "peer_to_cpu": config.peer_gbps * 1e9,
        }
        self.latency_s: dict[Direction, float] = {
            "device_to_cpu": config.pcie_latency_us * 1e-6,
            "cpu_to_device": config.pcie_latency_us * 1e-6,
            "cpu_to_disk": config.disk_latency_us * 1e-6,
            "disk_to_device": config.disk_latency_us * 1e-6,
            "peer_to_cpu": config.peer_latency_us * 1e-6,
        }
        self._busy_until: dict[Direction, float] = dict.fromkeys(_TIERS, 0.0)
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
