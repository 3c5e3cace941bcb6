"""Serving a store's blocks to another instance: the owner's side of a peer pull.

`find_run` re-validates a hint (which of the asked keys this store still holds, from the
fastest tier); `pin` pins that leading run so no block of it is evicted or reused while
its bytes are sent (`pin_run` does both); `read_run` gives the bytes (views straight
into host pools, or a bounce buffer for disk and non-host devices) with each block's
xxh3; `unpin` ends the pins. `held_keys` is the snapshot a peer resyncs from. The store
is single-threaded: call these on the thread that owns it, except `read_run`, which may
run in a worker thread on a pinned run. A run found and sent without the owning thread
running anything else in between (no await, no other thread) needs no pins.

A remote instance sees this store only through these functions and the store's block
events (`KVStore.add_listener`); `kvflow.peer` carries both over the network.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import numpy as np
import numpy.typing as npt
import xxhash

from kvflow.kv.store import TIERS, KVStore, TierName

if TYPE_CHECKING:
    from kvflow.kv.block_pool import BlockPool


# Not frozen: a frozen dataclass sets each field through object.__setattr__, one per
# pull served (measured in callgrind, docs/peer.md "What a pull costs").
@dataclass(slots=True)
class HeldRun:
    """The leading run of asked keys that a store holds (pinned, or valid only until
    the store's thread runs something else): block `i` is `keys[i]` at `slots[i]` of
    tier `tiers[i]`."""

    keys: tuple[int, ...]
    tiers: tuple[TierName, ...]
    slots: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.keys)


@dataclass(slots=True)  # not frozen (see HeldRun)
class RunBytes:
    """The bytes of a pinned run's first `len(views)` blocks (a disk block that failed
    its checksum ends the run early), with each block's xxh3 (None: not computed yet,
    see `read_run`)."""

    views: list[memoryview]
    checksums: list[int | None]


def _pools(store: KVStore) -> list[tuple[TierName, BlockPool]]:
    return [(tier, pool) for tier in TIERS if (pool := store._pools[tier]) is not None]


def pin_run(store: KVStore, keys: Sequence[int]) -> HeldRun:
    """Find and pin the leading run of `keys` that `store` holds now."""
    run = find_run(store, keys)
    pin(store, run)
    return run


def find_run(store: KVStore, keys: Sequence[int]) -> HeldRun:
    """The leading run of `keys` that `store` holds now, each block from the fastest
    tier that holds it; a key it does not hold ends the run. Not pinned (see `pin`)."""
    pools = store._pools
    for tier in TIERS:  # the common case first: the whole run in one tier
        pool = pools[tier]
        if pool is None:
            continue
        slots = tuple(map(pool._cached.get, keys))
        if None not in slots:
            return HeldRun(tuple(keys), (tier,) * len(keys), cast("tuple[int, ...]", slots))
        if slots.count(None) < len(slots):
            break  # some blocks here, some not: block by block
    lookups = [(tier, pool._cached.get) for tier, pool in _pools(store)]
    found: list[tuple[int, TierName, int]] = []
    for key in keys:
        for tier, lookup in lookups:
            slot = lookup(key)
            if slot is not None:
                found.append((key, tier, slot))
                break
        else:
            break
    if not found:
        return HeldRun((), (), ())
    run_keys, run_tiers, run_slots = zip(*found, strict=True)
    return HeldRun(run_keys, run_tiers, run_slots)


def pin(store: KVStore, run: HeldRun) -> None:
    """Pin a run `find_run` just returned: its blocks stay put until `unpin`."""
    _change_pins(store, run, +1)


def unpin(store: KVStore, run: HeldRun) -> None:
    """Release the pins `pin` (or `pin_run`) took (exactly once per run)."""
    _change_pins(store, run, -1)


def _change_pins(store: KVStore, run: HeldRun, delta: int) -> None:
    by_tier: dict[TierName, list[int]] = {}
    for tier, slot in zip(run.tiers, run.slots, strict=True):
        by_tier.setdefault(tier, []).append(slot)
    for tier, slots in by_tier.items():
        pool = store._pool(tier)
        pins = store.export_pins[tier]
        if delta > 0:
            pool.touch(slots, hit=False)
        else:
            pool.release(slots)
        for slot in slots:
            n = pins.get(slot, 0) + delta
            if n:
                pins[slot] = n
            else:
                del pins[slot]


class RunReader:
    """Reads pinned runs of one store (byte views of its host pools are made once).

    It keeps the checksum of each host block it was told (`remember`), for as long as
    that block stays cached in its slot: a sealed block's bytes never change, and a
    slot's key version moves on whenever its key is dropped, so a block served again
    (a popular prefix, pulled by many peers) is not hashed again by its owner. The
    puller hashes every block it receives regardless."""

    def __init__(self, store: KVStore) -> None:
        from kvflow.kv.storage import byte_view

        if store.device_storage is None:
            raise ValueError("the store has no block bytes to serve (built without tensors)")
        self.store = store
        self.bytes_per_block = store.bytes_per_block
        self._host: dict[TierName, memoryview] = {}
        device = store.device_storage.data
        if device.device.type == "cpu":
            self._host["device"] = byte_view(device)
        if store.cpu_storage is not None:
            self._host["cpu"] = byte_view(store.cpu_storage.data)
        self._known: dict[TierName, _Known] = {t: _Known() for t in self._host}
        """Per host tier, the blocks hashed before (see `_Known`)."""

    def remember(self, run: HeldRun, i: int, checksum: int) -> None:
        """Block `i` of a run hashes to `checksum` (a host block: kept until its slot's
        key changes)."""
        tier, slot = run.tiers[i], run.slots[i]
        known = self._known.get(tier)
        if known is not None:
            known.versions[slot] = self.store._pool(tier).key_versions.item(slot)
            known.checksums[slot] = checksum
            known.views[slot] = self._view(tier, slot)

    def _view(self, tier: TierName, slot: int) -> memoryview:
        size = self.bytes_per_block
        return self._host[tier][slot * size : (slot + 1) * size]

    def in_host_memory(self, run: HeldRun) -> bool:
        """Whether every block of the run is viewed in place (no disk read, no copy from
        a device), so reading it costs only hashing."""
        return self._host.keys() >= set(run.tiers)

    def read_run(self, run: HeldRun, hash_host: bool = True) -> RunBytes:
        """The run's bytes and checksums; a disk block that fails its checksum (or a
        tier whose bytes cannot be read) ends the run there. Blocking: disk reads and
        hashing release the GIL, so a worker thread may call this.

        With `hash_host=False`, blocks viewed in place in a host pool get no checksum
        (None) here unless one was remembered: a sender hashes each just before sending
        it, overlapping hashing with the transfer of the blocks before (and
        `remember`s it)."""
        views: list[memoryview] = []
        checksums: list[int | None] = []
        digest = xxhash.xxh3_64_intdigest if hash_host else _no_digest
        i = 0
        n = len(run)
        while i < n:
            tier = run.tiers[i]
            if i == 0 and run.tiers.count(tier) == n:  # the common case: all in one tier
                j = n
            else:
                j = i + 1
                while j < n and run.tiers[j] == tier:
                    j += 1
            slots = run.slots[i:j]
            known = self._known.get(tier)
            if known is not None:
                versions = self.store._pool(tier).key_versions
                if list(map(known.versions.get, slots)) == list(map(versions.item, slots)):
                    # All hashed before, none dropped since (a popular prefix served
                    # again): no Python per block.
                    views += map(known.views.__getitem__, slots)
                    checksums += map(known.checksums.__getitem__, slots)
                else:
                    for s in slots:
                        view = self._view(tier, s)
                        views.append(view)
                        if known.versions.get(s) == versions.item(s):
                            checksums.append(known.checksums[s])
                        else:
                            checksums.append(digest(view))
            elif tier == "disk":
                num_good = self._read_disk(slots, views, checksums)
                if num_good < len(slots):
                    break
            else:
                self._read_device(slots, views, checksums)
            i = j
        return RunBytes(views, checksums)

    def _read_disk(
        self, slots: Sequence[int], views: list[memoryview], sums: list[int | None]
    ) -> int:
        disk = self.store.disk_storage
        if disk is None:
            return 0
        size = self.bytes_per_block
        bounce = memoryview(bytearray(len(slots) * size))
        ok = disk.read_into(slots, bounce, range(len(slots)))
        num_good = ok.index(False) if False in ok else len(ok)
        for i in range(num_good):
            checksum = disk.checksums[slots[i]]
            if checksum is None:  # overwritten since the read: not this block any more
                return i
            views.append(bounce[i * size : (i + 1) * size])
            sums.append(checksum)
        return num_good

    def _read_device(
        self, slots: Sequence[int], views: list[memoryview], sums: list[int | None]
    ) -> None:
        """Blocks of a device pool that is not host memory, through a host copy."""
        from kvflow.kv.storage import byte_view

        assert self.store.device_storage is not None
        data = self.store.device_storage.data
        index = np.asarray(slots, dtype=np.int64)
        host = byte_view(data[index].cpu().contiguous())
        size = self.bytes_per_block
        digest = xxhash.xxh3_64_intdigest
        for i in range(len(slots)):
            view = host[i * size : (i + 1) * size]
            views.append(view)
            sums.append(digest(view))


class _Known:
    """The blocks of one host tier hashed before, by slot: the slot's key version when
    hashed (its checksum holds while the version does), the checksum, and a view of
    the slot's bytes (host pools never move, so views are made once per slot)."""

    __slots__ = ("checksums", "versions", "views")

    def __init__(self) -> None:
        self.versions: dict[int, int] = {}
        self.checksums: dict[int, int] = {}
        self.views: dict[int, memoryview] = {}


def _no_digest(view: memoryview) -> None:
    return None


def held_keys(store: KVStore) -> dict[TierName, npt.NDArray[np.uint64]]:
    """Every key each tier holds now, as a sorted uint64 array per tier."""
    out: dict[TierName, npt.NDArray[np.uint64]] = {}
    for tier, pool in _pools(store):
        keys = np.fromiter(pool._cached.keys(), dtype=np.uint64, count=len(pool._cached))
        keys.sort()
        out[tier] = keys
    return out
