"""Eviction order below device: a chain the device releases is lined up in cpu and disk
to be evicted tail first, as the device's own blocks are, once its copies down land."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass

from kvflow.kv.block_pool import BlockPool
from kvflow.kv.transfer import Transfer


@dataclass(eq=False, slots=True)
class _ReleasedChain:
    """A chain the device released (keys, root first) while some of its blocks were
    still being copied down: lined up below device once the last of them lands."""

    seq: int
    keys: list[int]
    num_waiting: int
    """Its keys still being copied down to cpu or disk."""


class ReleaseOrder:
    """The lower tiers' side of `KVStore.release_device`.

    Args:
        cpu, disk: the store's lower pools (None: not configured).
        inflight_keys: the store's keys being copied into each tier, by tier name;
            read, never changed, here (the store updates its sets in place).
    """

    def __init__(
        self,
        cpu: BlockPool | None,
        disk: BlockPool | None,
        inflight_keys: Mapping[str, set[int]],
    ) -> None:
        self.cpu = cpu
        self.disk = disk
        self._cpu_inflight = inflight_keys["cpu"]
        self._disk_inflight = inflight_keys["disk"]
        self._waiting_chains: dict[int, list[_ReleasedChain]] = {}
        """Key -> the released chains waiting for its copy down to land (see
        `order_below`)."""
        self._release_seq = itertools.count()

    def order_below(self, chain: list[int]) -> None:
        """Line `chain` (keys, root first) up in cpu and disk to be evicted from its tail
        toward its root, as the device releases it (`BlockPool.order_tail_first`: in the
        LRU places its blocks hold, so how recently they were used is unchanged). Its
        blocks entered those tiers one copy at a time, root first: write_through copies
        each block as it is sealed, a later turn's new blocks land after the earlier
        turn's, and a cpu block goes back in line when its copy to disk lands. While any
        of its blocks is still being copied down, the chain waits for the last of those
        copies to land (`on_landed`)."""
        cpu_inflight, disk_inflight = self._cpu_inflight, self._disk_inflight
        if cpu_inflight or disk_inflight:
            waiting = [k for k in chain if k in cpu_inflight or k in disk_inflight]
            if waiting:
                released = _ReleasedChain(next(self._release_seq), chain, len(waiting))
                for key in waiting:
                    self._waiting_chains.setdefault(key, []).append(released)
                return
        self._order_tail_first(chain)

    def on_landed(self, done: list[tuple[Transfer, list[bool]]]) -> None:
        """Line up the released chains whose last copy down was among `done` (in the
        order they were released), now that every copy `done` started has begun."""
        waiting_chains = self._waiting_chains
        if not waiting_chains:
            return
        cpu_inflight, disk_inflight = self._cpu_inflight, self._disk_inflight
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
