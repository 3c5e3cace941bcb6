"""Who holds what: one instance's own index of its peers' blocks, from their events.

Pure and synchronous (time comes in as an argument), like the scheduler. Each peer's
entries are a map key -> the tiers it holds the key in, always equal to that peer's key
set at one past moment: its last resync snapshot plus the events numbered after it, in
order. An event batch that is not the next number is a gap: the entries stay as they
were (a consistent, if stale, state) and the peer needs a resync, whose snapshot then
replaces them. Duplicates and late batches are ignored; a new incarnation (the peer
restarted) discards the old entries; a peer not heard from within the timeout is down
and its entries dropped. Entries are hints: the owner re-validates every pull.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from kvflow.kv.remote import RemoteRun, RemoteTier
from kvflow.kv.transfer import CopyEngine
from kvflow.peer.frames import KeyRecord, SeqFrame

_TIER_BITS = {"device": 1, "cpu": 2, "disk": 4}
_TIER_RANK = ("device", "cpu", "disk")

Outcome = Literal["applied", "duplicate", "gap", "ignored"]


RunHint = RemoteRun


@dataclass(eq=False, slots=True)
class PeerEntries:
    incarnation: bytes
    last_seq: int = -1
    """Number of the last batch applied (-1: no snapshot yet)."""
    needs_resync: bool = True
    last_heard: float = 0.0
    tiers: dict[int, int] = field(default_factory=dict)
    """key -> bit set of tiers (device 1, cpu 2, disk 4)."""


class Directory(RemoteTier):
    """Entries of every peer this instance hears from (never of itself). Set it as a
    store's `remote` and `locate` reports the longest run a peer holds."""

    def __init__(self, heartbeat_timeout_s: float) -> None:
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self._peers: dict[str, PeerEntries] = {}
        self.num_gaps = 0
        self.num_restarts = 0
        self.puller: CopyEngine | None = None
        """Carries out the store's pulls from these peers (`kvflow.peer.pulls`)."""

    @property
    def pull_engine(self) -> CopyEngine | None:
        return self.puller

    # -- what peers tell us ----------------------------------------------------------
    def _entries(self, peer: str, incarnation: bytes, now: float) -> PeerEntries:
        entries = self._peers.get(peer)
        if entries is None or entries.incarnation != incarnation:
            if entries is not None:
                self.num_restarts += 1
            entries = PeerEntries(incarnation)  # a restart: nothing of the old one holds
            self._peers[peer] = entries
        entries.last_heard = max(entries.last_heard, now)
        return entries

    def apply_events(self, peer: str, frame: SeqFrame, now: float) -> Outcome:
        """Apply one EVENTS batch if it is the next one; says what became of it."""
        entries = self._entries(peer, frame.incarnation, now)
        if entries.needs_resync:
            return "ignored"
        if frame.seq <= entries.last_seq:
            return "duplicate"
        if frame.seq != entries.last_seq + 1:
            self._gap(entries)
            return "gap"
        for record in frame.records:
            _apply(entries.tiers, record)
        entries.last_seq = frame.seq
        return "applied"

    def apply_resync(self, peer: str, frame: SeqFrame, now: float) -> Outcome:
        """Replace a peer's entries by its snapshot (unless it is older than them)."""
        entries = self._entries(peer, frame.incarnation, now)
        if not entries.needs_resync and frame.seq <= entries.last_seq:
            return "duplicate"
        tiers: dict[int, int] = {}
        for record in frame.records:
            if record.kind == "stored":
                _apply(tiers, record)
        entries.tiers = tiers
        entries.last_seq = frame.seq
        entries.needs_resync = False
        return "applied"

    def heartbeat(self, peer: str, frame: SeqFrame, now: float) -> Outcome:
        """A peer is alive and at batch `frame.seq`; a later number than ours means we
        missed a batch (a gap)."""
        entries = self._entries(peer, frame.incarnation, now)
        if not entries.needs_resync and frame.seq > entries.last_seq:
            self._gap(entries)
            return "gap"
        return "applied"

    def _gap(self, entries: PeerEntries) -> None:
        if not entries.needs_resync:
            self.num_gaps += 1
        entries.needs_resync = True

    def mark_down(self, peer: str) -> None:
        """Forget a peer (it died, stalled, or stopped answering)."""
        self._peers.pop(peer, None)

    def expire(self, now: float) -> list[str]:
        """Mark down every peer not heard from within the heartbeat timeout."""
        cutoff = now - self.heartbeat_timeout_s
        down = [p for p, e in self._peers.items() if e.last_heard < cutoff]
        for peer in down:
            self.mark_down(peer)
        return down

    # -- questions -------------------------------------------------------------------
    def needs_resync(self, peer: str) -> bool:
        entries = self._peers.get(peer)
        return entries is None or entries.needs_resync

    def num_keys(self) -> int:
        """Keys held at peers, summed over the peers (one per peer holding a key)."""
        return sum(len(entries.tiers) for entries in self._peers.values())

    def peers(self) -> list[str]:
        return sorted(self._peers)

    def held(self, peer: str) -> dict[int, frozenset[str]]:
        """The keys a peer is believed to hold, with their tiers."""
        entries = self._peers.get(peer)
        if entries is None:
            return {}
        return {k: _tier_names(bits) for k, bits in entries.tiers.items()}

    def num_held(self, peer: str) -> int:
        """Keys `peer` is believed to hold (0 for a peer not heard from)."""
        entries = self._peers.get(peer)
        return 0 if entries is None else len(entries.tiers)

    def prefix_run(self, peer: str, keys: Sequence[int]) -> int:
        """How many leading blocks of `keys` `peer` is believed to hold, in any tier.

        Found by bisection, a few lookups rather than one per block: keys are chained,
        so a peer holding block p once computed blocks 0..p, and a device tier evicts a
        prefix's tail before its root. A tier written through evicts in the order the
        blocks landed there, root first, so a run with a hole can be over-counted (the
        entries are hints either way)."""
        entries = self._peers.get(peer)
        if entries is None or not keys:
            return 0
        tiers = entries.tiers
        if not tiers.get(keys[0]):
            return 0
        lo, hi = 1, len(keys)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if tiers.get(keys[mid - 1]):
                lo = mid
            else:
                hi = mid - 1
        return lo

    def last_seq(self, peer: str) -> int:
        entries = self._peers.get(peer)
        return -1 if entries is None else entries.last_seq

    def longest_run(self, keys: Sequence[int], start: int = 0) -> RunHint | None:
        """The peer holding the longest run of `keys[start:]` (ties: the faster run, then
        the peer name), or None when no peer holds `keys[start]`."""
        best: tuple[int, int, str] | None = None
        best_peer = ""
        for peer, entries in self._peers.items():
            tiers = entries.tiers
            n = 0
            slowest = 0
            for key in keys[start:]:
                bits = tiers.get(key)
                if not bits:
                    break
                slowest = max(slowest, (bits & -bits).bit_length() - 1)
                n += 1
            if n == 0:
                continue
            rank = (-n, slowest, peer)
            if best is None or rank < best:
                best = rank
                best_peer = peer
        if best is None:
            return None
        return RunHint(best_peer, -best[0], _TIER_RANK[best[1]])


def _apply(tiers: dict[int, int], record: KeyRecord) -> None:
    bit = _TIER_BITS[record.tier]
    keys = record.keys.tolist() if isinstance(record.keys, np.ndarray) else list(record.keys)
    if record.kind == "stored":
        for key in keys:
            tiers[key] = tiers.get(key, 0) | bit
    else:
        for key in keys:
            bits = tiers.get(key, 0) & ~bit
            if bits:
                tiers[key] = bits
            else:
                tiers.pop(key, None)


def _tier_names(bits: int) -> frozenset[str]:
    return frozenset(name for name, bit in _TIER_BITS.items() if bits & bit)
