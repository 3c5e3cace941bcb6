"""Explicit priority, then queue order."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from operator import attrgetter

from kvflow.policies.base import Policy, SchedulerView
from kvflow.request import RequestState

_priority = attrgetter("priority")


def _least_important(requests: Sequence[RequestState]) -> RequestState:
    """The request with the largest priority value; ties go to the latest in `requests`."""
    chosen = requests[-1]
    for req in requests:
        if req.priority >= chosen.priority:
            chosen = req
    return chosen


class PriorityPolicy(Policy):
    """Orders by (priority, queue position); a lower priority value is more important,
    as in vLLM. Preempts the least important running request (the last admitted among
    equals). With `preempt=True`, a waiting request that cannot be admitted preempts a
    running one that is strictly less important."""

    name = "priority"

    def __init__(self, preempt: bool = False) -> None:
        self.preempt = preempt

    def order(self, waiting: Sequence[RequestState], view: SchedulerView) -> Iterable[RequestState]:
        # Stable sort keeps queue order within a priority, and is linear when the queue
        # is already in priority order (e.g. a single priority).
        return sorted(waiting, key=_priority)

    def victim(self, candidates: Sequence[RequestState], view: SchedulerView) -> RequestState:
        return _least_important(candidates)

    def preempt_for(
        self, request: RequestState, running: Sequence[RequestState], view: SchedulerView
    ) -> RequestState | None:
        if not self.preempt or not running:
            return None
        candidate = _least_important(running)
        return candidate if candidate.priority > request.priority else None

    def __repr__(self) -> str:
        return f"PriorityPolicy(preempt={self.preempt})"
