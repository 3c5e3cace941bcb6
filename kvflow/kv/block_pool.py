"""Block accounting for one tier: refcounts, a free list, and a prefix cache with LRU.

Every block is in exactly one of three sets:

- referenced: `ref_counts[b] > 0`, held by one or more requests;
- evictable: unreferenced but holding a cached, keyed block (LRU order, oldest first);
- free: unreferenced and holding nothing worth keeping.

Allocation takes free blocks first, then evicts the least recently used cached block.

A request holds hundreds of blocks and the scheduler takes, hits and releases them a
request at a time, so the per-block state lives in numpy arrays and each call is a few
vectorized operations, not a Python loop over blocks; the LRU order is a
`kvflow.kv.lru.LRUQueue`. Only the key index (a dict from block key to block) is
per-block Python work. `kvflow.kv.pool_integrity` checks that the sets add up.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from itertools import filterfalse, islice, repeat, takewhile

import numpy as np

from kvflow.kv import pool_integrity
from kvflow.kv.block_ids import BlockIds as BlockIds
from kvflow.kv.block_ids import IntArray as IntArray
from kvflow.kv.block_ids import IntegrityError as IntegrityError
from kvflow.kv.block_ids import PrefixMatch as PrefixMatch
from kvflow.kv.block_ids import as_ids as _ids
from kvflow.kv.lru import LRUQueue

MAX_DEPTH = 0xFFFF
"""Block depths (`BlockPool.depths`) saturate here."""
KeyListener = Callable[[bool, list[int]], None]
"""Told `(True, keys)` when keys enter a pool's index, `(False, keys)` when they leave."""


class OutOfBlocksError(RuntimeError):
    """Raised by `allocate` when asked for more blocks than `num_free_blocks`."""


class BlockPool:
    """Refcounts, free list, LRU and key index of `num_blocks` blocks.

    Calls that take block ids expect distinct ids (one request's blocks, one copy's
    slots), as vectorized updates do: an id repeated within one call is a caller's bug
    and leaves the counts wrong (`check_integrity` reports it)."""

    BYTES_PER_BLOCK = 5 * 8 + 2 * 8 + 1 + 2 + 8 + 120
    """RAM per block of a full pool: five int64 arrays, the LRU queue (two int64 slots
    per block), one bool array, one uint16 array, the `block_keys` list's pointer, and
    the key index (a dict entry with its key and slot int objects: ~120 bytes measured
    on CPython 3.11)."""

    @classmethod
    def bytes_needed(cls, num_blocks: int) -> int:
        """RAM a pool of `num_blocks` takes once full (for checks before building one)."""
        return num_blocks * cls.BYTES_PER_BLOCK

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"a block pool needs at least 1 block, got {num_blocks!r}")
        self.num_blocks = num_blocks
        self.ref_counts = np.zeros(num_blocks, dtype=np.int64)
        self.block_keys: list[int | None] = [None] * num_blocks
        self.hit_counts = np.zeros(num_blocks, dtype=np.int64)
        """Prefix hits on each cached block since it was filled."""
        self.depths = np.zeros(num_blocks, dtype=np.uint16)
        """Each keyed block's index in its chain (root 0, saturating at `MAX_DEPTH`; 0
        when unknown), given when it is sealed. The store carries it along with a block's
        copies; a persistent slab's records keep it, so that a restart lines its blocks
        up tail first (`kvflow.kv.persist`)."""
        self._keyed = np.zeros(num_blocks, dtype=np.bool_)
        # The free stack: `_free[:_num_free]`, popped from the end.
        self._free = np.arange(num_blocks - 1, -1, -1, dtype=np.int64)
        self._num_free = num_blocks
        self._lru = LRUQueue(num_blocks)
        """The evictable blocks, least recently used first."""
        self._cached: dict[int, int] = {}
        self.num_evictions = 0
        """Cached blocks evicted to make room (not those `reset_prefix_cache` drops)."""
        self.key_versions = np.zeros(num_blocks, dtype=np.int64)
        """Bumped for a block each time its key leaves the index: a block matched at
        one version still holds that key while its version is unchanged."""
        self.key_listener: KeyListener | None = None
        """Called synchronously with every change of the index (see `KeyListener`); the
        store uses it to publish block events to peers. None costs nothing."""

    # -- queries ---------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks an `allocate` can hand out now (free plus evictable)."""
        return self._num_free + self._lru.num_blocks

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self._num_free - self._lru.num_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def lookup(self, key: int) -> int | None:
        return self._cached.get(key)

    def uncached(self, keys: Iterable[int]) -> list[int]:
        """Those of `keys` no block here holds, in order (a C-speed filter)."""
        return list(filterfalse(self._cached.__contains__, keys))

    def count_prefix(self, keys: Sequence[int], start: int = 0) -> int:
        """How many of `keys[start:]`, in order from `start`, are cached here."""
        found = list(map(self._cached.__contains__, islice(keys, start, None)))
        try:
            return found.index(False)
        except ValueError:
            return len(found)

    def match(
        self, keys: Sequence[int], max_blocks: int, prev: PrefixMatch | None = None
    ) -> PrefixMatch:
        """The blocks holding the leading cached run of `keys[:max_blocks]`. With `prev`
        (an earlier match of the same chain), only the blocks that lost their key since
        and the keys past its end are looked at."""
        cached = self._cached
        max_blocks = min(max_blocks, len(keys))
        if prev is None:
            hits = list(map(cached.get, islice(keys, max_blocks), repeat(-1)))
            with contextlib.suppress(ValueError):  # no miss
                del hits[hits.index(-1) :]
        else:
            hits = prev.block_ids
            if hits:
                changed = self.key_versions[prev.ids] != prev.versions
                if np.count_nonzero(changed):
                    hits = hits[: int(np.argmax(changed))]
            if len(hits) > max_blocks:
                hits = hits[:max_blocks]
            elif len(hits) < max_blocks and keys[len(hits)] in cached:
                hits = hits + list(
                    takewhile(
                        (-1).__ne__,
                        map(cached.get, islice(keys, len(hits), max_blocks), repeat(-1)),
                    )
                )
            if hits is prev.block_ids:
                return prev
        ids = _ids(hits)
        return PrefixMatch(hits, ids, self.key_versions[ids])

    def num_evictable_among(self, block_ids: BlockIds) -> int:
        """How many of these cached blocks would leave the free pool if touched."""
        if not len(block_ids):
            return 0
        return int(np.count_nonzero(self.ref_counts[_ids(block_ids)] == 0))

    def evictable_among(self, block_ids: Sequence[int], min_hits: int = 0) -> list[int]:
        """Those of these blocks that are cached and unreferenced, with at least
        `min_hits` prefix hits, in the order given."""
        if not block_ids:
            return []
        ids = _ids(block_ids)
        mask = (self.ref_counts[ids] == 0) & self._keyed[ids]
        if min_hits:
            mask &= self.hit_counts[ids] >= min_hits
        return ids[mask].tolist()  # type: ignore[no-any-return]

    # -- changes ---------------------------------------------------------------
    def touch(self, block_ids: BlockIds, hit: bool = True) -> None:
        """Take a reference on cached blocks: a prefix hit, or (hit=False) a pin that
        keeps a block from being evicted while a copy reads it."""
        if not len(block_ids):
            return
        ids = _ids(block_ids)
        refs = self.ref_counts[ids]
        idle = ids[refs == 0]
        if len(idle):
            # (np.count_nonzero is a plain C call; ndarray.all() goes through Python.)
            if np.count_nonzero(self._keyed[idle]) < len(idle):
                raise IntegrityError(f"touched free blocks {idle[~self._keyed[idle]][:5]}")
            self._lru.remove(idle)
        self.ref_counts[ids] = refs + 1
        if hit:
            self.hit_counts[ids] += 1

    def allocate(self, num_blocks: int) -> list[int]:
        """Hand out `num_blocks` fresh blocks, each with one reference."""
        num_free = self._num_free
        if num_blocks > num_free + self._lru.num_blocks:
            raise OutOfBlocksError(
                f"asked for {num_blocks} blocks, {self.num_free_blocks} are free"
            )
        if num_blocks <= 0:
            return []
        if num_blocks == 1:  # a decode's next block: no array work
            if num_free:
                b = self._free.item(num_free - 1)
                self._num_free = num_free - 1
            else:  # `_drop_keys` in scalar steps, for the least recently used block
                b = self._lru.pop_one()
                self._keyed[b] = False
                self.num_evictions += 1
                self.key_versions[b] += 1
                key = self.block_keys[b]
                del self._cached[key]  # type: ignore[arg-type]
                self.block_keys[b] = None
                if self.key_listener is not None:
                    self.key_listener(False, [key])  # type: ignore[list-item]
            self.ref_counts[b] = 1
            self.hit_counts[b] = 0
            return [b]
        num_fresh = min(num_blocks, num_free)
        out = self._free[num_free - num_fresh : num_free].copy()
        self._num_free = num_free - num_fresh
        if num_fresh < num_blocks:
            evicted = self._drop_keys(self._lru.pop(num_blocks - num_fresh))
            out = np.concatenate((out, evicted))
            self.num_evictions += num_blocks - num_fresh
        self.ref_counts[out] = 1
        self.hit_counts[out] = 0
        return out.tolist()  # type: ignore[no-any-return]

    def _drop_keys(self, out: IntArray) -> IntArray:
        """Evicted blocks (popped from the LRU) leave the index."""
        self._keyed[out] = False
        self.key_versions[out] += 1
        cached = self._cached
        block_keys = self.block_keys
        dropped: list[int] = []
        for b in out.tolist():
            key = block_keys[b]
            del cached[key]
            block_keys[b] = None
            dropped.append(key)
        if self.key_listener is not None and dropped:
            self.key_listener(False, dropped)
        return out

    def _push_free(self, ids: IntArray) -> None:
        n = self._num_free
        self._free[n : n + len(ids)] = ids
        self._num_free = n + len(ids)

    def seal(self, block_id: int, key: int, depth: int = 0) -> bool:
        """Register a full, computed block under its key, at `depth` in its chain (0:
        the root, or unknown). Returns False when another block already holds that key
        (computed twice in one step); the duplicate stays unkeyed and returns to the
        free list when released."""
        if key in self._cached:
            return self._cached[key] == block_id
        self._cached[key] = block_id
        self.depths[block_id] = min(depth, MAX_DEPTH)
        self.block_keys[block_id] = key
        self._keyed[block_id] = True
        if self.key_listener is not None:
            self.key_listener(True, [key])
        return True

    def seal_many(
        self,
        block_ids: Sequence[int],
        keys: Sequence[int],
        first_depth: int | None = None,
        depths: Sequence[int] = (),
    ) -> list[int]:
        """`seal` each block under its key, in order, at its depth in its chain: with
        `first_depth` the blocks are a run of one chain, the first at that depth; with
        `depths`, each block's own; with neither, their depths are unknown (0). Returns
        the blocks that hold their key afterwards (those for which `seal` returns
        True)."""
        cached = self._cached
        num_before = len(cached)
        if cached.keys().isdisjoint(keys):
            cached.update(zip(keys, block_ids, strict=True))
            if len(cached) - num_before != len(keys):  # a key twice: undo, go one by one
                for key in keys:
                    cached.pop(key, None)
        if len(cached) - num_before != len(keys):  # some key was cached already
            if not len(depths):
                n = len(keys)
                depths = [0] * n if first_depth is None else range(first_depth, first_depth + n)
            sealed = zip(block_ids, keys, depths, strict=True)
            return [b for b, key, depth in sealed if self.seal(b, key, depth)]
        if len(depths):
            self._index(block_ids, keys, np.minimum(np.asarray(depths, dtype=np.int64), MAX_DEPTH))
        elif first_depth is None:
            self._index(block_ids, keys, 0)
        else:
            run_depths = np.arange(first_depth, first_depth + len(keys))
            self._index(block_ids, keys, np.minimum(run_depths, MAX_DEPTH))
        return list(block_ids)

    def _index(self, block_ids: Sequence[int], keys: Sequence[int], depths: IntArray | int) -> None:
        """Mark blocks that `_cached` now holds under `keys` as keyed, at `depths`."""
        block_keys = self.block_keys
        for b, key in zip(block_ids, keys, strict=True):
            block_keys[b] = key
        ids = _ids(block_ids)
        self._keyed[ids] = True
        self.depths[ids] = depths
        if self.key_listener is not None and keys:
            self.key_listener(True, list(keys))

    def adopt(
        self, block_ids: Sequence[int], keys: Sequence[int], depths: Sequence[int] = ()
    ) -> None:
        """Index free blocks that already hold data (a persistent disk tier's recovered
        blocks) under their distinct `keys` (at `depths` in their chains, when given),
        as cached, unreferenced blocks: evictable, the first of them first."""
        if not len(block_ids):
            return
        ids = _ids(block_ids)
        free = self._free[: self._num_free]
        taken = np.isin(free, ids)
        if np.count_nonzero(taken) != len(ids) or len(set(keys)) != len(keys):
            raise IntegrityError("adopt takes distinct free blocks under distinct keys")
        if not self._cached.keys().isdisjoint(keys):
            raise IntegrityError("adopt: a key is cached already")
        rest = free[~taken]
        self._free[: len(rest)] = rest
        self._num_free = len(rest)
        self.seal_many(block_ids, keys, depths=depths)
        self._lru.push(ids)

    def release(self, block_ids: Sequence[int]) -> None:
        """Drop one reference on each block. Tail blocks are released first, so a
        prefix's root is the last of its blocks to be evicted."""
        if not len(block_ids):
            return
        ids = _ids(block_ids)[::-1]
        refs = self.ref_counts[ids] - 1
        if np.count_nonzero(refs < 0):
            bad = ids[refs < 0]
            raise IntegrityError(f"blocks {bad[:5].tolist()} released more often than referenced")
        self.ref_counts[ids] = refs
        idle = ids[refs == 0]
        if not len(idle):
            return
        keyed = self._keyed[idle]
        num_keyed = np.count_nonzero(keyed)
        if num_keyed == len(idle):
            self._lru.push(idle)
        else:
            self._push_free(idle[~keyed])
            if num_keyed:
                self._lru.push(idle[keyed])

    def order_tail_first(self, block_ids: BlockIds) -> None:
        """Line up these blocks (distinct, in chain order: root first) to be evicted tail
        first, in the places in the LRU they hold now: the chain keeps its places (how
        recently it was used), its last block takes the oldest and its root the newest.
        For blocks that entered the LRU one at a time, root first (a lower tier's copies
        landing). Blocks that are referenced or not cached keep out of it."""
        self._lru.order_tail_first(block_ids)

    def forget(self, block_ids: Iterable[int]) -> None:
        """Drop these referenced blocks' keys from the index (their contents are bad);
        each returns to the free list, not the LRU, when released."""
        dropped: list[int] = []
        for b in block_ids:
            key = self.block_keys[b]
            if key is not None:
                del self._cached[key]
                self.block_keys[b] = None
                self._keyed[b] = False
                self.key_versions[b] += 1
                dropped.append(key)
        if self.key_listener is not None and dropped:
            self.key_listener(False, dropped)

    def reset_prefix_cache(self) -> int:
        """Forget every unreferenced cached block; returns how many were dropped."""
        dropped = self._lru.num_blocks
        if dropped:
            self._push_free(self._drop_keys(self._lru.pop(dropped)))
        self._lru.clear()
        return dropped

    def check_integrity(self, expected_refs: Sequence[int] | None = None) -> None:
        """Raise `IntegrityError` when the sets or the index disagree. With
        `expected_refs`, also check every refcount against an outside count."""
        pool_integrity.check_pool(self, expected_refs)

    def free_list(self) -> list[int]:
        """The free blocks, next to be handed out last (for integrity checks)."""
        return self._free[: self._num_free].tolist()  # type: ignore[no-any-return]
