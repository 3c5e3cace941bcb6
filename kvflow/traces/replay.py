"""Virtual-time replay: arrivals, plan, runner, commit, in a discrete-event loop.

Nothing sleeps: the clock jumps to the end of each step (the runner's duration) or
to the next arrival when the instance is idle. The same inputs give the same
results, bit for bit.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kvflow import policies
from kvflow.config import KVFlowConfig
from kvflow.engine_adapters.base import ModelRunner
from kvflow.engine_adapters.simulated import SimulatedRunner
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
    num_leaked_blocks: int
    end_time: float
    wall_s: float


def make_policy(name: str, config: KVFlowConfig) -> Policy:
    """A policy by name, with its options from `config.policies` when it has a section."""
    section = getattr(config.policies, name, None)
    options = section.model_dump() if section is not None else {}
    return policies.create(name, **options)


def replay(
    requests: Sequence[Request],
    config: KVFlowConfig,
    policy: Policy | str,
    runner: ModelRunner | None = None,
    *,
    check_integrity: bool = False,
    on_step: StepHook | None = None,
) -> ReplayResult:
    """Replay `requests` through a fresh scheduler in virtual time.

    Args:
        requests: in any order; arrival times are on the replay clock (seconds).
        config: the instance's configuration.
        policy: a policy instance or a registered name.
        runner: defaults to the simulated runner from `config.sim`.
        check_integrity: call `Scheduler.check_integrity()` after every commit (slow;
            for tests).
        on_step: called after every commit with (scheduler, plan, result, now).
    """
    name = policy if isinstance(policy, str) else (policy.name or type(policy).__name__)
    if isinstance(policy, str):
        policy = make_policy(policy, config)
    if runner is None:
        runner = SimulatedRunner.from_config(config.sim)
    scheduler = Scheduler(config, policy)
    pending = sorted(requests, key=lambda r: r.arrival_time)
    states: list[RequestState] = []
    wall_start = time.perf_counter()
    now = pending[0].arrival_time if pending else 0.0
    i = 0
    n = len(pending)
    while True:
        while i < n and pending[i].arrival_time <= now:
            states.append(scheduler.add(pending[i]))
            i += 1
        if not scheduler.has_unfinished:
            if i >= n:
                break
            now = pending[i].arrival_time
            continue
        plan = scheduler.plan(now)
        if plan.is_empty:
            if i < n:
                now = pending[i].arrival_time
                continue
            if not scheduler.has_unfinished:  # the policy dropped the rest
                break
            raise ReplayStalledError(
                f"at t={now:.6f}s the scheduler holds {scheduler.num_unfinished} requests "
                "but scheduled nothing, and no arrival is due"
            )
        result = runner.execute(plan)
        now += result.duration_s
        scheduler.commit(plan, result, now)
        if check_integrity:
            scheduler.check_integrity()
        if on_step is not None:
            on_step(scheduler, plan, result, now)
    return ReplayResult(
        policy=name,
        states=states,
        stats=scheduler.stats,
        num_leaked_blocks=scheduler.num_leaked_blocks(),
        end_time=now,
        wall_s=time.perf_counter() - wall_start,
    )
