"""Load sweeps: replay a trace under every policy at every offered rate, in parallel,
on one instance or on fleets of several sizes behind several routers.

Each grid point rescales the trace's arrivals to the rate (`scale_to_rate`: same
requests, same order, arrival gaps stretched or squeezed), replays it in virtual time
(a fleet point through `replay_identical_fleet`: the rate is the whole fleet's) and
summarises it. Replays are deterministic, so a parallel sweep gives exactly the numbers
of a serial one (only a single instance's `wall_s` differs; fleet points leave it out).

The capacity of a curve (a policy, or a policy on one fleet shape; DistServe's
goodput) is the highest swept rate at which it, and every lower swept rate, keeps SLO
attainment at or above the target (90%).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any, TypeVar

from kvflow.cluster import routers
from kvflow.cluster.fleet import replay_identical_fleet
from kvflow.config import KVFlowConfig
from kvflow.request import Request
from kvflow.traces.metrics import RunReport, summarize_replay
from kvflow.traces.outcome import nothing_served_reason
from kvflow.traces.replay import make_policy, replay
from kvflow.traces.shaping import mean_rate, scale_to_rate

T = TypeVar("T")
R = TypeVar("R")

DEFAULT_ATTAINMENT_TARGET = 0.9
"""SLO attainment a policy must keep for a rate to count as within its capacity."""


@dataclass(frozen=True, slots=True)
class FleetShape:
    """A fleet of identical instances behind a router (a sweep point's fleet)."""

    num_instances: int
    router: str
    peers: bool = False

    def label(self, policy: str) -> str:
        """``router/policy x N`` (``+peers`` with peers), as fleet runs are named."""
        return f"{self.router}/{policy}{'+peers' if self.peers else ''} x{self.num_instances}"


@dataclass(frozen=True, slots=True)
class SweepPoint:
    """One grid point: a policy (on one instance, or on a fleet) at an offered rate,
    and what its replay achieved."""

    policy: str
    rate_rps: float
    report: RunReport
    nothing_served: str | None = None
    """Why the replay served no request (`nothing_served_reason`); None when it did."""
    fleet: FleetShape | None = None
    """The fleet replayed; None: one instance (`replay`)."""

    @property
    def label(self) -> str:
        """The curve the point belongs to: its policy, or its fleet's run name."""
        return self.policy if self.fleet is None else self.fleet.label(self.policy)

    def to_json(self) -> dict[str, Any]:
        """``{"policy", "rate_rps", "goodput_rps", "slo_attainment", ...}``: the run
        report's keys follow in their own order. A fleet point has ``"instances"``,
        ``"router"`` and ``"peers"`` after ``"policy"``, and no ``wall_s``."""
        data: dict[str, Any] = {"policy": self.policy}
        if self.fleet is not None:
            data["instances"] = self.fleet.num_instances
            data["router"] = self.fleet.router
            data["peers"] = self.fleet.peers
        data["rate_rps"] = self.rate_rps
        data["goodput_rps"] = self.report.goodput_rps
        data["slo_attainment"] = self.report.slo_attainment
        for key, value in self.report.to_json(wall_clock=self.fleet is None).items():
            data.setdefault(key, value)
        return data


def run_point(
    requests: Sequence[Request],
    config: KVFlowConfig,
    policy: str,
    rate_rps: float,
    fleet: FleetShape | None = None,
) -> SweepPoint:
    """Replay `requests` rescaled to `rate_rps` under `policy` (on `fleet` when given,
    each instance configured by `config`), and summarise it."""
    scaled = scale_to_rate(requests, rate_rps)
    if fleet is None:
        result = replay(scaled, config, policy)
        report = summarize_replay(result, policy=policy)
        return SweepPoint(policy, rate_rps, report, nothing_served_reason(result.states, config))
    from kvflow.traces.fleet_report import summarize_fleet  # it imports tables, which import us

    run = replay_identical_fleet(
        scaled, config, fleet.num_instances, policy, fleet.router, peers=fleet.peers
    )
    report = summarize_fleet(run).report
    return SweepPoint(
        policy, rate_rps, report, nothing_served_reason(run.states, config), fleet=fleet
    )


def _sweep_task(
    shared: tuple[Sequence[Request], KVFlowConfig],
    point: tuple[str, float, FleetShape | None],
) -> SweepPoint:
    requests, config = shared
    policy, rate, fleet = point
    return run_point(requests, config, policy, rate, fleet)


_worker_shared: Any = None


def _init_worker(shared: Any) -> None:
    global _worker_shared
    _worker_shared = shared


def _call_in_worker(task: Callable[[Any, T], R], item: T) -> R:
    if _worker_shared is None:
        raise RuntimeError("worker used before its initializer ran")
    return task(_worker_shared, item)


class ProcessRunner:
    """Runs `task(shared, item)` for many items in worker processes that each receive
    `shared` (the trace, the config) once, when they start; `jobs == 1` runs in this
    process. A context manager: the pool lives until it exits, across `map` calls.

    Args:
        shared: picklable inputs every task needs.
        jobs: worker processes, >= 1.
    """

    def __init__(self, shared: Any, jobs: int) -> None:
        if jobs < 1:
            raise ValueError(f"jobs must be >= 1, got {jobs!r}")
        self._shared = shared
        self._pool = (
            None
            if jobs == 1
            else ProcessPoolExecutor(max_workers=jobs, initializer=_init_worker, initargs=(shared,))
        )

    def __enter__(self) -> ProcessRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)

    def map(
        self,
        task: Callable[[Any, T], R],
        items: Sequence[T],
        on_result: Callable[[R], None] | None = None,
    ) -> list[R]:
        """`task(shared, item)` for each item, in the items' order; `on_result` is called
        in this process as each finishes (in finishing order). `task` must be a
        module-level function (it is pickled by name)."""
        if self._pool is None:
            results = []
            for item in items:
                results.append(task(self._shared, item))
                if on_result is not None:
                    on_result(results[-1])
            return results
        futures: dict[Future[R], int] = {
            self._pool.submit(_call_in_worker, task, item): i for i, item in enumerate(items)
        }
        done: dict[int, R] = {}
        for future in as_completed(futures):
            result = future.result()
            done[futures[future]] = result
            if on_result is not None:
                on_result(result)
        return [done[i] for i in range(len(items))]


def default_jobs(num_points: int) -> int:
    """Processes a sweep uses by default: one per grid point, at most one per CPU."""
    return max(1, min(os.cpu_count() or 1, num_points))


def jobs_for(jobs: int | None, num_tasks: int) -> int:
    """Worker processes for `num_tasks` tasks: `jobs` (`default_jobs` when None), but
    never more than the tasks, so a large `--jobs` forks no idle workers.

    Raises:
        ValueError: `jobs` below 1.
    """
    if jobs is None:
        return default_jobs(num_tasks)
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs!r}")
    return max(1, min(jobs, num_tasks))


def sweep(
    requests: Sequence[Request],
    config: KVFlowConfig,
    policies: Sequence[str],
    rates: Sequence[float],
    jobs: int | None = None,
    on_point: Callable[[SweepPoint], None] | None = None,
    fleets: Sequence[FleetShape] | None = None,
) -> list[SweepPoint]:
    """Replay the grid policies x fleets x rates and return its points, in that order
    of nesting (policy-major), each in the given order.

    Args:
        requests: the trace; at least two requests with different arrival times.
        config: the instance's configuration, the same at every point (and on every
            instance of a fleet).
        policies: registered policy names.
        rates: offered request rates in requests/s, each > 0 (a fleet's whole rate).
        jobs: worker processes (default `default_jobs`; at most one per point); 1
            runs in this process.
        on_point: called in this process as each point finishes (in finishing order).
        fleets: fleet shapes to replay each policy and rate on; None (or empty): one
            instance.

    Raises:
        ValueError: a rate <= 0, an empty grid, a fleet of no instance, or a trace
            without a rate to scale.
        UnknownNameError: an unknown policy or router (before anything is replayed).
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
    shapes: list[FleetShape | None] = list(fleets) if fleets else [None]
    for shape in shapes:
        if shape is not None:
            if shape.num_instances < 1:
                raise ValueError(f"a fleet needs >= 1 instance, got {shape.num_instances!r}")
            routers.create(shape.router, config)
    grid = [(policy, rate, shape) for policy in policies for shape in shapes for rate in rates]
    jobs = jobs_for(jobs, len(grid))
    with ProcessRunner((list(requests), config), jobs) as runner:
        return runner.map(_sweep_task, grid, on_point)


def capacity(
    points: Sequence[SweepPoint], attainment_target: float = DEFAULT_ATTAINMENT_TARGET
) -> dict[str, float | None]:
    """By curve (`SweepPoint.label`: the policy, or a fleet's run name): the highest
    swept rate at which SLO attainment, there and at every lower swept rate, is at
    least `attainment_target` (None: not even the lowest)."""
    result: dict[str, float | None] = {}
    for label in dict.fromkeys(p.label for p in points):
        best = None
        for point in sorted((p for p in points if p.label == label), key=lambda p: p.rate_rps):
            if point.report.slo_attainment < attainment_target:
                break
            best = point.rate_rps
        result[label] = best
    return result
