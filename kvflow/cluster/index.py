"""A router's index of which instance holds which block, built from block events."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from kvflow.kv.store import BlockEvent

_TIERS = {"device": 0, "cpu": 1, "disk": 2}


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

    Each instance's tiers are sets of keys, so an event is one set update over its
    keys (run by the interpreter's C code, not a Python loop per key).

    Args:
        num_instances: instances are numbered 0..num_instances-1.
    """

    def __init__(self, num_instances: int) -> None:
        self.num_instances = num_instances
        self._tiers: list[tuple[set[int], set[int], set[int]]] = [
            (set(), set(), set()) for _ in range(num_instances)
        ]

    def listener(self, instance: int) -> _Feed:
        """The callable to hand an instance's store (`KVStore.add_listener`)."""
        return _Feed(self._tiers[instance])

    def apply(self, instance: int, event: BlockEvent) -> None:
        """Learn one event of `instance`'s stream (in order, none missed: the fleet's
        listeners are synchronous).

        Raises:
            ValueError: an unknown tier.
        """
        _apply(self._tiers[instance], event)

    @property
    def num_blocks(self) -> list[int]:
        """Blocks each instance holds, summed over its tiers (a key in two tiers counts
        twice): its caches' fill, as the index sees it."""
        return [len(d) + len(c) + len(k) for d, c, k in self._tiers]

    def holders(self, key: int) -> frozenset[int]:
        """The instances said to hold `key`."""
        return frozenset(
            i for i, (d, c, k) in enumerate(self._tiers) if key in d or key in c or key in k
        )

    def prefix_runs(self, keys: Sequence[int]) -> list[int]:
        """How many leading blocks of `keys` each instance holds.

        Found by bisection, a few lookups per instance rather than one per block: keys
        are chained, so an instance holding block p once computed blocks 0..p, and
        stores evict a prefix's tail before its root, so what an instance holds of a
        chain is a leading run (the index is advisory either way)."""
        runs = [0] * self.num_instances
        if not keys:
            return runs
        first = keys[0]
        n = len(keys)
        for i, (d, c, k) in enumerate(self._tiers):
            if not (first in d or first in c or first in k):
                continue
            lo, hi = 1, n
            while lo < hi:
                mid = (lo + hi + 1) // 2
                key = keys[mid - 1]
                if key in d or key in c or key in k:
                    lo = mid
                else:
                    hi = mid - 1
            runs[i] = lo
        return runs

    def __len__(self) -> int:
        """Distinct keys held anywhere."""
        return len(set().union(*(s for tiers in self._tiers for s in tiers)))


def _apply(tiers: tuple[set[int], set[int], set[int]], event: BlockEvent) -> None:
    tier = _TIERS.get(event.tier)
    if tier is None:
        raise ValueError(f"block event of an unknown tier {event.tier!r}")
    if event.kind == "stored":
        tiers[tier].update(event.keys)
    else:
        tiers[tier].difference_update(event.keys)


class _Feed:
    """One instance's event stream into a `BlockIndex`."""

    __slots__ = ("tiers",)

    def __init__(self, tiers: tuple[set[int], set[int], set[int]]) -> None:
        self.tiers = tiers

    def __call__(self, event: BlockEvent) -> None:
        _apply(self.tiers, event)
