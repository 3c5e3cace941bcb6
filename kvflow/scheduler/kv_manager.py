"""The scheduler's KV manager: what it asks of the KV store, in the scheduler's terms.

The `Scheduler` decides who runs; `KVManager` answers where a request's prefix is
cached (`lookup`), whether blocks are there to take (`can_admit`),
hands them out (`admit`, `allocate_slots`), indexes computed blocks (`seal`) and gives
them back (`free`, `free_preempted`, `free_after_step`). The shape is vLLM v1's
KVCacheManager: the scheduler never drives the device pool itself.
"""

from __future__ import annotations

from typing import NamedTuple

from kvflow.config import SchedulerConfig
from kvflow.kv.block_pool import IntArray
from kvflow.kv.location import PrefixLocation
from kvflow.kv.remote import RemoteRun
from kvflow.kv.store import KVStore, TierName
from kvflow.request import RequestState
from kvflow.scheduler.prefix import PrefixMatcher
from kvflow.scheduler.stats import SchedulerStats


class CachedPrefix(NamedTuple):
    """Where the leading blocks of a request being admitted are cached."""

    device_ids: list[int]
    """Its device hits, in order."""
    device_array: IntArray | list[int]
    """The same blocks as the pool's match holds them (for `touch` and its counts)."""
    below: list[tuple[TierName, int]]
    """The run after the device hits held by the cpu or disk tier, by (tier, slot),
    when loading it beats recomputing it (else empty)."""
    pull: RemoteRun | None
    """The run after those held by a peer, when pulling it beats recomputing it."""


class KVManager:
    """The KV blocks of one scheduler's requests, over one KV store.

    Args:
        store: the KV store; its device tier holds the requests' blocks.
        config: the scheduler's configuration (prefix caching, preemption mode).
        stats: the scheduler's counters (hits by tier).
    """

    def __init__(self, store: KVStore, config: SchedulerConfig, stats: SchedulerStats) -> None:
        self.store = store
        self.pool = store.device
        self.block_size = store.block_size
        self.stats = stats
        self.caching = config.enable_prefix_caching
        self._preemption_mode = config.preemption_mode
        prefix = PrefixMatcher(self.pool, self.block_size)
        # Bound once: these run per request per step.
        self._match_device = prefix.match_device
        self.extend_keys = prefix.extend_keys
        self._matches = prefix.matches
        self._write_through = store.write_through and store.has_lower_tiers
        self.deferred: list[list[int]] = []
        """Blocks of requests finished while a step ran (`free_after_step`), held until
        `release_deferred`."""

    # -- lookups -------------------------------------------------------------------
    def locate(self, state: RequestState) -> PrefixLocation:
        """Where the leading full blocks of the request's known tokens are cached."""
        if not self.caching:
            return PrefixLocation()
        n = (state.num_tokens - 1) // self.block_size
        match = self._match_device(state, n)
        keys = state.block_keys
        return self.store.locate(keys if len(keys) == n else keys[:n], len(match.block_ids))

    def lookup(self, req: RequestState, num_tokens: int) -> CachedPrefix:
        """Where the cached prefix of a request's first `num_tokens` tokens is, short
        of its last token (which is always computed, to sample from)."""
        if not self.caching:
            return CachedPrefix([], [], [], None)
        store = self.store
        max_hit_blocks = (num_tokens - 1) // self.block_size
        match = self._match_device(req, max_hit_blocks)
        hits = match.block_ids
        below: list[tuple[TierName, int]] = []
        pull: RemoteRun | None = None
        if store.has_lower_tiers and len(hits) < max_hit_blocks:
            below = store.find_below(req.block_keys, len(hits), max_hit_blocks)
            if below and not store.costs.should_load(below):
                below = []  # recomputing them is cheaper, and what follows
            elif store.remote is not None:
                run = store.find_remote(req.block_keys, len(hits) + len(below), max_hit_blocks)
                if run is not None and store.costs.should_pull(run.num_blocks):
                    pull = run
        return CachedPrefix(hits, match.ids, below, pull)

    # -- taking blocks ---------------------------------------------------------------
    def can_admit(self, cached: CachedPrefix, num_new_blocks: int) -> bool:
        """Whether `admit` can take the cached device blocks and `num_new_blocks` more."""
        num_free = self.pool.num_free_blocks
        # Touching a hit takes it out of the free pool if nobody held it; counting those
        # is only needed when the pool is nearly full.
        return num_new_blocks + len(cached.device_ids) <= num_free or (
            num_new_blocks + self.pool.num_evictable_among(cached.device_array) <= num_free
        )

    def admit(self, req: RequestState, cached: CachedPrefix, num_new_blocks: int) -> None:
        """Give an admitted request its device hits and `num_new_blocks` fresh blocks."""
        self._matches.pop(req.request_id, None)
        pool = self.pool
        hits = cached.device_ids
        pool.touch(cached.device_array)
        req.block_ids = hits + pool.allocate(num_new_blocks)
        req.num_sealed_blocks = len(hits)

    def allocate_slots(self, req: RequestState, num_blocks: int) -> None:
        """Append `num_blocks` fresh blocks to a running request's."""
        req.block_ids.extend(self.pool.allocate(num_blocks))

    def count_hits(
        self, req: RequestState, cached: CachedPrefix, num_tokens: int, now: float
    ) -> bool:
        """Count an admission's hits by tier: a first admission's as prefix hits (it sets
        the request's `num_cached_tokens`), a preempted request's re-admission apart, so
        its own swapped blocks are no prefix hit. Returns whether it is the first."""
        bs = self.block_size
        stats = self.stats
        below = cached.below
        num_device = len(cached.device_ids)
        num_pulled = cached.pull.num_blocks if cached.pull is not None else 0
        first_admission = req.first_scheduled_time is None
        num_cpu = sum(1 for tier, _ in below if tier == "cpu")
        stats.count_hits(first_admission, "device", num_device * bs)
        stats.count_hits(first_admission, "cpu", num_cpu * bs)
        stats.count_hits(first_admission, "disk", (len(below) - num_cpu) * bs)
        if num_pulled:
            stats.count_hits(first_admission, "peer", num_pulled * bs)
        if not first_admission:
            stats.readmission_query_tokens += num_tokens
            return False
        stats.prefix_query_tokens += num_tokens
        req.first_scheduled_time = now
        req.num_cached_tokens = (num_device + len(below) + num_pulled) * bs
        return True

    # -- computed blocks ---------------------------------------------------------------
    def seal(self, req: RequestState, num_full: int, now: float) -> None:
        """Index the request's full blocks up to `num_full` in the prefix cache (a
        write-through store also copies them down)."""
        self.extend_keys(req, num_full)
        first = req.num_sealed_blocks
        if num_full - first == 1:  # a decode filled its last block: no slicing
            block = req.block_ids[first]
            if self.pool.seal(block, req.block_keys[first], first) and self._write_through:
                self.store.on_sealed(block, now)
        else:
            blocks = req.block_ids[first:num_full]
            sealed = self.pool.seal_many(blocks, req.block_keys[first:num_full], first)
            if self._write_through:
                for b in sealed:
                    self.store.on_sealed(b, now)
        req.num_sealed_blocks = num_full

    # -- giving blocks back ------------------------------------------------------------
    def free(self, req: RequestState, now: float) -> None:
        """Release a finished request's blocks (cached ones stay cached) and forget its
        prefix match."""
        if req.block_ids:
            self.store.release_device(req.block_ids, now, keep=True)
            req.block_ids = []
        self._matches.pop(req.request_id, None)

    def free_preempted(self, req: RequestState, now: float) -> bool:
        """Release a preempted request's blocks: swapped down to the cpu tier (they come
        back through a prefix hit on resume), or dropped to be recomputed; the
        preemption mode, or with `auto` a cost estimate, chooses. Returns whether they
        were swapped."""
        store = self.store
        mode = self._preemption_mode
        swap = store.has_lower_tiers and (
            mode == "swap"
            or (mode == "auto" and store.costs.swap_is_cheaper(req.num_sealed_blocks))
        )
        store.release_device(req.block_ids, now, keep=swap)
        req.block_ids = []
        req.num_sealed_blocks = 0
        return swap

    def free_after_step(self, req: RequestState) -> None:
        """Take a request's blocks to release once the running step has ended
        (`release_deferred`): the step may still read them."""
        if req.block_ids:
            self.deferred.append(req.block_ids)
            req.block_ids = []

    def release_deferred(self, now: float) -> None:
        """Release the blocks `free_after_step` held."""
        for block_ids in self.deferred:
            self.store.release_device(block_ids, now, keep=True)
        self.deferred.clear()
