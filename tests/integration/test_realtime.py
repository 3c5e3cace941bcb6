"""Real-time replay through the async engine with a real runner, and `kvflow calibrate`
writing a preset the simulator loads. A tiny random checkpoint; no timed assertions."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import anyio
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from kvflow.cli import build_parser, main
from kvflow.config import TransferConfig
from kvflow.engine_adapters.calibrate import read_preset
from kvflow.engine_adapters.factory import build_runner, load_model
from kvflow.engine_adapters.hf import save_random_hf_llama
from kvflow.kv.bandwidth import DIRECTIONS
from kvflow.request import FinishReason, Request
from kvflow.traces.metrics import summarize_replay
from kvflow.traces.realtime import fit_to_vocab, replay_realtime_async
from tests.integration.test_exactness import SPEC


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("realtime-model")
    save_random_hf_llama(dataclasses.replace(SPEC, dtype="float32"), path, seed=5, init_std=0.2)
    return path


def write_trace(path: Path, num_requests: int = 14, span_s: float = 1.0) -> Path:
    """Requests over `span_s` seconds, three groups sharing 16-token prefixes."""
    lines = [
        {
            "arrival_s": round(i * span_s / num_requests, 4),
            "prompt_len": 20 + 3 * (i % 5),
            "output_len": 3 + i % 4,
            "prefix_group": f"g{i % 3}",
            "prefix_len": 16,
        }
        for i in range(num_requests)
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_token_ids_fold_into_the_vocabulary_keeping_equal_ids_equal() -> None:
    reqs = [Request("a", (5, 300, 700), 2), Request("b", (5, 300, 9), 2, arrival_time=1.0)]
    folded = fit_to_vocab(reqs, 256)
    assert [r.prompt_token_ids for r in folded] == [(5, 44, 188), (5, 44, 9)]
    assert folded[1].arrival_time == 1.0
    assert fit_to_vocab(folded, 256)[0] is folded[0]


@pytest.mark.anyio
async def test_realtime_replay_serves_every_request_with_the_simulators_report(
    model_dir: Path,
) -> None:
    model = load_model(model_dir, "torch", "float32")
    config, runner, store = build_runner(model, {"kv.block_size": 4, "kv.device.num_blocks": 64})
    requests = [
        Request(f"q{i}", tuple((7 * i + j) % 97 for j in range(8 + i % 6)), 2 + i % 3,
                arrival_time=i * 0.05)
        for i in range(12)
    ]  # fmt: skip
    try:
        with anyio.fail_after(60):
            result = await replay_realtime_async(
                requests, config, "fcfs", runner, store, time_scale=0.5
            )
    finally:
        store.close()
    assert len(result.states) == 12
    assert all(s.finish_reason is FinishReason.LENGTH for s in result.states)
    assert [s.num_output_tokens for s in result.states] == [r.max_new_tokens for r in requests]
    arrivals = [s.arrival_time for s in result.states]
    assert arrivals == sorted(arrivals) and arrivals[-1] > arrivals[0]
    assert result.num_leaked_blocks == 0
    report = summarize_replay(result)
    assert report.num_finished == 12 and report.ttft_ms.p50 > 0
    assert result.end_time >= arrivals[-1] and result.wall_s > 0


def test_replay_engine_defaults_to_the_simulator() -> None:
    assert build_parser().parse_args(["replay"]).engine == "sim"


@pytest.mark.parametrize("engine", ["torch", "hf"])
def test_kvflow_replay_with_a_real_engine_writes_the_same_report(
    model_dir: Path, tmp_path: Path, engine: str
) -> None:
    trace = write_trace(tmp_path / "trace.jsonl")
    out = tmp_path / "report.json"
    argv = ["replay", str(trace), "--engine", engine, "--model", str(model_dir),
            "--time-scale", "0.5", "--set", "kv.block_size=4", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    doc = json.loads(out.read_text())
    assert list(doc) == [
        "schema_version",
        "trace",
        "engine",
        "model",
        "device",
        "runs",
        "config",
        "slo",
    ]
    assert doc["engine"] == engine and [r["policy"] for r in doc["runs"]] == ["fcfs"]
    run = doc["runs"][0]
    assert run["num_finished"] == 14 and run["num_rejected"] == 0
    assert run["ttft_ms"]["p50"] > 0 and run["num_leaked_blocks"] == 0
    assert run["prefix_hit_rate"] > 0  # the groups' 16-token prefixes are 4 full blocks
    for key in ("tpot_ms", "e2e_ms", "throughput_tokens_per_s", "hit_tokens_by_tier"):
        assert key in run


def test_kvflow_replay_with_a_real_engine_needs_a_model(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["replay", "--engine", "torch"]) == 2
    assert "--model" in capsys.readouterr().err


def test_calibrate_validates_and_writes_a_preset_that_replay_loads(
    model_dir: Path, tmp_path: Path
) -> None:
    preset = tmp_path / "preset.json"
    trace = write_trace(tmp_path / "validate.jsonl", num_requests=10, span_s=0.3)
    grid = ["--prefill", "0,8,32", "--decode", "0,1,4", "--context", "8,32"]
    argv = ["calibrate", "--model", str(model_dir), "--out", str(preset), "--repeat", "2",
            "--engine-requests", "6", "--tier-dir", str(tmp_path), "--tier-mib", "0.25,1",
            "--validate", str(trace),
            "--block-size", "4", *grid]  # fmt: skip
    assert main(argv) == 0
    doc = json.loads(preset.read_text())
    for key in ("fixed_ms", "prefill_token_us", "decode_seq_us", "kv_token_ns",
                "prefill_attn_ns", "prefill_seq_us", "decode_padded_kv_ns",
                "step_overhead_ms", "seq_overhead_us"):  # fmt: skip
        assert doc[key] >= 0
    fit = doc["fit"]
    assert fit["num_points"] == len(_grid_of(grid, SPEC.max_position_embeddings))
    assert fit["median_rel_error"] >= 0 and fit["noise_median_rel_spread"] >= 0
    # The machine's drift over the grid's timing was estimated (its median is 1 by
    # definition) and divided out.
    drift = fit["drift"]
    assert drift["neighbours"] == 5 and drift["min"] <= drift["p10"] <= 1.0 <= drift["p90"]
    assert fit["raw_noise_median_rel_spread"] >= 0
    assert sum(fit["term_shares"].values()) == pytest.approx(1.0)
    assert fit["engine"]["num_steps"] >= 1 and fit["engine"]["median_rel_error"] >= 0
    assert set(fit["engine"]["bias_by_shape"]) <= {"prefill", "decode", "mixed"}
    # The runner's terms were refitted on the engine's own steps, grid beside them.
    assert fit["engine"]["refitted"] is True and fit["engine"]["live_median_rel_error"] >= 0
    assert set(fit["holdout_bias_by_shape"]) == {"prefill", "decode", "mixed"}
    # The tiers were timed: every kv.transfer figure, bandwidths positive.
    transfer = doc["kv"]["transfer"]
    tiers = {f"{d}_gbps" for d in DIRECTIONS} | {"pcie_latency_us", "disk_latency_us"}
    assert set(transfer) == tiers and tiers <= set(TransferConfig.model_fields)
    assert all(transfer[k] > 0 for k in transfer if k.endswith("gbps"))
    assert doc["sim"] == {"overlap": True}
    # The validation: real (twice), simulated, error and spread for every metric.
    validation = fit["validation"]
    assert validation["trace"] == str(trace) and validation["real_runs"] == 2
    metrics = {m["metric"]: m for m in validation["metrics"]}
    assert list(metrics)[:3] == ["ttft p50", "ttft p90", "ttft p99"]
    assert {"tpot p99", "itl p50", "e2e p99", "steps", "hit rate"} <= set(metrics)
    for row in metrics.values():
        assert len(row["real_runs"]) == 2 and row["simulated"] >= 0
        assert row["real"] == pytest.approx(sum(row["real_runs"]) / 2)
        if row["real"] > 0:
            assert row["error"] == pytest.approx(row["simulated"] / row["real"] - 1)
            spread = (max(row["real_runs"]) - min(row["real_runs"])) / row["real"]
            assert row["spread"] == pytest.approx(spread)
    assert metrics["ttft p50"]["real"] > 0 and metrics["e2e p50"]["simulated"] > 0
    assert metrics["hit rate"]["real"] > 0  # three groups share 16-token prefixes
    assert validation["max_abs_error_p50"] >= 0
    # Each real run's own steps priced by the model: a ratio per run, over its steps.
    speeds = validation["run_speeds"]
    assert len(speeds) == 2 and all(s["num_steps"] >= s["num_busy_steps"] >= 1 for s in speeds)
    assert all(s["runner_measured_over_model"] > 0 for s in speeds)
    # The machine's speed around each run, probed apart from it (calibrated mixes timed
    # before and after), and the simulation at that speed; around the engine's timing too.
    assert all(s["machine_speed_probed"] > 0 for s in speeds)
    assert all(row["error_at_probed_speed"] is not None for row in metrics.values())
    assert fit["engine"]["machine_speed_probed"] > 0
    # Simulated again with each real run's own step times: an error per row, and the
    # share of each run's steps the simulator scheduled alike (the first at least).
    assert all(row["error_at_step_times"] is not None for row in metrics.values())
    assert metrics["hit rate"]["error_at_step_times"] == 0.0
    matched = validation["schedule_matched"]
    assert len(matched) == 2 and all(0 < m <= 1 for m in matched)
    from kvflow.engine_adapters.torch.spec import default_device

    assert doc["model"] == str(model_dir)
    assert doc["device"].startswith(default_device().type)  # e.g. "cpu: x86_64, 2 threads"
    out = tmp_path / "report.json"
    argv = ["replay", "-p", "fcfs", "--limit", "20", "--set", f"sim.preset_file={preset}",
            "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert report["config"]["sim"]["preset_file"] == str(preset)
    assert report["config"]["sim"]["overlap"] is True
    applied = report["config"]["kv"]["transfer"]
    assert {k: applied[k] for k in transfer} == transfer
    assert report["runs"][0]["num_finished"] == 20
    assert read_preset(preset).prefill_attn_ns == doc["prefill_attn_ns"]


def _grid_of(argv: list[str], max_positions: int) -> list[object]:
    from kvflow.engine_adapters.calibrate import TRAIN_GRID

    values = {argv[i]: tuple(int(v) for v in argv[i + 1].split(",")) for i in (0, 2, 4)}
    return list(
        dataclasses.replace(
            TRAIN_GRID,
            prefill_tokens=values["--prefill"],
            decode_seqs=values["--decode"],
            context_lens=values["--context"],
        ).mixes(max_positions)
    )
