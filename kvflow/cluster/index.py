"""A router's index of which instance holds which block, built from block events."""

from __future__ import annotations

from collections.abc import Sequence

from kvflow.kv.store import BlockEvent


class BlockIndex:
    """Block key -> the instances holding it (in any tier), fed by each instance's
    `BlockEvent` stream (`apply`). The index is advisory, like the peer directory it
    stands for: an instance may have dropped a block since it said so.

    Args:
        num_instances: instances are numbered 0..num_instances-1.
    """

    def __init__(self, num_instances: int) -> None:
        self.num_instances = num_instances
        self._holders: dict[int, dict[int, int]] = {}
        """key -> {instance: how many of its tiers hold the key}."""
        self.num_blocks = [0] * num_instances
        """Distinct keys each instance holds (its cache's fill, as the index sees it)."""

    def listener(self, instance: int) -> _Feed:
        """The callable to hand an instance's store (`KVStore.add_listener`)."""
        return _Feed(self, instance)

    def apply(self, instance: int, event: BlockEvent) -> None:
        """Learn one event of `instance`'s stream (in order, none missed: the fleet's
        listeners are synchronous)."""
        holders = self._holders
        if event.kind == "stored":
            num_new = 0
            for key in event.keys:
                tiers = holders.get(key)
                if tiers is None:
                    holders[key] = {instance: 1}
                    num_new += 1
                else:
                    n = tiers.get(instance, 0)
                    tiers[instance] = n + 1
                    num_new += not n
            self.num_blocks[instance] += num_new
        else:
            for key in event.keys:
                tiers = holders.get(key)
                if tiers is None or instance not in tiers:
                    continue  # never learned (e.g. the listener attached late)
                n = tiers[instance] - 1
                if n:
                    tiers[instance] = n
                else:
                    del tiers[instance]
                    self.num_blocks[instance] -= 1
                    if not tiers:
                        del holders[key]

    def holders(self, key: int) -> frozenset[int]:
        """The instances said to hold `key`."""
        return frozenset(self._holders.get(key, ()))

    def prefix_runs(self, keys: Sequence[int]) -> list[int]:
        """How many leading blocks of `keys` each instance holds.

        Found by bisection, a few lookups per instance rather than one per block: keys
        are chained, so an instance holding block p once computed blocks 0..p, and
        stores evict a prefix's tail before its root, so what an instance holds of a
        chain is a leading run (the index is advisory either way)."""
        holders = self._holders
        first = holders.get(keys[0]) if keys else None
        runs = [0] * self.num_instances
        if not first:
            return runs
        for i in first:
            lo, hi = 1, len(keys)
            while lo < hi:
                mid = (lo + hi + 1) // 2
                tiers = holders.get(keys[mid - 1])
                if tiers is not None and i in tiers:
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
