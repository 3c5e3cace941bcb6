"""End-to-end validation of a latency model: one trace replayed in real time through a
real runner (twice, for the machine's run-to-run spread) and in virtual time through
the simulator, compared metric by metric (the engine's own time per step, for
`kvflow calibrate`, is measured in `kvflow.traces.engine_workload`).

The simulated run is set up as the real one: the same scheduler and KV settings (block
counts included), the same policy, the engine's overlapped scheduling
(`sim.overlap`), and output lengths from the trace on both sides (a real run with a
random-weight model has no end-of-sequence token; the simulated runner never stops
early).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvflow.engine_adapters.base import ModelRunner
from kvflow.engine_adapters.simulated import StepFeatures
from kvflow.scheduler.plan import StepPlan, StepResult
from kvflow.traces.metrics import RunReport, summarize_replay

if TYPE_CHECKING:
    from kvflow.config import KVFlowConfig
    from kvflow.engine_adapters.engine_timing import TimedStep
    from kvflow.engine_adapters.factory import LoadedModel
    from kvflow.engine_adapters.simulated import LatencyModel
    from kvflow.kv.store import KVStore
    from kvflow.request import Request
    from kvflow.traces.replay import ReplayResult

LATENCY_METRICS = ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")
PERCENTILES = ("p50", "p90", "p99")


@dataclass(frozen=True, slots=True)
class MetricRow:
    """One figure of the comparison. `real` is the mean over the real runs (each in
    `real_runs`); `error` is simulated / real - 1 (negative: the simulator is
    optimistic); `spread` is (largest - smallest real run) / real, the machine's own
    run-to-run noise that any prediction is judged against (None for one run)."""

    metric: str
    real_runs: tuple[float, ...]
    simulated: float
    error_at_speed: float | None = None
    """The mean over the real runs of (simulated at that run's speed / that run - 1):
    the simulation repeated with every term scaled by the run's measured whole-step
    speed (`RunSpeed.engine`), so what is left is the simulator's own error
    (scheduling, queueing, batching, the relative costs of steps), with the machine's
    speed during each run taken out. None when not computed."""
    error_at_step_times: float | None = None
    """The mean over the real runs of (simulated with that run's own step times / that
    run - 1): the simulation's k-th step takes as long as the run's k-th step did
    (`RecordedSteps`), so no latency model is left in it and what remains is the
    schedule's error (arrivals against steps, batching, overlap, queueing). Near 0 the
    simulator reproduces the engine and the whole error is the pricing of steps. None
    when not computed."""
    error_at_probed_speed: float | None = None
    """The mean over the real runs of (simulated at the machine's probed speed around
    that run / that run - 1): every term scaled by `RunSpeed.probe`, the machine's speed
    measured apart from the run (calibrated mixes timed just before and after it), so,
    unlike `error_at_speed`, nothing of the run's own steps goes into it. None when not
    probed."""

    @property
    def real(self) -> float:
        return statistics.fmean(self.real_runs)

    @property
    def error(self) -> float:
        return _ratio(self.simulated, self.real)

    @property
    def spread(self) -> float | None:
        if len(self.real_runs) < 2:
            return None
        return _ratio(max(self.real_runs), self.real) - _ratio(min(self.real_runs), self.real)

    def to_json(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "real": self.real,
            "real_runs": list(self.real_runs),
            "simulated": self.simulated,
            "error": self.error,
            "spread": self.spread,
            "error_at_speed": self.error_at_speed,
            "error_at_step_times": self.error_at_step_times,
            "error_at_probed_speed": self.error_at_probed_speed,
        }


def _ratio(a: float, b: float) -> float:
    """a / b - 1, or 0 where both are 0 (nan where only b is)."""
    if b == 0:
        return 0.0 if a == 0 else float("nan")
    return a / b - 1.0


def _figures(report: RunReport) -> dict[str, float]:
    out: dict[str, float] = {}
    for metric in LATENCY_METRICS:
        summary = getattr(report, metric)
        for pct in PERCENTILES:
            out[f"{metric.removesuffix('_ms')} {pct}"] = float(getattr(summary, pct))
    out["steps"] = float(report.sim_steps)
    out["hit rate"] = report.prefix_hit_rate
    return out


def compare(
    real: Sequence[RunReport],
    simulated: RunReport,
    at_speed: Sequence[RunReport] = (),
    at_step_times: Sequence[RunReport] = (),
    at_probed_speed: Sequence[RunReport] = (),
) -> list[MetricRow]:
    """Per metric (TTFT, TPOT, ITL, E2E at p50/p90/p99 in ms, steps, prefix hit rate),
    the real runs' figures and the simulated one (see `MetricRow`); with `at_speed`
    (one simulated report per real run, at that run's speed), `error_at_speed` too, and
    with `at_step_times` (one per real run, with its step times), `error_at_step_times`,
    and with `at_probed_speed` (one per real run, at the machine's probed speed around
    it), `error_at_probed_speed`.

    Raises:
        ValueError: no real run, or `at_speed`, `at_step_times` or `at_probed_speed` not
            one per real run.
    """
    if not real:
        raise ValueError("compare needs at least one real run")
    for name, reports in (
        ("at_speed", at_speed),
        ("at_step_times", at_step_times),
        ("at_probed_speed", at_probed_speed),
    ):
        if reports and len(reports) != len(real):
            raise ValueError(f"{name} needs one report per real run ({len(real)})")
    runs = [_figures(r) for r in real]
    sim = _figures(simulated)
    by_speed = [_figures(r) for r in at_speed]
    by_times = [_figures(r) for r in at_step_times]
    by_probe = [_figures(r) for r in at_probed_speed]

    def mean_error(paired: list[dict[str, float]], name: str) -> float | None:
        errors = [_ratio(p[name], r[name]) for p, r in zip(paired, runs, strict=False)]
        return statistics.fmean(errors) if errors else None

    return [
        MetricRow(
            name,
            tuple(run[name] for run in runs),
            sim[name],
            mean_error(by_speed, name),
            mean_error(by_times, name),
            mean_error(by_probe, name),
        )
        for name in sim
    ]


def summary_errors(rows: Sequence[MetricRow]) -> dict[str, float]:
    """The largest |error| and |spread| over the latency rows at p50 and at p99."""
    out: dict[str, float] = {}
    for pct in ("p50", "p99"):
        picked = [r for r in rows if r.metric.endswith(pct)]
        out[f"max_abs_error_{pct}"] = max((abs(r.error) for r in picked), default=0.0)
        spreads = [abs(r.spread) for r in picked if r.spread is not None]
        if spreads:
            out[f"max_abs_spread_{pct}"] = max(spreads)
    return out


@dataclass(frozen=True, slots=True)
class RunSpeed:
    """How one real run's steps compared with the latency model, step by step (the
    features of each step the engine ran, priced by the model, against what it
    measured): `runner` is the runner's measured time over the model's runner terms,
    `engine` the busy steps' periods (start to the next step's start) over the whole
    model, each summed over the run's steps. Near 1 the model priced that run's own steps
    right, and a latency error comes from elsewhere (scheduling, queueing); a run at
    1.3 ran its steps 30% slower than the model says, which no latency figure of it
    can then match (the machine was slower during it, or its mixes cost more)."""

    runner: float
    engine: float
    num_steps: int
    num_busy_steps: int
    probe: float | None = None
    """The machine's speed around the run, measured apart from it: the mean of a
    `SpeedProbe` just before and just after (1: as while the grid was timed). None when
    not probed."""

    def to_json(self) -> dict[str, Any]:
        return {
            "runner_measured_over_model": self.runner,
            "engine_measured_over_model": self.engine,
            "num_steps": self.num_steps,
            "num_busy_steps": self.num_busy_steps,
            "machine_speed_probed": self.probe,
        }


@dataclass(frozen=True, slots=True)
class Validation:
    rows: list[MetricRow]
    real: list[RunReport]
    simulated: RunReport
    speeds: tuple[RunSpeed, ...] = ()
    """One per real run (empty when not measured)."""
    steps: tuple[tuple[TimedStep, ...], ...] = ()
    """Each real run's timed steps (for `kvflow calibrate --json`)."""
    schedule_matched: tuple[float, ...] = ()
    """Per real run, the share of its steps that the simulation with its step times
    (`RecordedSteps`) scheduled in the same shape at the same place (empty when not
    computed)."""

    def to_json(self) -> dict[str, Any]:
        """The comparison as a preset's `fit.validation` record holds it."""
        return {
            "metrics": [r.to_json() for r in self.rows],
            **summary_errors(self.rows),
            "num_requests": self.simulated.num_requests,
            "real_runs": len(self.real),
            "run_speeds": [s.to_json() for s in self.speeds],
            "schedule_matched": list(self.schedule_matched),
        }


def run_speed(latency: LatencyModel, steps: Sequence[TimedStep]) -> RunSpeed:
    """`RunSpeed` of one real run's timed steps under `latency`: each ratio is the sum
    of the measured times over the sum of the model's (latencies add step times up; a
    median would pass over a slow spell's long steps)."""
    from kvflow.engine_adapters.engine_timing import busy_steps

    busy = busy_steps(steps)
    return RunSpeed(
        _sum_ratio((s.execute_s, latency.runner_time_s(s.features)) for s in steps),
        _sum_ratio((b.period_s, latency.features_time_s(b.features)) for b in busy),
        len(steps),
        len(busy),
    )


class RecordedSteps(ModelRunner):
    """A runner for the simulator whose k-th step takes as long as a real run's k-th
    step did (`TimedStep`s in order): a busy step its period (start to the next step's
    start, the runner's time and the engine's around it), a step after which the engine
    went idle its runner time plus `latency`'s engine terms. Steps past the run's last
    are priced by `latency`. `num_matched` counts the steps whose shape (prefill tokens,
    decode sequences) was the recorded step's: all of them when the simulator scheduled
    what the engine did."""

    name = "recorded"
    supports_overlap = True

    def __init__(self, steps: Sequence[TimedStep], latency: LatencyModel) -> None:
        from kvflow.engine_adapters.engine_timing import step_periods

        self.latency = latency
        self._steps = steps
        self._periods = step_periods(steps)
        self.num_steps = 0
        self.num_matched = 0

    def execute(self, plan: StepPlan) -> StepResult:
        k = self.num_steps
        self.num_steps += 1
        features = StepFeatures.of(plan)
        latency = self.latency
        if k >= len(self._steps):
            duration = latency.features_time_s(features)
        else:
            step = self._steps[k]
            shape = (step.features.num_prefill_tokens, step.features.num_decode_seqs)
            if shape == (features.num_prefill_tokens, features.num_decode_seqs):
                self.num_matched += 1
            period = self._periods[k]
            if period is None:  # idle after it: the engine's own work from the model
                engine_s = latency.features_time_s(features) - latency.runner_time_s(features)
                period = step.execute_s + engine_s
            duration = period
        return StepResult([0] * len(plan.requests), duration)


def _sum_ratio(pairs: Iterable[tuple[float, float]]) -> float:
    measured = predicted = 0.0
    for m, p in pairs:
        measured += m
        predicted += p
    return measured / predicted if predicted > 0 else math.nan


def timed_realtime(
    requests: Sequence[Request],
    config: KVFlowConfig,
    policy: str,
    runner: ModelRunner,
    store: KVStore,
) -> tuple[ReplayResult, list[TimedStep]]:
    """`replay_realtime` through `runner` wrapped in a `StepTimer` on the engine's own
    clock: the run, and every step as the timer saw it."""
    from kvflow.engine_adapters.engine_timing import StepTimer
    from kvflow.traces.realtime import replay_realtime, seconds_since_now

    clock = seconds_since_now()
    timer = StepTimer(runner, clock)
    result = replay_realtime(requests, config, policy, timer, store, clock=clock)
    return result, timer.steps


def validate(
    requests: Sequence[Request],
    model: LoadedModel,
    latency: LatencyModel,
    settings: Mapping[str, Any] | None = None,
    *,
    policy: str = "fcfs",
    real_runs: int = 2,
    probe: Callable[[], float] | None = None,
) -> Validation:
    """Replay `requests` (folded into the model's vocabulary) `real_runs` times in real
    time through `model`'s runner, each over a fresh store and cache, and once in
    virtual time through the simulated runner with `latency`, over a simulated store
    of the same config (`settings` on top of the model's layout) with `sim.overlap`
    on when the real runner overlaps; compare them. The simulation is repeated at each
    real run's speed and with each real run's own step times (`MetricRow`); with
    `probe` (the machine's speed now, e.g. a `SpeedProbe`), called before the first run
    and after each, also at the machine's speed around each run.

    Raises:
        ValueError: `real_runs` < 1 or no requests.
    """
    from kvflow.engine_adapters.engine_timing import scaled
    from kvflow.engine_adapters.factory import build_runner
    from kvflow.engine_adapters.simulated import TERMS, SimulatedRunner
    from kvflow.traces.realtime import fit_to_vocab
    from kvflow.traces.replay import replay

    if real_runs < 1 or not requests:
        raise ValueError(f"need real_runs >= 1 and requests, got {real_runs!r}, {len(requests)}")
    folded = fit_to_vocab(requests, model.vocab_size)
    real = []
    speeds = []
    run_steps: list[tuple[TimedStep, ...]] = []
    config = None
    overlap = False
    probed = [probe()] if probe else []
    for _ in range(real_runs):
        config, runner, store = build_runner(model, settings)
        overlap = runner.supports_overlap
        try:
            result, steps = timed_realtime(folded, config, policy, runner, store)
        finally:
            store.close()
        real.append(summarize_replay(result))
        speed = run_speed(latency, steps)
        if probe:
            probed.append(probe())
            speed = dataclasses.replace(speed, probe=(probed[-2] + probed[-1]) / 2)
        speeds.append(speed)
        run_steps.append(tuple(steps))
    assert config is not None  # real_runs >= 1
    sim_config = config.with_overrides({"sim.overlap": overlap})

    def simulate(runner: ModelRunner) -> RunReport:
        return summarize_replay(replay(folded, sim_config, policy, runner))

    simulated = simulate(SimulatedRunner(latency))
    at_speed = [
        simulate(SimulatedRunner(scaled(latency, s.engine, TERMS)))
        for s in speeds
        if math.isfinite(s.engine)
    ]
    recorded = [RecordedSteps(steps, latency) for steps in run_steps]
    at_step_times = [simulate(runner) for runner in recorded]
    at_probed_speed = [
        simulate(SimulatedRunner(scaled(latency, s.probe, TERMS)))
        for s in speeds
        if s.probe is not None
    ]
    rows = compare(
        real,
        simulated,
        at_speed if len(at_speed) == len(real) else (),
        at_step_times,
        at_probed_speed,
    )
    matched = tuple(
        r.num_matched / max(1, len(s)) for r, s in zip(recorded, run_steps, strict=True)
    )
    return Validation(rows, real, simulated, tuple(speeds), tuple(run_steps), matched)


__all__ = [
    "LATENCY_METRICS",
    "PERCENTILES",
    "MetricRow",
    "RecordedSteps",
    "RunSpeed",
    "Validation",
    "compare",
    "run_speed",
    "summary_errors",
    "timed_realtime",
    "validate",
]
