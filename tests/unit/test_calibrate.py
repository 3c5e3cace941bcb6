"""Calibration's pure parts: plans of a mix, the non-negative fit, preset files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvflow.config import ConfigError, SimRunnerConfig
from kvflow.engine_adapters.calibrate import (
    HOLDOUT_GRID,
    TRAIN_GRID,
    Grid,
    Mix,
    Sample,
    blocks_needed,
    fit,
    median_rel_error,
    plan_for,
    preset_fields,
    read_preset,
    write_preset,
)
from kvflow.engine_adapters.simulated import LatencyModel, latency_model_from_config

KNOWN = LatencyModel(fixed_ms=2.5, prefill_token_us=30.0, decode_seq_us=45.0, kv_token_ns=12.0)


def samples_of(model: LatencyModel, mixes: list[Mix]) -> list[Sample]:
    """What a runner that takes exactly `model`'s time would measure."""
    out = []
    for mix in mixes:
        plan = plan_for(mix, block_size=4, num_blocks=blocks_needed(mixes, 4), vocab_size=50)
        p, d, kv = plan.num_prefill_tokens, plan.num_decode_tokens, plan.num_kv_tokens
        out.append(Sample(p, d, kv, model.step_time_s(p, d, kv)))
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


def test_grid_takes_a_prefill_only_mix_once_and_respects_max_positions() -> None:
    mixes = Grid(prefill_tokens=(0, 8), decode_seqs=(0, 2), context_lens=(4, 600)).mixes(512)
    assert mixes == [Mix(0, 2, 4), Mix(8, 0, 0), Mix(8, 2, 4)]
    assert not set(TRAIN_GRID.mixes()) & set(HOLDOUT_GRID.mixes())


def test_fit_recovers_known_coefficients_exactly() -> None:
    fitted = fit(samples_of(KNOWN, TRAIN_GRID.mixes()))
    assert fitted.fixed_ms == pytest.approx(KNOWN.fixed_ms, rel=1e-6)
    assert fitted.prefill_token_us == pytest.approx(KNOWN.prefill_token_us, rel=1e-6)
    assert fitted.decode_seq_us == pytest.approx(KNOWN.decode_seq_us, rel=1e-6)
    assert fitted.kv_token_ns == pytest.approx(KNOWN.kv_token_ns, rel=1e-6)
    assert median_rel_error(fitted, samples_of(KNOWN, HOLDOUT_GRID.mixes())) < 1e-6


def test_fit_recovers_a_zero_coefficient_and_never_goes_negative() -> None:
    no_kv = LatencyModel(fixed_ms=1.0, prefill_token_us=5.0, decode_seq_us=50.0, kv_token_ns=0.0)
    fitted = fit(samples_of(no_kv, TRAIN_GRID.mixes()))
    assert fitted.kv_token_ns == pytest.approx(0.0, abs=1e-9)
    assert fitted.decode_seq_us == pytest.approx(50.0, rel=1e-6)
    # Longer steps taking less time would need a negative cost per token: it is clamped.
    shrinking = [Sample(n, 0, n, 0.01 / (1 + n)) for n in (1, 10, 100, 1000)]
    clamped = fit(shrinking)
    assert min(preset_fields(clamped).values()) >= 0.0
    assert clamped.prefill_token_us == 0.0 and clamped.kv_token_ns == 0.0


def test_fit_rejects_what_it_cannot_use() -> None:
    with pytest.raises(ValueError, match="at least one sample"):
        fit([])
    with pytest.raises(ValueError, match="positive durations"):
        fit([Sample(1, 0, 1, 0.0)])


def test_a_preset_file_round_trips_and_the_simulator_loads_it(tmp_path: Path) -> None:
    path = tmp_path / "preset.json"
    doc = write_preset(path, KNOWN, fit={"median_rel_error": 0.05, "num_points": 9}, model="m")
    assert json.loads(path.read_text()) == doc
    assert read_preset(path) == KNOWN
    assert latency_model_from_config(SimRunnerConfig(preset_file=str(path))) == KNOWN
    overridden = latency_model_from_config(SimRunnerConfig(preset_file=str(path), fixed_ms=9.0))
    assert overridden.fixed_ms == 9.0 and overridden.kv_token_ns == KNOWN.kv_token_ns


def test_a_bad_preset_file_is_a_config_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "missing.json"
    with pytest.raises(ConfigError, match="cannot read"):
        latency_model_from_config(SimRunnerConfig(preset_file=str(missing)))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**preset_fields(KNOWN), "decode_seq_us": -1}))
    with pytest.raises(ConfigError, match="decode_seq_us must be a number >= 0"):
        read_preset(bad)
