"""Who hears which keys each tier of a `KVStore` holds: its listeners, wired into the
pools' key hooks so that a tier nobody listens to pays nothing per change."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Literal, NamedTuple

from kvflow.kv.block_pool import BlockPool, KeyListener
from kvflow.kv.location import TierName


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


class StoreListeners:
    """The listeners of one store's tiers (`KVStore.add_listener`,
    `KVStore.add_key_listeners`), each pool's hook pointed at what listens to it."""

    def __init__(self, pools: Mapping[str, BlockPool | None]) -> None:
        self._pools = pools
        self._listeners: list[BlockListener] = []
        self._key_listeners: list[dict[TierName, KeyListener]] = []

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
