"""The LRU queue on its own: oldest first, removal orphans entries, compaction keeps the
order (the pool's model test drives it through `BlockPool` too)."""

from __future__ import annotations

import numpy as np
import pytest

from kvflow.kv.block_ids import IntegrityError, as_ids
from kvflow.kv.lru import LRUQueue


def test_blocks_pop_oldest_first_and_removed_ones_are_skipped() -> None:
    lru = LRUQueue(6)
    lru.push(as_ids([3, 1, 4]))
    lru.push(as_ids([5]))
    lru.remove(as_ids([1]))

    assert lru.num_blocks == 3
    assert lru.live() == [3, 4, 5]
    assert lru.pop_one() == 3
    assert lru.pop(2).tolist() == [4, 5]
    assert lru.num_blocks == 0
    assert lru.positions.tolist() == [-1] * 6


def test_pushing_past_the_end_compacts_and_keeps_the_order() -> None:
    lru = LRUQueue(2)
    lru.push(as_ids([0, 1]))
    for _ in range(5):  # each round orphans 0's entry and appends a fresh one
        lru.remove(as_ids([0]))
        lru.push(as_ids([0]))

    assert lru.tail <= 4
    assert lru.live() == [1, 0]


def test_a_chain_is_lined_up_tail_first_in_the_places_it_holds() -> None:
    lru = LRUQueue(5)
    lru.push(np.array([0, 1, 2, 3, 4]))
    lru.order_tail_first([1, 3, 4])  # root 1, tail 4

    assert lru.live() == [0, 4, 2, 3, 1]


def test_popping_more_than_it_holds_is_an_integrity_error() -> None:
    lru = LRUQueue(3)
    lru.push(as_ids([2]))
    lru.num_blocks = 2  # a miscount, as a bug would leave it
    with pytest.raises(IntegrityError, match="LRU ran out"):
        lru.pop(2)
