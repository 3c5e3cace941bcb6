"""Per-tenant fairness with virtual token counters (VTC, Sheng et al., OSDI '24)."""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

from kvflow.policies.base import Policy, SchedulerView
from kvflow.request import RequestState

if TYPE_CHECKING:
    from kvflow.scheduler.plan import StepPlan


class FairPolicy(Policy):
    """Orders by tenant service received: next comes the oldest waiting request of the
    tenant with the smallest virtual token counter (FCFS within a tenant; ties between
    tenants go to the one whose request is earlier in the queue).

    Counters are charged in `on_step` for the work actually scheduled: each entry
    computing more than one token costs `input_weight` per token (prefill chunks,
    recompute), each single-token entry `output_weight` (a decode). `order` is lazy: it
    adds an estimate of each yielded request's prefill (uncached tokens times
    `input_weight`) to a copy of the counters that lives only for that call, so
    consecutive admissions interleave tenants, and nothing is charged twice.

    A tenant with no queued or running request that gets one has its counter lifted to
    the smallest counter among active tenants (to the counter of the last tenant that
    went idle, when none is active), so idle tenants cannot bank credit. Preempts the
    last admitted running request of the tenant with the largest counter.
    """

    name = "fair"

    def __init__(self, input_weight: float = 1.0, output_weight: float = 2.0) -> None:
        for key, value in (("input_weight", input_weight), ("output_weight", output_weight)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"fair: {key} must be >= 0, got {value!r}")
        self.input_weight = input_weight
        self.output_weight = output_weight
        self.counters: dict[str, float] = {}
        """Virtual tokens charged per tenant."""
        self.num_active: dict[str, int] = {}
        """Queued or running requests per active tenant (tenants with none are absent)."""
        self._active_ids: set[str] = set()
        self._last_idle_counter = 0.0

    def counter(self, tenant: str) -> float:
        """Virtual tokens charged to `tenant` so far (0 for a tenant never seen)."""
        return self.counters.get(tenant, 0.0)

    def order(self, waiting: Sequence[RequestState], view: SchedulerView) -> Iterable[RequestState]:
        if len(waiting) <= 1:
            return waiting
        return self._fair_order(waiting, view)

    def _fair_order(
        self, waiting: Sequence[RequestState], view: SchedulerView
    ) -> Iterator[RequestState]:
        queues: dict[str, list[tuple[int, RequestState]]] = {}
        for index, req in enumerate(waiting):
            queues.setdefault(req.tenant, []).append((index, req))
        if len(queues) == 1:
            yield from waiting
            return
        # Heap of (counter, queue index of the tenant's next request, tenant, position).
        heap = [(self.counter(t), q[0][0], t, 0) for t, q in queues.items()]
        heapq.heapify(heap)
        while heap:
            counter, _, tenant, pos = heap[0]
            req = queues[tenant][pos][1]
            yield req
            pos += 1
            if pos == len(queues[tenant]):
                heapq.heappop(heap)
                continue
            num_uncached = max(req.num_tokens - view.cached_tokens(req), 0)
            estimate = counter + num_uncached * self.input_weight
            heapq.heapreplace(heap, (estimate, queues[tenant][pos][0], tenant, pos))

    def on_add(self, request: RequestState, view: SchedulerView) -> None:
        if request.request_id in self._active_ids:
            return
        self._active_ids.add(request.request_id)
        tenant = request.tenant
        num = self.num_active.get(tenant, 0)
        if num == 0:
            floor = min((self.counter(t) for t in self.num_active), default=self._last_idle_counter)
            self.counters[tenant] = max(self.counter(tenant), floor)
        self.num_active[tenant] = num + 1

    def on_finish(self, request: RequestState, view: SchedulerView) -> None:
        if request.request_id not in self._active_ids:
            return  # never added (or finished twice)
        self._active_ids.remove(request.request_id)
        tenant = request.tenant
        num = self.num_active[tenant] - 1
        if num > 0:
            self.num_active[tenant] = num
        else:
            del self.num_active[tenant]
            self._last_idle_counter = self.counter(tenant)

    def on_step(self, plan: StepPlan, view: SchedulerView) -> None:
        counters = self.counters
        for req, num_tokens in zip(plan.requests, plan.num_tokens, strict=True):
            weight = self.output_weight if num_tokens == 1 else self.input_weight
            counters[req.tenant] = counters.get(req.tenant, 0.0) + num_tokens * weight

    def victim(self, candidates: Sequence[RequestState], view: SchedulerView) -> RequestState:
        chosen = candidates[-1]
        largest = -math.inf
        for req in candidates:
            counter = self.counter(req.tenant)
            if counter >= largest:  # >=: ties go to the last admitted
                chosen, largest = req, counter
        return chosen

    def __repr__(self) -> str:
        return f"FairPolicy(input_weight={self.input_weight}, output_weight={self.output_weight})"
