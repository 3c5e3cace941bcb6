"""The tiered KV store the scheduler and policies talk to.

Three tiers, each a `BlockPool` (refcounts, free list, LRU of cached blocks, key index):
device (the working set the runner reads and writes), cpu (hot cache) and disk (large
cache). `locate` answers where a prefix lives. Blocks move down when they go cold or as
soon as they are computed (the write policy), and up when a request hits them below
device (`start_load`). Copies are `Transfer`s carried out by a `CopyEngine`; while a
copy runs, its source blocks are pinned (cannot be evicted) and its destination blocks
are neither indexed nor reusable, so a block is never read before its copy ends.
Beside it: its cost model (`costs`), eviction order below device (`release_order`),
listeners, lookups below device (`lookup`), construction (`store_setup`) and pins.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, cast

from kvflow.config import KVConfig
from kvflow.kv.block_pool import BlockPool, KeyListener
from kvflow.kv.costs import TransferCosts
from kvflow.kv.engine_pair import EnginePair
from kvflow.kv.listeners import BlockEvent, BlockListener, StoreListeners
from kvflow.kv.location import TIERS, PrefixLocation, TierName
from kvflow.kv.lookup import find_below, find_remote
from kvflow.kv.release_order import ReleaseOrder
from kvflow.kv.remote import RemoteRun, RemoteTier
from kvflow.kv.store_integrity import count_pins
from kvflow.kv.store_setup import adopt_recovered, allocate_tensor_tiers, check_store_config
from kvflow.kv.store_stats import StoreStats
from kvflow.kv.transfer import PEER_DIRECTION, CopyEngine, Direction, SimCopyEngine, Transfer

if TYPE_CHECKING:
    import torch

    from kvflow.kv.storage import DiskStorage, TensorStorage

__all__ = ["TIERS", "BlockEvent", "BlockListener", "KVStore", "StoreStats", "TierName"]


class KVStore:
    """Block pools for every configured tier, their index, and the copies between them.

    Args:
        config: tier capacities, layout, write and load policies.
        engine: carries out copies; the virtual-time `SimCopyEngine` when omitted.
        device_storage, cpu_storage, disk_storage: real block bytes, when a runner
            needs them (see `with_tensors`); the simulator runs without.

    Raises:
        CapacityError: the pools' bookkeeping would not fit in available RAM.
        SlabPathError: `kv.disk.path` names something a real store would refuse
            (checked without a slab too, so a simulated run is refused alike).
        ConfigError: `kv.disk.persist` without a real slab (`disk_storage`).
    """

    def __init__(
        self,
        config: KVConfig,
        engine: CopyEngine | None = None,
        *,
        device_storage: TensorStorage | None = None,
        cpu_storage: TensorStorage | None = None,
        disk_storage: DiskStorage | None = None,
    ) -> None:
        check_store_config(config, device_storage, disk_storage)
        num_cpu = config.tier_blocks("cpu")
        num_disk = config.tier_blocks("disk")
        self.config = config
        self.block_size = config.block_size
        self.bytes_per_block = config.bytes_per_block()
        self.device = BlockPool(config.tier_blocks("device"))
        self.cpu: BlockPool | None = BlockPool(num_cpu) if num_cpu else None
        self.disk: BlockPool | None = BlockPool(num_disk) if num_disk and num_cpu else None
        self.engine = engine if engine is not None else SimCopyEngine(config.transfer)
        self.device_storage = device_storage
        self.cpu_storage = cpu_storage
        self.disk_storage = disk_storage
        self.stats = StoreStats()
        self.remote: RemoteTier | None = None
        """Blocks held by peers (hints), asked after the local tiers by `locate`."""
        self._pools: dict[str, BlockPool | None] = {
            "device": self.device,
            "cpu": self.cpu,
            "disk": self.disk,
        }
        self._inflight: dict[int, Transfer] = {}
        self._inflight_keys: dict[str, set[int]] = {"device": set(), "cpu": set(), "disk": set()}
        self._release_order = ReleaseOrder(self.cpu, self.disk, self._inflight_keys)
        self._listeners = StoreListeners(self._pools)
        self._engines = EnginePair(self.engine)
        self.export_pins: dict[str, dict[int, int]] = {"device": {}, "cpu": {}, "disk": {}}
        """Slot -> pins held by transfers to peers (`kvflow.kv.export`), per tier."""
        policy = config.write_policy
        self.write_through = policy == "write_through"
        self.selective = policy == "write_through_selective"
        self._threshold = config.write_through_threshold
        sim_engine = self.engine if isinstance(self.engine, SimCopyEngine) else None
        self.costs = TransferCosts(config, sim_engine or SimCopyEngine(config.transfer))
        """What moves cost against recomputing (`should_load`, `should_pull`,
        `swap_is_cheaper`)."""
        if disk_storage is not None and self.disk is not None:
            adopt_recovered(disk_storage, self.disk, self.stats)

    @classmethod
    def with_tensors(
        cls,
        config: KVConfig,
        device: str | torch.device = "cpu",
        max_workers: int = 2,
        model_id: str = "",
    ) -> KVStore:
        """A store with real tensor pools (and a slab file for disk) and threaded copies.
        `model_id` (the weights' identity, `peer.model_id`) keys a persistent slab
        (`kv.disk.persist`), whose surviving blocks the disk tier starts with.

        Raises:
            ConfigError: `kv.disk.persist` without a `model_id`.
            CapacityError: a tier larger than the memory or disk that would hold it.
            SlabPathError: `kv.disk.path` is not a slab kvflow may use.
        """
        engine, dev, cpu, disk = allocate_tensor_tiers(config, device, max_workers, model_id)
        return cls(config, engine, device_storage=dev, cpu_storage=cpu, disk_storage=disk)

    @property
    def has_lower_tiers(self) -> bool:
        return self.cpu is not None

    def add_listener(self, listener: BlockListener) -> None:
        """See `StoreListeners.add_listener`."""
        self._listeners.add_listener(listener)

    def remove_listener(self, listener: BlockListener) -> None:
        self._listeners.remove_listener(listener)

    def add_key_listeners(self, listeners: Mapping[TierName, KeyListener]) -> None:
        """See `StoreListeners.add_key_listeners`."""
        self._listeners.add_key_listeners(listeners)

    def close(self) -> None:
        self.engine.close()
        if self.disk_storage is not None:
            self.disk_storage.close()

    # -- where prefixes live ---------------------------------------------------------
    def locate(self, block_keys: Sequence[int], num_device: int | None = None) -> PrefixLocation:
        """The cached run of leading blocks with these keys: first those on device, then
        those below it, each counted in the fastest lower tier that holds it. Pass
        `num_device` when the device run is known (from `BlockPool.match`)."""
        d = self.device.count_prefix(block_keys) if num_device is None else num_device
        if d == len(block_keys) or (self.cpu is None and self.remote is None):
            return PrefixLocation(device_tokens=d * self.block_size)
        num_cpu, num_disk = (
            find_below(self.cpu, self.disk, block_keys, d, len(block_keys))
            if self.cpu is not None
            else (0, 0)
        )
        bs = self.block_size
        location = PrefixLocation(
            device_tokens=d * bs, cpu_tokens=num_cpu * bs, disk_tokens=num_disk * bs
        )
        end = d + num_cpu + num_disk
        if self.remote is None or end == len(block_keys):
            return location
        run = self.remote.longest_run(block_keys, end)
        if run is None:
            return location
        return location._replace(peer_tokens=run.num_blocks * bs, peer=run.peer)

    def find_below(
        self, block_keys: Sequence[int], start: int, max_blocks: int
    ) -> list[tuple[TierName, int]]:
        """(tier, slot) of the run of blocks `start..` that lower tiers hold, at most up to
        `max_blocks`; each block from the fastest tier holding it."""
        slots: list[tuple[TierName, int]] = []
        if self.cpu is not None:
            find_below(self.cpu, self.disk, block_keys, start, max_blocks, slots)
        return slots

    def find_remote(
        self, block_keys: Sequence[int], start: int, max_blocks: int
    ) -> RemoteRun | None:
        """The run of blocks `start..` (at most up to `max_blocks`) a peer holds by the
        remote tier's hints, capped at what the cpu tier can take in now."""
        return find_remote(self.remote, self.cpu, block_keys, start, max_blocks)

    # -- moving blocks up -------------------------------------------------------------
    def start_load(
        self,
        sources: Sequence[tuple[TierName, int]],
        keys: Sequence[int],
        device_blocks: Sequence[int],
        now: float,
    ) -> list[Transfer]:
        """Copy lower-tier blocks into freshly allocated `device_blocks` (the caller holds
        them). The device index learns each key when its copy completes."""
        by_tier: dict[TierName, tuple[list[int], list[int], list[int]]] = {}
        for (tier, slot), key, dst in zip(sources, keys, device_blocks, strict=True):
            src_slots, dst_slots, tier_keys = by_tier.setdefault(tier, ([], [], []))
            src_slots.append(slot)
            dst_slots.append(dst)
            tier_keys.append(key)
        transfers = []
        for tier, (src_slots, dst_slots, tier_keys) in by_tier.items():
            direction: Direction = "cpu_to_device" if tier == "cpu" else "disk_to_device"
            pool = self._pool(tier)
            pool.touch(src_slots)  # a hit: pinned until the copy is done
            transfers.append(self._submit(direction, src_slots, dst_slots, tier_keys, now))
        self.stats.num_promoted_blocks += len(device_blocks)
        return transfers

    def start_pull(
        self, peer: str, keys: Sequence[int], now: float, first_depth: int | None = None
    ) -> Transfer | None:
        """Pull the blocks `keys` from `peer` into fresh cpu slots (as many as the cpu
        tier has room for; None when none): the remote tier's engine does it for real,
        else the store's engine models it. The blocks that land intact are indexed in
        cpu (at depths from `first_depth` in their chain, when given) when the transfer
        completes (`poll`); `cpu_slots_of` finds them then."""
        cpu = self._pool("cpu")
        n = min(len(keys), cpu.num_free_blocks)
        if n <= 0:
            return None
        remote = self.remote
        engine = remote.pull_engine if remote is not None else None
        if engine is not None:
            self._engines.pull_engine = engine
        dst = cpu.allocate(n)
        keys = list(keys[:n])
        depths = None if first_depth is None else list(range(first_depth, first_depth + n))
        nbytes = n * self.bytes_per_block
        t = Transfer(PEER_DIRECTION, [], dst, keys, nbytes, now, peer=peer, depths=depths)
        self._inflight[t.transfer_id] = t
        self._inflight_keys["cpu"].update(keys)
        self.stats.num_pulls += 1
        (engine or self.engine).submit(t, now)
        return t

    def cpu_slots_of(self, keys: Sequence[int]) -> list[int]:
        """The cpu slots holding the leading run of `keys` (a pull's landed blocks)."""
        return [] if self.cpu is None else self.cpu.match(keys, len(keys)).block_ids

    # -- moving blocks down -------------------------------------------------------------
    def release_device(self, block_ids: Sequence[int], now: float, *, keep: bool) -> None:
        """Drop a request's references (its blocks in chain order, root first). With
        `keep`, blocks that go cold are copied down to cpu (write_back;
        write_through_selective copies only hot blocks, and write_through copied them
        already), and the chain's blocks in the lower tiers are lined up to be evicted
        tail first, as the device's are, once its copies down have landed."""
        pool = self.device
        pool.release(block_ids)
        if not keep or self.cpu is None:
            return
        if not self.write_through:
            cold = pool.evictable_among(block_ids, self._threshold if self.selective else 0)
            if cold:
                self._copy_down("device_to_cpu", cold, now)
        keys = list(map(pool.block_keys.__getitem__, block_ids))
        with contextlib.suppress(ValueError):  # the chain ends at its first unsealed block
            del keys[keys.index(None) :]
        self._release_order.order_below(cast("list[int]", keys))

    def on_sealed(self, block_id: int, now: float) -> None:
        """A device block was just computed and indexed (write_through copies it now)."""
        if self.write_through and self.cpu is not None:
            self._copy_down("device_to_cpu", [block_id], now)

    def _copy_down(self, direction: Direction, slots: Sequence[int], now: float) -> None:
        src_pool = self._pool("device" if direction == "device_to_cpu" else "cpu")
        dst_tier = "cpu" if direction == "device_to_cpu" else "disk"
        dst_pool = self._pool(dst_tier)
        storage = self.disk_storage
        if dst_tier == "disk" and storage is not None and not storage.enabled:
            return
        inflight = self._inflight_keys[dst_tier]
        src_slots: list[int] = []
        keys: list[int] = []
        for b in slots:
            key = src_pool.block_keys[b]
            if key is None or key in inflight or dst_pool.lookup(key) is not None:
                continue
            src_slots.append(b)
            keys.append(key)
        n = min(len(src_slots), dst_pool.num_free_blocks)
        if n == 0:
            return
        src_slots, keys = src_slots[:n], keys[:n]
        dst_slots = dst_pool.allocate(n)
        src_pool.touch(src_slots, hit=False)
        # A persistent slab's record keeps each block's depth in its chain
        # (`kvflow.kv.persist`); nothing else reads a copy's depths.
        persistent = storage is not None and storage.layout.persistent
        depths = src_pool.depths[src_slots].tolist() if dst_tier == "disk" and persistent else None
        self._submit(direction, src_slots, dst_slots, keys, now, depths)
        if direction == "device_to_cpu":
            self.stats.num_demoted_blocks += n
        else:
            self.stats.num_disk_writes += n

    # -- copies -----------------------------------------------------------------------
    def _pool(self, tier: str) -> BlockPool:
        pool = self._pools[tier]
        if pool is None:
            raise ValueError(f"the {tier} tier is not configured")
        return pool

    def _submit(
        self,
        direction: Direction,
        src_slots: list[int],
        dst_slots: list[int],
        keys: list[int],
        now: float,
        depths: list[int] | None = None,
    ) -> Transfer:
        nbytes = len(keys) * self.bytes_per_block
        t = Transfer(direction, src_slots, dst_slots, keys, nbytes, now, depths=depths)
        self._inflight[t.transfer_id] = t
        self._inflight_keys[t.dst_tier].update(keys)
        self.stats.bytes_moved[direction] += t.num_bytes
        if t.dst_tier == "device":
            self.device.touch(dst_slots, hit=False)  # the copy's own hold on its target
        self.engine.submit(t, now)
        return t

    def poll(self, now: float) -> list[tuple[Transfer, list[bool]]]:
        """Finish the copies done by `now`: index their blocks where they landed, unpin
        sources, and start the next copy down (cpu -> disk). Returns them."""
        done = self._engines.completed(now)
        for t, ok in done:
            self._finish(t, ok, now)
        if done:
            self._release_order.on_landed(done)
        return done

    def _finish(self, t: Transfer, ok: list[bool], now: float) -> None:
        del self._inflight[t.transfer_id]
        dst_tier = t.dst_tier
        self._inflight_keys[dst_tier].difference_update(t.keys)
        if t.peer is not None:
            self._finish_pull(t, ok)
            return
        src_pool = self._pool(t.src_tier)
        dst_pool = self._pool(dst_tier)
        landed: list[int] = []
        depths = src_pool.depths[t.src_slots].tolist()  # each block keeps its depth
        for slot, key, good, depth in zip(t.dst_slots, t.keys, ok, depths, strict=True):
            if good and dst_pool.seal(slot, key, depth):
                landed.append(slot)
        num_bad = len(ok) - sum(ok)
        if num_bad:
            self.stats.num_tier_errors += num_bad
            if t.src_tier == "disk":  # a corrupt or unreadable block: forget it
                src_pool.forget(s for s, g in zip(t.src_slots, ok, strict=True) if not g)
        src_pool.release(t.src_slots)
        dst_pool.release(t.dst_slots)
        if dst_tier == "cpu" and self.disk is not None and landed:
            hits = dst_pool.hit_counts
            hits[t.dst_slots] = src_pool.hit_counts[t.src_slots]
            if self.selective:
                landed = [s for s in landed if hits[s] >= self._threshold]
            if landed:
                self._copy_down("cpu_to_disk", landed, now)

    def _finish_pull(self, t: Transfer, ok: list[bool]) -> None:
        """Index the leading run of pulled blocks that landed intact; the rest of the
        slots go back (a block after a bad one is a miss, never garbage)."""
        cpu = self._pool("cpu")
        n = ok.index(False) if not all(ok) else len(ok)
        first_depth = t.depths[0] if t.depths else None
        landed = cpu.seal_many(t.dst_slots[:n], t.keys[:n], first_depth) if n else []
        self.stats.bytes_moved[PEER_DIRECTION] += len(landed) * self.bytes_per_block
        if n < len(ok):
            self.stats.num_failed_pulls += 1
        cpu.release(t.dst_slots)

    def next_event_time(self) -> float | None:
        """When the next copy finishes in virtual time (None if none or unknown)."""
        return self._engines.next_completion()

    @property
    def num_inflight(self) -> int:
        return len(self._inflight)

    def wait(self, timeout_s: float | None = None) -> None:
        """Block until a copy finishes (real copy engines)."""
        self._engines.wait(timeout_s)

    def drain(self, now: float) -> None:
        """Finish every copy in flight (waiting for real ones). Pulls from peers are
        given up (closing their engine fails them): they run on the caller's loop."""
        self._engines.close_pulls()
        while self._inflight:
            t_next = self.engine.next_completion()
            if t_next is not None:
                now = max(now, t_next)
            else:
                self.engine.wait(1.0)
            self.poll(now)

    # -- invariants ---------------------------------------------------------------------
    def check_integrity(self, expected_device_refs: Sequence[int] | None = None) -> None:
        """Pools' own invariants, plus: every reference is held by a request (counted in
        `expected_device_refs`) or by a copy in flight."""
        pins = count_pins(self._pools, self.export_pins, self._inflight.values())
        if expected_device_refs is not None:
            refs = [a + b for a, b in zip(expected_device_refs, pins["device"], strict=True)]
            self.device.check_integrity(refs)
        else:
            self.device.check_integrity()
        for tier in ("cpu", "disk"):
            pool = self._pools[tier]
            if pool is not None:
                pool.check_integrity(pins[tier])
