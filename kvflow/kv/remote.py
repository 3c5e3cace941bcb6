"""What this instance knows of blocks held by other instances: the remote tier's seam.

The store asks a `RemoteTier` (when one is set, `KVStore.remote`) for the longest run of
a prefix's keys that some peer holds, after its own tiers; `locate` reports it as
`peer_tokens` at `peer`. Answers are hints: the owner re-validates at pull time.
`kvflow.peer.directory.Directory` implements it from peers' block events; a simulator
can put a modelled fleet behind the same interface. `kvflow.kv` never imports
`kvflow.peer`.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import NamedTuple

from kvflow.kv.transfer import CopyEngine


class RemoteRun(NamedTuple):
    """The longest run of asked keys one peer holds: `num_blocks` from the start asked
    for, and the slowest tier any of them is held in (what a pull of the run costs)."""

    peer: str
    num_blocks: int
    tier: str


class RemoteTier(abc.ABC):
    """Where runs of keys are held beyond this instance."""

    @abc.abstractmethod
    def longest_run(self, keys: Sequence[int], start: int = 0) -> RemoteRun | None:
        """The peer holding the longest run of `keys[start:]`, or None when no peer is
        known to hold `keys[start]`. Synchronous and cheap: `locate` calls it."""

    @property
    def pull_engine(self) -> CopyEngine | None:
        """Carries out the store's pulls (`peer_to_cpu` transfers, `Transfer.peer` naming
        the peer, into the cpu slots `dst_slots`) and reports per block whether it landed
        intact. None (the default): the store's own copy engine models them, so in
        virtual time a pull takes `peer_latency_us` + bytes / `peer_gbps` and lands whole.
        A modelled fleet can return an engine that prices or fails pulls its own way."""
        return None
