"""Prefix matching for the scheduler: a request's block keys are hashed once, and its
device match is memoized across the steps it waits and revalidated, not redone."""

from __future__ import annotations

from kvflow.kv.block_pool import BlockPool, PrefixMatch
from kvflow.kv.chain_memo import ChainMemo
from kvflow.kv.hashing import root_key
from kvflow.request import RequestState

_MAX_RECENT_MATCHES = 1024
_MAX_RECENT_BLOCKS = 2**18  # bounds the memory recent matches keep alive (~20 MB)


class PrefixMatcher:
    """Block keys and device prefix matches of the scheduler's requests.

    Args:
        pool: the device tier's block pool, matched against.
        block_size: tokens per block.
    """

    def __init__(self, pool: BlockPool, block_size: int) -> None:
        self.pool = pool
        self.matches: dict[str, PrefixMatch] = {}
        """Queued requests' device prefix matches, kept up to date cheaply across the
        steps a request waits (the policy locates it each step) and its admission."""
        self._root_keys: dict[tuple[str, ...], int] = {}
        self._chain_memo = ChainMemo(block_size)
        self._recent_matches: dict[int, tuple[list[int], PrefixMatch, int]] = {}
        """The latest device match by the key of its chain's first block, with the chain's
        length then (bounded in entries and in blocks)."""
        self._num_recent_blocks = 0

    def match_device(self, state: RequestState, max_blocks: int) -> PrefixMatch:
        """The device blocks of the request's cached prefix (at most `max_blocks`)."""
        self.extend_keys(state, max_blocks)
        rid = state.request_id
        keys = state.block_keys
        prev = self.matches.get(rid)
        if prev is None and keys:
            prev = self._recent_match(keys)
        match = self.matches[rid] = self.pool.match(keys, max_blocks, prev)
        if keys:
            recent = self._recent_matches
            replaced = recent.pop(keys[0], None)
            if replaced is not None:
                self._num_recent_blocks -= replaced[2]
            recent[keys[0]] = (keys, match, len(keys))  # the newest, at the back
            self._num_recent_blocks += len(keys)
            while len(recent) > _MAX_RECENT_MATCHES or (
                self._num_recent_blocks > _MAX_RECENT_BLOCKS and recent
            ):
                self._num_recent_blocks -= recent.pop(next(iter(recent)))[2]
        return match

    def _recent_match(self, keys: list[int]) -> PrefixMatch | None:
        """The latest match of a chain starting like `keys`, cut to the blocks the two
        chains share, as a start for matching `keys` (`BlockPool.match` revalidates it)."""
        recent = self._recent_matches.get(keys[0])
        if recent is None:
            return None
        other_keys, other, _ = recent
        # Chained keys: equal keys at block i mean equal chains up to i, so the shared
        # length is found by bisection, one comparison per step.
        lo, hi = 1, min(len(keys), len(other_keys), len(other.block_ids))
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if keys[mid - 1] == other_keys[mid - 1]:
                lo = mid
            else:
                hi = mid - 1
        if lo >= len(other.block_ids):
            return other
        return PrefixMatch(other.block_ids[:lo], other.ids[:lo], other.versions[:lo])

    def extend_keys(self, state: RequestState, num_blocks: int) -> None:
        """Hash the request's keys up to `num_blocks` full blocks (those it lacks only)."""
        if len(state.block_keys) >= num_blocks:
            return
        extra = state.request.extra_keys
        root = self._root_keys.get(extra)
        if root is None:
            root = self._root_keys[extra] = root_key(extra)
        self._chain_memo.extend(state.block_keys, state.token_ids, num_blocks, root)
