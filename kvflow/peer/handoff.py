"""Prefill/decode handoff over the peer path (`kvflow serve --role prefill|decode`).

Prefill side: once a request asking to keep its KV has finished, `keep` pins the
leading run of its prompt's full blocks under a lease (`Handoffs`), publishes the
store's pending block events at once, and returns the `HandoffTicket` its response
carries. A lease ends when a pull served the run's last block (the decode instance has
it), when it expires (`peer.handoff_lease_s`), or when the node closes: no pin leaks.

Decode side: `accept` checks a ticket against its own request (model fingerprint,
block keys), connects to the prefill instance's peer service when it is not connected
yet, and waits until its directory has followed that peer's events up to the ticket's
event number, which lists the kept blocks (bounded by `peer.handoff_wait_s`). The
scheduler then finds the run at that peer and pulls it as any peer prefix (the same
frames, checksums and timeouts); whatever fails on the way is recomputed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal, NamedTuple

import anyio

from kvflow.kv.export import HeldRun, pin_run, unpin
from kvflow.kv.store import KVStore

if TYPE_CHECKING:
    from kvflow.peer.node import PeerNode

logger = logging.getLogger("kvflow.peer")

AcceptOutcome = Literal["ready", "local", "mismatch", "unreachable"]
"""What became of a ticket at the decode instance: `ready` (its blocks are known at the
prefill instance: the scheduler pulls them), `local` (this instance made them),
`mismatch` (another model, or another prompt), `unreachable` (the prefill instance was
not followed in time)."""


class HandoffTicket(NamedTuple):
    """Where a decode instance finds a prompt's KV: the prefill instance's peer service
    and identity, the kept blocks' keys, and the event number that lists them."""

    peer: str
    """The prefill instance's peer service, `host:port`."""
    peer_id: str
    fingerprint: str
    """The model fingerprint, hex (blocks of another model are never pulled)."""
    seq: int
    """The prefill instance's block-event number once the kept blocks were published."""
    block_keys: tuple[int, ...]
    block_size: int

    @property
    def num_tokens(self) -> int:
        return len(self.block_keys) * self.block_size


class _Lease(NamedTuple):
    run: HeldRun
    deadline: float


class Handoffs:
    """The prefill side's leases: runs of blocks pinned for a decode instance to pull.
    Single-threaded, on the loop that owns the store."""

    def __init__(
        self, store: KVStore, lease_s: float, clock: Callable[[], float] | None = None
    ) -> None:
        self.store = store
        self.lease_s = lease_s
        self.clock = clock or time.monotonic
        self._leases: dict[int, _Lease] = {}
        self._next_id = 0
        self.num_kept = 0
        self.num_pulled = 0
        """Leases ended because a pull served their last block."""
        self.num_expired = 0

    @property
    def num_active(self) -> int:
        return len(self._leases)

    def keep(self, keys: Sequence[int]) -> HeldRun | None:
        """Pin the leading run of `keys` the store holds; None when it holds none."""
        run = pin_run(self.store, keys)
        if not run:
            unpin(self.store, run)
            return None
        self._leases[self._next_id] = _Lease(run, self.clock() + self.lease_s)
        self._next_id += 1
        self.num_kept += 1
        return run

    def on_served(self, keys: Sequence[int]) -> None:
        """A pull served `keys`: end the oldest lease per last key served."""
        served = set(keys)
        done: list[int] = []
        for lease_id, lease in self._leases.items():
            last = lease.run.keys[-1]
            if last in served:
                served.discard(last)  # one lease per pull of a key
                done.append(lease_id)
        for lease_id in done:
            self._release(lease_id)
        self.num_pulled += len(done)

    def expire(self, now: float | None = None) -> int:
        """End the leases past their deadline; how many ended."""
        now = self.clock() if now is None else now
        done = [i for i, lease in self._leases.items() if lease.deadline <= now]
        for lease_id in done:
            self._release(lease_id)
        self.num_expired += len(done)
        return len(done)

    def close(self) -> None:
        """End every lease (the node is closing)."""
        for lease_id in list(self._leases):
            self._release(lease_id)

    def _release(self, lease_id: int) -> None:
        unpin(self.store, self._leases.pop(lease_id).run)


def prompt_block_keys(
    token_ids: Sequence[int], block_size: int, extra_keys: Sequence[str] = ()
) -> list[int]:
    """The keys of a prompt's full blocks, as the scheduler chains them."""
    from kvflow.kv.hashing import extend_block_keys, root_key

    keys: list[int] = []
    extend_block_keys(
        keys, token_ids, len(token_ids) // block_size, block_size, root_key(extra_keys)
    )
    return keys


def keep(node: PeerNode, keys: Sequence[int]) -> HandoffTicket | None:
    """Prefill side: lease the run of `keys` this instance holds and publish its block
    events now; the ticket for the response, or None when it holds none of them."""
    run = node.handoffs.keep(keys)
    if run is None:
        return None
    service = node.service
    return HandoffTicket(
        peer=f"{node.config.host}:{service.port}",
        peer_id=service.identity.peer_id,
        fingerprint=service.identity.fingerprint.hex(),
        seq=service.publish_now(),
        block_keys=run.keys,
        block_size=node.store.config.block_size,
    )


async def accept(node: PeerNode, ticket: HandoffTicket, keys: Sequence[int]) -> AcceptOutcome:
    """Decode side: make the ticket's blocks known to the scheduler (see the module
    docstring); `keys` are the request's prompt block keys here. Counted in
    `node.handoff_outcomes`."""
    outcome = await _accept(node, ticket, keys)
    node.handoff_outcomes[outcome] = node.handoff_outcomes.get(outcome, 0) + 1
    return outcome


async def _accept(node: PeerNode, ticket: HandoffTicket, keys: Sequence[int]) -> AcceptOutcome:
    from kvflow.peer.node import PeerAddress

    me = node.service.identity
    n = len(ticket.block_keys)
    if (
        ticket.fingerprint != me.fingerprint.hex()
        or ticket.block_size != node.store.config.block_size
        or tuple(keys[:n]) != ticket.block_keys
    ):
        return "mismatch"
    if ticket.peer_id == me.peer_id:
        return "local"
    node.ensure_peer(PeerAddress.parse(ticket.peer))
    with anyio.move_on_after(node.config.handoff_wait_s):
        await node.wait_following(ticket.peer_id, ticket.seq)
        return "ready"
    logger.warning(
        "kvflow: handoff from %s (%s) not followed within %s s: recomputing",
        ticket.peer,
        ticket.peer_id,
        node.config.handoff_wait_s,
    )
    return "unreachable"


__all__ = [
    "AcceptOutcome",
    "HandoffTicket",
    "Handoffs",
    "accept",
    "keep",
    "prompt_block_keys",
]
