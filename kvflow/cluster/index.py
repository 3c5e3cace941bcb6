"""A router's index of which instance holds which block, built from block events."""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

from kvflow.kv.block_pool import KeyListener
from kvflow.kv.store import BlockEvent, TierName

_TIERS: dict[TierName, int] = {"device": 0, "cpu": 1, "disk": 2}


class PrefixIndex(ABC):
    """Who holds which block, as a router reads it: `BlockIndex` in a simulated fleet,
    a peer directory in a router process (`kvflow.cluster.live`)."""

    num_instances: int
    num_blocks: list[int]
    """Blocks each instance holds, its caches' fill as the index sees it (`BlockIndex`
    counts a key once per tier holding it; the peer directory counts distinct keys)."""

    @abstractmethod
    def prefix_runs(self, keys: Sequence[int]) -> list[int]:
        """How many leading blocks of `keys` each instance holds."""


class BlockIndex(PrefixIndex):
    """Block key -> the instances holding it (in any tier), fed by each instance's
    `BlockEvent` stream (`apply`). The index is advisory, like the peer directory it
    stands for: an instance may have dropped a block since it said so.

    Each instance's tiers are sets of keys, so an event is one set update over its
    keys (run by the interpreter's C code, not a Python loop per key). A simulated
    fleet feeds it through `key_listeners` (the same changes without `BlockEvent`
    objects); `listener` takes the events themselves.

    Args:
        num_instances: instances are numbered 0..num_instances-1.
    """

    def __init__(self, num_instances: int) -> None:
        self.num_instances = num_instances
        self._tiers: list[tuple[set[int], set[int], set[int]]] = [
            (set(), set(), set()) for _ in range(num_instances)
        ]
        self.num_blocks = [0] * num_instances
        """Blocks each instance holds, summed over its tiers (a key in two tiers counts
        twice): its caches' fill, as the index sees it."""

    def listener(self, instance: int) -> Callable[[BlockEvent], None]:
        """A callable for an instance's `BlockEvent`s (`KVStore.add_listener`)."""
        return functools.partial(self.apply, instance)

    def key_listeners(self, instance: int) -> dict[TierName, KeyListener]:
        """The same feed at less cost per change (`KVStore.add_key_listeners`): each
        tier's ``(stored, keys)`` straight into that tier's set."""
        tiers = self._tiers[instance]
        return {name: _key_feed(tiers[t], self.num_blocks, instance) for name, t in _TIERS.items()}

    def apply(self, instance: int, event: BlockEvent) -> None:
        """Learn one event of `instance`'s stream (in order, none missed: the fleet's
        listeners are synchronous).

        Raises:
            ValueError: an unknown tier.
        """
        tier = _TIERS.get(event.tier)
        if tier is None:
            raise ValueError(f"block event of an unknown tier {event.tier!r}")
        _key_feed(self._tiers[instance][tier], self.num_blocks, instance)(
            event.kind == "stored", event.keys
        )

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
            if c or k:
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
            else:  # its lower tiers hold nothing (or it has none): the device's set alone
                # (a loop of its own: the loop above, two empty-set lookups per probe
                # more, costs a fleet replay 0.35% more instructions, 2026-12-06)
                if first not in d:
                    continue
                lo, hi = 1, n
                while lo < hi:
                    mid = (lo + hi + 1) // 2
                    if keys[mid - 1] in d:
                        lo = mid
                    else:
                        hi = mid - 1
            runs[i] = lo
        return runs

    def __len__(self) -> int:
        """Distinct keys held anywhere."""
        return len(set().union(*(s for tiers in self._tiers for s in tiers)))


def _key_feed(
    held: set[int], counts: list[int], instance: int
) -> Callable[[bool, Sequence[int]], None]:
    """One tier of one instance: its keys as they enter and leave (`held`), and the
    instance's count (a closure: called for every change, it costs less than an object's
    `__call__`)."""
    store, drop = held.update, held.difference_update

    def feed(stored: bool, keys: Sequence[int]) -> None:
        before = len(held)
        if stored:
            store(keys)
        else:
            drop(keys)
        counts[instance] += len(held) - before

    return feed
