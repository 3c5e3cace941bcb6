"""What `AsyncEngine` spends per step around the runner's forward pass.

A step of the engine is more than `runner.execute`: the hop to the worker thread and
back, the overlapped planning of the next step competing for the interpreter, the
commit, and each request's new tokens put on its stream (and the consumer tasks that
wake up for them). `StepTimer` wraps a runner and records when each step started;
while the engine is busy (the next step was planned before this one ended), the time
from one step's start to the next one's is the engine's whole step. What the runner
model does not explain of it is the engine's overhead, fitted as a cost per step plus
a cost per scheduled request (`fit_overhead`).
"""

from __future__ import annotations

import dataclasses
import itertools
import statistics
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from kvflow.engine_adapters.base import ModelRunner
from kvflow.engine_adapters.latency_fit import RUNNER_TERMS, Sample, fit_live, median_rel_error
from kvflow.engine_adapters.simulated import LatencyModel, StepFeatures
from kvflow.scheduler.plan import StepPlan, StepResult


class TimedStep(NamedTuple):
    features: StepFeatures
    planned_at: float
    """The plan's `now` (the engine's clock when it was made)."""
    started_at: float
    """The engine's clock when execute began."""
    execute_s: float
    """The runner's reported duration."""


class StepTimer(ModelRunner):
    """A runner that runs `inner` and records every step (`steps`), on `clock` (the
    engine's clock)."""

    def __init__(self, inner: ModelRunner, clock: Callable[[], float]) -> None:
        self.inner = inner
        self.clock = clock
        self.name = inner.name
        self.supports_overlap = inner.supports_overlap
        self.steps: list[TimedStep] = []

    def execute(self, plan: StepPlan) -> StepResult:
        started = self.clock()
        result = self.inner.execute(plan)
        self.steps.append(TimedStep(StepFeatures.of(plan), plan.now, started, result.duration_s))
        return result


class EngineStep(NamedTuple):
    """A busy step: its features, the runner's duration and the engine's (start to the
    next step's start)."""

    features: StepFeatures
    execute_s: float
    period_s: float


def step_periods(steps: Sequence[TimedStep]) -> list[float | None]:
    """Per step, the time from its start to its successor's when the successor was
    planned before it ended (the engine went straight on: overlap, so that time is all
    engine work); None where the engine went idle after it, and for the last step."""
    periods: list[float | None] = [
        after.started_at - step.started_at
        if after.planned_at <= step.started_at + step.execute_s
        else None
        for step, after in itertools.pairwise(steps)
    ]
    return [*periods, None] if steps else []


def busy_steps(steps: Sequence[TimedStep]) -> list[EngineStep]:
    """The steps with a period (`step_periods`): those the engine went straight on from."""
    return [
        EngineStep(step.features, step.execute_s, period)
        for step, period in zip(steps, step_periods(steps), strict=True)
        if period is not None
    ]


class Overhead(NamedTuple):
    step_overhead_ms: float
    seq_overhead_us: float
    num_steps: int
    median_rel_error: float
    """Median |predicted - measured| / measured of whole engine steps: the runner
    model (times `runner_scale` when the fit rescales) plus this overhead against each
    busy step's period."""
    runner_median_rel_error: float
    """Median |predicted - measured| / measured of the runner model as given against
    the runner's own durations inside the engine (a large figure: the machine's speed
    moved since the grid was timed, or live steps run warmer or colder than the grid's)."""
    runner_scale: float
    """Median of (runner's duration in the engine / the runner model's time) over the
    busy steps."""
    runner: LatencyModel
    """The runner's terms the whole-step figure used: the model as given, times
    `runner_scale` (`rescale` without a grid) or refitted on the busy steps with the
    grid beside them (`rescale` with `grid`, see `fit_live`); the engine's terms 0."""
    live_median_rel_error: float
    """Median |predicted - measured| / measured of `runner` against the runner's own
    durations inside the engine."""


def scaled(model: LatencyModel, factor: float, terms: Sequence[str] = RUNNER_TERMS) -> LatencyModel:
    """`model` with each of `terms` (by default every runner term, not the engine's)
    multiplied by `factor`."""
    return dataclasses.replace(model, **{t: getattr(model, t) * factor for t in terms})


def fit_overhead(
    runner_model: LatencyModel,
    steps: Sequence[EngineStep],
    *,
    rescale: bool = False,
    grid: Sequence[Sample] = (),
) -> Overhead:
    """The engine's overhead as a cost per step plus one per scheduled request: the
    least-squares fit (both >= 0) of each busy step's period minus the runner's own
    duration of that step. Both are measured in the same run, so a machine that got
    slower or faster since the grid was timed does not leak into the overhead. Least
    squares on absolute time predicts the sum of step times, which latencies add up.

    With `rescale`, the runner's terms follow the engine's own steps: with `grid` (the
    calibration's timed mixes), refitted on the busy steps with the grid beside them
    (`fit_live`: the engine's steps say what its mixes cost, the grid tells the terms
    apart); without, `runner_model` times `runner_scale` (the grid gives the relative
    costs of steps, the engine's steps the level). `median_rel_error` is that of the
    resulting model, as `kvflow calibrate` writes it.

    Raises:
        ValueError: no steps.
    """
    from scipy.optimize import nnls

    if not steps:
        raise ValueError("fit_overhead needs at least one busy engine step")
    residual = np.array([s.period_s - s.execute_s for s in steps])
    matrix = np.array([[1e-3, s.features.num_seqs * 1e-6] for s in steps])
    norms = matrix.max(axis=0)
    norms[norms == 0] = 1.0
    coef, _ = nnls(matrix / norms, residual, maxiter=100)
    per_step, per_seq = (float(c) for c in coef / norms)
    predicted = [runner_model.runner_time_s(s.features) for s in steps]
    pairs = [(p, s.execute_s) for p, s in zip(predicted, steps, strict=True) if p > 0]
    scale = statistics.median(e / p for p, e in pairs) if pairs else 1.0
    runner = [abs(p - e) / e for p, e in pairs if e > 0]
    live = [Sample(s.features, s.execute_s) for s in steps if s.execute_s > 0]
    if rescale and grid and live:
        chosen = fit_live(live, grid)
    elif rescale:
        chosen = scaled(runner_model, scale)
    else:
        chosen = runner_model
    chosen = dataclasses.replace(chosen, step_overhead_ms=0.0, seq_overhead_us=0.0)
    model = dataclasses.replace(chosen, step_overhead_ms=per_step, seq_overhead_us=per_seq)
    whole = [abs(model.features_time_s(s.features) - s.period_s) / s.period_s for s in steps]
    return Overhead(
        per_step,
        per_seq,
        len(steps),
        statistics.median(whole),
        statistics.median(runner) if runner else float("nan"),
        scale,
        chosen,
        median_rel_error(chosen, live) if live else float("nan"),
    )


def engine_noise(steps: Sequence[EngineStep]) -> float:
    """The median relative deviation of `period / execute` from its median: how much
    the engine's step varies around the runner's for the same work, a measure of the
    machine's noise during the run."""
    ratios = [s.period_s / s.execute_s for s in steps if s.execute_s > 0]
    if not ratios:
        return float("nan")
    mid = statistics.median(ratios)
    return statistics.median(abs(r / mid - 1.0) for r in ratios)


__all__ = [
    "EngineStep",
    "Overhead",
    "StepTimer",
    "TimedStep",
    "busy_steps",
    "engine_noise",
    "fit_overhead",
    "scaled",
    "step_periods",
]
