"""A router's index of which instance holds which block, built from block events."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from kvflow.kv.store import BlockEvent

_TIER_BITS = {"device": 0, "cpu": 1, "disk": 2}
_BITS_PER_INSTANCE = len(_TIER_BITS)


class PrefixIndex(ABC):
    """Who holds which block, as a router reads it: `BlockIndex` in a simulated fleet,
    a peer directory in a router process (`kvflow.cluster.live`)."""

    num_instances: int
    num_blocks: list[int]
    """Distinct keys each instance holds (its cache's fill, as the index sees it)."""

    @abstractmethod
    def prefix_runs(self, keys: Sequence[int]) -> list[int]:
        """How many leading blocks of `keys` each instance holds."""


class BlockIndex(PrefixIndex):
    """Block key -> the instances holding it (in any tier), fed by each instance's
    `BlockEvent` stream (`apply`). The index is advisory, like the peer directory it
    stands for: an instance may have dropped a block since it said so.

    Each key maps to one int with a bit per (instance, tier), so an event costs one
    lookup and one store per key.

    Args:
        num_instances: instances are numbered 0..num_instances-1.
    """

    def __init__(self, num_instances: int) -> None:
        self.num_instances = num_instances
        self._holders: dict[int, int] = {}
        self._masks = [
            ((1 << _BITS_PER_INSTANCE) - 1) << (_BITS_PER_INSTANCE * i)
            for i in range(num_instances)
        ]
        self.num_blocks = [0] * num_instances
        """Distinct keys each instance holds (its cache's fill, as the index sees it)."""

    def listener(self, instance: int) -> _Feed:
        """The callable to hand an instance's store (`KVStore.add_listener`)."""
        return _Feed(self, instance)

    def apply(self, instance: int, event: BlockEvent) -> None:
        """Learn one event of `instance`'s stream (in order, none missed: the fleet's
        listeners are synchronous).

        Raises:
            ValueError: an unknown tier.
        """
        tier = _TIER_BITS.get(event.tier)
        if tier is None:
            raise ValueError(f"block event of an unknown tier {event.tier!r}")
        bit = 1 << (_BITS_PER_INSTANCE * instance + tier)
        mask = self._masks[instance]
        holders = self._holders
        get = holders.get
        changed = 0  # keys the instance gained or lost as a whole
        if event.kind == "stored":
            for key in event.keys:
                held = get(key, 0)
                changed += not held & mask
                holders[key] = held | bit
            self.num_blocks[instance] += changed
            return
        for key in event.keys:
            before = get(key, 0)
            if not before & bit:
                continue  # never learned (the listener came later)
            held = before & ~bit
            if held:
                holders[key] = held
            else:
                holders.pop(key, None)
            changed += not held & mask
        self.num_blocks[instance] -= changed

    def holders(self, key: int) -> frozenset[int]:
        """The instances said to hold `key`."""
        held = self._holders.get(key, 0)
        return frozenset(i for i, mask in enumerate(self._masks) if held & mask)

    def prefix_runs(self, keys: Sequence[int]) -> list[int]:
        """How many leading blocks of `keys` each instance holds.

        Found by bisection, a few lookups per instance rather than one per block: keys
        are chained, so an instance holding block p once computed blocks 0..p, and
        stores evict a prefix's tail before its root, so what an instance holds of a
        chain is a leading run (the index is advisory either way)."""
        holders = self._holders
        runs = [0] * self.num_instances
        first = holders.get(keys[0], 0) if keys else 0
        if not first:
            return runs
        n = len(keys)
        for i, mask in enumerate(self._masks):
            if not first & mask:
                continue
            lo, hi = 1, n
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if holders.get(keys[mid - 1], 0) & mask:
                    lo = mid
                else:
                    hi = mid - 1
            runs[i] = lo
        return runs

    def __len__(self) -> int:
        return len(self._holders)


class _Feed:
    """One instance's event stream into a `BlockIndex`."""

    __slots__ = ("index", "instance")

    def __init__(self, index: BlockIndex, instance: int) -> None:
        self.index = index
        self.instance = instance

    def __call__(self, event: BlockEvent) -> None:
        self.index.apply(self.instance, event)
