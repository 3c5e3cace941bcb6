"""The scheduler's requests by state, and the changes of state that free their blocks.

A request waits (`waiting`, in the order it came or was preempted), loads its prefix
from lower tiers (`loading`, `kvflow.scheduler.loads`), runs (`running`), and finishes;
preemption takes a running request back to the front of `waiting`. The containers are
changed in place, never rebound: the scheduler and its admission, commit and checks hold
the same ones."""

from __future__ import annotations

from collections.abc import Sequence

from kvflow.policies.base import Policy, SchedulerView
from kvflow.request import FinishReason, RequestState, RequestStatus
from kvflow.scheduler.kv_manager import KVManager
from kvflow.scheduler.loads import Loads
from kvflow.scheduler.stats import SchedulerStats

# Enum members bound once (in Python 3.11 `RequestStatus.RUNNING` goes through
# `EnumType.__getattr__`, ~1k instructions): read per request or per step here.
_RUNNING = RequestStatus.RUNNING
_PREEMPTED = RequestStatus.PREEMPTED
_FINISHED = RequestStatus.FINISHED


class RequestQueues:
    """The waiting, loading and running requests of one scheduler.

    Args:
        kv: the scheduler's KV manager (frees a request's blocks).
        loads: the requests loading their prefix (`loading` is its queue).
        policy: told of each request queued and finished.
        view: what the policy sees of the scheduler.
        stats: the scheduler's counters (preemptions, swaps).
    """

    def __init__(
        self,
        kv: KVManager,
        loads: Loads,
        policy: Policy,
        view: SchedulerView,
        stats: SchedulerStats,
    ) -> None:
        self.kv = kv
        self.loads = loads
        self.policy = policy
        self.view = view
        self.stats = stats
        self.waiting: dict[str, RequestState] = {}
        self.running: list[RequestState] = []
        self.loading = loads.loading
        self.active_ids: set[str] = set()
        """Ids of the requests in `waiting`, `loading` and `running`."""

    def enqueue(self, state: RequestState) -> None:
        """Queue a new request at the back of `waiting`."""
        rid = state.request_id
        self.waiting[rid] = state
        self.active_ids.add(rid)
        self.policy.on_add(state, self.view)

    def remove(self, request_id: str) -> RequestState | None:
        """Take an active request out of whichever queue holds it (None: no such
        request); its blocks are still its own."""
        state = self.waiting.pop(request_id, None)
        if state is None:
            state = self.loads.cancel(request_id)
        if state is None:
            state = next((r for r in self.running if r.request_id == request_id), None)
            if state is not None:
                self.running.remove(state)
        return state

    def preempt(self, victim: RequestState, now: float, candidates: Sequence[RequestState]) -> None:
        """Queue a running request, the policy's choice among `candidates`, again at the
        front of `waiting`, its blocks released (swapped down or dropped:
        `KVManager.free_preempted`).

        Raises:
            ValueError: the policy chose a request that is not one of the candidates.
        """
        if victim.status is not _RUNNING or victim not in candidates:
            raise ValueError(
                f"policy chose {victim.request_id!r} as a victim, which is not one of "
                "the running candidates"
            )
        self.running.remove(victim)
        if self.kv.free_preempted(victim, now):
            self.stats.num_swaps += 1
        victim.num_computed_tokens = 0
        victim.num_inflight_samples = 0
        victim.status = _PREEMPTED
        victim.num_preemptions += 1
        self.stats.num_preemptions += 1
        waiting = self.waiting
        rest = waiting.copy()
        waiting.clear()
        waiting[victim.request_id] = victim
        waiting.update(rest)

    def finish(self, req: RequestState, reason: FinishReason, now: float, detail: str = "") -> None:
        """Finish a request (out of its queue already) and release its blocks."""
        self.kv.free(req, now)
        self.active_ids.discard(req.request_id)
        req.status = _FINISHED
        req.finish_reason = reason
        req.finish_detail = detail
        req.finish_time = now
        self.policy.on_finish(req, self.view)
