"""Builders that make tests read like specifications."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from kvflow.config import KVFlowConfig
from kvflow.engine_adapters.base import ModelRunner
from kvflow.kv.store import KVStore
from kvflow.policies.base import Policy
from kvflow.request import SLO, Request
from kvflow.scheduler import Scheduler, StepPlan, StepResult
from kvflow.traces.replay import make_policy

_counter = itertools.count()


def make_config(**settings: Any) -> KVFlowConfig:
    """A config from dotted keys: make_config(**{"kv.block_size": 4})."""
    return KVFlowConfig.from_dict({}, settings)


def make_scheduler(policy: str | Policy = "fcfs", /, **settings: Any) -> Scheduler:
    config = make_config(**settings)
    if isinstance(policy, str):
        policy = make_policy(policy, config)
    return Scheduler(config, policy)


def make_request(
    prompt: int | Sequence[int] = 32,
    max_new_tokens: int = 4,
    arrival: float = 0.0,
    request_id: str | None = None,
    *,
    base: int = 1000,
    ttft_ms: float | None = None,
    **kwargs: Any,
) -> Request:
    """A request with `prompt` tokens (a count gives `base, base+1, ...`)."""
    tokens = list(range(base, base + prompt)) if isinstance(prompt, int) else list(prompt)
    rid = request_id if request_id is not None else f"r{next(_counter)}"
    slo = SLO(ttft_ms=ttft_ms) if ttft_ms is not None else SLO()
    return Request(
        request_id=rid,
        prompt_token_ids=tokens,
        max_new_tokens=max_new_tokens,
        arrival_time=arrival,
        slo=slo,
        **kwargs,
    )


class ScriptedRunner(ModelRunner):
    """Samples `token` for every entry that samples and takes `step_s` per step.
    Records every plan it saw."""

    def __init__(self, token: int = 7, step_s: float = 0.01) -> None:
        self.token = token
        self.step_s = step_s
        self.plans: list[StepPlan] = []

    def execute(self, plan: StepPlan) -> StepResult:
        self.plans.append(plan)
        return StepResult([self.token] * len(plan.requests), self.step_s)


def run_to_completion(
    scheduler: Scheduler, runner: ScriptedRunner | None = None, max_steps: int = 100_000
) -> list[StepPlan]:
    """Step the scheduler until idle, checking integrity after every commit."""
    runner = runner or ScriptedRunner()
    now = 0.0
    plans: list[StepPlan] = []
    for _ in range(max_steps):
        if not scheduler.has_unfinished:
            return plans
        plan = scheduler.plan(now)
        result = runner.execute(plan)
        now += result.duration_s
        scheduler.commit(plan, result, now)
        scheduler.check_integrity()
        plans.append(plan)
    raise AssertionError(f"not finished after {max_steps} steps")


def run_over_real_copies(
    scheduler: Scheduler, runner: ModelRunner, store: KVStore, max_steps: int = 10_000
) -> float:
    """Step the scheduler until idle over a store whose copies are real (a step with
    nothing runnable waits for one to land), checking integrity after every commit.
    Returns the time at the end (10 ms a step)."""
    now = 0.0
    for _ in range(max_steps):
        if not scheduler.has_unfinished:
            return now
        plan = scheduler.plan(now)
        now += 0.01
        if plan.is_empty:
            store.wait(1.0)  # everything runnable waits for a copy
            continue
        scheduler.commit(plan, runner.execute(plan), now)
        scheduler.check_integrity()
    raise AssertionError(f"not finished after {max_steps} steps")
