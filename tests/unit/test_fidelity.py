"""The simulator's model of the engine: overlapped scheduling in virtual time, the
engine's overhead around the runner, and the real-vs-simulated comparison."""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from kvflow.engine_adapters.engine_timing import (
    EngineStep,
    TimedStep,
    busy_steps,
    engine_noise,
    fit_overhead,
    scaled,
)
from kvflow.engine_adapters.latency_fit import Sample, fit, fit_live
from kvflow.engine_adapters.simulated import TERMS, LatencyModel, SimulatedRunner, StepFeatures
from kvflow.request import Request
from kvflow.scheduler.plan import StepPlan, StepResult
from kvflow.traces.engine_workload import calibration_workload, overloaded_arrivals
from kvflow.traces.metrics import RunReport, summarize_replay
from kvflow.traces.replay import replay
from kvflow.traces.validate import (
    RecordedSteps,
    compare,
    run_speed,
    summary_errors,
)
from tests.builders import make_config

TEN_MS = LatencyModel(fixed_ms=10.0, prefill_token_us=0.0, decode_seq_us=0.0, kv_token_ns=0.0)


def first_token_times(overlap: bool) -> dict[str, list[float]]:
    config = make_config().with_overrides({"sim.overlap": overlap})
    requests = [
        Request("a", tuple(range(8)), 4, arrival_time=0.0),
        Request("b", tuple(range(100, 108)), 2, arrival_time=0.005),
    ]
    result = replay(requests, config, "fcfs", SimulatedRunner(TEN_MS))
    assert result.num_leaked_blocks == 0
    return {s.request.request_id: [round(t, 6) for t in s.token_times] for s in result.states}


def test_overlap_plans_the_next_step_when_a_step_starts() -> None:
    # b arrives during step 1 (0-10 ms). Planned after step 1, step 2 takes it in; with
    # overlap step 2 was planned when step 1 started, so b waits for step 3 (20-30 ms).
    plain, overlapped = first_token_times(False), first_token_times(True)
    assert plain["b"][0] == pytest.approx(0.020)
    assert overlapped["b"][0] == pytest.approx(0.030)
    # a decodes every step either way, one token per 10 ms step.
    assert plain["a"] == overlapped["a"] == pytest.approx([0.01, 0.02, 0.03, 0.04])


def test_overlap_is_off_by_default_so_replays_are_unchanged() -> None:
    assert make_config().sim.overlap is False


def timed(planned: float, started: float, execute: float, seqs: int = 1) -> TimedStep:
    return TimedStep(StepFeatures(0, seqs, seqs, num_seqs=seqs), planned, started, execute)


def test_busy_steps_are_those_whose_successor_was_planned_before_they_ended() -> None:
    steps = [
        timed(0.0, 0.001, 0.010),  # next planned at 0.001 (overlap): busy
        timed(0.001, 0.012, 0.010),  # next planned at 0.5, after an idle gap: not busy
        timed(0.5, 0.501, 0.010),  # the last: no successor
    ]
    (busy,) = busy_steps(steps)
    assert busy.period_s == pytest.approx(0.011) and busy.execute_s == 0.010


def test_fit_overhead_recovers_a_cost_per_step_and_per_request() -> None:
    runner = LatencyModel(1.0, 0.0, 100.0, 0.0)
    steps = []
    for n in (1, 2, 4, 8, 16, 3, 5):
        execute = runner.features_time_s(StepFeatures(0, n, n, num_seqs=n))
        period = execute + 0.5e-3 + n * 40e-6
        steps.append(EngineStep(StepFeatures(0, n, n, num_seqs=n), execute, period))
    overhead = fit_overhead(runner, steps)
    assert overhead.step_overhead_ms == pytest.approx(0.5, rel=1e-6)
    assert overhead.seq_overhead_us == pytest.approx(40.0, rel=1e-6)
    assert overhead.median_rel_error < 1e-9 and overhead.runner_median_rel_error < 1e-9
    assert overhead.runner_scale == pytest.approx(1.0)
    assert engine_noise(steps) >= 0.0
    # The runner ran 20% faster in the engine than the grid said: the scale finds it,
    # and the rescaled model predicts the whole steps again.
    faster = [EngineStep(s.features, s.execute_s * 0.8, s.period_s - s.execute_s * 0.2)
              for s in steps]  # fmt: skip
    plain = fit_overhead(runner, faster)
    rescaled = fit_overhead(runner, faster, rescale=True)
    assert plain.runner_scale == rescaled.runner_scale == pytest.approx(0.8)
    assert plain.runner_median_rel_error == pytest.approx(0.25)
    assert rescaled.step_overhead_ms == pytest.approx(0.5, rel=1e-6)
    assert rescaled.median_rel_error < 1e-9 < plain.median_rel_error
    model = scaled(runner, 0.8)
    assert model.fixed_ms == pytest.approx(0.8) and model.decode_seq_us == pytest.approx(80.0)
    # The engine's terms scale only when asked (validation's runs at their own speed).
    engine = dataclasses.replace(runner, step_overhead_ms=0.5)
    assert scaled(engine, 2.0).step_overhead_ms == 0.5
    assert scaled(engine, 2.0, TERMS) == dataclasses.replace(
        runner, fixed_ms=2.0, decode_seq_us=200.0, step_overhead_ms=1.0
    )
    with pytest.raises(ValueError, match="at least one busy engine step"):
        fit_overhead(runner, [])


def test_live_refit_follows_a_miss_that_differs_by_kind_of_step() -> None:
    # The grid says decodes cost 100 us each and 1 ns per KV token; in the live engine
    # the decode batches read shared blocks and cost half as much per KV token, while
    # prefills cost what the grid said. One scale cannot be right for both kinds; the
    # refit on the live steps, with the grid beside them, is.
    grid_model = LatencyModel(1.0, 50.0, 100.0, 1000.0)
    live_model = LatencyModel(1.0, 50.0, 100.0, 500.0)
    shapes = [StepFeatures(p, d, d * c + p, num_seqs=d + (p > 0))
              for p in (0, 64, 256) for d in (0, 4, 16) for c in (128, 512) if p or d]  # fmt: skip
    grid = [Sample(f, grid_model.features_time_s(f)) for f in shapes]
    steps = [
        EngineStep(f, live_model.features_time_s(f), live_model.features_time_s(f) + 1e-3)
        for f in shapes
    ]
    scaled_fit = fit_overhead(grid_model, steps, rescale=True)
    refit = fit_overhead(grid_model, steps, rescale=True, grid=grid)
    assert refit.live_median_rel_error < 0.02 < 0.05 < scaled_fit.live_median_rel_error
    assert refit.runner.kv_token_ns == pytest.approx(500.0, rel=0.1)
    assert refit.runner.step_overhead_ms == 0.0  # the engine's terms are fitted apart
    assert refit.step_overhead_ms == pytest.approx(1.0, rel=1e-3)
    assert refit.median_rel_error < 0.02


def test_fit_live_weighs_the_grid_as_asked() -> None:
    live = [Sample(StepFeatures(0, 1, 1, num_seqs=1), 2e-3)] * 4
    grid = [Sample(StepFeatures(0, 1, 1, num_seqs=1), 4e-3)] * 40
    only_live = fit_live(live, grid, grid_weight=0.0)
    assert only_live.features_time_s(live[0].features) == pytest.approx(2e-3, rel=1e-6)
    # Half the weight each: the relative errors balance between 2 ms and 4 ms.
    half = fit_live(live, grid, grid_weight=0.5).features_time_s(live[0].features)
    assert 2e-3 < half < 4e-3
    with pytest.raises(ValueError, match="grid_weight"):
        fit_live(live, grid, grid_weight=1.0)
    with pytest.raises(ValueError, match="weights must be one number"):
        fit(live, weights=[1.0])


def test_compare_reports_error_and_spread_per_metric() -> None:
    requests = [
        Request(f"r{i}", tuple(range(i, i + 40)), 6, arrival_time=i * 0.01) for i in range(12)
    ]
    config = make_config()

    def run(fixed_ms: float) -> RunReport:
        model = LatencyModel(fixed_ms, 50.0, 20.0, 1.0)
        return summarize_replay(replay(requests, config, "fcfs", SimulatedRunner(model)))

    real, again, sim = run(10.0), run(11.0), run(12.0)
    rows = compare([real, again], sim)
    names = [r.metric for r in rows]
    assert names[:3] == ["ttft p50", "ttft p90", "ttft p99"]
    assert names[-2:] == ["steps", "hit rate"] and len(rows) == 14
    tpot = rows[names.index("tpot p50")]
    assert tpot.real_runs == (real.tpot_ms.p50, again.tpot_ms.p50)
    assert tpot.real == pytest.approx((real.tpot_ms.p50 + again.tpot_ms.p50) / 2)
    assert tpot.error == pytest.approx(tpot.simulated / tpot.real - 1)
    assert tpot.spread == pytest.approx((again.tpot_ms.p50 - real.tpot_ms.p50) / tpot.real)
    assert tpot.error > 0 and tpot.spread is not None and 0 < tpot.spread < tpot.error
    assert tpot.to_json()["real_runs"] == list(tpot.real_runs)
    hit = rows[-1]
    assert hit.error == 0.0  # same trace and cache: same hits
    summary = summary_errors(rows)
    assert summary["max_abs_error_p50"] >= abs(tpot.error)
    assert set(summary) == {
        "max_abs_error_p50",
        "max_abs_error_p99",
        "max_abs_spread_p50",
        "max_abs_spread_p99",
    }
    single = compare([real], sim)
    assert all(len(r.real_runs) == 1 and r.spread is None for r in single)
    with pytest.raises(ValueError, match="at least one real run"):
        compare([], sim)
    # Simulated at each run's own speed: each run against its own simulation.
    paired = compare([real, again], sim, at_speed=[real, run(11.0 * 1.1)])
    tpot = paired[names.index("tpot p50")]
    assert tpot.error_at_speed is not None and 0 < tpot.error_at_speed < tpot.error
    assert tpot.to_json()["error_at_speed"] == tpot.error_at_speed
    assert rows[0].error_at_speed is None
    with pytest.raises(ValueError, match="one report per real run"):
        compare([real, again], sim, at_speed=[sim])
    # With each run's own step times: each run against its own replay.
    slower = run(11.0 * 1.1)
    timed_rows = compare([real, again], sim, at_step_times=[real, slower])
    tpot = timed_rows[names.index("tpot p50")]
    expected = (0.0 + (slower.tpot_ms.p50 / again.tpot_ms.p50 - 1)) / 2
    assert expected > 0 and tpot.error_at_step_times == pytest.approx(expected)
    assert tpot.error_at_speed is None and rows[0].error_at_step_times is None
    assert tpot.to_json()["error_at_step_times"] == tpot.error_at_step_times
    with pytest.raises(ValueError, match="at_step_times needs one report per real run"):
        compare([real, again], sim, at_step_times=[sim])


def test_run_speed_prices_a_real_runs_own_steps() -> None:
    # Steps that took 1.5x what the model's runner terms say, back to back (each next
    # one planned before the last ended), each period 0.5 ms past its execute.
    model = LatencyModel(2.0, 0.0, 100.0, 0.0, step_overhead_ms=0.5)
    steps, t, last_start = [], 0.0, 0.0
    for n in (1, 2, 3, 4):
        runner_s = model.features_time_s(StepFeatures(0, n, n, num_seqs=n)) - 0.5e-3
        steps.append(timed(last_start, t, runner_s * 1.5, seqs=n))  # planned as the last began
        last_start = t
        t += runner_s * 1.5 + 0.5e-3
    speed = run_speed(model, steps)
    assert speed.runner == pytest.approx(1.5)
    assert speed.num_steps == 4 and speed.num_busy_steps == 3
    assert 1.0 < speed.engine < 1.5  # the whole step includes the overhead the model has
    assert run_speed(model, []).num_steps == 0


def test_recorded_step_times_reproduce_the_run_they_were_recorded_from() -> None:
    """A run in virtual time, its steps recorded as `StepTimer` records an engine's,
    then replayed by `RecordedSteps` over a model that prices every step differently:
    every step's time comes from the recording, so the same schedule and latencies."""
    config = make_config(**{"sim.overlap": True, "scheduler.max_num_batched_tokens": 24})
    model = LatencyModel(2.0, 100.0, 300.0, 5.0, prefill_attn_ns=50.0)
    requests = [
        Request(f"r{i}", tuple(range(100 * i, 100 * i + 10 + 7 * i)), 3 + i % 4,
                arrival_time=0.004 * i)
        for i in range(12)
    ]  # fmt: skip
    steps: list[TimedStep] = []

    def record(scheduler: object, plan: StepPlan, result: StepResult, now: float) -> None:
        start = now - result.duration_s
        steps.append(TimedStep(StepFeatures.of(plan), plan.now, start, result.duration_s))

    original = summarize_replay(
        replay(requests, config, "fcfs", SimulatedRunner(model), on_step=record)
    )
    # Overlapped: some step was planned while the one before it ran.
    assert any(b.planned_at < a.started_at + a.execute_s for a, b in itertools.pairwise(steps))
    other = LatencyModel(7.0, 0.0, 0.0, 0.0)
    recorded = RecordedSteps(steps, other)
    again = summarize_replay(replay(requests, config, "fcfs", recorded))
    assert recorded.num_steps == len(steps) == recorded.num_matched
    for metric in ("ttft_ms", "tpot_ms", "e2e_ms"):
        for pct in ("p50", "p99"):
            expected = getattr(getattr(original, metric), pct)
            assert getattr(getattr(again, metric), pct) == pytest.approx(expected, rel=1e-3)
    # The other model alone gives other latencies: the recording is what matched.
    priced = summarize_replay(replay(requests, config, "fcfs", SimulatedRunner(other)))
    assert priced.e2e_ms.p50 != pytest.approx(original.e2e_ms.p50, rel=0.05)
    # Past the recording, steps are priced by the model.
    short = RecordedSteps(steps[:3], other)
    summarize_replay(replay(requests, config, "fcfs", short))
    assert short.num_steps > 3 and short.num_matched == 3


def test_the_engine_timing_workload_reaches_a_loaded_servers_steps() -> None:
    """The live refit can only price the steps it sees: replayed as `measure_engine`
    replays it (arriving at twice the rate a model of the small CPU Llama serves, a
    512-token step budget, overlapped), the calibration workload builds decode batches
    of 30 and more beside prefill chunks of 300 and more tokens, over padded decode
    contexts past the calibration grid's largest (32 x 512)."""
    model = LatencyModel(
        3.0, 70.0, 90.0, 400.0, prefill_attn_ns=60.0, prefill_seq_us=300.0,
        decode_padded_kv_ns=900.0, step_overhead_ms=0.8, seq_overhead_us=25.0,
    )  # fmt: skip
    config = make_config(
        **{"sim.overlap": True, "scheduler.max_num_batched_tokens": 512,
           "scheduler.max_model_len": 2048}
    )  # fmt: skip
    requests = calibration_workload(64, vocab_size=4096, max_len=2048)
    assert all(len(r.prompt_token_ids) + r.max_new_tokens <= 2048 for r in requests)
    arriving = overloaded_arrivals(requests, config, model, load=2.0)
    assert [r.request_id for r in arriving] == [r.request_id for r in requests]
    assert all(b.arrival_time >= a.arrival_time for a, b in itertools.pairwise(arriving))
    steps: list[StepFeatures] = []

    def record(scheduler: object, plan: StepPlan, result: StepResult, now: float) -> None:
        steps.append(StepFeatures.of(plan))

    result = replay(arriving, config, "fcfs", SimulatedRunner(model), on_step=record)
    assert result.num_leaked_blocks == 0
    busy_mixed = [s for s in steps if s.num_decode_seqs >= 30 and s.num_prefill_tokens >= 300]
    assert len(busy_mixed) >= 5
    assert max(s.num_decode_seqs for s in steps) >= 45
    assert max(s.decode_padded_kv for s in steps) > 2 * 32 * 512


def test_the_engine_timing_workload_fits_a_short_model() -> None:
    for max_len in (16, 64, 300):
        requests = calibration_workload(10, vocab_size=97, max_len=max_len)
        assert len(requests) == 10
        assert all(len(r.prompt_token_ids) + r.max_new_tokens <= max_len for r in requests)
        assert all(t < 97 for r in requests for t in r.prompt_token_ids)


def test_measure_engine_reports_the_machine_speed_probed_around_its_run() -> None:
    # The engine timed in real time over a runner that sleeps 4 ms a step; a probe says
    # the machine ran at twice the grid's step times (called once before the run and
    # once after): the speed is reported, and the steps are kept as measured (a probe
    # samples a moment; dividing by it once made a preset 34% too slow).
    from kvflow.engine_adapters.realtime_sim import RealTimeSimRunner
    from kvflow.kv.store import KVStore
    from kvflow.traces.engine_workload import measure_engine

    model = LatencyModel(fixed_ms=4.0, prefill_token_us=0.0, decode_seq_us=0.0, kv_token_ns=0.0)
    config = make_config(**{"sim.overlap": True})
    requests = calibration_workload(6, vocab_size=97, max_len=64)
    speeds = iter([1.5, 2.5])

    def probe() -> float:
        return next(speeds)

    store = KVStore(config.kv)
    try:
        _, _, steps, speed = measure_engine(
            RealTimeSimRunner(model), config, store, model, requests, probe=probe
        )
    finally:
        store.close()
    assert speed == 2.0  # the mean of the probe before and the one after
    assert steps and min(s.execute_s for s in steps) >= 0.004  # each slept 4 ms
