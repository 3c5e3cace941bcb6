"""Calibration's pure parts: plans of a mix, the non-negative fit, preset files."""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path

import pytest

from kvflow.config import ConfigError, KVFlowConfig, SimRunnerConfig
from kvflow.engine_adapters.calibrate import (
    HOLDOUT_GRID,
    LINEAR_TERMS,
    PROBE_QUANTILES,
    RUNNER_TERMS,
    TRAIN_GRID,
    Grid,
    Mix,
    Sample,
    SpeedProbe,
    blocks_needed,
    drift_speeds,
    fit,
    measure,
    median_rel_error,
    plan_for,
    preset_fields,
    read_preset,
    residuals_by_shape,
    term_shares,
    write_preset,
)
from kvflow.engine_adapters.simulated import (
    LatencyModel,
    SimulatedRunner,
    StepFeatures,
    latency_model_from_config,
)
from kvflow.scheduler.plan import StepPlan, StepResult

KNOWN = LatencyModel(fixed_ms=2.5, prefill_token_us=30.0, decode_seq_us=45.0, kv_token_ns=12.0)
FULL = LatencyModel(
    fixed_ms=2.5,
    prefill_token_us=30.0,
    decode_seq_us=45.0,
    kv_token_ns=12.0,
    prefill_attn_ns=40.0,
    prefill_seq_us=400.0,
    decode_padded_kv_ns=20.0,
)
"""Every runner term non-zero, the quadratic prefill attention among them."""


def samples_of(
    model: LatencyModel, mixes: list[Mix], noise: float = 0.0, seed: int = 0
) -> list[Sample]:
    """What a runner that takes exactly `model`'s time would measure; with `noise`,
    each time is multiplied by a seeded factor uniform in [1 - noise, 1 + noise]."""
    rng = random.Random(seed)
    out = []
    for mix in mixes:
        plan = plan_for(mix, block_size=4, num_blocks=blocks_needed(mixes, 4), vocab_size=50)
        features = StepFeatures.of(plan)
        factor = 1.0 + rng.uniform(-noise, noise)
        out.append(Sample(features, model.features_time_s(features) * factor))
    return out


def test_plan_of_a_mix_has_the_counts_the_simulator_reads() -> None:
    plan = plan_for(Mix(10, 3, 7), block_size=4, num_blocks=100, vocab_size=50)
    assert plan.num_prefill_tokens == 10
    assert plan.num_decode_tokens == 3
    assert plan.num_kv_tokens == 10 + 3 * 8
    assert all(plan.samples(i) for i in range(len(plan.requests)))
    assert [len(r.block_ids) for r in plan.requests] == [3, 2, 2, 2]
    used = [b for r in plan.requests for b in r.block_ids]
    assert len(set(used)) == len(used) == blocks_needed([Mix(10, 3, 7)], 4)


def test_features_of_chunked_prefills_with_context_and_ramped_decodes() -> None:
    mix = Mix(30, 4, 16, prefill_context=8, num_prefills=3, decode_ramp=True)
    plan = plan_for(mix, block_size=4, num_blocks=blocks_needed([mix], 4), vocab_size=50)
    f = StepFeatures.of(plan)
    assert mix.chunks() == [10, 10, 10] and mix.decode_contexts() == [4, 8, 12, 16]
    assert f.num_prefill_seqs == 3 and f.num_prefill_tokens == 30
    assert f.prefill_attn_pairs == 3 * 10 * (8 + 10)
    assert f.num_decode_seqs == 4 and f.decode_padded_kv == 4 * 17
    assert f.num_kv_tokens == 3 * 18 + (5 + 9 + 13 + 17)
    assert f.num_seqs == 7
    assert Mix(7, 0, 0, num_prefills=2).chunks() == [4, 3]


def test_grid_takes_a_prefill_only_mix_once_and_respects_max_positions() -> None:
    grid = Grid(
        prefill_tokens=(0, 8),
        decode_seqs=(0, 2),
        context_lens=(4, 600),
        prefill_contexts=(1000,),
        chunk_counts=(),
        ramp=False,
    )
    assert grid.mixes(512) == [Mix(0, 2, 4), Mix(8, 0, 0), Mix(8, 2, 4)]
    assert Mix(8, 0, 0, prefill_context=1000) in grid.mixes()
    assert not set(TRAIN_GRID.mixes()) & set(HOLDOUT_GRID.mixes())


def test_fit_recovers_known_coefficients_exactly() -> None:
    fitted = fit(samples_of(KNOWN, TRAIN_GRID.mixes()), LINEAR_TERMS)
    assert fitted.fixed_ms == pytest.approx(KNOWN.fixed_ms, rel=1e-6)
    assert fitted.prefill_token_us == pytest.approx(KNOWN.prefill_token_us, rel=1e-6)
    assert fitted.decode_seq_us == pytest.approx(KNOWN.decode_seq_us, rel=1e-6)
    assert fitted.kv_token_ns == pytest.approx(KNOWN.kv_token_ns, rel=1e-6)
    assert median_rel_error(fitted, samples_of(KNOWN, HOLDOUT_GRID.mixes())) < 1e-6


def test_fit_recovers_every_term_including_the_quadratic_one() -> None:
    fitted = fit(samples_of(FULL, TRAIN_GRID.mixes()))
    for name in RUNNER_TERMS:
        assert getattr(fitted, name) == pytest.approx(getattr(FULL, name), rel=1e-5), name
    assert fitted.step_overhead_ms == 0.0 and fitted.seq_overhead_us == 0.0


def test_fit_recovers_the_terms_from_noisy_timings() -> None:
    # 3% noise on every timing (seeded). The terms the grid tells apart come back within
    # 10%, the quadratic attention among them; the two KV terms (summed and padded
    # context) differ only on the ramped decode mixes, so noise may move time between
    # them, but held-out steps are still predicted within the noise.
    noisy = samples_of(FULL, TRAIN_GRID.mixes(), noise=0.03, seed=1)
    fitted = fit(noisy)
    for name in ("fixed_ms", "prefill_token_us", "decode_seq_us", "prefill_attn_ns",
                 "prefill_seq_us"):  # fmt: skip
        assert getattr(fitted, name) == pytest.approx(getattr(FULL, name), rel=0.10), name
    assert median_rel_error(fitted, samples_of(FULL, HOLDOUT_GRID.mixes())) < 0.01
    # The four-term model cannot price the quadratic attention: it misses by more.
    linear = fit(noisy, LINEAR_TERMS)
    assert median_rel_error(linear, noisy) > 2 * median_rel_error(fitted, noisy)


class DriftingRunner(SimulatedRunner):
    """Takes `model`'s time per step, times `slow` on the calls from `slow_from` to
    `slow_until` (a spell when another process held the core), and a seeded 2% jitter."""

    def __init__(self, model: LatencyModel, slow: float, slow_from: int, slow_until: int):
        super().__init__(model)
        self.calls = 0
        self.slow, self.slow_from, self.slow_until = slow, slow_from, slow_until
        self.rng = random.Random(3)

    def execute(self, plan: StepPlan) -> StepResult:
        result = super().execute(plan)
        spell = self.slow if self.slow_from <= self.calls < self.slow_until else 1.0
        self.calls += 1
        jitter = 1.0 + self.rng.uniform(-0.02, 0.02)
        return StepResult(result.sampled_token_ids, result.duration_s * spell * jitter)


def test_measure_divides_a_slow_spell_out_of_the_timings() -> None:
    # 3 rounds over 40 mixes (each timed run after an untimed one: 2 calls a run, after
    # 40 warm-up calls); the machine runs 2x slower for the last half of the second round
    # and the first half of the third, so about a quarter of the mixes have 2 of their 3
    # runs in the spell: their median is their slow time. The drift correction tells the
    # spell from the runs of other mixes around each run in time.
    mixes = TRAIN_GRID.mixes()[:40]
    num_blocks = blocks_needed(mixes, 4)
    true = [
        SimulatedRunner(FULL).step_time_s(plan_for(m, 4, num_blocks, 50, seed=i))
        for i, m in enumerate(mixes)
    ]

    def errors(neighbours: int) -> tuple[list[float], list[float]]:
        runner = DriftingRunner(FULL, 2.0, slow_from=40 + 2 * 60, slow_until=40 + 2 * 100)
        got = measure(
            runner, mixes, block_size=4, num_blocks=num_blocks, vocab_size=50, repeat=3,
            drift_neighbours=neighbours,
        )  # fmt: skip
        errs = [abs(s.duration_s / t - 1) for s, t in zip(got.samples, true, strict=True)]
        return errs, got.drift

    corrected, drift = errors(5)
    raw, flat = errors(0)
    # The jitter (2%), a little more at the spell's two edges, nothing of the spell.
    assert max(corrected) < 0.05 and statistics.median(corrected) < 0.015
    assert max(raw) > 0.5  # a mix timed twice in the spell took its slow time
    assert flat == [1.0] * 120
    # The spell shows as factors of ~2 on the runs in it, ~1 elsewhere.
    assert all(f == pytest.approx(2.0, rel=0.1) for f in drift[65:95])
    assert all(f == pytest.approx(1.0, rel=0.1) for f in drift[:55] + drift[105:])


def test_drift_speeds_recover_a_known_speed_from_interleaved_mixes() -> None:
    rng = random.Random(5)
    typical = [rng.uniform(0.001, 0.05) for _ in range(30)]
    speed = [1.0 + 0.5 * (k // 30 == 1) for k in range(90)]  # slow in the second round
    timed = []
    for k, i in enumerate(rng.sample(range(30), 30) * 3):
        timed.append((i, typical[i] * speed[k]))
    factors = drift_speeds(timed, neighbours=4)
    assert all(
        f == pytest.approx(s, rel=0.05) for f, s in zip(factors[5:25], speed[5:25], strict=True)
    )
    assert all(
        f == pytest.approx(s, rel=0.05) for f, s in zip(factors[35:55], speed[35:55], strict=True)
    )
    assert drift_speeds([]) == []
    with pytest.raises(ValueError, match="drift_neighbours must be >= 0, got -1"):
        measure(SimulatedRunner(KNOWN), [Mix(8, 0, 0)], block_size=4, num_blocks=4,
                vocab_size=50, drift_neighbours=-1)  # fmt: skip


def test_a_speed_probe_tells_the_machine_speed_against_the_grid() -> None:
    mixes = TRAIN_GRID.mixes()[:20]
    num_blocks = blocks_needed(mixes, 4)
    runner = DriftingRunner(FULL, 1.5, slow_from=10**9, slow_until=10**9)
    got = measure(runner, mixes, block_size=4, num_blocks=num_blocks, vocab_size=50, repeat=3)
    probe = SpeedProbe.of(runner, mixes, got.samples, block_size=4, num_blocks=num_blocks,
                          vocab_size=50)  # fmt: skip
    assert len(probe.plans) == len(PROBE_QUANTILES)
    assert probe() == pytest.approx(1.0, abs=0.03)  # as the grid was timed
    runner.slow_from, runner.slow_until = runner.calls, runner.calls + 10**6
    assert probe() == pytest.approx(1.5, rel=0.03)  # another process took half the core
    with pytest.raises(ValueError, match="positive reference time"):
        SpeedProbe(runner, probe.plans, [0.0] * len(probe.plans))
    with pytest.raises(ValueError, match="rounds >= 1, got 0"):
        SpeedProbe(runner, probe.plans, probe.reference_s, rounds=0)


def test_term_shares_add_up_and_residuals_group_by_shape() -> None:
    samples = samples_of(FULL, TRAIN_GRID.mixes())
    shares = term_shares(FULL, samples)
    assert set(shares) == set(RUNNER_TERMS)
    assert sum(shares.values()) == pytest.approx(1.0)
    biases = residuals_by_shape(FULL, samples)
    assert set(biases) == {"prefill", "decode", "mixed"}
    assert all(abs(b) < 1e-9 for b in biases.values())
    slow = [Sample(s.features, s.duration_s * 2) for s in samples]
    assert all(b == pytest.approx(-0.5) for b in residuals_by_shape(FULL, slow).values())


def test_fit_recovers_a_zero_coefficient_and_never_goes_negative() -> None:
    no_kv = LatencyModel(fixed_ms=1.0, prefill_token_us=5.0, decode_seq_us=50.0, kv_token_ns=0.0)
    fitted = fit(samples_of(no_kv, TRAIN_GRID.mixes()), LINEAR_TERMS)
    assert fitted.kv_token_ns == pytest.approx(0.0, abs=1e-9)
    assert fitted.decode_seq_us == pytest.approx(50.0, rel=1e-6)
    # Longer steps taking less time would need a negative cost per token: it is clamped.
    shrinking = [Sample(StepFeatures(n, 0, n), 0.01 / (1 + n)) for n in (1, 10, 100, 1000)]
    clamped = fit(shrinking)
    assert min(preset_fields(clamped).values()) >= 0.0
    assert clamped.prefill_token_us == 0.0 and clamped.kv_token_ns == 0.0


def test_fit_rejects_what_it_cannot_use() -> None:
    with pytest.raises(ValueError, match="at least one sample"):
        fit([])
    with pytest.raises(ValueError, match="positive durations"):
        fit([Sample(StepFeatures(1, 0, 1), 0.0)])
    with pytest.raises(ValueError, match="unknown latency terms"):
        fit([Sample(StepFeatures(1, 0, 1), 1.0)], ["fixed_ms", "warp_ns"])


def test_a_preset_file_round_trips_and_the_simulator_loads_it(tmp_path: Path) -> None:
    path = tmp_path / "preset.json"
    doc = write_preset(path, FULL, fit={"median_rel_error": 0.05, "num_points": 9}, model="m")
    assert json.loads(path.read_text()) == doc
    assert read_preset(path) == FULL
    assert latency_model_from_config(SimRunnerConfig(preset_file=str(path))) == FULL
    overridden = latency_model_from_config(
        SimRunnerConfig(preset_file=str(path), fixed_ms=9.0, prefill_attn_ns=0.0)
    )
    assert overridden.fixed_ms == 9.0 and overridden.kv_token_ns == FULL.kv_token_ns
    assert overridden.prefill_attn_ns == 0.0 and overridden.prefill_seq_us == FULL.prefill_seq_us


def test_a_preset_of_the_four_original_terms_loads_and_prices_steps_as_before(
    tmp_path: Path,
) -> None:
    old = tmp_path / "old.json"
    old.write_text(json.dumps({**{t: getattr(KNOWN, t) for t in LINEAR_TERMS}, "fit": {}}))
    loaded = read_preset(old)
    assert loaded == KNOWN and loaded.is_linear and loaded.prefill_attn_ns == 0.0
    plan = plan_for(Mix(10, 3, 7, prefill_context=4), block_size=4, num_blocks=100, vocab_size=50)
    expected = KNOWN.step_time_s(
        plan.num_prefill_tokens, plan.num_decode_tokens, plan.num_kv_tokens
    )
    assert SimulatedRunner(loaded).execute(plan).duration_s == expected
    assert KNOWN.features_time_s(StepFeatures.of(plan)) == pytest.approx(expected)
    assert not FULL.is_linear
    assert SimulatedRunner(FULL).execute(plan).duration_s == pytest.approx(
        FULL.features_time_s(StepFeatures.of(plan))
    )


def test_a_preset_carries_tier_copy_figures_and_overlap_into_the_config(tmp_path: Path) -> None:
    path = tmp_path / "preset.json"
    transfer = {"cpu_to_disk_gbps": 1.5, "disk_latency_us": 250.0}
    doc = write_preset(path, FULL, transfer, overlap=True)
    assert doc["kv"] == {"transfer": transfer} and doc["sim"] == {"overlap": True}
    config = KVFlowConfig.load(None, {"sim.preset_file": str(path)})
    assert config.kv.transfer.cpu_to_disk_gbps == 1.5
    assert config.kv.transfer.disk_latency_us == 250.0
    assert config.kv.transfer.cpu_to_device_gbps == 50.0  # not in the preset: default
    assert config.sim.overlap is True
    explicit = KVFlowConfig().with_overrides(
        {"sim.preset_file": str(path), "kv.transfer.disk_latency_us": 7.0, "sim.overlap": False}
    )
    assert explicit.kv.transfer.disk_latency_us == 7.0 and explicit.sim.overlap is False
    assert explicit.kv.transfer.cpu_to_disk_gbps == 1.5
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**preset_fields(KNOWN), "kv": {"transfer": [1]}}))
    with pytest.raises(ConfigError, match=r"kv\.transfer must be an object"):
        KVFlowConfig.load(None, {"sim.preset_file": str(bad)})


def test_a_bad_preset_file_is_a_config_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "missing.json"
    with pytest.raises(ConfigError, match="cannot read"):
        latency_model_from_config(SimRunnerConfig(preset_file=str(missing)))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**preset_fields(KNOWN), "decode_seq_us": -1}))
    with pytest.raises(ConfigError, match="decode_seq_us must be a number >= 0"):
        read_preset(bad)


class FakeClock:
    """`time` for a module under test: `perf_counter` reads a clock only `sleep` moves."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def perf_counter(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_the_real_time_runner_sleeps_every_runner_term_and_none_of_the_engines(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`kvflow serve --engine sim` sleeps what the virtual-time runner charges for the
    runner's part of a step: the quadratic and per-chunk terms too; the engine's own
    terms are spent for real by the engine around it, so it sleeps none of them."""
    import dataclasses

    from kvflow.engine_adapters import realtime_sim
    from kvflow.engine_adapters.realtime_sim import RealTimeSimRunner

    plan = plan_for(Mix(10, 3, 7, prefill_context=4), block_size=4, num_blocks=100, vocab_size=50)
    features = StepFeatures.of(plan)
    slow = dataclasses.replace(FULL, fixed_ms=20.0, prefill_seq_us=20_000.0)
    # Engine terms of minutes: sleeping them would be unmistakable.
    engine = dataclasses.replace(slow, step_overhead_ms=60_000.0, seq_overhead_us=10e6)
    expected = slow.features_time_s(features)
    assert engine.runner_time_s(features) == pytest.approx(expected)
    assert engine.features_time_s(features) > expected + 60
    clock = FakeClock()  # a sleep moves it: the runner's wall clock, without waiting
    monkeypatch.setattr(realtime_sim, "time", clock)
    result = RealTimeSimRunner(engine).execute(plan)
    assert result.duration_s == pytest.approx(expected)
    assert clock.now == pytest.approx(expected)  # the runner's terms slept ...
    assert clock.slept and max(clock.slept) <= expected  # ... and never the engine's minutes
