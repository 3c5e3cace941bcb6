"""The command line refuses, with one `kvflow: error:` line and no traceback, what would
destroy a file or take more memory than the machine has.

A refusal that must hold under a memory limit, or whose command would serve (and never
end) were it lost, runs in a fresh process (`kvflow`); the others run in this process
(`cli`, see tests/cli_run.py), each command keeping a test of its entry point."""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from kvflow.kv.block_pool import BlockPool
from kvflow.kv.capacity import available_ram_bytes
from tests.cli_run import CLI, CLIResult

TIMEOUT_S = 120

LLAMA_CONFIG = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
}
"""A tiny Llama's config.json (no weights: the refusals come before loading them)."""


MAX_ADDRESS_SPACE = 4 * 2**30
"""The CLI runs under this limit of virtual memory: a run that would take gigabytes
fails fast instead of taking the machine's RAM."""


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MAX_ADDRESS_SPACE, MAX_ADDRESS_SPACE))


def kvflow(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`kvflow ARGS` as a user runs it, in a fresh process (this checkout's package)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return subprocess.run(
        [sys.executable, "-m", "kvflow", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=TIMEOUT_S,
        preexec_fn=_limit_memory,
    )


def assert_one_line_error(done: CLIResult, *needles: str) -> str:
    assert done.returncode != 0, done.stdout[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-4000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvflow: error: "), done.stderr[-4000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_replay_refuses_a_disk_path_that_is_a_document_and_leaves_it_intact(
    tmp_path: Path, cli: CLI
) -> None:
    doc = tmp_path / "thesis.txt"
    doc.write_text("three years of work\n")
    done = cli(
        "replay",
        "-p",
        "fcfs",
        "--set",
        "kv.cpu.num_blocks=64",
        "--set",
        "kv.disk.num_blocks=64",
        "--set",
        f"kv.disk.path={doc}",
        cwd=tmp_path,
    )
    assert_one_line_error(done, "kv.disk.path", str(doc))
    assert doc.read_text() == "three years of work\n"


def test_replay_refuses_a_billion_device_blocks_before_allocating(tmp_path: Path) -> None:
    # 10**9, or more where the RAM would hold their bookkeeping (~185 GB).
    n = max(10**9, 4 * available_ram_bytes() // BlockPool.BYTES_PER_BLOCK)
    done = kvflow("replay", "-p", "fcfs", "--set", f"kv.device.num_blocks={n}", cwd=tmp_path)
    line = assert_one_line_error(done, f"kv.device.num_blocks={n}", "RAM available")
    assert "MemoryError" not in line


def test_a_simulated_replay_refuses_a_persistent_disk_tier(tmp_path: Path, cli: CLI) -> None:
    slab = tmp_path / "kv.slab"
    done = cli(
        "replay",
        "-p",
        "fcfs",
        "--set",
        "kv.cpu.num_blocks=64",
        "--set",
        "kv.disk.num_blocks=64",
        "--set",
        f"kv.disk.path={slab}",
        "--set",
        "kv.disk.persist=true",
        cwd=tmp_path,
    )
    assert_one_line_error(done, "kv.disk.persist=true", "the simulator writes no slab")
    assert not slab.exists()


@pytest.mark.parametrize(
    ("config", "needles"),
    [
        ({"model_type": "llama"}, ["'hidden_size'", "missing"]),
        ([1, 2], ["a JSON object", "[1, 2]"]),
        (
            {**LLAMA_CONFIG, "num_attention_heads": 0},
            ["num_attention_heads", "0"],
        ),
        (
            {**LLAMA_CONFIG, "hidden_size": "wide"},
            ["hidden_size", "'wide'"],
        ),
    ],
)
def test_a_model_config_json_with_a_bad_field_is_one_line_naming_the_file_and_field(
    tmp_path: Path, config: object, needles: list[str], cli: CLI
) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(config))
    done = cli("replay", "--engine", "torch", "--model", str(model), "--limit", "1", cwd=tmp_path)
    assert_one_line_error(done, str(model / "config.json"), *needles)


@pytest.mark.parametrize("content", [b"\xff\xfe[gpu.h100]\n", None])
def test_plan_refuses_a_prices_file_that_is_not_toml_text_naming_it(
    tmp_path: Path, content: bytes | None, cli: CLI
) -> None:
    # Not UTF-8, or a device that never ends (read whole, it would fill the RAM: in a
    # fresh process under the memory limit).
    prices = "/dev/zero" if content is None else str(tmp_path / "prices.toml")
    if content is not None:
        Path(prices).write_bytes(content)
    trace = tmp_path / "one.jsonl"
    trace.write_text('{"arrival_s": 0, "output_len": 4, "prompt_len": 16}\n')
    run = kvflow if content is None else cli
    done = run("plan", str(trace), "--ttft-slo-ms", "100", "--prices", prices, cwd=tmp_path)
    assert_one_line_error(done, "prices file", prices)


@pytest.mark.parametrize(
    "key", ["kv.device.size_mib", "kv.cpu.size_mib", "sim.fixed_ms", "kv.transfer.peer_gbps"]
)
@pytest.mark.parametrize("value", ["1e999", "-1e999"])
def test_an_infinite_config_number_is_refused_naming_the_key(
    tmp_path: Path, key: str, value: str, cli: CLI
) -> None:
    # JSON's 1e999 parses as infinity: no size, rate or time is infinite.
    done = cli("replay", "-p", "fcfs", "--limit", "2", "--set", f"{key}={value}", cwd=tmp_path)
    assert_one_line_error(done, f"invalid config: {key}=", "inf")


def test_synth_refuses_more_system_prompts_than_the_ram_holds_before_allocating(
    tmp_path: Path,
) -> None:
    n = max(10**12, available_ram_bytes())  # each prompt's popularity weight takes bytes
    out = tmp_path / "out.jsonl"
    done = kvflow("synth", str(out), "-n", "10", "--system-prompts", str(n), cwd=tmp_path)
    line = assert_one_line_error(done, f"--system-prompts {n}", "RAM available")
    assert "MemoryError" not in line
    assert not out.exists()


def test_synth_refuses_to_overwrite_the_trace_it_samples_lengths_from(
    tmp_path: Path, cli: CLI
) -> None:
    trace = tmp_path / "lengths.jsonl"
    original = '{"arrival_s": 0, "output_len": 4, "prompt_len": 16}\n'
    trace.write_text(original)
    for flag in ("--prompt-len", "--output-len"):
        done = cli("synth", str(trace), "-n", "3", flag, f"trace:{trace}", cwd=tmp_path)
        assert_one_line_error(done, "OUT", str(trace), "refusing to overwrite an input")
        assert trace.read_text() == original


def test_synth_checks_its_destination_before_generating(tmp_path: Path, cli: CLI) -> None:
    done = cli("synth", str(tmp_path), "-n", "3", cwd=tmp_path)
    assert_one_line_error(done, f"OUT {tmp_path}: is a directory")
    done = cli("synth", str(tmp_path / "no" / "t.jsonl"), "-n", "3", cwd=tmp_path)
    assert_one_line_error(done, f"directory {tmp_path / 'no'} does not exist")


@pytest.mark.parametrize("command", [["serve"], ["router", "--instance", "http://127.0.0.1:9"]])
def test_a_port_in_use_is_one_line_naming_it(tmp_path: Path, command: list[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = kvflow(*command, "--port", str(port), cwd=tmp_path)
    assert_one_line_error(done, f"127.0.0.1 --port {port}", "in use")
    assert done.returncode == 2


def test_a_fleet_replay_refuses_instances_whose_bookkeeping_together_passes_the_ram(
    tmp_path: Path,
) -> None:
    # Each instance's pools fit alone; N of them together do not: refused before the
    # first is built (it took ~185 bytes a block until the RAM ran out).
    blocks = 2**20
    each = BlockPool.bytes_needed(blocks)
    n = 2 * available_ram_bytes() // each + 2
    args = ("--set", f"kv.device.num_blocks={blocks}", "--limit", "2", "-p", "fcfs")
    done = kvflow("replay", "--instances", str(n), *args, cwd=tmp_path)
    line = assert_one_line_error(done, f"a fleet of {n} instances needs", "RAM available")
    assert "MemoryError" not in line


def test_cluster_up_refuses_more_instances_than_the_ram_holds_before_starting_any(
    tmp_path: Path,
) -> None:
    # Each `kvflow serve` is a Python process of tens of MiB before its store.
    n = max(100_000, available_ram_bytes() // 2**20)
    state_dir = tmp_path / "state"
    done = kvflow(
        "cluster", "up", "--instances", str(n), "--state-dir", str(state_dir), cwd=tmp_path
    )
    assert_one_line_error(done, f"--instances {n}", "RAM available")
    assert not state_dir.exists()  # nothing started, no log written


def test_a_report_that_cannot_be_written_names_the_flag_and_path(tmp_path: Path, cli: CLI) -> None:
    # /dev/full passes the checks made before the run (a writable file) and fails the
    # write as a full disk does.
    done = cli("replay", "-p", "fcfs", "--limit", "2", "--json", "/dev/full", cwd=tmp_path)
    assert_one_line_error(done, "--json /dev/full", "No space left on device")


@pytest.mark.parametrize("flag", ["--out", "--json"])
def test_calibrate_refuses_to_write_over_its_model_before_timing(
    tmp_path: Path, flag: str, cli: CLI
) -> None:
    model = tmp_path / "model"
    model.mkdir()
    config = model / "config.json"
    config.write_text(json.dumps(LLAMA_CONFIG))
    done = cli(
        "calibrate", "--engine", "torch", "--model", str(model), flag, str(config),
        "--repeat", "1", cwd=tmp_path,
    )  # fmt: skip
    assert_one_line_error(done, f"{flag} {config}", "refusing to overwrite an input")
    assert json.loads(config.read_text()) == LLAMA_CONFIG


def test_calibrate_checks_its_destinations_before_timing(tmp_path: Path, cli: CLI) -> None:
    # A calibration takes minutes: a destination that cannot be written fails first.
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    missing = tmp_path / "no" / "preset.json"
    done = cli(
        "calibrate", "--engine", "torch", "--model", str(model), "--out", str(missing),
        cwd=tmp_path,
    )  # fmt: skip
    assert_one_line_error(done, f"--out {missing}: directory {missing.parent} does not exist")


def test_replay_with_a_model_refuses_to_write_its_report_over_the_model(
    tmp_path: Path, cli: CLI
) -> None:
    model = tmp_path / "model"
    model.mkdir()
    config = model / "config.json"
    config.write_text(json.dumps(LLAMA_CONFIG))
    done = cli(
        "replay", "--engine", "torch", "--model", str(model), "--json", str(config), cwd=tmp_path
    )
    assert_one_line_error(done, f"--json {config}", "refusing to overwrite an input")
    assert json.loads(config.read_text()) == LLAMA_CONFIG


def test_plan_refuses_to_write_its_report_over_the_prices_file(tmp_path: Path, cli: CLI) -> None:
    prices = tmp_path / "prices.toml"
    text = '[gpu.mine]\nprice_per_gpu_hour = 2.0\nsim_preset = "llama3-8b-h100"\n'
    prices.write_text(text)
    trace = tmp_path / "one.jsonl"
    trace.write_text('{"arrival_s": 0, "output_len": 4, "prompt_len": 16}\n')
    done = cli(
        "plan", str(trace), "--ttft-slo-ms", "1000", "--prices", str(prices), "--gpu", "mine",
        "--json", str(prices), "--max-instances", "1", "--jobs", "1", cwd=tmp_path,
    )  # fmt: skip
    assert_one_line_error(done, f"--json {prices}", "refusing to overwrite an input")
    assert prices.read_text() == text


def test_synth_refuses_a_workload_without_a_request(tmp_path: Path, cli: CLI) -> None:
    # A trace of no request is one `kvflow replay` refuses: not a success to write.
    out = tmp_path / "empty.jsonl"
    done = cli("synth", str(out), "-n", "0", cwd=tmp_path)
    assert_one_line_error(done, "-n 0")
    assert not out.exists()


@pytest.mark.parametrize("fleet", [[], ["--instances", "2"]])
def test_a_simulated_replay_refuses_a_model_it_would_ignore(
    tmp_path: Path, fleet: list[str], cli: CLI
) -> None:
    # The user who names a model expects it replayed, not the simulator's preset.
    model = tmp_path / "model"
    model.mkdir()
    done = cli("replay", "--model", str(model), "--limit", "2", "-p", "fcfs", *fleet, cwd=tmp_path)
    assert_one_line_error(done, "--model", "--engine torch|hf")


@pytest.mark.parametrize(
    ("command", "needle"),
    [(["replay"], "--instances"), (["serve", "--engine", "sim"], "one instance")],
)
def test_an_instance_setting_without_a_fleet_is_named(
    tmp_path: Path, command: list[str], needle: str, cli: CLI
) -> None:
    run = kvflow if command[0] == "serve" else cli  # a lost refusal would serve: a process
    done = run(*command, "--set", "instances.1.kv.device.num_blocks=64", cwd=tmp_path)
    assert_one_line_error(done, "--set instances.1.kv.device.num_blocks", needle)


def test_calibrate_threads_below_one_is_refused_naming_it(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    done = kvflow("calibrate", "--model", str(model), "--threads", "0", cwd=tmp_path)
    assert_one_line_error(done, "--threads", "0")


def test_a_step_timeline_that_cannot_be_written_names_trace_events(
    tmp_path: Path, cli: CLI
) -> None:
    # /dev/full takes the open and fails the (buffered) writes as a full disk does.
    done = cli("replay", "-p", "fcfs", "--limit", "2", "--trace-events", "/dev/full", cwd=tmp_path)
    assert_one_line_error(done, "--trace-events /dev/full", "No space left on device")
