"""Load sweeps: replay a trace under every policy at every offered rate, in parallel.

Each grid point rescales the trace's arrivals to the rate (`scale_to_rate`: same
requests, same order, arrival gaps stretched or squeezed), replays it in virtual time
and summarises it. Replays are deterministic, so a parallel sweep gives exactly the
numbers of a serial one (only `wall_s` differs).

The capacity of a policy (DistServe's goodput) is the highest swept rate at which it,
and every lower swept rate, keeps SLO attainment at or above the target (90%).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any

from kvflow.config import KVFlowConfig
from kvflow.request import Request
from kvflow.traces.metrics import RunReport, summarize_replay
from kvflow.traces.outcome import nothing_served_reason
from kvflow.traces.replay import make_policy, replay
from kvflow.traces.shaping import mean_rate, scale_to_rate

DEFAULT_ATTAINMENT_TARGET = 0.9
"""SLO attainment a policy must keep for a rate to count as within its capacity."""


@dataclass(frozen=True, slots=True)
class SweepPoint:
    """One grid point: a policy at an offered rate, and what its replay achieved."""

    policy: str
    rate_rps: float
    report: RunReport
    nothing_served: str | None = None
    """Why the replay served no request (`nothing_served_reason`); None when it did."""

    def to_json(self) -> dict[str, Any]:
        """``{"policy", "rate_rps", "goodput_rps", "slo_attainment", ...}``: the run
        report's keys follow in their own order."""
        data: dict[str, Any] = {
            "policy": self.policy,
            "rate_rps": self.rate_rps,
            "goodput_rps": self.report.goodput_rps,
            "slo_attainment": self.report.slo_attainment,
        }
        for key, value in self.report.to_json().items():
            data.setdefault(key, value)
        return data


def run_point(
    requests: Sequence[Request], config: KVFlowConfig, policy: str, rate_rps: float
) -> SweepPoint:
    """Replay `requests` rescaled to `rate_rps` under `policy`, and summarise it."""
    result = replay(scale_to_rate(requests, rate_rps), config, policy)
    report = summarize_replay(result, policy=policy)
    return SweepPoint(policy, rate_rps, report, nothing_served_reason(result.states, config))


_worker_inputs: tuple[Sequence[Request], KVFlowConfig] | None = None


def _init_worker(requests: Sequence[Request], config: KVFlowConfig) -> None:
    global _worker_inputs
    _worker_inputs = (requests, config)


def _run_in_worker(policy: str, rate_rps: float) -> SweepPoint:
    if _worker_inputs is None:
        raise RuntimeError("sweep worker used before its initializer ran")
    return run_point(*_worker_inputs, policy, rate_rps)


def default_jobs(num_points: int) -> int:
    """Processes a sweep uses by default: one per grid point, at most one per CPU."""
    return max(1, min(os.cpu_count() or 1, num_points))


def sweep(
    requests: Sequence[Request],
    config: KVFlowConfig,
    policies: Sequence[str],
    rates: Sequence[float],
    jobs: int | None = None,
    on_point: Callable[[SweepPoint], None] | None = None,
) -> list[SweepPoint]:
    """Replay the grid policies x rates and return its points, policy-major in the given
    orders.

    Args:
        requests: the trace; at least two requests with different arrival times.
        config: the instance's configuration, the same at every point.
        policies: registered policy names.
        rates: offered request rates in requests/s, each > 0.
        jobs: worker processes (default `default_jobs`); 1 runs in this process.
        on_point: called in this process as each point finishes (in finishing order).

    Raises:
        ValueError: a rate <= 0, an empty grid, or a trace without a rate to scale.
        UnknownNameError: an unknown policy (before anything is replayed).
    """
    if not policies or not rates:
        raise ValueError("a sweep needs at least one policy and one rate")
    for rate in rates:
        if not rate > 0:
            raise ValueError(f"rates must be > 0 requests/s, got {rate!r}")
    if mean_rate(requests) is None:
        raise ValueError(
            "a sweep needs a trace of at least two requests arriving at different times"
        )
    for name in policies:
        make_policy(name, config)
    grid = [(policy, rate) for policy in policies for rate in rates]
    jobs = default_jobs(len(grid)) if jobs is None else jobs
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs!r}")
    if jobs == 1:
        points = []
        for policy, rate in grid:
            points.append(run_point(requests, config, policy, rate))
            if on_point is not None:
                on_point(points[-1])
        return points
    with ProcessPoolExecutor(
        max_workers=jobs, initializer=_init_worker, initargs=(list(requests), config)
    ) as pool:
        futures: dict[Future[SweepPoint], int] = {
            pool.submit(_run_in_worker, policy, rate): i for i, (policy, rate) in enumerate(grid)
        }
        done: list[SweepPoint | None] = [None] * len(grid)
        for future in as_completed(futures):
            point = future.result()
            done[futures[future]] = point
            if on_point is not None:
                on_point(point)
    return [point for point in done if point is not None]


def capacity(
    points: Sequence[SweepPoint], attainment_target: float = DEFAULT_ATTAINMENT_TARGET
) -> dict[str, float | None]:
    """By policy: the highest swept rate at which SLO attainment, there and at every
    lower swept rate, is at least `attainment_target` (None: not even the lowest)."""
    result: dict[str, float | None] = {}
    for policy in dict.fromkeys(p.policy for p in points):
        best = None
        for point in sorted((p for p in points if p.policy == policy), key=lambda p: p.rate_rps):
            if point.report.slo_attainment < attainment_target:
                break
            best = point.rate_rps
        result[policy] = best
    return result
