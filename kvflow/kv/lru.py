"""The eviction order of a pool's evictable blocks (cached, unreferenced): least
recently used first.

The queue is append-only: a block's live entry is the one at `positions[block]`; taking
it out (a reference taken, an eviction) orphans the entry, which is skipped when eviction
reaches it, and putting it back appends a fresh one. So taking a request's hundreds of
blocks out or in is a few vectorized operations, not a Python loop over blocks."""

from __future__ import annotations

import numpy as np

from kvflow.kv.block_ids import BlockIds, IntArray, IntegrityError, as_ids


class LRUQueue:
    """The evictable blocks among `num_blocks`, oldest first.

    A pool keeps each block in at most one place: in this queue (evictable), on its free
    list, or referenced; the queue checks none of that, only its own entries."""

    def __init__(self, num_blocks: int) -> None:
        # `_entries[_head:tail]`, oldest first. Twice the pool leaves room to append a
        # whole pool after compacting.
        self._entries = np.empty(2 * num_blocks, dtype=np.int64)
        self.positions = np.full(num_blocks, -1, dtype=np.int64)
        """Each block's live entry in the queue (-1: not in it)."""
        self._head = 0
        self.tail = 0
        """The end of the queue's entries (live and orphaned)."""
        self.num_blocks = 0
        """Blocks in the queue (live entries)."""

    def push(self, ids: IntArray) -> None:
        """Put blocks (not in the queue) at its back, in order: the most recently used."""
        m = len(ids)
        if self.tail + m > len(self._entries):
            self._compact()
        tail = self.tail
        self._entries[tail : tail + m] = ids
        self.positions[ids] = np.arange(tail, tail + m)
        self.tail = tail + m
        self.num_blocks += m

    def remove(self, ids: IntArray) -> None:
        """Take blocks (all in the queue) out of it: their entries are orphaned."""
        self.positions[ids] = -1
        self.num_blocks -= len(ids)

    def pop(self, n: int) -> IntArray:
        """Take the `n` least recently used blocks out of the queue."""
        entries, positions = self._entries, self.positions
        head = self._head
        taken: list[IntArray] = []
        while n:
            m = min(self.tail - head, max(2 * n, 64))
            if m == 0:
                raise IntegrityError(f"the LRU ran out with {n} evictable blocks still counted")
            chunk = entries[head : head + m]
            live = np.flatnonzero(positions[chunk] == np.arange(head, head + m))
            if len(live) >= n:
                live = live[:n]
                taken.append(chunk[live])
                head += int(live[-1]) + 1
                break
            taken.append(chunk[live])
            n -= len(live)
            head += m
        self._head = head
        out = taken[0] if len(taken) == 1 else np.concatenate(taken)
        positions[out] = -1
        self.num_blocks -= len(out)
        return out

    def pop_one(self) -> int:
        """`pop(1)` in scalar steps."""
        entries, positions = self._entries, self.positions
        head, tail = self._head, self.tail
        while head < tail:
            b: int = entries.item(head)
            head += 1
            if positions.item(b) == head - 1:
                self._head = head
                positions[b] = -1
                self.num_blocks -= 1
                return b
        raise IntegrityError("the LRU ran out with evictable blocks still counted")

    def clear(self) -> None:
        """Forget every entry (once every block was popped)."""
        self._head = self.tail = 0

    def _compact(self) -> None:
        head, tail = self._head, self.tail
        entries = self._entries[head:tail]
        live = entries[self.positions[entries] == np.arange(head, tail)]
        self._entries[: len(live)] = live
        self.positions[live] = np.arange(len(live))
        self._head = 0
        self.tail = len(live)

    def order_tail_first(self, block_ids: BlockIds) -> None:
        """Line up these blocks (distinct, in chain order: root first) to be evicted tail
        first, in the places in the queue they hold now: the chain keeps its places (how
        recently it was used), its last block takes the oldest and its root the newest.
        Blocks not in the queue keep out of it."""
        if len(block_ids) < 2:
            return
        ids = as_ids(block_ids)
        places = self.positions[ids]
        queued = places >= 0
        if np.count_nonzero(queued) < 2:
            return
        ids = ids[queued][::-1]
        places = np.sort(places[queued])
        self._entries[places] = ids
        self.positions[ids] = places

    def live(self) -> list[int]:
        """The blocks in the queue, oldest first, once each unless a bug put one twice
        (for integrity checks)."""
        head, tail = self._head, self.tail
        entries = self._entries[head:tail]
        return entries[self.positions[entries] == np.arange(head, tail)].tolist()  # type: ignore[no-any-return]
