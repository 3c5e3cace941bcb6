"""The tiered KV store the scheduler and policies talk to.

Three tiers, each a `BlockPool` (refcounts, free list, LRU of cached blocks, key index):
device (the working set the runner reads and writes), cpu (hot cache) and disk (large
cache). `locate` answers where a prefix lives. Blocks move down when they go cold or as
soon as they are computed (the write policy), and up when a request hits them below
device (`start_load`). Copies are `Transfer`s carried out by a `CopyEngine`; while a
copy runs, its source blocks are pinned (cannot be evicted) and its destination blocks
are neither indexed nor reusable, so a block is never read before its copy ends.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NamedTuple, cast

from kvflow.config import ConfigError, KVConfig
from kvflow.kv.block_pool import BlockPool, IntegrityError, KeyListener
from kvflow.kv.capacity import check_bookkeeping, check_tensors
from kvflow.kv.location import PrefixLocation
from kvflow.kv.remote import RemoteRun, RemoteTier
from kvflow.kv.slab import SlabLayout, check_slab_path
from kvflow.kv.transfer import (
    DIRECTIONS,
    PEER_DIRECTION,
    CopyEngine,
    Direction,
    SimCopyEngine,
    Transfer,
)

if TYPE_CHECKING:
    import torch

    from kvflow.kv.storage import DiskStorage, TensorStorage

TierName = Literal["device", "cpu", "disk"]
TIERS: tuple[TierName, ...] = ("device", "cpu", "disk")


class BlockEvent(NamedTuple):
    """Keys that entered (`stored`) or left (`dropped`) one tier's index. A block moving
    between tiers is a `stored` in one and, when it leaves the other, a `dropped` there.
    (A NamedTuple: one is made for every change of a listened store's caches.)"""

    kind: Literal["stored", "dropped"]
    tier: TierName
    keys: tuple[int, ...]


BlockListener = Callable[[BlockEvent], None]


def _fan_out(hooks: Sequence[KeyListener]) -> KeyListener:
    def on_keys(stored: bool, keys: list[int]) -> None:
        for hook in hooks:
            hook(stored, keys)

    return on_keys


@dataclass(eq=False, slots=True)
class _ReleasedChain:
    """A chain the device released (keys, root first) while some of its blocks were
    still being copied down: lined up below device once the last of them lands."""

    seq: int
    keys: list[int]
    num_waiting: int
    """Its keys still being copied down to cpu or disk."""


@dataclass(slots=True)
class StoreStats:
    """What moved between tiers. Block counts; bytes per direction."""

    num_promoted_blocks: int = 0
    num_demoted_blocks: int = 0
    num_disk_writes: int = 0
    num_tier_errors: int = 0
    num_disk_blocks_recovered: int = 0
    """Blocks a persistent disk tier found good at start, indexed as cached blocks."""
    num_disk_blocks_dropped: int = 0
    """Blocks a persistent disk tier dropped at start: a torn record, missing bytes (a
    truncated slab) or bytes that fail their checksum."""
    bytes_moved: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys((*DIRECTIONS, PEER_DIRECTION), 0)
    )
    """Bytes per direction; `peer_to_cpu` counts the bytes of pulled blocks that landed."""
    num_pulls: int = 0
    num_failed_pulls: int = 0
    """Pulls that landed fewer blocks than asked (stale hint, bad checksum, peer down)."""


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
        num_cpu = config.tier_blocks("cpu")
        num_disk = config.tier_blocks("disk")
        if device_storage is None:  # with_tensors checked it with the tensors
            check_bookkeeping(config)  # before the pools allocate it
        if disk_storage is None and num_disk and num_cpu and config.disk.persist:
            raise ConfigError(
                "kv.disk.persist=true: the simulator writes no slab, so nothing would "
                "persist; set kv.disk.persist=false for a simulated run"
            )
        if disk_storage is None and num_disk and num_cpu and config.disk.path is not None:
            # No slab here (the simulator), but the path must be one a real store would
            # accept: a run is refused alike whether or not it writes the file.
            check_slab_path(Path(config.disk.path).expanduser(), SlabLayout.of(config, num_disk))
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
        self._waiting_chains: dict[int, list[_ReleasedChain]] = {}
        """Key -> the released chains waiting for its copy down to land (see
        `_order_below`)."""
        self._release_seq = itertools.count()
        self._listeners: list[BlockListener] = []
        self._key_listeners: list[dict[TierName, KeyListener]] = []
        self._pull_engine: CopyEngine | None = None
        """The remote tier's engine, once a pull went through it (real pulls)."""
        self.export_pins: dict[str, dict[int, int]] = {"device": {}, "cpu": {}, "disk": {}}
        """Slot -> pins held by transfers to peers (`kvflow.kv.export`), per tier."""
        policy = config.write_policy
        self.write_through = policy == "write_through"
        self.selective = policy == "write_through_selective"
        self._threshold = config.write_through_threshold
        sim_engine = self.engine if isinstance(self.engine, SimCopyEngine) else None
        self._cost_model = sim_engine or SimCopyEngine(config.transfer)
        if disk_storage is not None and self.disk is not None:
            self._adopt_recovered(disk_storage, self.disk)

    def _adopt_recovered(self, storage: DiskStorage, pool: BlockPool) -> None:
        """Index what a persistent slab held at start as cached disk blocks. No listener
        is attached yet: peers learn these keys from the snapshot (`held_keys`) every
        subscriber gets first, as they learn any key held before they connected."""
        recovered = storage.recovered
        pool.adopt(recovered.slots, recovered.keys, recovered.depths)
        self.stats.num_disk_blocks_recovered = len(recovered.slots)
        self.stats.num_disk_blocks_dropped = recovered.num_dropped

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
        from kvflow.kv.storage import DiskStorage, TensorStorage
        from kvflow.kv.transfer import TensorCopyEngine

        check_tensors(config, device)
        num_cpu = config.tier_blocks("cpu")
        num_disk = config.tier_blocks("disk")
        # The slab first: a refused kv.disk.path fails before any tensor is allocated.
        disk = DiskStorage.create(config, num_disk, model_id) if num_disk and num_cpu else None
        try:
            dev = TensorStorage.allocate(config, config.tier_blocks("device"), device)
            cpu = TensorStorage.allocate(config, num_cpu, "cpu", pin=True) if num_cpu else None
        except BaseException:
            if disk is not None:
                disk.close()
            raise
        engine = TensorCopyEngine(dev, cpu, disk, max_workers=max_workers)
        return cls(config, engine, device_storage=dev, cpu_storage=cpu, disk_storage=disk)

    @property
    def has_lower_tiers(self) -> bool:
        return self.cpu is not None

    def add_listener(self, listener: BlockListener) -> None:
        """Call `listener` synchronously with every change of which keys a tier holds
        (what a peer service publishes to its peers). Listeners must not touch the store."""
        self._listeners.append(listener)
        self._wire_listeners()

    def remove_listener(self, listener: BlockListener) -> None:
        self._listeners.remove(listener)
        self._wire_listeners()

    def add_key_listeners(self, listeners: Mapping[TierName, KeyListener]) -> None:
        """The stream of `add_listener` without its `BlockEvent`s: each tier's changes go
        to that tier's callable as ``(stored, keys)`` (keys: a list the callable must not
        keep), one call less and no object per change. For listeners in the store's own
        process that see every change (a simulated fleet's block index). Listeners must
        not touch the store."""
        self._key_listeners.append(dict(listeners))
        self._wire_listeners()

    def _wire_listeners(self) -> None:
        """Point each pool's hook at what listens to its tier (None: nothing, free)."""
        for tier, pool in self._pools.items():
            if pool is None:
                continue
            hooks = [own[tier] for own in self._key_listeners if tier in own]
            if self._listeners:
                hooks.append(self._tier_listener(tier))  # type: ignore[arg-type]
            pool.key_listener = (
                None if not hooks else hooks[0] if len(hooks) == 1 else _fan_out(hooks)
            )

    def _tier_listener(self, tier: TierName) -> KeyListener:
        def on_keys(stored: bool, keys: list[int]) -> None:
            event = BlockEvent("stored" if stored else "dropped", tier, tuple(keys))
            for listener in self._listeners:
                listener(event)

        return on_keys

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
        num_cpu, num_disk = self._count_below(block_keys, d) if self.cpu is not None else (0, 0)
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

    def _count_below(self, keys: Sequence[int], start: int) -> tuple[int, int]:
        assert self.cpu is not None
        cpu_index = self.cpu._cached
        disk_index = self.disk._cached if self.disk is not None else {}
        num_cpu = num_disk = 0
        for i in range(start, len(keys)):
            key = keys[i]
            if key in cpu_index:
                num_cpu += 1
            elif key in disk_index:
                num_disk += 1
            else:
                break
        return num_cpu, num_disk

    def find_below(
        self, block_keys: Sequence[int], start: int, max_blocks: int
    ) -> list[tuple[TierName, int]]:
        """(tier, slot) of the run of blocks `start..` that lower tiers hold, at most up to
        `max_blocks`; each block from the fastest tier holding it."""
        out: list[tuple[TierName, int]] = []
        if self.cpu is None:
            return out
        cpu_index = self.cpu._cached
        disk_index = self.disk._cached if self.disk is not None else {}
        for i in range(start, min(max_blocks, len(block_keys))):
            key = block_keys[i]
            slot = cpu_index.get(key)
            if slot is not None:
                out.append(("cpu", slot))
                continue
            slot = disk_index.get(key)
            if slot is None:
                break
            out.append(("disk", slot))
        return out

    def find_remote(
        self, block_keys: Sequence[int], start: int, max_blocks: int
    ) -> RemoteRun | None:
        """The run of blocks `start..` (at most up to `max_blocks`) a peer holds by the
        remote tier's hints, capped at what the cpu tier can take in now."""
        remote = self.remote
        if remote is None or self.cpu is None or start >= min(max_blocks, len(block_keys)):
            return None
        run = remote.longest_run(block_keys[:max_blocks], start)
        if run is None:
            return None
        n = min(run.num_blocks, self.cpu.num_free_blocks)
        return run._replace(num_blocks=n) if n > 0 else None

    # -- costs --------------------------------------------------------------------------
    def load_time_s(self, sources: Sequence[tuple[TierName, int]]) -> float:
        """Estimated time to bring these blocks to device."""
        num_cpu = sum(1 for tier, _ in sources if tier == "cpu")
        num_disk = len(sources) - num_cpu
        model = self._cost_model
        t = 0.0
        if num_cpu:
            t += model.duration_s("cpu_to_device", num_cpu * self.bytes_per_block)
        if num_disk:
            t += model.duration_s("disk_to_device", num_disk * self.bytes_per_block)
        return t

    def pull_time_s(self, num_blocks: int) -> float:
        """Estimated time to pull blocks from a peer into cpu and bring them to device."""
        nbytes = num_blocks * self.bytes_per_block
        model = self._cost_model
        return model.duration_s(PEER_DIRECTION, nbytes) + model.duration_s("cpu_to_device", nbytes)

    def should_pull(self, num_blocks: int) -> bool:
        """Whether pulling `num_blocks` from a peer beats recomputing them (load_policy)."""
        policy = self.config.load_policy
        if num_blocks <= 0 or policy == "never":
            return False
        return policy == "always" or self.pull_time_s(num_blocks) < self.recompute_time_s(
            num_blocks
        )

    def recompute_time_s(self, num_blocks: int) -> float:
        return num_blocks * self.block_size * self.config.recompute_token_us * 1e-6

    def should_load(self, sources: Sequence[tuple[TierName, int]]) -> bool:
        policy = self.config.load_policy
        if not sources or policy == "never":
            return False
        if policy == "always":
            return True
        return self.load_time_s(sources) < self.recompute_time_s(len(sources))

    def swap_is_cheaper(self, num_blocks: int) -> bool:
        """Whether demoting and reloading `num_blocks` beats recomputing them."""
        if self.cpu is None or num_blocks == 0:
            return False
        nbytes = num_blocks * self.bytes_per_block
        model = self._cost_model
        swap = model.duration_s("device_to_cpu", nbytes) + model.duration_s("cpu_to_device", nbytes)
        return swap < self.recompute_time_s(num_blocks)

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
            self._pull_engine = engine
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
        if self.cpu is None:
            return []
        index = self.cpu._cached
        out: list[int] = []
        for key in keys:
            slot = index.get(key)
            if slot is None:
                break
            out.append(slot)
        return out

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
        self._order_below(cast("list[int]", keys))

    def _order_below(self, chain: list[int]) -> None:
        """Line `chain` (keys, root first) up in cpu and disk to be evicted from its tail
        toward its root, as the device releases it (`BlockPool.order_tail_first`: in the
        LRU places its blocks hold, so how recently they were used is unchanged). Its
        blocks entered those tiers one copy at a time, root first: write_through copies
        each block as it is sealed, a later turn's new blocks land after the earlier
        turn's, and a cpu block goes back in line when its copy to disk lands. While any
        of its blocks is still being copied down, the chain waits for the last of those
        copies to land (`_on_landed`)."""
        cpu_inflight, disk_inflight = self._inflight_keys["cpu"], self._inflight_keys["disk"]
        if cpu_inflight or disk_inflight:
            waiting = [k for k in chain if k in cpu_inflight or k in disk_inflight]
            if waiting:
                released = _ReleasedChain(next(self._release_seq), chain, len(waiting))
                for key in waiting:
                    self._waiting_chains.setdefault(key, []).append(released)
                return
        self._order_tail_first(chain)

    def _on_landed(self, done: list[tuple[Transfer, list[bool]]]) -> None:
        """Line up the released chains whose last copy down was among `done` (in the
        order they were released), now that every copy `done` started has begun."""
        waiting_chains = self._waiting_chains
        cpu_inflight, disk_inflight = self._inflight_keys["cpu"], self._inflight_keys["disk"]
        ready: list[_ReleasedChain] = []
        for t, _ in done:
            for key in t.keys:
                if key not in waiting_chains or key in cpu_inflight or key in disk_inflight:
                    continue  # (a cpu block's copy to disk may have started)
                for released in waiting_chains.pop(key):
                    released.num_waiting -= 1
                    if not released.num_waiting:
                        ready.append(released)
        ready.sort(key=lambda released: released.seq)
        for released in ready:
            self._order_tail_first(released.keys)

    def _order_tail_first(self, chain: list[int]) -> None:
        for tier in (self.cpu, self.disk):
            if tier is not None:
                tier.order_tail_first([s for s in map(tier._cached.get, chain) if s is not None])

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
        # A disk record keeps each block's depth in its chain (`kvflow.kv.persist`).
        depths = src_pool.depths[src_slots].tolist() if dst_tier == "disk" else None
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
        done = self.engine.completed(now)
        if self._pull_engine is not None:
            done += self._pull_engine.completed(now)
        for t, ok in done:
            self._finish(t, ok, now)
        if done and self._waiting_chains:
            self._on_landed(done)
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
        for slot, key, good in zip(t.dst_slots, t.keys, ok, strict=True):
            if good and dst_pool.seal(slot, key):
                landed.append(slot)
        dst_pool.depths[t.dst_slots] = src_pool.depths[t.src_slots]
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
        t = self.engine.next_completion()
        if self._pull_engine is None:
            return t
        t_pull = self._pull_engine.next_completion()
        return t_pull if t is None else t if t_pull is None else min(t, t_pull)

    @property
    def num_inflight(self) -> int:
        return len(self._inflight)

    def wait(self, timeout_s: float | None = None) -> None:
        """Block until a copy finishes (real copy engines)."""
        pulls = self._pull_engine
        if pulls is not None and pulls.num_pending and not self.engine.num_pending:
            pulls.wait(timeout_s)  # only pulls in flight: wait for them, not spin
        else:
            self.engine.wait(timeout_s)

    def drain(self, now: float) -> None:
        """Finish every copy in flight (waiting for real ones). Pulls from peers are
        given up (closing their engine fails them): they run on the caller's loop."""
        if self._pull_engine is not None:
            self._pull_engine.close()
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
        pins: dict[str, list[int]] = {
            tier: [0] * pool.num_blocks for tier, pool in self._pools.items() if pool
        }
        for tier, slot_pins in self.export_pins.items():
            for slot, num_pins in slot_pins.items():
                pins[tier][slot] += num_pins
        for t in self._inflight.values():
            for s in t.src_slots:
                pins[t.src_tier][s] += 1
            for d in t.dst_slots:
                pins[t.dst_tier][d] += 1
                if self._pool(t.dst_tier).block_keys[d] is not None:
                    raise IntegrityError(
                        f"{t.dst_tier} block {d} is indexed before its copy finished"
                    )
        if expected_device_refs is not None:
            refs = [a + b for a, b in zip(expected_device_refs, pins["device"], strict=True)]
            self.device.check_integrity(refs)
        else:
            self.device.check_integrity()
        for tier in ("cpu", "disk"):
            pool = self._pools[tier]
            if pool is not None:
                pool.check_integrity(pins[tier])
