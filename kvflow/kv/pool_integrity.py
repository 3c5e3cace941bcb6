"""A block pool's invariants (`BlockPool.check_integrity`): every block is referenced,
free or evictable, exactly one of them; the LRU, the free list, the keys and the index
agree; optionally each refcount matches an outside count. Read from the pool's own
state: this module is its checker, not a user of it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from kvflow.kv.block_ids import IntegrityError

if TYPE_CHECKING:
    from kvflow.kv.block_pool import BlockPool


def check_pool(pool: BlockPool, expected_refs: Sequence[int] | None = None) -> None:
    """Raise `IntegrityError` when the pool's sets or its index disagree. With
    `expected_refs`, also check every refcount against that outside count."""
    problems: list[str] = []
    free_list = pool.free_list()
    free = set(free_list)
    lru = pool._lru
    live = lru.live()
    evictable = set(live)
    if len(free) != len(free_list):
        problems.append("a block is on the free list twice")
    if len(evictable) != len(live) or len(live) != lru.num_blocks:
        problems.append(
            f"the LRU holds {len(live)} live entries for {len(evictable)} blocks, "
            f"{lru.num_blocks} counted"
        )
    if free & evictable:
        problems.append(f"blocks both free and evictable: {sorted(free & evictable)[:5]}")
    ref_counts = pool.ref_counts.tolist()
    block_keys = pool.block_keys
    keyed = pool._keyed
    index = pool._cached
    for b in range(pool.num_blocks):
        ref = ref_counts[b]
        key = block_keys[b]
        if ref < 0:
            problems.append(f"block {b} has refcount {ref}")
        if ref == 0 and b not in free and b not in evictable:
            problems.append(f"block {b} is unreferenced but neither free nor evictable")
        if ref > 0 and (b in free or b in evictable):
            problems.append(f"block {b} is referenced ({ref}) but free or evictable")
        if b not in evictable and lru.positions[b] != -1:
            problems.append(f"block {b} has an LRU position but is not evictable")
        if b in evictable and key is None:
            problems.append(f"evictable block {b} has no key")
        if b in free and key is not None:
            problems.append(f"free block {b} still has key {key}")
        if (key is not None) != bool(keyed[b]):
            problems.append(f"block {b}: keyed flag disagrees with its key {key}")
        if key is not None and index.get(key) != b:
            problems.append(f"block {b} has key {key} that the index maps elsewhere")
        if expected_refs is not None and expected_refs[b] != ref:
            problems.append(f"block {b} has refcount {ref}, requests hold {expected_refs[b]}")
    if len(index) != sum(k is not None for k in block_keys):
        problems.append("the index and the block keys disagree on the number of cached blocks")
    if problems:
        raise IntegrityError("; ".join(problems[:10]))
