"""Virtual-time replay: arrivals, plan, runner, commit, in a discrete-event loop.

Nothing sleeps: the clock jumps to the end of each step (the runner's duration) or
to the next arrival when the instance is idle. The same inputs give the same
results, bit for bit.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kvflow.config import KVFlowConfig
from kvflow.engine_adapters.base import ModelRunner
from kvflow.engine_adapters.simulated import SimulatedRunner
from kvflow.gc_pause import cyclic_gc_paused
from kvflow.kv.store import KVStore, StoreStats
from kvflow.policies import make_policy as make_policy  # re-exported: it lived here
from kvflow.policies.base import Policy
from kvflow.request import Request, RequestState
from kvflow.scheduler.core import Scheduler
from kvflow.scheduler.plan import StepPlan, StepResult
from kvflow.scheduler.stats import SchedulerStats

StepHook = Callable[[Scheduler, StepPlan, StepResult, float], None]


class ReplayStalledError(RuntimeError):
    """The scheduler had work but could schedule nothing and no arrival was due."""


@dataclass(frozen=True, slots=True)
class ReplayResult:
    policy: str
    states: list[RequestState]
    stats: SchedulerStats
    store_stats: StoreStats
    num_leaked_blocks: int
    end_time: float
    wall_s: float


def _settle_real_copies(scheduler: Scheduler) -> None:
    """Before virtual time jumps over an idle gap, let real copies (whose duration is
    not virtual) finish, as they would have in that gap."""
    scheduler.store.engine.settle()


def resolve_policy(policy: Policy | str, config: KVFlowConfig) -> tuple[str, Policy]:
    """The name a replay reports under and the policy instance (a registered name is
    made with `make_policy`)."""
    if isinstance(policy, str):
        return policy, make_policy(policy, config)
    return policy.name or type(policy).__name__, policy


def replay(
    requests: Sequence[Request],
    config: KVFlowConfig,
    policy: Policy | str,
    runner: ModelRunner | None = None,
    *,
    store: KVStore | None = None,
    check_integrity: bool = False,
    on_step: StepHook | None = None,
) -> ReplayResult:
    """Replay `requests` through a fresh scheduler in virtual time.

    Args:
        requests: in any order; arrival times are on the replay clock (seconds).
        config: the instance's configuration.
        policy: a policy instance or a registered name.
        runner: defaults to the simulated runner from `config.sim`.
        store: the KV store (e.g. `KVStore.with_tensors` for real copies); a simulated
            one from `config.kv` by default.
        check_integrity: call `Scheduler.check_integrity()` after every commit (slow;
            for tests).
        on_step: called after every commit with (scheduler, plan, result, now).

    With `config.sim.overlap` (and a runner that supports it), steps follow
    `AsyncEngine`'s overlapped loop.
    """
    name, policy = resolve_policy(policy, config)
    if runner is None:
        runner = SimulatedRunner.from_config(config.sim)
    scheduler = Scheduler(config, policy, store)
    pending = sorted(requests, key=lambda r: r.arrival_time)
    states: list[RequestState] = []
    wall_start = time.perf_counter()
    overlap = config.sim.overlap and runner.supports_overlap
    with cyclic_gc_paused():
        now = _run(scheduler, runner, pending, states, check_integrity, on_step, overlap)
    scheduler.store.drain(now)  # demotions still in flight
    if check_integrity:
        scheduler.check_integrity()
    return ReplayResult(
        policy=name,
        states=states,
        stats=scheduler.stats,
        store_stats=scheduler.store.stats,
        num_leaked_blocks=scheduler.num_leaked_blocks(),
        end_time=now,
        wall_s=time.perf_counter() - wall_start,
    )


def _when_idle(scheduler: Scheduler, now: float, next_arrival: float | None) -> float | None:
    """After an empty plan: the time to go on from (the next finished copy or arrival,
    whichever comes first; `now` again after waiting for real copies to land), or None
    when nothing is left (the policy dropped the rest)."""
    t_copy = scheduler.next_event_time()
    if t_copy is None and scheduler.store.num_inflight:
        scheduler.store.wait(1.0)  # real copies: let them land before time moves
        return now
    candidates = [t for t in (t_copy, next_arrival) if t is not None]
    if candidates:
        _settle_real_copies(scheduler)
        return max(now, min(candidates))
    if not scheduler.has_unfinished:
        return None
    raise ReplayStalledError(
        f"at t={now:.6f}s the scheduler holds {scheduler.num_unfinished} requests "
        "but scheduled nothing, and no arrival or copy is due"
    )


def _run(
    scheduler: Scheduler,
    runner: ModelRunner,
    pending: list[Request],
    states: list[RequestState],
    check_integrity: bool,
    on_step: StepHook | None,
    overlap: bool,
) -> float:
    """The event loop; returns the virtual time it ended at.

    With `overlap`, steps go as `AsyncEngine` steps with overlap: when step N starts,
    step N+1 is planned (`overlapped=True`) from the arrivals until then, and it executes
    right after step N's commit; a request arriving while step N runs waits for step
    N+2. After a plan short of blocks the next one is made after the commit, as the
    engine does. Idle gaps are skipped either way."""
    now = pending[0].arrival_time if pending else 0.0
    i = 0
    n = len(pending)
    plan: StepPlan | None = None
    while True:
        while i < n and pending[i].arrival_time <= now:
            states.append(scheduler.add(pending[i]))
            i += 1
        if plan is None:
            if not scheduler.has_unfinished:
                if i >= n:
                    break
                _settle_real_copies(scheduler)
                now = pending[i].arrival_time
                continue
            plan = scheduler.plan(now)
            if plan.is_empty:
                plan = None
                idle_until = _when_idle(scheduler, now, pending[i].arrival_time if i < n else None)
                if idle_until is None:
                    break
                now = idle_until
                continue
        next_plan = None
        if overlap and not scheduler.last_plan_short_of_blocks:
            next_plan = scheduler.plan(now, overlapped=True)
        result = runner.execute(plan)
        now += result.duration_s
        if overlap:
            while i < n and pending[i].arrival_time <= now:  # they arrived during the step
                states.append(scheduler.add(pending[i]))
                i += 1
        scheduler.commit(plan, result, now)
        if check_integrity:
            scheduler.check_integrity()
        if on_step is not None:
            on_step(scheduler, plan, result, now)
        plan = next_plan if next_plan is not None and not next_plan.is_empty else None
    return now
