"""A shadow of what every KV position must hold, for model-based tests over real tensors.

The KV of position `p` of a sequence depends on its tokens `0..p` and nothing else, so
a fake runner can write a value that encodes exactly that (`kv_value`, a rolling hash
of the prefix) into the real device tensors, and check, before each step, that every
position the step attends holds the value of *that request's* prefix. A block copied to
the wrong slot, read before its copy landed, overwritten while shared, or garbage read
back from disk all show up as a wrong value, which refcounts alone cannot see.

`ShadowRunner` is that runner (usable by the scheduler directly and by `AsyncEngine`);
`ShadowCopies` is a virtual-time copy engine that moves the real bytes between the
tensor pools, the slab file and simulated peers when a copy completes, and checks that
no copy's source or destination was written while it ran.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from kvflow.config import KVConfig, KVFlowConfig
from kvflow.engine_adapters.base import ModelRunner
from kvflow.kv.storage import DiskStorage, TensorStorage, byte_view
from kvflow.kv.store import KVStore
from kvflow.kv.transfer import SimCopyEngine, Transfer
from kvflow.request import Request, RequestState
from kvflow.scheduler.plan import StepPlan, StepResult

if TYPE_CHECKING:
    import torch

_MOD = (1 << 52) - 1  # values stay exact in float64
LAYOUT = {"num_layers": 1, "num_kv_heads": 1, "head_dim": 2, "dtype": "float64"}
"""The smallest layout: four float64 values per token (K and V, two dims)."""


def shadow_config(settings: Mapping[str, Any], tmp: str | Path) -> KVFlowConfig:
    """A model-based test's config: `settings` (a disk tier only below a cpu one) over
    the shadow's `LAYOUT`, the slab file in `tmp`, recompute dear enough that loads and
    swaps happen, and sequences of up to 64 positions."""
    overrides = dict(settings)
    if overrides["kv.cpu.num_blocks"] == 0:
        overrides["kv.disk.num_blocks"] = 0
    overrides.update(
        {
            "kv.layout": LAYOUT,
            "kv.disk.path": str(Path(tmp) / "slab"),
            "kv.recompute_token_us": 1000.0,
            "scheduler.max_model_len": 64,
        }
    )
    return KVFlowConfig.from_dict({}, overrides)


class ShadowError(AssertionError):
    """A step read KV that is not its own, or a copy's block was written while it ran."""


def prefix_values(tokens: Sequence[int], start: int = 0, h: int = 0) -> list[int]:
    """The shadow KV value of positions `start..` of `tokens`, continuing from `h` (the
    value at `start - 1`, 0 for none)."""
    out = []
    for t in tokens[start:]:
        h = (h * 1_000_003 + int(t) + 1) % _MOD
        out.append(h)
    return out


def sample(value: int) -> int:
    """The token a shadow step samples after a position of value `value` (1..97)."""
    return 1 + value % 97


def _rows(data: torch.Tensor) -> npt.NDArray[np.float64]:
    """A pool tensor as numpy (num_blocks, layers, 2, block_size, heads, dim), sharing
    its memory."""
    return data.numpy()


class Hazards:
    """Device blocks that copies in flight read or write, readable from any thread."""

    def __init__(self, store: KVStore) -> None:
        self.store = store

    def busy_device_blocks(self) -> tuple[set[int], set[int]]:
        """(sources, destinations): device blocks copies in flight read, and write. A
        step may read a source, but write neither, nor read a destination."""
        sources: set[int] = set()
        destinations: set[int] = set()
        for t in list(self.store._inflight.values()):  # one C-level copy: thread-safe
            if t.src_tier == "device":
                sources.update(t.src_slots)
            if t.dst_tier == "device":
                destinations.update(t.dst_slots)
        return sources, destinations


@dataclass
class ShadowStats:
    num_steps: int = 0
    num_positions_checked: int = 0
    num_positions_written: int = 0


class ShadowRunner(ModelRunner):
    """Computes "KV" for each plan entry into the real device tensor and samples from it,
    checking first that every position the entry attends holds its own prefix's value
    and that no block it touches is the source or target of a copy in flight.

    Args:
        store: the store whose device tensor is the KV cache.
        overlap: allow the engine to plan ahead (`supports_overlap`).
        step_s: the duration each step reports.
    """

    name = "shadow"

    def __init__(self, store: KVStore, *, overlap: bool = False, step_s: float = 0.01) -> None:
        assert store.device_storage is not None, "the shadow runner needs real tensors"
        self.store = store
        self.supports_overlap = overlap
        self.step_s = step_s
        self.block_size = store.block_size
        self.kv = _rows(store.device_storage.data)
        self.hazards = Hazards(store)
        self.stats = ShadowStats()
        self._values: dict[int, tuple[RequestState, list[int]]] = {}
        self._lock = threading.Lock()

    def values_of(self, req: RequestState, end: int) -> list[int]:
        """Shadow values of positions `0..end-1` of `req` (cached per request object)."""
        with self._lock:
            entry = self._values.get(id(req))
            if entry is None or entry[0] is not req:
                entry = self._values[id(req)] = (req, [])
            values = entry[1]
        if len(values) < end:
            tokens = req.token_ids
            if len(tokens) < end:
                raise ShadowError(
                    f"{req.request_id}: the plan computes position {end - 1}, but only "
                    f"{len(tokens)} tokens are known"
                )
            values.extend(prefix_values(tokens[:end], len(values), values[-1] if values else 0))
        return values[:end]

    def execute(self, plan: StepPlan) -> StepResult:
        bs = self.block_size
        kv = self.kv
        sources, destinations = self.hazards.busy_device_blocks()
        sampled: list[int | None] = []
        for i, req in enumerate(plan.requests):
            if req.is_finished:  # aborted since the plan: its blocks may be gone
                sampled.append(None)
                continue
            start, n = plan.start_positions[i], plan.num_tokens[i]
            table = plan.block_table(i)
            values = self.values_of(req, start + n)
            read = {table[p // bs] for p in range(start)}
            written = {table[p // bs] for p in range(start, start + n)}
            clash = (read & destinations) | (written & (sources | destinations))
            if clash:
                raise ShadowError(
                    f"step {plan.step_id}: {req.request_id} reads or writes device blocks "
                    f"{sorted(clash)} while a copy writes or reads them"
                )
            for p in range(start):
                got = kv[table[p // bs], 0, :, p % bs, 0, :]
                if got[0, 0] != values[p] or got[1, 1] != values[p]:
                    raise ShadowError(
                        f"step {plan.step_id}: {req.request_id} position {p} in block "
                        f"{table[p // bs]} holds {got[0, 0]:.0f}, its own KV is {values[p]}"
                    )
            for p in range(start, start + n):
                kv[table[p // bs], :, :, p % bs, :, :] = values[p]
            self.stats.num_positions_checked += start
            self.stats.num_positions_written += n
            last = start + n - 1
            sampled.append(sample(values[last]) if plan.samples(i) else None)
        self.stats.num_steps += 1
        return StepResult(sampled, self.step_s)


def expected_output(req: Request) -> list[int]:
    """What the shadow runner generates for `req`, whatever happened on the way."""
    tokens = list(req.prompt_token_ids)
    out: list[int] = []
    h = prefix_values(tokens)[-1]
    stops = set(req.sampling.stop_token_ids or ())
    while len(out) < req.max_new_tokens:
        token = sample(h)
        out.append(token)
        if token in stops:
            break
        h = prefix_values([token], 0, h)[0]
    return out


# -- copies that move real bytes in virtual time ----------------------------------------
@dataclass
class SimPeer:
    """A modelled peer: the blocks it really holds (key -> the tokens up to the end of
    the block), and whether it answers."""

    name: str
    up: bool = True
    keys: dict[int, tuple[int, ...]] = field(default_factory=dict)
    incarnation: bytes = b"\0" * 16


class ShadowCopies(SimCopyEngine):
    """Virtual-time copies (`SimCopyEngine`'s timing) that move real bytes when they
    complete: between the tensor pools, through the slab file (checksummed reads: a
    corrupt or short block fails), and from simulated peers (a block lands only if its
    peer is up and still holds it). At completion it checks that the copy's device and
    cpu blocks still hold the bytes they held at submission (nobody wrote them while
    the copy ran)."""

    def __init__(
        self,
        config: KVConfig,
        device: TensorStorage,
        cpu: TensorStorage | None,
        disk: DiskStorage | None,
        peers: Callable[[str], SimPeer | None] = lambda name: None,
    ) -> None:
        super().__init__(config.transfer)
        self.block_size = config.block_size
        self.device = device
        self.cpu = cpu
        self.disk = disk
        self.peers = peers
        self._snapshots: dict[int, list[tuple[str, int, npt.NDArray[np.float64]]]] = {}
        self.num_failed_blocks = 0

    def _pool(self, tier: str) -> TensorStorage | None:
        return {"device": self.device, "cpu": self.cpu}.get(tier)

    def submit(self, transfer: Transfer, now: float) -> None:
        shots: list[tuple[str, int, npt.NDArray[np.float64]]] = []
        sides = ((transfer.src_tier, transfer.src_slots), (transfer.dst_tier, transfer.dst_slots))
        for tier, slots in sides:
            pool = self._pool(tier)
            if pool is not None:
                shots.extend((tier, s, pool.data[s].numpy().copy()) for s in slots)
        self._snapshots[transfer.transfer_id] = shots
        super().submit(transfer, now)

    def completed(self, now: float) -> list[tuple[Transfer, list[bool]]]:
        out = []
        for t, _ in super().completed(now):
            for tier, slot, before in self._snapshots.pop(t.transfer_id):
                pool = self._pool(tier)
                assert pool is not None
                if not np.array_equal(pool.data[slot].numpy(), before):
                    raise ShadowError(
                        f"{tier} block {slot} was written while {t.direction} copy "
                        f"{t.transfer_id} ran"
                    )
            ok = self._move(t)
            self.num_failed_blocks += len(ok) - sum(ok)
            out.append((t, ok))
        return out

    def _move(self, t: Transfer) -> list[bool]:
        d = t.direction
        if d in ("device_to_cpu", "cpu_to_device"):
            src = self._pool(t.src_tier)
            dst = self._pool(t.dst_tier)
            assert src is not None and dst is not None
            for s, x in zip(t.src_slots, t.dst_slots, strict=True):
                dst.data[x].copy_(src.data[s])
            return [True] * len(t.keys)
        if d == "cpu_to_disk":
            assert self.disk is not None and self.cpu is not None
            cpu_bytes = byte_view(self.cpu.data)
            return self.disk.write_from(
                cpu_bytes, t.src_slots, t.dst_slots, keys=t.keys, depths=t.depths
            )
        if d == "disk_to_device":
            assert self.disk is not None
            return self.disk.read_into(t.src_slots, byte_view(self.device.data), t.dst_slots)
        return self._pull(t)

    def _pull(self, t: Transfer) -> list[bool]:
        assert self.cpu is not None and t.peer is not None
        peer = self.peers(t.peer)
        ok = []
        bs = self.block_size
        rows = _rows(self.cpu.data)
        for key, slot in zip(t.keys, t.dst_slots, strict=True):
            tokens = peer.keys.get(key) if peer is not None and peer.up else None
            ok.append(tokens is not None)
            if tokens is not None:
                values = prefix_values(tokens)
                for j in range(bs):
                    rows[slot, :, :, j, :, :] = values[len(tokens) - bs + j]
        return ok


def corrupt_disk_block(disk: DiskStorage, slot: int) -> None:
    """Overwrite a slab block's bytes behind the store's back (its checksum now fails)."""
    os.pwrite(disk.fd, b"\x5a" * disk.bytes_per_block, disk.block_offset(slot))


def truncate_slab(disk: DiskStorage) -> None:
    """Cut the slab file after its header: every block read is now short."""
    os.ftruncate(disk.fd, disk.data_offset)
