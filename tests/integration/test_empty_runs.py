"""No run is silently empty: a trace or shaping step that leaves no request, a config
under which no request can be served, and an output that cannot be written (or would
overwrite an input) each end with one `kvflow: ...` line and a non-zero exit, never a
traceback or an empty table with exit code 0.

Most run in this process (`cli`, see tests/cli_run.py); the replay's and the sweep's first
refusals run in a fresh process (`kvflow`), as a user runs them."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvflow.traces import bundled_sample_path
from tests.cli_run import CLI, CLIResult


def kvflow(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The real command line, in a fresh process (so a traceback would show on stderr)."""
    return subprocess.run(
        [sys.executable, "-m", "kvflow", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ),
        cwd=cwd,
    )


def error_line(out: CLIResult, prefix: str = "kvflow: error: ") -> str:
    """The one `kvflow: error: ...` line; fails on a traceback or on no such line."""
    assert "Traceback" not in out.stderr, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, out.stderr
    return lines[0]


def write_trace(path: Path, num_requests: int = 4) -> Path:
    lines = [
        json.dumps({"arrival_s": 0.1 * i, "prompt_len": 40, "output_len": 4})
        for i in range(num_requests)
    ]
    path.write_text("".join(line + "\n" for line in lines))
    return path


# -- nothing to replay -------------------------------------------------------------------
def test_an_empty_trace_file_is_an_error_naming_it(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = kvflow("replay", str(empty), "-p", "fcfs")
    assert out.returncode == 2
    line = error_line(out)
    assert str(empty) in line and "no requests" in line
    assert "policy" not in out.stdout  # no table


def test_limit_zero_is_an_error(tmp_path: Path, cli: CLI) -> None:
    out = cli("replay", str(write_trace(tmp_path / "t.jsonl")), "--limit", "0")
    assert out.returncode == 2
    assert "--limit 0 leaves no requests" in error_line(out)


def test_a_window_past_the_end_is_an_error_saying_where_the_trace_ends(
    tmp_path: Path, cli: CLI
) -> None:
    trace = write_trace(tmp_path / "t.jsonl", num_requests=4)  # arrivals 0 .. 0.3 s
    out = cli("replay", str(trace), "--window", "100:200")
    assert out.returncode == 2
    line = error_line(out)
    assert "--window 100:200 leaves no requests" in line and "0.3 s" in line


def test_the_sweep_refuses_an_empty_window_too(tmp_path: Path) -> None:
    trace = write_trace(tmp_path / "t.jsonl")
    out = kvflow("sweep", str(trace), "--rate", "1,2", "--window", "100:", "--jobs", "1")
    assert out.returncode == 2
    assert "--window 100: leaves no requests" in error_line(out)


@pytest.mark.parametrize(
    ("flag", "value", "named"),
    [
        ("--rate", "1e-300", "rate 1e-300 requests/s"),
        ("--rate", "1e-308", "rate 1e-308 requests/s"),
        ("--time-scale", "1e300", "time scale 1e+300"),
    ],
)
def test_a_rate_or_time_scale_that_loses_virtual_time_is_an_error(
    flag: str, value: str, named: str, tmp_path: Path, cli: CLI
) -> None:
    # Arrivals stretched past ~10^300 s: a step of milliseconds added to them is lost to
    # rounding, so every latency would read 0.0 ms.
    out = cli("replay", str(write_trace(tmp_path / "t.jsonl")), flag, value)
    assert out.returncode == 2
    line = error_line(out)
    assert named in line and "resolution" in line


# -- nothing can be served ----------------------------------------------------------------
def smallest_request_blocks(trace: Path, block_size: int = 16) -> tuple[int, int]:
    """(requests, blocks the smallest one needs) of a native trace with prompt_len."""
    needs = []
    for line in trace.read_text().splitlines():
        record = json.loads(line)
        if "arrival_s" in record:
            needs.append(math.ceil((record["prompt_len"] + record["output_len"]) / block_size))
    return len(needs), min(needs)


def test_a_device_tier_smaller_than_any_request_fails_with_the_reason(
    tmp_path: Path, cli: CLI
) -> None:
    report = tmp_path / "r.json"
    out = cli("replay", "-p", "fcfs", "--set", "kv.device.num_blocks=1", "--json", str(report))
    assert out.returncode == 1
    num_requests, min_blocks = smallest_request_blocks(bundled_sample_path())
    line = error_line(out)
    assert "fcfs" in line
    assert (
        f"all {num_requests} requests rejected: each needs >= {min_blocks} blocks of 16 "
        "tokens, the device tier holds 1"
    ) in line
    # The run's figures are still reported, with latencies of no request as null / '-'.
    run = json.loads(report.read_text())["runs"][0]
    assert run["num_finished"] == 0 and run["num_rejected"] == num_requests
    for metric in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms", "queue_ms", "kv_wait_ms"):
        assert set(run[metric].values()) == {None}, metric
    for tenant in run["per_tenant"].values():
        assert set(tenant["ttft_ms"].values()) == {None}
    row = next(line for line in out.stdout.splitlines() if "fcfs" in line)
    assert "0.0 /" not in row and " - " in row


def test_max_model_len_below_every_request_fails_with_the_reason(tmp_path: Path, cli: CLI) -> None:
    out = cli(
        "replay",
        str(write_trace(tmp_path / "t.jsonl")),
        "-p",
        "lpm",
        "--set",
        "scheduler.max_model_len=10",
    )
    assert out.returncode == 1
    line = error_line(out)
    assert "all 4 requests rejected: each has >= 44 tokens" in line
    assert "scheduler.max_model_len is 10" in line


def test_a_policy_that_rejects_every_request_fails_quoting_its_first_reason(
    tmp_path: Path, cli: CLI
) -> None:
    # EDF set to reject hopeless requests, under a TTFT objective no prefill can meet.
    trace = str(write_trace(tmp_path / "t.jsonl"))
    settings = ["--set", "policies.edf.hopeless=reject", "--ttft-slo-ms", "0.001"]
    out = cli("replay", trace, "-p", "edf", *settings)
    assert out.returncode == 1
    line = error_line(out)
    assert line.startswith("kvflow: error: no request served by edf: all 4 requests rejected;")
    assert "cannot be met" in line  # the policy's own reason, quoted


def test_a_sweep_whose_points_serve_nothing_fails_with_the_reason(tmp_path: Path, cli: CLI) -> None:
    report = tmp_path / "sweep.json"
    trace = str(write_trace(tmp_path / "t.jsonl"))  # 4 requests of 44 tokens: 3 blocks
    args = ["sweep", trace, "-p", "fcfs", "--rate", "1,2", "--jobs", "1", "--json", str(report)]
    out = cli(*args, "--set", "kv.device.num_blocks=2")
    assert out.returncode == 1
    line = error_line(out)
    assert line == (
        "kvflow: error: no request served by fcfs at 1, 2 req/s: all 4 requests rejected: "
        "each needs >= 3 blocks of 16 tokens, the device tier holds 2"
    )
    points = json.loads(report.read_text())["sweep"]
    assert [p["num_finished"] for p in points] == [0, 0]
    assert points[0]["ttft_ms"]["p50"] is None


def test_a_run_that_serves_some_requests_succeeds(tmp_path: Path, cli: CLI) -> None:
    out = cli("replay", str(write_trace(tmp_path / "t.jsonl")), "-p", "fcfs")
    assert out.returncode == 0, out.stderr
    assert "kvflow: error" not in out.stderr


# -- outputs checked before the run --------------------------------------------------------
@pytest.mark.parametrize("flag", ["--json", "--trace-events"])
def test_an_output_in_a_missing_directory_fails_before_the_run(
    flag: str, tmp_path: Path, cli: CLI
) -> None:
    dest = tmp_path / "no-such-dir" / "out.json"
    out = cli("replay", "-p", "fcfs", flag, str(dest))
    assert out.returncode == 2
    line = error_line(out)
    assert flag in line and str(dest.parent) in line and "does not exist" in line
    assert "policy" not in out.stdout  # nothing was replayed


@pytest.mark.parametrize("flag", ["--json", "--trace-events"])
def test_an_output_that_is_a_directory_is_refused(flag: str, tmp_path: Path, cli: CLI) -> None:
    out = cli("replay", "-p", "fcfs", flag, str(tmp_path))
    assert out.returncode == 2
    line = error_line(out)
    assert flag in line and "is a directory" in line
    assert "policy" not in out.stdout


def test_a_plot_directory_that_is_a_file_is_refused(tmp_path: Path, cli: CLI) -> None:
    pytest.importorskip("matplotlib")
    a_file = tmp_path / "plots"
    a_file.write_text("mine\n")
    out = cli("replay", "-p", "fcfs", "--plot", str(a_file))
    assert out.returncode == 2
    line = error_line(out)
    assert "--plot" in line and "not a directory" in line
    assert a_file.read_text() == "mine\n"


@pytest.mark.parametrize("flag", ["--json", "--trace-events"])
def test_an_output_equal_to_the_trace_is_refused_and_the_trace_kept(
    flag: str, tmp_path: Path, cli: CLI
) -> None:
    trace = write_trace(tmp_path / "t.jsonl")
    before = trace.read_text()
    (tmp_path / "sub").mkdir()
    # The same file by another spelling: resolved paths are compared.
    other_spelling = tmp_path / "sub" / ".." / "t.jsonl"
    out = cli("replay", str(trace), "-p", "fcfs", flag, str(other_spelling))
    assert out.returncode == 2
    line = error_line(out)
    assert flag in line and "the trace" in line
    assert trace.read_text() == before


def test_an_output_hard_linked_to_the_config_is_refused(tmp_path: Path, cli: CLI) -> None:
    config = tmp_path / "c.json"
    config.write_text('{"scheduler": {"max_num_seqs": 8}}\n')
    link = tmp_path / "report.json"
    os.link(config, link)
    out = cli("replay", "-p", "fcfs", "--config", str(config), "--json", str(link))
    assert out.returncode == 2
    assert "the config file" in error_line(out)
    assert config.read_text() == '{"scheduler": {"max_num_seqs": 8}}\n'


def test_two_outputs_to_one_file_are_refused(tmp_path: Path, cli: CLI) -> None:
    dest = tmp_path / "out.json"
    out = cli("replay", "-p", "fcfs", "--json", str(dest), "--trace-events", str(dest))
    assert out.returncode == 2
    line = error_line(out)
    assert "--json" in line and "--trace-events" in line
    assert not dest.exists()


def test_the_sweep_refuses_a_json_report_over_its_trace(tmp_path: Path, cli: CLI) -> None:
    trace = write_trace(tmp_path / "t.jsonl")
    before = trace.read_text()
    out = cli("sweep", str(trace), "--rate", "1", "--jobs", "1", "--json", str(trace))
    assert out.returncode == 2
    assert "the trace" in error_line(out)
    assert trace.read_text() == before
