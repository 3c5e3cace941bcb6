"""Block accounting for one tier: refcounts, a free list, and a prefix cache with LRU.

Every block is in exactly one of three sets:

- referenced: `ref_counts[b] > 0`, held by one or more requests;
- evictable: unreferenced but holding a cached, keyed block (LRU order, oldest first);
- free: unreferenced and holding nothing worth keeping.

Allocation takes free blocks first, then evicts the least recently used cached block.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from itertools import islice


class OutOfBlocksError(RuntimeError):
    """Raised by `allocate` when asked for more blocks than `num_free_blocks`."""


class IntegrityError(AssertionError):
    """A broken invariant of a pool, store or scheduler (a bug, never bad input)."""


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"a block pool needs at least 1 block, got {num_blocks!r}")
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.block_keys: list[int | None] = [None] * num_blocks
        self.hit_counts = [0] * num_blocks
        """Prefix hits on each cached block since it was filled."""
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # a stack
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._cached: dict[int, int] = {}
        self.num_evictions = 0

    # -- queries ---------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks an `allocate` can hand out now (free plus evictable)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free) - len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def lookup(self, key: int) -> int | None:
        return self._cached.get(key)

    def count_prefix(self, keys: Sequence[int], start: int = 0) -> int:
        """How many of `keys[start:]`, in order from `start`, are cached here."""
        found = list(map(self._cached.__contains__, islice(keys, start, None)))
        try:
            return found.index(False)
        except ValueError:
            return len(found)

    def num_evictable_among(self, block_ids: Iterable[int]) -> int:
        """How many of these cached blocks would leave the free pool if touched."""
        return list(map(self.ref_counts.__getitem__, block_ids)).count(0)

    # -- changes ---------------------------------------------------------------
    def touch(self, block_ids: Iterable[int], hit: bool = True) -> None:
        """Take a reference on cached blocks: a prefix hit, or (hit=False) a pin that
        keeps a block from being evicted while a copy reads it."""
        refs = self.ref_counts
        evictable = self._evictable
        for b in block_ids:
            n = refs[b]
            if not n:
                del evictable[b]
            refs[b] = n + 1
        if hit:
            hits = self.hit_counts
            for b in block_ids:
                hits[b] += 1

    def allocate(self, num_blocks: int) -> list[int]:
        """Hand out `num_blocks` fresh blocks, each with one reference."""
        if num_blocks > len(self._free) + len(self._evictable):
            raise OutOfBlocksError(
                f"asked for {num_blocks} blocks, {self.num_free_blocks} are free"
            )
        free = self._free
        num_fresh = min(num_blocks, len(free))
        out = free[len(free) - num_fresh :]
        del free[len(free) - num_fresh :]
        if num_fresh < num_blocks:
            evictable = self._evictable
            block_keys = self.block_keys
            cached = self._cached
            pop = evictable.popitem
            append = out.append
            for _ in range(num_blocks - num_fresh):
                b = pop(False)[0]
                del cached[block_keys[b]]  # type: ignore[arg-type]
                block_keys[b] = None
                append(b)
            self.num_evictions += num_blocks - num_fresh
        refs = self.ref_counts
        hits = self.hit_counts
        for b in out:
            refs[b] = 1
            hits[b] = 0
        return out

    def seal(self, block_id: int, key: int) -> bool:
        """Register a full, computed block under its key. Returns False when another
        block already holds that key (computed twice in one step); the duplicate stays
        unkeyed and returns to the free list when released."""
        if key in self._cached:
            return self._cached[key] == block_id
        self._cached[key] = block_id
        self.block_keys[block_id] = key
        return True

    def seal_many(self, block_ids: Sequence[int], keys: Sequence[int]) -> list[int]:
        """`seal` each block under its key, in order. Returns the blocks that hold their
        key afterwards (those for which `seal` returns True)."""
        cached = self._cached
        if any(map(cached.__contains__, keys)):
            return [b for b, key in zip(block_ids, keys, strict=True) if self.seal(b, key)]
        cached.update(zip(keys, block_ids, strict=True))
        block_keys = self.block_keys
        for b, key in zip(block_ids, keys, strict=True):
            block_keys[b] = key
        return list(block_ids)

    def release(self, block_ids: Sequence[int]) -> None:
        """Drop one reference on each block. Tail blocks are released first, so a
        prefix's root is the last of its blocks to be evicted."""
        refs = self.ref_counts
        keys = self.block_keys
        free_append = self._free.append
        evictable = self._evictable
        for b in reversed(block_ids):
            n = refs[b] - 1
            refs[b] = n
            if n == 0:
                if keys[b] is None:
                    free_append(b)
                else:
                    evictable[b] = None
            elif n < 0:
                raise IntegrityError(f"block {b} released more often than referenced")

    def forget(self, block_ids: Iterable[int]) -> None:
        """Drop these referenced blocks' keys from the index (their contents are bad);
        each returns to the free list, not the LRU, when released."""
        for b in block_ids:
            key = self.block_keys[b]
            if key is not None:
                del self._cached[key]
                self.block_keys[b] = None

    def reset_prefix_cache(self) -> int:
        """Forget every unreferenced cached block; returns how many were dropped."""
        dropped = 0
        while self._evictable:
            b, _ = self._evictable.popitem(last=False)
            key = self.block_keys[b]
            if key is not None:
                del self._cached[key]
                self.block_keys[b] = None
            self._free.append(b)
            dropped += 1
        return dropped

    def check_integrity(self, expected_refs: Sequence[int] | None = None) -> None:
        """Raise `IntegrityError` when the sets or the index disagree. With
        `expected_refs`, also check every refcount against an outside count."""
        free = set(self._free)
        evictable = set(self._evictable)
        problems: list[str] = []
        if len(free) != len(self._free):
            problems.append("a block is on the free list twice")
        if free & evictable:
            problems.append(f"blocks both free and evictable: {sorted(free & evictable)[:5]}")
        for b in range(self.num_blocks):
            ref = self.ref_counts[b]
            key = self.block_keys[b]
            if ref < 0:
                problems.append(f"block {b} has refcount {ref}")
            if ref == 0 and b not in free and b not in evictable:
                problems.append(f"block {b} is unreferenced but neither free nor evictable")
            if ref > 0 and (b in free or b in evictable):
                problems.append(f"block {b} is referenced ({ref}) but free or evictable")
            if b in evictable and key is None:
                problems.append(f"evictable block {b} has no key")
            if b in free and key is not None:
                problems.append(f"free block {b} still has key {key}")
            if key is not None and self._cached.get(key) != b:
                problems.append(f"block {b} has key {key} that the index maps elsewhere")
            if expected_refs is not None and expected_refs[b] != ref:
                problems.append(f"block {b} has refcount {ref}, requests hold {expected_refs[b]}")
        if len(self._cached) != sum(k is not None for k in self.block_keys):
            problems.append("the index and the block keys disagree on the number of cached blocks")
        if problems:
            raise IntegrityError("; ".join(problems[:10]))
