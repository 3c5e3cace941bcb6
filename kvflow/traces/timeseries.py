"""A bounded-memory time series of a replay, sampled from its `on_step` hook.

`TimeSeriesRecorder.on_step` is a `replay(..., on_step=...)` hook. It samples every
`stride`-th step; when `max_points` samples are held it drops every other one and
doubles the stride, so a replay of any length keeps between `max_points / 2` and
`max_points` evenly spaced samples (in steps) and costs a counter decrement on most
steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kvflow.scheduler.core import Scheduler
from kvflow.scheduler.plan import StepPlan, StepResult
from kvflow.traces.replay import StepHook


@dataclass(frozen=True, slots=True)
class TimeSeries:
    """Samples of one replay, one list entry per sample, all the same length.

    Attributes:
        time_s: virtual time at the end of the sampled step.
        num_waiting: requests queued after the step: waiting (preempted ones included)
            or waiting for KV.
        num_batched: requests the step computed (the running batch size).
        kv_usage: device blocks held by requests / device blocks in all (0..1).
        hit_rate: prompt tokens found cached / prompt tokens looked up, so far.
        step_stride: steps between consecutive samples.
    """

    time_s: list[float]
    num_waiting: list[int]
    num_batched: list[int]
    kv_usage: list[float]
    hit_rate: list[float]
    step_stride: int

    def __len__(self) -> int:
        return len(self.time_s)


class TimeSeriesRecorder:
    """Samples queue length, batch size, KV usage and hit rate after replay steps.

    Args:
        max_points: most samples held (an even number >= 2).
    """

    def __init__(self, max_points: int = 2048) -> None:
        if max_points < 2 or max_points % 2:
            raise ValueError(f"max_points must be an even number >= 2, got {max_points!r}")
        self.max_points = max_points
        self._stride = 1
        self._countdown = 1
        self._time_s: list[float] = []
        self._num_waiting: list[int] = []
        self._num_batched: list[int] = []
        self._kv_usage: list[float] = []
        self._hit_rate: list[float] = []

    def on_step(self, scheduler: Scheduler, plan: StepPlan, result: StepResult, now: float) -> None:
        """The replay hook: sample this step if it is due."""
        self._countdown -= 1
        if self._countdown:
            return
        pool = scheduler.pool
        self._time_s.append(now)
        self._num_waiting.append(scheduler.num_unfinished - len(scheduler.running))
        self._num_batched.append(len(plan.requests))
        self._kv_usage.append(pool.num_used_blocks / pool.num_blocks)
        self._hit_rate.append(scheduler.stats.prefix_hit_rate)
        self._countdown = self._stride
        if len(self._time_s) >= self.max_points:
            # Keep samples 0, 2, 4, ...: the last kept one is `stride` steps back, so the
            # next sample is due in `stride` steps to keep the new spacing of 2 * stride.
            for values in self._columns():
                del values[1::2]
            self._stride *= 2

    def _columns(self) -> tuple[list[float], list[int], list[int], list[float], list[float]]:
        return self._time_s, self._num_waiting, self._num_batched, self._kv_usage, self._hit_rate

    def series(self) -> TimeSeries:
        """A copy of the samples so far."""
        return TimeSeries(
            time_s=list(self._time_s),
            num_waiting=list(self._num_waiting),
            num_batched=list(self._num_batched),
            kv_usage=list(self._kv_usage),
            hit_rate=list(self._hit_rate),
            step_stride=self._stride,
        )


def chain_hooks(hooks: Sequence[StepHook | None]) -> StepHook | None:
    """One hook calling each given hook in order (None when there are none)."""
    active = [hook for hook in hooks if hook is not None]
    if not active:
        return None
    if len(active) == 1:
        return active[0]

    def on_step(scheduler: Scheduler, plan: StepPlan, result: StepResult, now: float) -> None:
        for hook in active:
            hook(scheduler, plan, result, now)

    return on_step
