"""Earliest (TTFT) deadline first, with slack from a prefill-time estimate."""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Iterator, Sequence

from kvflow.policies.base import Policy, SchedulerView
from kvflow.request import RequestState

HOPELESS_MODES = ("keep", "deprioritize", "reject")


class EDFPolicy(Policy):
    """Orders by TTFT deadline (`request.ttft_deadline`), earliest first; requests
    without a deadline follow all that have one, in queue order.

    A request is hopeless when its slack, deadline - now - estimated service time, is
    negative; the estimate is its uncached tokens times `prefill_token_s`. `hopeless`
    says what happens to such a request: "keep" (plain EDF), "deprioritize" (after all
    feasible requests, still EDF among themselves, before those without a deadline) or
    "reject" (`drop` returns it). A request that already produced its first token (a
    preempted one) is never hopeless: its TTFT is settled, and its past deadline puts it
    first. Preempts the running request with the latest deadline (none counts as latest).
    """

    name = "edf"

    def __init__(self, hopeless: str = "deprioritize", prefill_token_s: float = 40e-6) -> None:
        if hopeless not in HOPELESS_MODES:
            raise ValueError(f"edf: hopeless must be one of {HOPELESS_MODES}, got {hopeless!r}")
        if not (math.isfinite(prefill_token_s) and prefill_token_s >= 0):
            raise ValueError(f"edf: prefill_token_s must be >= 0, got {prefill_token_s!r}")
        self.hopeless = hopeless
        self.prefill_token_s = prefill_token_s

    def order(self, waiting: Sequence[RequestState], view: SchedulerView) -> Iterable[RequestState]:
        if len(waiting) <= 1:
            return waiting
        return self._earliest_first(waiting, view)

    def _earliest_first(
        self, waiting: Sequence[RequestState], view: SchedulerView
    ) -> Iterator[RequestState]:
        # A heap rather than a sort: the scheduler usually admits only a few per step.
        demote = self.hopeless == "deprioritize"
        heap: list[tuple[bool, float, int, RequestState]] = []
        no_deadline: list[RequestState] = []
        for index, req in enumerate(waiting):
            deadline = req.request.ttft_deadline
            if deadline is None:
                no_deadline.append(req)
            else:
                late = demote and self._hopeless_estimate_s(req, deadline, view) is not None
                heap.append((late, deadline, index, req))
        heapq.heapify(heap)
        while heap:
            yield heapq.heappop(heap)[3]
        yield from no_deadline

    def _hopeless_estimate_s(
        self, request: RequestState, deadline: float, view: SchedulerView
    ) -> float | None:
        """The estimated service time of a hopeless `request` (one it would make miss
        `deadline`), else None. Looks up the cache only when the answer depends on it."""
        if request.first_token_time is not None:
            return None
        time_left_s = deadline - view.now
        if time_left_s >= request.num_tokens * self.prefill_token_s:
            return None  # feasible even with nothing cached
        num_uncached = max(request.num_tokens - view.cached_tokens(request), 0)
        estimate_s = num_uncached * self.prefill_token_s
        return estimate_s if estimate_s > time_left_s else None

    def drops_requests(self) -> bool:
        return self.hopeless == "reject"

    def drop(
        self, waiting: Sequence[RequestState], view: SchedulerView
    ) -> Iterable[tuple[RequestState, str]]:
        if self.hopeless != "reject":
            return ()
        dropped: list[tuple[RequestState, str]] = []
        for req in waiting:
            deadline = req.request.ttft_deadline
            if deadline is None:
                continue
            estimate_s = self._hopeless_estimate_s(req, deadline, view)
            if estimate_s is not None:
                reason = (
                    f"edf: TTFT deadline {deadline:.6f}s cannot be met: at {view.now:.6f}s "
                    f"the estimated prefill time is {estimate_s:.6f}s"
                )
                dropped.append((req, reason))
        return dropped

    def victim(self, candidates: Sequence[RequestState], view: SchedulerView) -> RequestState:
        chosen = candidates[-1]
        latest = -math.inf
        for req in candidates:
            deadline = req.request.ttft_deadline
            key = math.inf if deadline is None else deadline
            if key >= latest:  # >=: ties go to the last admitted
                chosen, latest = req, key
        return chosen

    def __repr__(self) -> str:
        return f"EDFPolicy(hopeless={self.hopeless!r}, prefill_token_s={self.prefill_token_s})"
