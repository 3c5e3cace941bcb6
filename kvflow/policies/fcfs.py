"""First come, first served."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from kvflow.policies.base import Policy, SchedulerView
from kvflow.request import RequestState


class FCFSPolicy(Policy):
    """Admits in queue order (arrival, with preempted requests first); preempts the
    most recently admitted request."""

    name = "fcfs"

    def order(self, waiting: Sequence[RequestState], view: SchedulerView) -> Iterable[RequestState]:
        return waiting
