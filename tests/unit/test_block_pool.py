"""BlockPool against a plain-Python reference model, plus its contract case by case.

The model keeps the three sets of the pool's docstring in the most obvious form: a
refcount per block, a set of free blocks and an OrderedDict LRU (oldest first)."""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Sequence
from itertools import pairwise

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kvflow.kv.block_pool import BlockPool, IntegrityError, OutOfBlocksError, PrefixMatch

MAX_KEY = 24  # a small key space, so seals collide with cached keys and evicted keys return
CHAINS = ([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [0, 1, 2, 20, 21, 22], [5, 6, 7, 8])
"""Key chains that `match` follows; the pool starts with keys 0, 1, 2, ... cached."""


class ModelPool:
    """What a BlockPool should do, without arrays, orphaned entries or compaction."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.block_keys: list[int | None] = [None] * num_blocks
        self.hit_counts = [0] * num_blocks
        self.free = set(range(num_blocks))
        self.lru: OrderedDict[int, None] = OrderedDict()
        self.cached: dict[int, int] = {}
        self.num_evictions = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.free) + len(self.lru)

    def leading_run(self, keys: Sequence[int], max_blocks: int) -> list[int]:
        blocks = []
        for key in keys[:max_blocks]:
            if key not in self.cached:
                break
            blocks.append(self.cached[key])
        return blocks

    def evictable_among(self, block_ids: Sequence[int], min_hits: int = 0) -> list[int]:
        return [b for b in block_ids if b in self.lru and self.hit_counts[b] >= min_hits]

    def allocate(self, num_blocks: int) -> tuple[int, list[int]]:
        """How many blocks come off the free set, and which LRU blocks are evicted."""
        num_fresh = min(num_blocks, len(self.free))
        evicted = list(self.lru)[: num_blocks - num_fresh]
        for b in evicted:
            del self.lru[b]
            self._drop_key(b)
        self.num_evictions += len(evicted)
        return num_fresh, evicted

    def take(self, block_ids: Sequence[int]) -> None:
        """The blocks `allocate` handed out now have one reference and no hits."""
        for b in block_ids:
            self.free.discard(b)
            self.ref_counts[b] = 1
            self.hit_counts[b] = 0

    def touch(self, block_ids: Sequence[int], hit: bool) -> None:
        for b in block_ids:
            self.lru.pop(b, None)
            self.ref_counts[b] += 1
            self.hit_counts[b] += hit

    def release(self, block_ids: Sequence[int]) -> None:
        for b in reversed(block_ids):  # the tail first, so the root is evicted last
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                if self.block_keys[b] is None:
                    self.free.add(b)
                else:
                    self.lru[b] = None

    def seal(self, block_id: int, key: int) -> bool:
        if key in self.cached:
            return self.cached[key] == block_id
        self.cached[key] = block_id
        self.block_keys[block_id] = key
        return True

    def forget(self, block_ids: Sequence[int]) -> None:
        for b in block_ids:
            self._drop_key(b)

    def order_tail_first(self, block_ids: Sequence[int]) -> None:
        """The chain's evictable blocks trade places in the LRU: the last one takes the
        oldest place, the first one the newest."""
        order = list(self.lru)
        chain = [b for b in block_ids if b in self.lru]
        places = sorted(order.index(b) for b in chain)
        for place, b in zip(places, reversed(chain), strict=True):
            order[place] = b
        self.lru = OrderedDict.fromkeys(order)

    def reset_prefix_cache(self) -> int:
        dropped = list(self.lru)
        self.lru.clear()
        for b in dropped:
            self._drop_key(b)
            self.free.add(b)
        return len(dropped)

    def _drop_key(self, block_id: int) -> None:
        key = self.block_keys[block_id]
        if key is not None:
            del self.cached[key]
            self.block_keys[block_id] = None


def in_order_subset(data: st.DataObject, items: Sequence[int]) -> list[int]:
    """A non-empty sub-list of distinct `items`, keeping their order (one draw: a bitmask)."""
    mask = data.draw(st.integers(1, 2 ** len(items) - 1), label="subset")
    return [x for i, x in enumerate(items) if mask >> i & 1]


class BlockPoolMachine(RuleBasedStateMachine):
    """Random calls on a small pool, each mirrored on the model and compared after.

    `holders` are the references requests hold: each a list of distinct blocks in the
    order the request took them, released in that order (or a sub-list of it)."""

    pool: BlockPool
    model: ModelPool

    @initialize(num_blocks=st.integers(1, 12), data=st.data())
    def make_pool(self, num_blocks: int, data: st.DataObject) -> None:
        """A pool whose prefix cache holds most blocks already, so allocations evict."""
        self.pool = BlockPool(num_blocks)
        self.model = ModelPool(num_blocks)
        self.holders: list[list[int]] = []
        self.matches: dict[int, PrefixMatch] = {}  # the last match of each chain
        num_left_free = data.draw(st.integers(0, num_blocks), label="num_left_free")
        block_ids = self.allocate_both(num_blocks - num_left_free)
        self.seal_many_both(block_ids, range(len(block_ids)))
        self.release_both(block_ids)

    # -- helpers -----------------------------------------------------------------
    def held_where(self, unkeyed: bool) -> list[list[int]]:
        """Each holder's blocks that are (un)keyed, for holders that have some."""
        keys = self.model.block_keys
        picked = [[b for b in h if (keys[b] is None) == unkeyed] for h in self.holders]
        return [h for h in picked if h]

    def hold(self, block_ids: list[int]) -> None:
        if block_ids:
            self.holders.append(block_ids)

    def allocate_both(self, num_blocks: int) -> list[int]:
        """Allocate on both; the pool must evict exactly the model's oldest LRU blocks."""
        cached_before = set(self.model.cached)
        free_before = set(self.model.free)
        num_fresh, evicted = self.model.allocate(num_blocks)

        block_ids = self.pool.allocate(num_blocks)

        evicted_keys = {k for k in cached_before if self.pool.lookup(k) is None}
        assert evicted_keys == cached_before - set(self.model.cached)
        assert len(block_ids) == len(set(block_ids)) == num_blocks
        fresh = set(block_ids) - set(evicted)
        assert len(fresh) == num_fresh and fresh <= free_before
        self.model.take(block_ids)
        if evicted:
            event(f"allocate({'1' if num_blocks == 1 else 'n'}) evicted")
        return block_ids

    def seal_many_both(self, block_ids: Sequence[int], keys: Sequence[int]) -> None:
        sealed = [b for b, k in zip(block_ids, keys, strict=True) if self.model.seal(b, k)]
        assert self.pool.seal_many(block_ids, keys) == sealed

    def touch_both(self, block_ids: list[int], hit: bool) -> None:
        self.pool.touch(block_ids, hit=hit)
        self.model.touch(block_ids, hit)

    def release_both(self, block_ids: list[int]) -> None:
        self.pool.release(block_ids)
        self.model.release(block_ids)

    # -- rules -------------------------------------------------------------------
    @rule(data=st.data())
    def allocate(self, data: st.DataObject) -> None:
        num_free = self.model.num_free_blocks
        n = data.draw(
            st.sampled_from([1, num_free, num_free + 1])
            | st.integers(0, self.model.num_blocks + 2),
            label="n",
        )
        if n > num_free:
            with pytest.raises(OutOfBlocksError):
                self.pool.allocate(n)
            return
        self.hold(self.allocate_both(n))

    @precondition(lambda self: self.model.num_free_blocks)
    @rule(data=st.data())
    def prefill(self, data: st.DataObject) -> None:
        """A request's prefill: fresh blocks, all but the last (partial) one sealed."""
        n = data.draw(st.integers(1, self.model.num_free_blocks), label="n")
        block_ids = self.allocate_both(n)
        fresh_keys = [k for k in range(MAX_KEY + 1) if k not in self.model.cached]
        keys = data.draw(st.permutations(fresh_keys), label="keys")[: n - 1]
        self.seal_many_both(block_ids[: n - 1], keys)
        self.hold(block_ids)

    @precondition(lambda self: self.model.cached)
    @rule(data=st.data(), hit=st.booleans())
    def touch(self, data: st.DataObject, hit: bool) -> None:
        block_ids = in_order_subset(data, sorted(self.model.cached.values()))
        block_ids = data.draw(st.permutations(block_ids), label="touched")
        self.touch_both(block_ids, hit)
        self.hold(block_ids)

    @precondition(lambda self: self.holders)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        holder = data.draw(st.sampled_from(self.holders), label="holder")
        released = in_order_subset(data, holder)
        self.release_both(released)
        holder[:] = [b for b in holder if b not in released]
        self.holders = [h for h in self.holders if h]

    @precondition(lambda self: self.held_where(unkeyed=True))
    @rule(data=st.data(), key=st.integers(0, MAX_KEY))
    def seal(self, data: st.DataObject, key: int) -> None:
        held = data.draw(st.sampled_from(self.held_where(unkeyed=True)), label="holder")
        block_id = data.draw(st.sampled_from(held), label="block")
        assert self.pool.seal(block_id, key) == self.model.seal(block_id, key)

    @precondition(lambda self: self.held_where(unkeyed=True))
    @rule(data=st.data())
    def seal_many(self, data: st.DataObject) -> None:
        held = data.draw(st.sampled_from(self.held_where(unkeyed=True)), label="holder")
        block_ids = in_order_subset(data, held)
        num = len(block_ids)
        keys = data.draw(
            st.lists(st.integers(0, MAX_KEY), min_size=num, max_size=num, unique=True),
            label="keys",
        )
        self.seal_many_both(block_ids, keys)

    @precondition(lambda self: self.held_where(unkeyed=False))
    @rule(data=st.data())
    def forget(self, data: st.DataObject) -> None:
        held = data.draw(st.sampled_from(self.held_where(unkeyed=False)), label="holder")
        block_ids = in_order_subset(data, held)
        self.pool.forget(block_ids)
        self.model.forget(block_ids)

    @precondition(lambda self: self.model.lru)
    @rule(data=st.data())
    def order_tail_first(self, data: st.DataObject) -> None:
        """Line up a "chain": any distinct blocks in any order, held, free or evictable."""
        shuffled = data.draw(st.permutations(range(self.model.num_blocks)), label="blocks")
        chain = in_order_subset(data, shuffled)
        self.pool.order_tail_first(chain)
        self.model.order_tail_first(chain)

    @precondition(lambda self: self.model.lru)
    @rule()
    def reset_prefix_cache(self) -> None:
        assert self.pool.reset_prefix_cache() == self.model.reset_prefix_cache()

    @precondition(lambda self: self.model.lru)
    @rule(data=st.data(), rounds=st.integers(1, 40))
    def churn(self, data: st.DataObject, rounds: int) -> None:
        """Hit and release the same cached blocks over and over: each round appends to
        the LRU queue, so it fills and compacts."""
        block_ids = in_order_subset(data, list(self.model.lru))
        compacted = False
        for i in range(rounds):
            tail = self.pool._lru.tail
            self.touch_both(block_ids, hit=i % 2 == 0)
            self.release_both(block_ids)
            compacted |= self.pool._lru.tail < tail + len(block_ids)
            self.check_integrity()
        event("LRU compacted" if compacted else "LRU not compacted")

    @rule(keys=st.lists(st.integers(0, MAX_KEY), max_size=6), start=st.integers(0, 3))
    def count_prefix(self, keys: list[int], start: int) -> None:
        expected = len(self.model.leading_run(keys[start:], len(keys)))
        assert self.pool.count_prefix(keys, start) == expected

    @rule(chain=st.sampled_from(range(len(CHAINS))), max_blocks=st.integers(0, 13))
    def match(self, chain: int, max_blocks: int) -> None:
        """Match a chain again up to `max_blocks`, from its last match: the next
        invariant check extends it again."""
        keys = CHAINS[chain]
        expected = self.model.leading_run(keys, max_blocks)
        assert self.pool.match(keys, max_blocks).block_ids == expected
        found = self.pool.match(keys, max_blocks, self.matches.get(chain))
        assert found.block_ids == found.ids.tolist() == expected
        self.matches[chain] = found

    # -- invariants --------------------------------------------------------------
    @invariant()
    def counts_agree(self) -> None:
        model, pool = self.model, self.pool
        assert pool.num_free_blocks == model.num_free_blocks
        assert pool.num_used_blocks == model.num_blocks - model.num_free_blocks
        assert pool.num_cached_blocks == len(model.cached)
        assert pool.num_evictions == model.num_evictions

    @invariant()
    def blocks_agree(self) -> None:
        assert self.pool.ref_counts.tolist() == self.model.ref_counts
        assert self.pool.hit_counts.tolist() == self.model.hit_counts
        assert self.pool.block_keys == self.model.block_keys
        assert {k: self.pool.lookup(k) for k in range(MAX_KEY + 1)} == {
            k: self.model.cached.get(k) for k in range(MAX_KEY + 1)
        }

    @invariant()
    def evictable_agree(self) -> None:
        everything = list(range(self.model.num_blocks))
        for min_hits in (0, 1, 2):
            expected = self.model.evictable_among(everything, min_hits)
            assert self.pool.evictable_among(everything, min_hits) == expected
        cached_ids = list(self.model.cached.values())
        expected_num = sum(b in self.model.lru for b in cached_ids)
        assert self.pool.num_evictable_among(cached_ids) == expected_num

    @invariant()
    def matches_agree(self) -> None:
        """Every chain's last match, brought up to date after each change, is what a
        fresh match finds."""
        for chain, keys in enumerate(CHAINS):
            expected = self.model.leading_run(keys, len(keys))
            found = self.pool.match(keys, len(keys), self.matches.get(chain))
            assert found.block_ids == found.ids.tolist() == expected
            self.matches[chain] = found

    @invariant()
    def eviction_order_agrees(self) -> None:
        """A copy of the pool, drained one block at a time, evicts in the model's order."""
        probe = copy.deepcopy(self.pool)
        probe.allocate(len(self.model.free))
        evicted = [probe.allocate(1)[0] for _ in range(len(self.model.lru))]
        assert evicted == list(self.model.lru)
        assert probe.num_free_blocks == 0

    @invariant()
    def check_integrity(self) -> None:
        holds = [0] * self.model.num_blocks
        for holder in self.holders:
            for b in holder:
                holds[b] += 1
        self.pool.check_integrity(expected_refs=holds)


BlockPoolMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=30, deadline=None
)
TestBlockPoolMatchesModel = BlockPoolMachine.TestCase


# -- the contract, case by case ----------------------------------------------------------
def cached_blocks(pool: BlockPool, keys: Sequence[int]) -> list[int]:
    """Allocate one block per key, seal each under its key; the blocks stay held."""
    block_ids = pool.allocate(len(keys))
    assert pool.seal_many(block_ids, keys) == block_ids
    return block_ids


def test_release_puts_a_requests_tail_first_in_line_for_eviction() -> None:
    pool = BlockPool(3)
    a, b, c = cached_blocks(pool, [10, 11, 12])
    pool.release([a, b, c])

    assert pool.allocate(1) == [c]
    assert pool.allocate(1) == [b]
    assert pool.allocate(1) == [a]
    assert pool.num_evictions == 3
    assert pool.num_cached_blocks == 0


def test_order_tail_first_lines_a_chain_up_tail_first_in_its_own_places() -> None:
    """A chain whose blocks entered the LRU one at a time, root first (copies landing
    in a lower tier), with another block between them."""
    pool = BlockPool(4)
    a, x, b, c = cached_blocks(pool, [10, 90, 11, 12])
    for block in (a, x, b, c):
        pool.release([block])  # LRU: a, x, b, c

    pool.order_tail_first([a, b, c])  # LRU: c, x, b, a

    assert [pool.allocate(1)[0] for _ in range(4)] == [c, x, b, a]


def test_order_tail_first_leaves_held_and_uncached_blocks_out() -> None:
    pool = BlockPool(4)
    a, b, c = cached_blocks(pool, [10, 11, 12])
    (unkeyed,) = pool.allocate(1)
    for block in (a, b, c):
        pool.release([block])  # LRU: a, b, c
    pool.touch([b])

    pool.order_tail_first([a, b, c, unkeyed])  # LRU: c, a

    assert pool.allocate(2) == [c, a]
    assert pool.lookup(11) == b and pool.num_free_blocks == 0


def test_a_touched_then_released_block_goes_to_the_back_of_the_lru() -> None:
    pool = BlockPool(3)
    a, b, c = cached_blocks(pool, [10, 11, 12])
    pool.release([a, b, c])  # LRU: c, b, a
    pool.touch([c])
    pool.release([c])  # LRU: b, a, c

    assert pool.allocate(2) == [b, a]
    assert pool.lookup(12) == c
    assert pool.lookup(10) is pool.lookup(11) is None


def test_uncached_keeps_the_keys_no_block_holds_in_order() -> None:
    pool = BlockPool(4)
    cached_blocks(pool, [10, 12])
    assert pool.uncached([13, 12, 11, 10, 14]) == [13, 11, 14]
    assert pool.uncached([10, 12]) == []


def test_allocate_takes_free_blocks_before_evicting() -> None:
    pool = BlockPool(4)
    a, b = cached_blocks(pool, [10, 11])
    pool.release([a, b])

    assert set(pool.allocate(2)).isdisjoint({a, b})
    assert pool.num_evictions == 0
    assert pool.num_cached_blocks == 2


def test_allocate_of_one_evicts_when_nothing_is_free() -> None:
    pool = BlockPool(2)
    a, b = cached_blocks(pool, [10, 11])
    pool.touch([a])
    pool.release([a, b])  # b idle; a still held by the touch

    assert pool.allocate(1) == [b]
    assert pool.ref_counts.tolist() == [1, 1]
    assert pool.hit_counts[b] == 0
    pool.check_integrity()


def test_out_of_blocks_names_the_counts_and_changes_nothing() -> None:
    pool = BlockPool(4)
    held = pool.allocate(3)

    with pytest.raises(OutOfBlocksError, match=r"asked for 2 blocks, 1 are free"):
        pool.allocate(2)
    assert pool.num_free_blocks == 1
    pool.check_integrity(expected_refs=[int(b in held) for b in range(4)])


def test_allocate_with_no_blocks_left_raises_on_the_single_block_path() -> None:
    pool = BlockPool(1)
    pool.allocate(1)

    with pytest.raises(OutOfBlocksError, match=r"asked for 1 blocks, 0 are free"):
        pool.allocate(1)


def test_releasing_more_often_than_referenced_is_an_integrity_error() -> None:
    pool = BlockPool(2)
    a, _ = pool.allocate(2)
    pool.release([a])

    with pytest.raises(IntegrityError, match=r"released more often than referenced"):
        pool.release([a])


def test_touching_a_block_that_was_never_sealed_is_an_integrity_error() -> None:
    pool = BlockPool(2)
    (a,) = pool.allocate(1)
    pool.release([a])

    with pytest.raises(IntegrityError, match=r"touched free blocks"):
        pool.touch([a])


def test_seal_of_a_key_held_by_another_block_leaves_the_duplicate_unkeyed() -> None:
    pool = BlockPool(3)
    (a,) = cached_blocks(pool, [10])
    b, c = pool.allocate(2)

    assert pool.seal(b, 10) is False
    assert pool.seal(a, 10) is True  # sealing the holder again is harmless
    assert pool.seal_many([b, c], [10, 11]) == [c]
    pool.release([a, b, c])
    assert pool.lookup(10) == a
    assert pool.num_cached_blocks == 2
    assert pool.evictable_among([a, b, c]) == [a, c]  # b went back to the free list
    pool.check_integrity()


def test_forgotten_blocks_return_to_the_free_list() -> None:
    pool = BlockPool(2)
    a, b = cached_blocks(pool, [10, 11])
    pool.forget([a])
    pool.release([a, b])

    assert pool.lookup(10) is None
    assert pool.evictable_among([a, b]) == [b]
    assert pool.allocate(1) == [a]
    assert pool.num_evictions == 0


def test_reset_prefix_cache_drops_every_unreferenced_cached_block() -> None:
    pool = BlockPool(4)
    a, b, c = cached_blocks(pool, [10, 11, 12])
    pool.release([a, b])

    assert pool.reset_prefix_cache() == 2
    assert [pool.lookup(k) for k in (10, 11, 12)] == [None, None, c]
    pool.release([c])
    assert pool.reset_prefix_cache() == 1
    assert pool.num_free_blocks == 4
    assert pool.num_cached_blocks == 0
    assert sorted(pool.allocate(4)) == [0, 1, 2, 3]
    pool.check_integrity()


def test_reset_prefix_cache_does_not_count_as_evictions() -> None:
    # num_evictions counts cached blocks evicted to make room, not those a reset drops.
    pool = BlockPool(2)
    pool.release(cached_blocks(pool, [10, 11]))

    pool.reset_prefix_cache()
    assert pool.num_evictions == 0


def test_evictable_among_keeps_the_given_order_and_filters_by_hits() -> None:
    pool = BlockPool(5)
    a, b, c, d = cached_blocks(pool, [10, 11, 12, 13])
    pool.release([a, b, c, d])
    pool.touch([a, c])
    pool.touch([c])
    pool.release([a, c])
    pool.release([c])
    pool.touch([d], hit=False)  # held: not evictable, and a pin is not a hit
    (e,) = pool.allocate(1)  # unkeyed

    ids = [e, d, c, b, a]
    assert pool.evictable_among(ids) == [c, b, a]
    assert pool.evictable_among(ids, min_hits=1) == [c, a]
    assert pool.evictable_among(ids, min_hits=2) == [c]
    assert pool.evictable_among([]) == []
    assert pool.hit_counts[d] == 0


def test_num_evictable_among_counts_the_unreferenced_cached_blocks() -> None:
    pool = BlockPool(4)
    a, b, c = cached_blocks(pool, [10, 11, 12])
    pool.release([a, c])

    assert pool.num_evictable_among([a, b, c]) == 2
    assert pool.num_evictable_among([b]) == 0
    assert pool.num_evictable_among([]) == 0


def test_lru_compaction_drops_orphans_and_keeps_the_order() -> None:
    pool = BlockPool(4)
    a, b, c, d = cached_blocks(pool, [10, 11, 12, 13])
    pool.release([a, b, c])  # LRU: c, b, a
    pool.release([d])  # LRU: c, b, a, d
    tail_before = pool._lru.tail
    tails = []
    for _ in range(2 * pool.num_blocks):  # each round orphans d's entry and appends one
        pool.touch([d])
        pool.release([d])
        tails.append(pool._lru.tail)
        pool.check_integrity()

    assert tail_before == 4
    assert any(b < a for a, b in pairwise([tail_before, *tails])), "never compacted"
    assert pool._lru.tail <= 2 * pool.num_blocks
    assert pool.hit_counts[d] == 2 * pool.num_blocks
    assert pool.allocate(4) == [c, b, a, d]


def test_count_prefix_stops_at_the_first_miss() -> None:
    pool = BlockPool(3)
    cached_blocks(pool, [10, 11, 13])

    assert pool.count_prefix([10, 11, 12, 13]) == 2
    assert pool.count_prefix([10, 11, 12, 13], start=3) == 1
    assert pool.count_prefix([12, 10]) == 0
    assert pool.count_prefix([10, 11]) == 2
    assert pool.count_prefix([]) == 0


def test_eviction_skips_long_runs_of_orphaned_lru_entries() -> None:
    pool = BlockPool(100)
    block_ids = cached_blocks(pool, range(100))
    lru = block_ids[::-1]
    pool.release(block_ids)  # the LRU is `lru`, one queue entry each
    pool.touch(lru[:60])  # orphans 60 entries: the first 64 the pool scans hold 4 live
    pool.release(lru[:60][::-1])  # back in at the tail, in the same order

    assert pool.allocate(10) == lru[60:70]  # 4 from the first chunk, 6 from the next
    assert pool.allocate(50) == lru[70:] + lru[:20]
    assert pool.num_evictions == 60
    pool.check_integrity(expected_refs=[int(b in lru[:20] + lru[60:]) for b in range(100)])


def test_a_repeated_id_in_one_touch_is_reported_by_check_integrity() -> None:
    # Distinct ids per call are the caller's side of the contract; breaking it must show.
    pool = BlockPool(2)
    (a,) = cached_blocks(pool, [10])
    pool.release([a])

    pool.touch([a, a])
    with pytest.raises(IntegrityError):
        pool.check_integrity()


def test_seal_many_with_a_fresh_key_twice_seals_only_the_first_block() -> None:
    # As `seal` one block after the other would.
    pool = BlockPool(2)
    a, b = pool.allocate(2)

    assert pool.seal_many([a, b], [10, 10]) == [a]
    assert pool.lookup(10) == a
    assert pool.block_keys[b] is None
    pool.check_integrity()


def test_a_sealed_block_keeps_its_depth_in_its_chain_saturating() -> None:
    pool = BlockPool(8)
    blocks = pool.allocate(8)
    assert pool.seal_many(blocks[:3], [10, 11, 12], first_depth=4) == blocks[:3]
    assert pool.seal(blocks[3], 13, depth=70_000)
    assert pool.seal_many(blocks[4:6], [20, 21]) == blocks[4:6]  # depths unknown: 0
    # A key cached already sends seal_many block by block; depths still follow the run.
    assert pool.seal_many(blocks[6:8], [12, 31], first_depth=1) == [blocks[7]]
    depths = pool.depths[blocks].tolist()
    assert depths[:6] + depths[7:] == [4, 5, 6, 65535, 0, 0, 2]
