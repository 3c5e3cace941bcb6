"""Longest cached prefix first, with a bounded candidate window and aging."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import chain, islice

from kvflow.kv.location import PrefixLocation
from kvflow.policies.base import Policy, SchedulerView
from kvflow.request import RequestState


class LPMPolicy(Policy):
    """Orders by longest cached prefix (tokens cached in any tier), most first.

    Only the first `candidate_window` waiting requests are ranked; the rest follow in
    queue order, so a step costs O(candidate_window) cache lookups however long the
    queue. Within the window, requests that have waited `max_wait_s` or longer go first,
    in queue order, ahead of every cache hit; ties in cached tokens keep queue order.
    An aged request outside the window is preceded only by requests ahead of it in the
    queue, so no request is passed over for a cache hit longer than `max_wait_s` (plus
    one step). Preempts the most recently admitted request.
    """

    name = "lpm"

    def __init__(
        self,
        candidate_window: int = 128,
        max_wait_s: float = 5.0,
        cpu_weight: float = 0.9,
        disk_weight: float = 0.6,
    ) -> None:
        if candidate_window < 1:
            raise ValueError(f"lpm: candidate_window must be >= 1, got {candidate_window!r}")
        if not max_wait_s > 0:
            raise ValueError(f"lpm: max_wait_s must be > 0, got {max_wait_s!r}")
        self.candidate_window = candidate_window
        self.max_wait_s = max_wait_s
        for name, weight in (("cpu_weight", cpu_weight), ("disk_weight", disk_weight)):
            if not 0 <= weight <= 1:
                raise ValueError(f"lpm: {name} must be in [0, 1], got {weight!r}")
        self.cpu_weight = cpu_weight
        self.disk_weight = disk_weight

    def order(self, waiting: Sequence[RequestState], view: SchedulerView) -> Iterable[RequestState]:
        if len(waiting) <= 1:
            return waiting
        now, max_wait_s = view.now, self.max_wait_s
        aged: list[RequestState] = []
        fresh: list[RequestState] = []
        for req in islice(waiting, self.candidate_window):
            (aged if now - req.arrival_time >= max_wait_s else fresh).append(req)
        # sort(reverse=True) is stable: equal hits keep queue order.
        fresh.sort(key=lambda r: self._weighted_hit(view.locate(r)), reverse=True)
        rest = islice(waiting, self.candidate_window, None)
        return chain(aged, fresh, rest)

    def _weighted_hit(self, loc: PrefixLocation) -> float:
        """Cached tokens, a token below device counting less: it must be loaded first."""
        return (
            loc.device_tokens
            + self.cpu_weight * loc.cpu_tokens
            + self.disk_weight * (loc.disk_tokens + loc.peer_tokens)
        )

    def __repr__(self) -> str:
        return f"LPMPolicy(candidate_window={self.candidate_window}, max_wait_s={self.max_wait_s})"
