"""The command line as a user runs it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvflow.cli import main

RUN_KEYS = [
    "policy", "num_requests", "num_finished", "num_rejected", "ttft_ms", "tpot_ms", "itl_ms",
    "e2e_ms", "throughput_tokens_per_s", "prefix_hit_rate", "num_preemptions",
    "num_leaked_blocks", "sim_steps", "wall_s",
]  # fmt: skip


def test_replay_of_the_bundled_sample_writes_the_documented_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "report.json"
    assert main(["replay", "--policy", "fcfs", "--policy", "lpm", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "fcfs" in table and "lpm" in table and "TTFT ms" in table
    assert "SLOs: trace" in table  # the title says where the SLOs came from
    doc = json.loads(out.read_text())
    assert list(doc) == ["schema_version", "trace", "engine", "runs", "config", "slo"]
    assert doc["schema_version"] == 1
    assert [r["policy"] for r in doc["runs"]] == ["fcfs", "lpm"]
    for run in doc["runs"]:
        assert set(RUN_KEYS) <= set(run)
        for metric in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            assert set(run[metric]) == {"p50", "p90", "p95", "p99", "p999", "mean"}
        assert run["num_finished"] + run["num_rejected"] == run["num_requests"] == 400
        assert run["num_leaked_blocks"] == 0
    assert doc["config"]["kv"]["block_size"] == 16


def test_set_overrides_reach_the_config(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    args = [
        "replay",
        "-p",
        "fcfs",
        "--json",
        str(out),
        "--set",
        "kv.device.num_blocks=300",
        "--set",
        "scheduler.max_num_seqs=8",
        "--set",
        "scheduler.long_prefill_threshold=256",
        "--set",
        "scheduler.max_num_batched_tokens=1024",
        "--set",
        "kv.block_size=32",
    ]
    assert main(args) == 0
    doc = json.loads(out.read_text())
    assert doc["config"]["scheduler"]["max_num_seqs"] == 8
    assert doc["config"]["kv"]["device"]["num_blocks"] == 300
    # 400 requests of >1056 tokens through 8 slots and 300 blocks: it must preempt.
    assert doc["runs"][0]["num_preemptions"] > 0


def test_config_file_and_bad_values_name_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "kv.toml"
    cfg.write_text("[scheduler]\nmax_num_seqs = -3\n")
    assert main(["replay", "-p", "fcfs", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "scheduler.max_num_seqs=-3" in err
    assert main(["replay", "-p", "fcfs", "--set", "kv.block_size=big"]) == 2
    assert "kv.block_size='big'" in capsys.readouterr().err
    assert main(["replay", "-p", "fcfs", "--set", "kv.no_such_key=1"]) == 2
    assert "kv.no_such_key" in capsys.readouterr().err


def test_unknown_policy_lists_the_known_ones(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["replay", "--policy", "no-such-policy"]) == 2
    err = capsys.readouterr().err
    assert "no-such-policy" in err
    for name in ("fcfs", "lpm", "edf", "priority", "fair"):
        assert name in err


def test_malformed_trace_line_names_file_line_and_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = tmp_path / "bad.jsonl"
    trace.write_text(
        '{"arrival_s": 0.0, "prompt_len": 10, "output_len": 4}\n'
        '{"arrival_s": 0.5, "prompt_len": 10, "output_len": "many"}\n'
    )
    assert main(["replay", str(trace), "-p", "fcfs"]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2" in err and "output_len" in err and "many" in err


def test_replay_of_a_user_trace(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "mine.jsonl"
    lines = [
        json.dumps(
            {
                "arrival_s": i * 0.01,
                "prompt_len": 64,
                "prefix_group": "sys",
                "prefix_len": 48,
                "output_len": 8,
            }
        )
        for i in range(20)
    ]
    trace.write_text("\n".join(lines) + "\n")
    out = tmp_path / "r.json"
    assert main(["replay", str(trace), "-p", "lpm", "--json", str(out), "--check-integrity"]) == 0
    run = json.loads(out.read_text())["runs"][0]
    assert run["num_finished"] == 20
    # 19 of 20 requests hit the 48-token (3-block) shared prefix.
    assert run["prefix_hit_rate"] == pytest.approx(19 * 48 / (20 * 64))


def test_replay_and_calibrate_take_the_same_model_flags() -> None:
    from kvflow.cli import build_parser
    from kvflow.cli.options import DTYPES
    from kvflow.engine_adapters.torch.spec import DTYPES as TORCH_DTYPES

    parser = build_parser()
    for command in ("replay", "calibrate"):
        args = parser.parse_args([command, "--model", "m", "--dtype", "float16"])
        assert (args.model, args.dtype) == ("m", "float16")
    assert sorted(DTYPES) == sorted(TORCH_DTYPES)
    assert parser.parse_args(["replay"]).model is None  # the simulator needs no model
    with pytest.raises(SystemExit):
        parser.parse_args(["calibrate"])


def test_policies_lists_builtins(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policies"]) == 0
    out = capsys.readouterr().out
    for name in ("fcfs", "lpm", "edf", "priority", "fair"):
        assert name in out
